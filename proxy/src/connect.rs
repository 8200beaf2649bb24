//! `CONNECT host:port` on the proxy listener. A CONNECT to a host or port no tool uses is
//! refused before any TLS. TLS interception (terminating with a minted leaf and running the
//! decrypted requests through the pipeline) needs `tls.intercept`; without it every CONNECT is
//! refused, because an opaque tunnel would carry calls no policy saw.

use crate::pipeline::refusal_response;
use crate::refusal::Refusal;
use crate::state::ProxyState;
use crate::target::{parse_authority, Scheme};
use crate::upstream::ResBody;
use hyper::body::Incoming;
use std::sync::Arc;

/// Handle a CONNECT request.
pub async fn handle_connect(
    state: Arc<ProxyState>,
    req: hyper::Request<Incoming>,
) -> hyper::Response<ResBody> {
    let run = crate::identify::new_run_id();
    let Some(snap) = state.snapshot.load_full() else {
        return refusal_response(
            &Refusal::Unavailable {
                code: "config_unavailable",
                reason: "no configuration loaded".into(),
            },
            None,
            &run,
            None,
        );
    };
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let (host, port) = match parse_authority(&authority, Scheme::Https) {
        Ok(hp) if authority.contains(':') => hp,
        _ => {
            return refusal_response(
                &Refusal::BadRequest(format!("CONNECT target {authority:?} must be host:port")),
                None,
                &run,
                None,
            )
        }
    };
    let allowed_ports = if snap.raw.server.connect_ports.is_empty() {
        vec![443]
    } else {
        snap.raw.server.connect_ports.clone()
    };
    if !allowed_ports.contains(&port) || !snap.catalog.host_known(&host, port, Scheme::Https) {
        return refusal_response(
            &Refusal::ConnectNotAllowed(format!(
                "CONNECT {host}:{port} matches none of this agent's tools"
            )),
            None,
            &run,
            None,
        );
    }
    refusal_response(
        &Refusal::ConnectNotAllowed(format!("CONNECT {host}:{port}: TLS interception is not configured (set tls.intercept), so the tunnel would bypass policy")),
        None,
        &run,
        None,
    )
}
