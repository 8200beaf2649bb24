//! Tunnels decided before any request inside them (CONNECT, transparent): the host-level
//! stages only — tenant, kill switch — through the same [`Call`] and [`super::finish`] as
//! every other call, so a refused or passed-through tunnel is counted and recorded exactly
//! like a call.

use super::call::Call;
use super::finish::{self, Outcome};
use crate::audit::Phase;
use crate::body::ResBody;
use crate::intercept::Tunnel;
use crate::refusal::{Decision, Refusal};
use crate::snapshot::Snapshot;
use crate::state::ProxyState;
use crate::target::Target;
use http::Response;
use std::sync::Arc;

/// The target a tunnel stands for, before any request inside it.
pub(super) fn tunnel_target(t: &Tunnel, method: http::Method) -> Target {
    Target {
        scheme: t.scheme,
        host: t.host.clone(),
        port: t.port,
        method,
        path: String::new(),
        query: None,
        via: t.via,
    }
}

fn tunnel_call(
    state: &Arc<ProxyState>,
    snap: &Arc<Snapshot>,
    tunnel: &Tunnel,
    tenant: String,
    run: String,
) -> Call {
    let mut call = Call::new(state.clone(), snap.clone(), run);
    call.target = Some(tunnel_target(tunnel, http::Method::CONNECT));
    call.tenant = tenant;
    call.stage = "tunnel";
    call
}

/// Refuse a tunnel before any request inside it (a CONNECT or transparent connection to a
/// host no tool serves, a bad ClientHello): recorded and counted like any refused call, and
/// counted in `tollgate_tunnels_refused_total{via,reason}`.
pub(crate) async fn refuse_tunnel(
    state: &Arc<ProxyState>,
    snap: &Arc<Snapshot>,
    tunnel: &Tunnel,
    tenant: String,
    r: Refusal,
) -> Response<ResBody> {
    state
        .metrics
        .tunnels_refused
        .with_label_values(&[tunnel.via.as_str(), r.code()])
        .inc();
    tracing::warn!(via = tunnel.via.as_str(), host = %tunnel.host, port = tunnel.port, reason = %r.reasons().join("; "), "tunnel refused");
    let run = crate::identify::mint(&snap.agent.runs);
    let call = tunnel_call(state, snap, tunnel, tenant, run);
    finish::finish(call, Outcome::Refused(r)).await
}

/// The host-level stages of a TLS passthrough tunnel (tenant, kill switch), then its record
/// before it opens, marked as passthrough. A refusal is returned for the caller to answer
/// with [`refuse_tunnel`].
pub(crate) async fn record_passthrough(
    state: &Arc<ProxyState>,
    snap: &Arc<Snapshot>,
    tunnel: &Tunnel,
    tenant: String,
    run: String,
    tool: usize,
) -> Result<(), Refusal> {
    crate::killswitch::check(snap, &tenant, snap.tools[tool].name())?;
    let mut call = tunnel_call(state, snap, tunnel, tenant, run);
    call.routed = Some(tool);
    let reasons =
        vec!["TLS passthrough: the tunnel is not decrypted; host-level policy only".into()];
    let mut recs = call.records(Phase::Decision, Decision::Allow, &reasons, 200);
    for r in &mut recs {
        r.passthrough = true;
    }
    call.finished = true;
    finish::durable(&call, recs).await?;
    call.count(Decision::Allow);
    Ok(())
}
