//! TLS passthrough: the host-level gate and the upstream connection that CONNECT passthrough
//! ([`crate::intercept::connect`]) and transparent passthrough ([`crate::intercept::tunnel`]) share.
//!
//! A passthrough tunnel is never decrypted, so only what is known before any byte of it is
//! forwarded can be decided: the tenant, the kill switches of every tool the host serves, and
//! the host itself. The upstream is always the tool host dialled *by name* (resolved by the
//! sidecar, on the tunnel's port), never an address the agent chose: in transparent mode the
//! packet's original destination is only where the agent *sent* the bytes, and the SNI is what
//! the policy decided about.

use crate::refusal::Refusal;
use crate::snapshot::Snapshot;
use crate::target::Scheme;
use std::time::Duration;
use tokio::net::TcpStream;

/// The host-level gate of a passthrough tunnel to `host:port`, whose tools are all
/// `passthrough` (`tool` is the one the record names).
///
/// `tenant` is what the tunnel's opener established (the CONNECT's `X-Tollgate-Tenant`, or
/// [`transparent_tenant`]); a refusal there is returned first. Then every engaged kill switch
/// that covers any tool served on the host refuses the tunnel, since an opaque tunnel can carry
/// a call to any of them. Returns the tenant the tunnel is recorded under.
pub fn host_gate(
    snap: &Snapshot,
    tenant: Result<String, Refusal>,
    host: &str,
    port: u16,
) -> Result<String, Refusal> {
    let tenant = tenant?;
    for i in snap.catalog.tools_on(host, port, Scheme::Https) {
        crate::killswitch::check(snap, &tenant, snap.tools[i].name())?;
    }
    Ok(tenant)
}

/// The tenant of a transparent passthrough tunnel. Nothing in an opaque TLS connection can
/// name one, so an agent that serves exactly one tenant uses it; an agent with several is
/// refused rather than guessed.
pub fn transparent_tenant(snap: &Snapshot) -> Result<String, Refusal> {
    match snap.agent.tenants.as_slice() {
        [only] => Ok(only.clone()),
        many => Err(Refusal::TenantNotAllowed(format!(
            "a transparent TLS passthrough tunnel carries no X-Tollgate-Tenant, and agent {} serves {} tenants ({}); use CONNECT (HTTPS_PROXY) with the tenant header, or intercept the host",
            snap.agent.name,
            many.len(),
            many.join(", ")
        ))),
    }
}

/// Dial the tool host by name on `port`, within the tool's connect timeout.
pub async fn connect_tool_host(
    snap: &Snapshot,
    tool: usize,
    host: &str,
    port: u16,
) -> Result<TcpStream, Refusal> {
    let limit = snap.tools[tool]
        .connect_timeout
        .max(Duration::from_millis(100));
    // An IP literal in brackets (from an authority) is dialled as the bare address.
    let name = host.trim_start_matches('[').trim_end_matches(']');
    match tokio::time::timeout(limit, TcpStream::connect((name, port))).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(Refusal::UpstreamFailed(format!("{host}:{port}: {e}"))),
        Err(_) => Err(Refusal::UpstreamTimeout(format!(
            "{host}:{port} did not accept the connection in time"
        ))),
    }
}
