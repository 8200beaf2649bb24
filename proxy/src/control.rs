//! Operator mode: `tollgate-proxy run --operator URL --agent NS/NAME --token-file F`.
//!
//! The sidecar long-polls the operator's snapshot API with its projected ServiceAccount
//! token, merges each snapshot (identity, tools, tenants, policies, kill switches, approval
//! grants) over its local settings (listeners, audit, limits, TLS), validates it like a file
//! config, and swaps it in atomically. Every answer, new snapshot or heartbeat, confirms
//! freshness; when the operator is unreachable the last good snapshot keeps serving until it
//! is older than `agent.maxStaleness`, after which calls fail closed with 503 `config_stale`
//! (unless `agent.failOpen`). A snapshot that does not validate is rejected whole: logged,
//! counted in `tollgate_config_reload_errors_total`, and the last good one stays.

use crate::config::Config;
use crate::snapshot::Snapshot;
use crate::state::ProxyState;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where the operator is and who this sidecar is.
#[derive(Clone, Debug)]
pub struct ControlArgs {
    /// Operator base URL, e.g. `http://tollgate-operator.tollgate-system.svc:8080`.
    pub url: String,
    /// `namespace/name` of the AgentIdentity.
    pub agent: String,
    /// Projected ServiceAccount token (audience `tollgate`); re-read on every request, since
    /// the kubelet rotates it.
    pub token_file: PathBuf,
    /// Long-poll timeout asked of the operator.
    pub poll_timeout: Duration,
}

/// Merge an operator snapshot over the sidecar's local config.
pub fn merge(base: &Config, op: Config) -> Config {
    let mut c = base.clone();
    c.agent = op.agent;
    c.tools = op.tools;
    c.tenants = op.tenants;
    c.policies = op.policies;
    c.kill_switches = op.kill_switches;
    c.approvals.granted = op.approvals.granted;
    c.approvals.ttl = op.approvals.ttl;
    c.approvals.single_use = op.approvals.single_use;
    c.approvals.max_wait_s = op.approvals.max_wait_s;
    c
}

/// Poll the operator forever, installing snapshots into `state`.
pub async fn poll(state: Arc<ProxyState>, base: Config, base_dir: PathBuf, args: ControlArgs) {
    let mut version = 0u64;
    let mut hash = String::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        // Heartbeats must come well within maxStaleness, or a quiet operator would look dead.
        let staleness = state
            .snapshot
            .load()
            .as_ref()
            .map(|s| ProxyState::max_staleness(s))
            .unwrap_or(Duration::from_secs(60));
        let timeout = args
            .poll_timeout
            .min(staleness / 3)
            .max(Duration::from_secs(1));
        match fetch(&state, &args, version, &hash, timeout).await {
            Ok(Answer::Unchanged) => {
                state.freshness.confirm();
                backoff = Duration::from_millis(100);
            }
            Ok(Answer::Snapshot(v, h, op)) => {
                state.freshness.confirm();
                backoff = Duration::from_millis(100);
                version = v;
                hash = h;
                match install(&state, &base, &base_dir, *op, v) {
                    Ok(()) => {
                        tracing::info!(version = v, agent = %args.agent, "operator snapshot installed")
                    }
                    Err(e) => {
                        state.metrics.reload_errors.inc();
                        tracing::error!(version = v, error = %e, "operator snapshot rejected; keeping the last good one");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, url = %args.url, "operator unreachable; serving the last good snapshot");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

enum Answer {
    Unchanged,
    Snapshot(u64, String, Box<Config>),
}

fn install(
    state: &ProxyState,
    base: &Config,
    base_dir: &Path,
    op: Config,
    version: u64,
) -> Result<(), String> {
    let merged = merge(base, op);
    let snap = Snapshot::build(merged, version, base_dir).map_err(|e| e.to_string())?;
    state.install(Arc::new(snap));
    Ok(())
}

async fn fetch(
    state: &ProxyState,
    args: &ControlArgs,
    version: u64,
    hash: &str,
    timeout: Duration,
) -> Result<Answer, String> {
    let token = std::fs::read_to_string(&args.token_file)
        .map_err(|e| format!("token file {}: {e}", args.token_file.display()))?;
    let url = format!(
        "{}/v1/snapshot?agent={}&version={version}&hash={hash}&timeoutSeconds={}",
        args.url.trim_end_matches('/'),
        args.agent,
        timeout.as_secs().max(1)
    );
    let req = http::Request::get(&url)
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", token.trim()),
        )
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let wait = timeout + Duration::from_secs(10);
    let res = state
        .upstreams
        .send(req, Duration::from_secs(2), wait)
        .await
        .map_err(|e| e.to_string())?;
    let status = res.status();
    let body = tokio::time::timeout(wait, res.into_body().collect())
        .await
        .map_err(|_| "snapshot body timed out".to_string())?
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!(
            "operator answered {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    if v["unchanged"] == true {
        return Ok(Answer::Unchanged);
    }
    let new_version = v["version"].as_u64().unwrap_or(0);
    let new_hash = v["hash"].as_str().unwrap_or("").to_string();
    let config: Config = serde_json::from_value(v["config"].clone())
        .map_err(|e| format!("snapshot does not parse: {e}"))?;
    Ok(Answer::Snapshot(new_version, new_hash, Box::new(config)))
}

/// Ask the operator to create an `ApprovalRequest` for a held call (fire and forget: the agent
/// already has its 403 `approval_required` with the request name; a failure is logged).
pub fn report_approval(
    args: &ControlArgs,
    req: &crate::approval::ApprovalRequest,
    upstreams: &crate::upstream::Upstreams,
) {
    let (args, upstreams) = (args.clone(), upstreams.clone());
    let body = serde_json::json!({
        "id": req.id,
        "key": req.key,
        "agent": args.agent,
        "tenant": req.summary.tenant,
        "run": req.summary.run,
        "tool": req.summary.tool,
        "summary": format!("{} ({})", req.summary.target, req.summary.reasons.join("; ")),
        "reasons": req.summary.reasons,
        "inputPreview": req.summary.input_preview,
        "expiresAt": req.expires_at,
    });
    tokio::spawn(async move {
        let token = match std::fs::read_to_string(&args.token_file) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the token to report an approval request");
                return;
            }
        };
        let url = format!("{}/v1/approvals", args.url.trim_end_matches('/'));
        let Ok(request) = http::Request::post(&url)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
        else {
            return;
        };
        match upstreams
            .send(request, Duration::from_secs(2), Duration::from_secs(10))
            .await
        {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => tracing::error!(status = %r.status(), "operator refused the approval request"),
            Err(e) => tracing::error!(error = %e, "approval request not delivered to the operator"),
        }
    });
}

/// Report this sidecar's spend today to the operator every `every` (it shows in the
/// `AgentIdentity` and `Tenant` status).
pub async fn report_usage(state: Arc<ProxyState>, args: ControlArgs, every: Duration) {
    let instance = format!("{:016x}", rand::random::<u64>());
    loop {
        tokio::time::sleep(every).await;
        let (day, by_tenant) = state.spend_today.lock().expect("spend lock").clone();
        if day.is_empty() {
            continue;
        }
        let Ok(token) = std::fs::read_to_string(&args.token_file) else {
            continue;
        };
        let body = serde_json::json!({"agent": args.agent, "instance": instance, "day": day, "spendUsd": by_tenant});
        let url = format!("{}/v1/usage", args.url.trim_end_matches('/'));
        let Ok(request) = http::Request::post(&url)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
        else {
            continue;
        };
        if let Err(e) = state
            .upstreams
            .send(request, Duration::from_secs(2), Duration::from_secs(5))
            .await
        {
            tracing::debug!(error = %e, "usage report not delivered");
        }
    }
}
