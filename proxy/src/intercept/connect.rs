//! `CONNECT host:port` on the proxy listener (`HTTPS_PROXY` clients).
//!
//! A CONNECT to a port outside `server.connectPorts` or to a host no tool serves is refused
//! with 403 before any TLS. Otherwise the tunnel is accepted and its TLS intercepted (see
//! [`crate::intercept::tunnel`]): the SNI must agree with the CONNECT host, and every decrypted request
//! runs the ordinary pipeline. Without `tls.intercept` the CONNECT is refused, since an opaque
//! tunnel would carry calls no policy saw. A host whose tools are all `passthrough` gets an
//! opaque tunnel after host-level checks (tenant, kill switch), recorded as passthrough.

use crate::body::ResBody;
use crate::intercept::conn::ConnLimits;
use crate::intercept::tunnel::{self, Expect};
use crate::intercept::Tunnel;
use crate::pipeline;
use crate::refusal::render as refusal_response;
use crate::refusal::Refusal;
use crate::state::ProxyState;
use crate::target::{parse_authority, Scheme, Via};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::sync::Arc;

/// Handle a CONNECT request.
pub async fn handle_connect(
    state: Arc<ProxyState>,
    mut req: hyper::Request<Incoming>,
) -> hyper::Response<ResBody> {
    let Some(snap) = state.snapshot.load_full() else {
        return refusal_response(
            &Refusal::Unavailable {
                code: "config_unavailable",
                reason: "no configuration loaded".into(),
            },
            None,
            "",
            None,
        );
    };
    let run = crate::identify::mint(&snap.agent.runs);
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let (host, port) = match parse_authority(&authority, Scheme::Https) {
        Ok(hp) if authority.contains(':') && !authority.contains('@') => hp,
        _ => {
            return refusal_response(
                &Refusal::BadRequest(format!("CONNECT target {authority:?} must be host:port")),
                None,
                &run,
                None,
            )
        }
    };
    let tunnel = Tunnel {
        scheme: Scheme::Https,
        host: host.clone(),
        port,
        via: Via::Connect,
    };
    // The tenant is read again from every decrypted request; here it labels the tunnel's
    // own records and gates passthrough.
    let tenant = crate::identify::tenant(req.headers(), &snap);
    let label = tenant.clone().unwrap_or_default();
    let allowed_ports = &snap.server.connect_ports;
    let refuse = |r: Refusal| {
        let state = state.clone();
        let snap = snap.clone();
        let tunnel = tunnel.clone();
        let label = label.clone();
        async move { pipeline::refuse_tunnel(&state, &snap, &tunnel, label, r).await }
    };
    if !allowed_ports.contains(&port) {
        return refuse(Refusal::ConnectNotAllowed(format!(
            "CONNECT to port {port} is not allowed (server.connectPorts: {allowed_ports:?})"
        )))
        .await;
    }
    if !snap.catalog.host_known(&host, port, Scheme::Https) {
        return refuse(Refusal::ConnectNotAllowed(format!(
            "CONNECT {host}:{port} matches none of this agent's tools"
        )))
        .await;
    }
    let limits = ConnLimits::from_config(&snap.server.connection);
    if let Some(tool) = tunnel::passthrough_tool(&snap, &host, port) {
        let tenant = match crate::intercept::passthrough::host_gate(&snap, tenant, &host, port) {
            Ok(t) => t,
            Err(r) => return refuse(r).await,
        };
        let mut up = match crate::intercept::passthrough::connect_tool_host(
            &snap, tool, &host, port,
        )
        .await
        {
            Ok(s) => s,
            Err(r) => return refuse(r).await,
        };
        if let Err(r) =
            pipeline::record_passthrough(&state, &snap, &tunnel, tenant, run.clone(), tool).await
        {
            return refuse(r).await;
        }
        tokio::spawn(async move {
            match hyper::upgrade::on(&mut req).await {
                Ok(upgraded) => {
                    let mut io = TokioIo::new(upgraded);
                    let _ = tokio::io::copy_bidirectional(&mut io, &mut up).await;
                }
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        });
        return established(&run);
    }
    if snap.intercept.is_none() {
        return refuse(Refusal::ConnectNotAllowed(format!(
            "CONNECT {host}:{port}: TLS interception is not configured (set tls.intercept), so the tunnel would bypass policy"
        )))
        .await;
    }
    tokio::spawn(async move {
        match hyper::upgrade::on(&mut req).await {
            Ok(upgraded) => {
                let expect = Expect::Connect { host, port };
                tunnel::serve_tls(state, snap, TokioIo::new(upgraded), expect, label, limits).await
            }
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    established(&run)
}

fn established(run: &str) -> hyper::Response<ResBody> {
    let mut res = hyper::Response::new(crate::body::full(bytes::Bytes::new()));
    if let Ok(v) = http::HeaderValue::from_str(run) {
        res.headers_mut().insert(crate::identify::RUN_HEADER, v);
    }
    res
}
