//! The admin listener: `/metrics`, `/healthz`, `/readyz` (ready once a valid config is
//! loaded), `/config` (version and hash, never secrets).

use crate::state::ProxyState;
use crate::upstream::{full, ResBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serve the admin listener until shutdown.
pub async fn serve_admin(
    listener: TcpListener,
    state: Arc<ProxyState>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            _ = shutdown.cancelled() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(status: u16, ct: &'static str, body: impl Into<bytes::Bytes>) -> hyper::Response<ResBody> {
    let mut r = hyper::Response::new(full(body));
    *r.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ct),
    );
    r
}

async fn route(state: &ProxyState, req: hyper::Request<Incoming>) -> hyper::Response<ResBody> {
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/metrics") => {
            state.refresh_gauges();
            text(200, "text/plain; version=0.0.4", state.metrics.render())
        }
        ("GET", "/healthz") => text(200, "text/plain", "ok\n"),
        ("GET", "/readyz") => match &*state.snapshot.load() {
            Some(_) => text(200, "text/plain", "ready\n"),
            None => text(503, "text/plain", "no valid configuration loaded\n"),
        },
        ("GET", "/config") => match &*state.snapshot.load() {
            Some(s) => {
                let body = serde_json::json!({
                    "version": s.version,
                    "hash": s.hash,
                    "policyBundle": s.policy.hash(),
                    "agent": s.agent.name,
                    "namespace": s.agent.namespace,
                    "mode": s.agent.mode.as_str(),
                    "tools": s.tools.iter().map(|t| t.name()).collect::<Vec<_>>(),
                    "killSwitchesEngaged": s.kill_switches.iter().map(|k| &k.name).collect::<Vec<_>>(),
                    "ageSeconds": state.freshness.age().as_secs_f64(),
                });
                text(
                    200,
                    "application/json",
                    serde_json::to_vec(&body).unwrap_or_default(),
                )
            }
            None => text(503, "application/json", r#"{"error":"config_unavailable"}"#),
        },
        _ => text(
            404,
            "application/json",
            r#"{"error":"not_found","reason":"admin endpoints: /metrics /healthz /readyz /config"}"#,
        ),
    }
}
