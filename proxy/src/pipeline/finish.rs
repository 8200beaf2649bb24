//! The single exit. [`finish`] turns every outcome of a call — refused, replayed, dry-run,
//! unrecordable, failed upstream, answered — into the response, the metric and the outcome
//! record, exactly once each, and ends the call's budget and idempotency guards. (A call that
//! never reaches `finish` is ended by its `Drop`; see [`super::call`].)

use super::call::Call;
use super::respond;
use crate::audit::{AuditRecord, Phase};
use crate::idempotency::Stored;
use crate::refusal::{self, Decision, Refusal};
use crate::target::Target;
use crate::upstream::{full, ResBody};
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::Value;
use std::time::Duration;

/// How a call ended.
pub enum Outcome {
    /// A stage refused it; nothing was forwarded.
    Refused(Refusal),
    /// An identical idempotent call already completed: its stored response.
    Replayed(Stored),
    /// Dry-run mode: what would have been sent.
    DryRun(Value),
    /// The decision record could not be made durable: not forwarded.
    AuditFailed(Refusal),
    /// The upstream failed or timed out (upstream latency in µs).
    UpstreamFailed(Refusal, u64),
    /// The upstream answered.
    Answered {
        /// Its response (the body still streaming).
        response: Response<Incoming>,
        /// Time to response headers, µs.
        upstream_us: u64,
        /// The tool's total timeout, which bounds the body.
        total: Duration,
        /// Where it went.
        target: Target,
    },
}

/// End the call.
pub async fn finish(mut call: Call, outcome: Outcome) -> Response<ResBody> {
    let span = tracing::Span::current();
    if let Some(t) = call.tool_name() {
        span.record("tool", t);
    }
    match outcome {
        Outcome::Refused(r) => {
            release(&mut call).await;
            let d = r.decision();
            span.record("decision", d.as_str());
            let recs = call.records(Phase::Decision, d, &r.reasons(), r.status().as_u16());
            call.count(d);
            call.finished = true;
            // A refusal is answered even if its record cannot be written: nothing was
            // forwarded, and the write error is counted and logged by the writer.
            for rec in recs {
                let _ = call.state.audit.append(rec).await;
            }
            observe_total(&call, 0);
            tracing::info!(tenant = %call.tenant, tool = call.tool_name().unwrap_or(""), decision = d.as_str(), reason = %r.reasons().join("; "), "refused");
            render(&call, &r)
        }
        Outcome::AuditFailed(r) => {
            release(&mut call).await;
            span.record("decision", Decision::Error.as_str());
            call.count(Decision::Error);
            call.finished = true;
            observe_total(&call, 0);
            render(&call, &r)
        }
        Outcome::Replayed(stored) => {
            release(&mut call).await;
            let d = call.passed();
            span.record("decision", d.as_str());
            let reason = "idempotent replay: an identical call with this Idempotency-Key already completed; not forwarded".to_string();
            let recs = call.records(Phase::Decision, d, &[reason], stored.status);
            call.finished = true;
            if let Err(r) = durable(&call, recs).await {
                call.count(Decision::Error);
                return render(&call, &r);
            }
            call.count(d);
            observe_total(&call, 0);
            replay_response(&call, stored)
        }
        Outcome::DryRun(answer) => {
            // Nothing is spent when nothing is sent.
            release(&mut call).await;
            let d = call.passed();
            span.record("decision", d.as_str());
            let recs = call.records(Phase::Decision, d, &call.shadow_reasons, 200);
            call.finished = true;
            if let Err(r) = durable(&call, recs).await {
                call.count(Decision::Error);
                return render(&call, &r);
            }
            call.count(d);
            observe_total(&call, 0);
            crate::forward::json_response(
                StatusCode::OK,
                &answer,
                &call.run,
                &[("x-tollgate-dry-run", "true")],
            )
        }
        Outcome::UpstreamFailed(r, upstream_us) => {
            release(&mut call).await;
            let d = call.passed();
            span.record("decision", d.as_str());
            let mut recs = call.records(
                Phase::Outcome,
                Decision::Error,
                &r.reasons(),
                r.status().as_u16(),
            );
            for rec in &mut recs {
                rec.latency_us.upstream = upstream_us;
            }
            call.count(d);
            call.finished = true;
            for rec in recs {
                let _ = call.state.audit.append(rec).await;
            }
            observe_total(&call, upstream_us);
            render(&call, &r)
        }
        Outcome::Answered {
            response,
            upstream_us,
            total,
            target,
        } => {
            let d = call.passed();
            span.record("decision", d.as_str());
            call.count(d);
            observe_total(&call, upstream_us);
            respond::answered(call, response, upstream_us, total, target).await
        }
    }
}

/// Render a refusal through the one renderer in refusal.rs.
fn render(call: &Call, r: &Refusal) -> Response<ResBody> {
    refusal::render(r, call.tool_name(), &call.run, call.mcp_id.as_ref())
}

/// Release the call's budget and idempotency claim: nothing was spent.
async fn release(call: &mut Call) {
    if let Some(b) = call.budget.take() {
        b.release().await;
    }
    if let Some(i) = call.idem.take() {
        i.release().await;
    }
}

/// The decision record(s) of a call about to be forwarded.
pub(super) async fn durable_decision(call: &Call) -> Result<(), Refusal> {
    let recs = call.records(Phase::Decision, call.passed(), &call.shadow_reasons, 0);
    durable(call, recs).await
}

/// Write records; on failure, fail closed unless `audit.failOpen` (counted).
pub(super) async fn durable(call: &Call, recs: Vec<AuditRecord>) -> Result<(), Refusal> {
    for rec in recs {
        if let Err(e) = call.state.audit.append(rec).await {
            if call.snap.audit.fail_open {
                call.state
                    .metrics
                    .fail_open
                    .with_label_values(&["audit"])
                    .inc();
            } else {
                return Err(Refusal::AuditUnavailable(format!(
                    "the audit record could not be written ({e}); the call was not forwarded"
                )));
            }
        }
    }
    Ok(())
}

/// `total` and `overhead` (total minus upstream) latency.
pub(super) fn observe_total(call: &Call, upstream_us: u64) {
    let total = call.started.elapsed();
    let d = &call.state.metrics.duration;
    d.with_label_values(&["total"]).observe(total.as_secs_f64());
    if upstream_us > 0 {
        let overhead = total.as_micros().saturating_sub(upstream_us as u128) as f64 / 1e6;
        d.with_label_values(&["overhead"]).observe(overhead);
    }
}

fn replay_response(call: &Call, stored: Stored) -> Response<ResBody> {
    let mut res = Response::new(full(Bytes::from(stored.body)));
    *res.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    if let Some(ct) = stored
        .content_type
        .and_then(|c| HeaderValue::from_str(&c).ok())
    {
        res.headers_mut().insert(http::header::CONTENT_TYPE, ct);
    }
    res.headers_mut().insert(
        "x-tollgate-idempotent-replay",
        HeaderValue::from_static("true"),
    );
    crate::forward::response_headers(res.headers_mut(), &call.run);
    res
}
