//! The admin listener: `/metrics`, `/healthz`, `/readyz` (ready once a valid config is
//! loaded and, under an operator, while it is not stale), `/config` (version and hash, never
//! secrets), `POST /runs` (start a run), `POST /runs/{run}/outcome` (end a run with its
//! reported outcome; see [`crate::outcome`]).

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
pub(crate) async fn serve_admin(
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
        // Start a run: a fresh signed run id (the same an agent gets by omitting
        // X-Tollgate-Run, so it grants nothing new; with `agent.runs.source: orchestrator`,
        // refused here too — the orchestrator signs its own with the shared key).
        ("POST", "/runs") => match &*state.snapshot.load() {
            Some(s) if s.agent.runs.source == crate::config::RunSource::Sidecar => {
                let run = crate::identify::mint(&s.agent.runs);
                text(
                    200,
                    "application/json",
                    serde_json::json!({ "run": run }).to_string(),
                )
            }
            Some(_) => text(
                403,
                "application/json",
                r#"{"error":"runs_started_by_orchestrator"}"#,
            ),
            None => text(503, "application/json", r#"{"error":"config_unavailable"}"#),
        },
        ("GET", "/readyz") => match &*state.snapshot.load() {
            // Stale (operator mode, no confirmation within maxStaleness): calls fail closed,
            // so the pod is not ready either.
            Some(s)
                if state.freshness.tracked
                    && state.freshness.age() > ProxyState::max_staleness(s) =>
            {
                text(
                    503,
                    "text/plain",
                    format!(
                        "configuration is stale: {}s without a confirmed snapshot (maxStaleness {}s)\n",
                        state.freshness.age().as_secs(),
                        ProxyState::max_staleness(s).as_secs()
                    ),
                )
            }
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
                    "approvalGrants": s.approvals.granted.iter().map(|g| &g.id).collect::<Vec<_>>(),
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
        ("POST", path) if path.starts_with("/runs/") && path.ends_with("/outcome") => {
            let run = path["/runs/".len()..path.len() - "/outcome".len()].to_string();
            run_outcome(state, &run, req).await
        }
        (_, path) if path == "/approvals" || path.starts_with("/approvals/") => {
            approvals(state, req).await
        }
        _ => text(
            404,
            "application/json",
            r#"{"error":"not_found","reason":"admin endpoints: /metrics /healthz /readyz /config, POST /runs, POST /runs/<run>/outcome, /approvals"}"#,
        ),
    }
}

fn json_error(status: u16, code: &str, reason: impl std::fmt::Display) -> hyper::Response<ResBody> {
    text(
        status,
        "application/json",
        serde_json::json!({"error": code, "reason": reason.to_string()}).to_string(),
    )
}

/// The body of `POST /runs/{run}/outcome`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OutcomeBody {
    outcome: String,
    #[serde(default)]
    label: Option<String>,
}

/// `POST /runs/{run}/outcome` with `{"outcome": "resolved", "label": "ticket_closed"}`: end the
/// run and answer with its record. The run id is the authority (unforgeable, held by the
/// run's orchestrator and agent); a run is ended once.
async fn run_outcome(
    state: &ProxyState,
    run: &str,
    req: hyper::Request<Incoming>,
) -> hyper::Response<ResBody> {
    let Some(snap) = state.snapshot.load_full() else {
        return json_error(
            503,
            "config_unavailable",
            "no valid configuration has been loaded yet",
        );
    };
    if !crate::identify::verify(&snap.agent.runs, run) {
        return json_error(
            400,
            "invalid_run",
            "the path names no run this sidecar or its orchestrator started: POST /runs/<X-Tollgate-Run>/outcome",
        );
    }
    use http_body_util::BodyExt;
    let body = match http_body_util::Limited::new(req.into_body(), 4 * 1024)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(_) => return json_error(413, "payload_too_large", "the body exceeds 4 KiB"),
    };
    let report = serde_json::from_slice::<OutcomeBody>(&body)
        .map_err(|e| e.to_string())
        .and_then(|b| crate::outcome::Report::new(&b.outcome, b.label.as_deref(), "endpoint"));
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            return json_error(
                400,
                "invalid_outcome",
                format!("{e}; send {{\"outcome\": \"resolved\", \"label\": \"ticket_closed\"}}"),
            )
        }
    };
    match crate::outcome::end_run(state, &snap, run, &report).await {
        Ok(rec) => text(
            200,
            "application/json",
            serde_json::json!({
                "run": rec.run,
                "agent": rec.agent,
                "tenant": rec.tenant,
                "cost": rec.cost,
                "outcome": rec.run_outcome,
            })
            .to_string(),
        ),
        Err(e) => {
            let (status, code) = match &e {
                crate::outcome::EndError::Unknown(_) => (404, "run_unknown"),
                crate::outcome::EndError::Ended(..) => (409, "run_ended"),
                crate::outcome::EndError::Audit(_) => (503, "audit_unavailable"),
            };
            json_error(status, code, e)
        }
    }
}

/// Who is calling the approval API, from `Authorization: Bearer <token>`.
fn approver(
    state: &ProxyState,
    req: &hyper::Request<Incoming>,
) -> Result<String, (u16, &'static str)> {
    let Some(snap) = state.snapshot.load_full() else {
        return Err((503, r#"{"error":"config_unavailable"}"#));
    };
    if snap.admin_tokens.is_empty() {
        return Err((
            403,
            r#"{"error":"approvals_api_disabled","reason":"configure approvals.adminTokens to decide approvals on the admin port"}"#,
        ));
    }
    let given = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    snap.admin_tokens
        .iter()
        .find(|(t, _)| constant_time_eq(t.as_bytes(), given.as_bytes()))
        .map(|(_, a)| a.clone())
        .ok_or((
            401,
            r#"{"error":"unauthorized","reason":"send Authorization: Bearer <admin token>"}"#,
        ))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `GET /approvals`, `POST /approvals/<id>/approve`, `POST /approvals/<id>/deny` (body
/// `{"reason": "..."}` optional). The approver is the name bound to the token, never a field
/// the client sends.
async fn approvals(state: &ProxyState, req: hyper::Request<Incoming>) -> hyper::Response<ResBody> {
    let who = match approver(state, &req) {
        Ok(w) => w,
        Err((status, body)) => return text(status, "application/json", body),
    };
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if method == http::Method::GET && path == "/approvals" {
        let list = state.approvals.list();
        return text(
            200,
            "application/json",
            serde_json::to_vec(&serde_json::json!({"approvals": list})).unwrap_or_default(),
        );
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if method != http::Method::POST || parts.len() != 3 || !matches!(parts[2], "approve" | "deny") {
        return text(
            404,
            "application/json",
            r#"{"error":"not_found","reason":"use GET /approvals, POST /approvals/<id>/approve or /deny"}"#,
        );
    }
    use http_body_util::BodyExt;
    let body = http_body_util::Limited::new(req.into_body(), 16 * 1024)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let reason = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["reason"].as_str().map(str::to_owned));
    let approve = parts[2] == "approve";
    match state.approvals.decide(parts[1], approve, &who, reason) {
        Ok(r) => {
            state
                .metrics
                .approvals
                .with_label_values(&[if approve { "approved" } else { "denied" }])
                .inc();
            tracing::info!(approval = %r.id, approver = %who, approved = approve, "approval decided");
            text(
                200,
                "application/json",
                serde_json::to_vec(&r).unwrap_or_default(),
            )
        }
        Err(e) => {
            let status = if matches!(e, crate::approval::DecideError::NotFound(_)) {
                404
            } else {
                409
            };
            text(
                status,
                "application/json",
                serde_json::json!({"error": "approval_conflict", "reason": e.to_string()})
                    .to_string(),
            )
        }
    }
}
