//! The single exit. [`finish`] turns every outcome of a call — refused, replayed, dry-run,
//! unrecordable, failed upstream, answered — into the response, the metric and the outcome
//! record, exactly once each, and ends the call's budget and idempotency guards. An answered
//! call whose body streams ends here a second time, in [`body_ended`], when its body ends,
//! is cut (timeout, upstream error) or is dropped by a client that went away: that is where
//! it is charged what was delivered and its outcome record is written. (A call that never
//! reaches `finish` is ended by its `Drop`; see [`super::call`].)
//!
//! A call a kill switch stops in flight ends here too, once: before it was forwarded it is a
//! refusal (`killed`, reservation released); once the upstream may have it, the upstream
//! request is dropped and the call is charged what it was delivered — nothing of the
//! answer, so an LLM call its prompt and a fixed-cost call its cost (the upstream may have
//! acted) — with a `killed` outcome record. A killed stream ends in [`body_ended`].
//!
//! Refusals are rendered by refusal.rs, in the error envelope of the call's LLM provider when
//! the tool declares one (so each provider's SDK surfaces the reason), in JSON-RPC for MCP.

use super::call::Call;
use super::respond;
use crate::audit::{AuditRecord, Phase};
use crate::idempotency::Stored;
use crate::refusal::{self, Decision, Envelope, Refusal};
use crate::target::Target;
use crate::upstream::stream::{BodyEnd, BodyTimeouts};
use crate::upstream::ResBody;
use http::{Response, StatusCode};
use hyper::body::Incoming;
use serde_json::Value;

/// How a call ended.
pub(crate) enum Outcome {
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
    /// A kill switch covering the call engaged while it was in flight (before any answer).
    Killed(crate::killswitch::inflight::Killed),
    /// The upstream answered.
    Answered {
        /// Its response (the body still streaming).
        response: Response<Incoming>,
        /// Time to response headers, µs.
        upstream_us: u64,
        /// The total and idle timeouts that bound the body.
        timeouts: BodyTimeouts,
        /// Where it went.
        target: Target,
    },
}

/// End the call.
pub(super) async fn finish(mut call: Call, outcome: Outcome) -> Response<ResBody> {
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
                let _ = call.state.record(rec).await;
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
            crate::idempotency::replay_response(stored, &call.run)
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
            crate::upstream::forward::json_response(
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
                let _ = call.state.record(rec).await;
            }
            observe_total(&call, upstream_us);
            render(&call, &r)
        }
        Outcome::Killed(k) => killed(call, k).await,
        Outcome::Answered {
            response,
            upstream_us,
            timeouts,
            target,
        } => {
            let d = call.passed();
            span.record("decision", d.as_str());
            call.count(d);
            observe_total(&call, upstream_us);
            respond::answered(call, response, upstream_us, timeouts, target).await
        }
    }
}

/// A call stopped in flight by a kill switch, before any answer: see the module docs.
async fn killed(mut call: Call, k: crate::killswitch::inflight::Killed) -> Response<ResBody> {
    let r = k.refusal();
    count_abort(&call, abort_stage(call.stage));
    tracing::warn!(tenant = %call.tenant, tool = call.tool_name().unwrap_or(""), stage = call.stage, switch = %k.name, "call stopped in flight by a kill switch");
    if !call.sent {
        // Nothing left the pod: a refusal like the gate's.
        return Box::pin(finish(call, Outcome::Refused(r))).await;
    }
    let span = tracing::Span::current();
    span.record("decision", Decision::Killed.as_str());
    let mut recs = call.records(
        Phase::Outcome,
        Decision::Killed,
        &r.reasons(),
        r.status().as_u16(),
    );
    let spend = match respond::llm_estimate(&call) {
        Some(est) => {
            let t = crate::meter::charged_tokens(&est, &Default::default(), true);
            for rec in &mut recs {
                rec.cost.prompt_tokens = t.prompt;
                rec.cost.completion_tokens = t.completion;
            }
            est.llm_spend(t)
        }
        None => call.elements.iter().map(|e| e.estimate.spend).sum(),
    };
    respond::cost_per_element(&call, &mut recs, spend);
    respond::charge(&mut call, spend).await;
    if let Some(i) = call.idem.take() {
        i.release().await;
    }
    for rec in &mut recs {
        rec.cut = Some("killed".into());
    }
    call.count(Decision::Killed);
    call.finished = true;
    for rec in recs {
        let _ = call.state.record(rec).await;
    }
    observe_total(&call, 0);
    render(&call, &r)
}

/// The bounded `stage` label of `tollgate_calls_aborted_total` for where a call was.
fn abort_stage(stage: &str) -> &'static str {
    match stage {
        "approval" => "approval",
        "upstream" | "decision_record" => "upstream",
        "response" => "response",
        _ => "gates",
    }
}

/// Count a call stopped in flight by a kill switch.
pub(super) fn count_abort(call: &Call, stage: &'static str) {
    call.state
        .metrics
        .calls_aborted
        .with_label_values(&["killed", stage])
        .inc();
}

/// The call's error envelope: JSON-RPC for MCP, its LLM provider's, or Tollgate's.
pub(super) fn envelope(call: &Call) -> Envelope<'_> {
    match &call.mcp_id {
        Some(id) => Envelope::JsonRpc(id),
        None => {
            let tool = call.elements.first().map(|e| e.tool).or(call.routed);
            match refusal::provider_for(&call.snap, tool, call.target.as_ref()) {
                Some(p) => Envelope::Provider(p),
                None => Envelope::Tollgate,
            }
        }
    }
}

/// Render a refusal through the one renderer in refusal.rs, in the call's envelope.
pub(super) fn render(call: &Call, r: &Refusal) -> Response<ResBody> {
    refusal::render_as(r, call.tool_name(), &call.run, envelope(call))
}

/// The end of an answered call's body (its last byte, a cut, or a client that went away):
/// an LLM call is charged what its body reported, or when cut what was delivered; a cut is
/// counted and noted in the outcome record, which is written now.
pub(super) async fn body_ended(mut call: Call, mut recs: Vec<AuditRecord>, end: BodyEnd) {
    if let Some(est) = respond::llm_estimate(&call) {
        let t = crate::meter::charged_tokens(&est, &end.scanned, end.cut.is_some());
        let spend = est.llm_spend(t);
        respond::charge(&mut call, spend).await;
        for rec in &mut recs {
            rec.cost.usd = crate::limits::to_usd(spend);
            rec.cost.prompt_tokens = t.prompt;
            rec.cost.completion_tokens = t.completion;
        }
    }
    if let Some(cut) = &end.cut {
        crate::upstream::stream::count_cut(&call.state, cut);
        for rec in &mut recs {
            rec.cut = Some(cut.label().to_string());
            rec.reasons.push(cut.reason());
            if let crate::upstream::stream::Cut::Killed(_) = cut {
                rec.decision = Decision::Killed.as_str().to_string();
                rec.reasons.push(format!(
                    "{} bytes of the response were delivered before the cut",
                    end.bytes
                ));
            }
        }
    }
    call.finished = true;
    for rec in recs {
        let _ = call.state.record(rec).await;
    }
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
        if let Err(e) = call.state.record(rec).await {
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
