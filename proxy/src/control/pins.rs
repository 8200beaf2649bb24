//! The sidecar's report of what its MCP servers advertise, to the operator
//! (`POST /v1/tools/observed`), which keeps it in each `Tool`'s status.

use crate::pins::Observed;
use serde_json::{json, Value};

/// Report the definitions this sidecar saw advertised to the operator
/// (`POST /v1/tools/observed`): at once when one changes, and again every `every` (an operator
/// that restarted, or a lost report, catches up). The operator sets each `Tool`'s
/// `DefinitionPinned` condition and `observedDefinition` from it. Best effort: enforcement is
/// here, in the sidecar, whether or not the report arrives.
pub(crate) async fn report(
    state: std::sync::Arc<crate::state::ProxyState>,
    args: crate::state::ControlArgs,
    every: std::time::Duration,
) {
    let instance = format!("{:016x}", rand::random::<u64>());
    let mut changes = state.tool_definitions.subscribe();
    loop {
        changes.borrow_and_update();
        let all = state.tool_definitions.all();
        if !all.is_empty() {
            send_report(&state, &args, &instance, all).await;
        }
        let _ = tokio::time::timeout(every, changes.changed()).await;
    }
}

/// One report of every observation.
async fn send_report(
    state: &crate::state::ProxyState,
    args: &crate::state::ControlArgs,
    instance: &str,
    all: Vec<(String, Observed)>,
) {
    let tools: serde_json::Map<String, Value> = all
        .into_iter()
        .map(|(name, o)| {
            (
                name,
                json!({"sha256": o.sha256, "definition": o.definition, "observedAt": o.at}),
            )
        })
        .collect();
    let body = json!({"agent": args.agent, "instance": instance, "tools": tools});
    let request = match crate::control::operator_post(args, "/v1/tools/observed", &body) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "tool definition report not sent");
            return;
        }
    };
    let t = std::time::Duration::from_secs(5);
    match state.upstreams.send(request, t / 2, t).await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => {
            tracing::warn!(status = %r.status(), "operator refused the tool definition report")
        }
        Err(e) => tracing::debug!(error = %e, "tool definition report not delivered"),
    }
}
