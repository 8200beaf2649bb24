//! The answered exit: the upstream's response goes back to the agent, the reservation is
//! settled at the metered cost, and the outcome record is written. A streamed body (any body
//! not buffered below) passes through [`crate::upstream::stream::ResponseStream`], bounded by the tool's
//! total and idle timeouts and read for LLM usage on the side; its end (complete, cut, or
//! dropped by a client that went away) is the pipeline's exit `finish::body_ended`. Buffered:
//! idempotent calls (whose response is stored, headers and coding included, for replays) and
//! MCP `tools/list` answers (decoded and filtered).

use super::call::Call;
use crate::audit::{AuditRecord, Phase};
use crate::limits::IdemGuard;
use crate::meter::Estimate;
use crate::refusal::Refusal;
use crate::target::Target;
use crate::upstream::stream::{BodyTimeouts, OnEnd, ResponseStream};
use crate::upstream::{full, ResBody};
use http::Response;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::time::Duration;

/// Build the agent's response from the upstream's and end the call.
pub(super) async fn answered(
    mut call: Call,
    res: Response<Incoming>,
    upstream_us: u64,
    timeouts: BodyTimeouts,
    target: Target,
) -> Response<ResBody> {
    let (mut parts, body) = res.into_parts();
    crate::upstream::forward::response_headers(&mut parts.headers, &call.run);
    let mut recs = call.records(
        Phase::Outcome,
        call.passed(),
        &call.shadow_reasons,
        parts.status.as_u16(),
    );
    for rec in &mut recs {
        rec.latency_us.upstream = upstream_us;
    }
    for e in &mut call.elements {
        // Recorded above; not kept alive for the length of a stream.
        e.policy_input = serde_json::Value::Null;
    }
    call.stage = "response";
    if let Some(idem) = call.idem.take() {
        return stored_for_replay(call, recs, parts, body, timeouts.total, idem).await;
    }
    let llm = llm_estimate(&call).is_some();
    if !llm {
        // A fixed or per-unit cost is known now; LLM usage at the end of the body.
        let spend: i64 = call.elements.iter().map(|e| e.estimate.spend).sum();
        cost_per_element(&call, &mut recs, spend);
        charge(&mut call, spend).await;
    }
    if call.mcp_list {
        call.finished = true;
        // The outcome record does not gate the response: the decision record already made
        // the call accountable.
        let state = call.state.clone();
        call.state.records_pending.spawn(async move {
            for rec in recs {
                let _ = state.record(rec).await;
            }
        });
        return filtered_tools_list(&call, &target, parts, body, timeouts.total).await;
    }
    // MCP streams carry only JSON-RPC: a cut one is aborted rather than told in an SSE event.
    let in_band = !crate::mcp::is_mcp(&call.snap, &target);
    let kill = call.kill.clone();
    let kill_event = kill_event(&call);
    let done: OnEnd = Box::new(move |end| {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pending = call.state.records_pending.clone();
        pending.spawn_on(super::finish::body_ended(call, recs, end), &rt);
    });
    let body = ResponseStream::new(body, &parts.headers, timeouts, llm, done)
        .in_band_errors(in_band)
        .killed_by(kill, kill_event)
        .boxed();
    Response::from_parts(parts, body)
}

/// The data of the SSE error event a killed stream of this call ends with: the `killed`
/// refusal in the call's provider envelope (the shape its SDK raises from); `None` where no
/// provider is declared, for Tollgate's cut shape.
fn kill_event(call: &Call) -> Option<crate::upstream::stream::KillEvent> {
    let crate::refusal::Envelope::Provider(p) = super::finish::envelope(call) else {
        return None;
    };
    let (tool, run) = (call.tool_name().map(str::to_owned), call.run.clone());
    Some(Box::new(move |k| {
        let (_, body) =
            k.refusal()
                .in_envelope(tool.as_deref(), &run, crate::refusal::Envelope::Provider(p));
        body
    }))
}

/// The estimate of a metered LLM call (one element with an LLM cost model), if this is one.
pub(super) fn llm_estimate(call: &Call) -> Option<Estimate> {
    match call.elements.as_slice() {
        [e] if e.estimate.llm.is_some() => Some(e.estimate.clone()),
        _ => None,
    }
}

/// Each element's cost in its record: the whole spend for a single call, each element's
/// estimate in a batch.
pub(super) fn cost_per_element(call: &Call, recs: &mut [AuditRecord], spend: i64) {
    if call.elements.len() == 1 {
        recs[0].cost.usd = crate::limits::to_usd(spend);
        return;
    }
    for (rec, e) in recs.iter_mut().zip(&call.elements) {
        rec.cost.usd = crate::limits::to_usd(e.estimate.spend);
    }
}

async fn write(call: &Call, recs: Vec<AuditRecord>) {
    for rec in recs {
        let _ = call.state.record(rec).await;
    }
}

/// An idempotent call's response: buffered (bounded), stored for replays, charged, recorded,
/// and returned.
async fn stored_for_replay(
    mut call: Call,
    mut recs: Vec<AuditRecord>,
    parts: http::response::Parts,
    body: Incoming,
    total: Duration,
    idem: IdemGuard,
) -> Response<ResBody> {
    let kill = call.kill.clone();
    let collected = tokio::select! {
        biased;
        k = kill.fired() => return killed_buffering(call, recs, idem, k).await,
        c = tokio::time::timeout(
            total,
            Limited::new(body, crate::idempotency::MAX_STORED_BODY).collect(),
        ) => c,
    };
    let bytes = match collected {
        Ok(Ok(b)) => b.to_bytes(),
        _ => {
            idem.release().await;
            // The upstream may have executed it: charge the estimate that was reserved.
            let spend: i64 = call.elements.iter().map(|e| e.estimate.spend).sum();
            charge(&mut call, spend).await;
            let r = Refusal::UpstreamFailed(
                "the response of an idempotent call could not be read (over 1 MiB or failed)"
                    .into(),
            );
            call.finished = true;
            write(&call, recs).await;
            return super::finish::render(&call, &r);
        }
    };
    let est = call
        .elements
        .first()
        .map(|e| e.estimate.clone())
        .unwrap_or_default();
    let spend = match est.llm {
        Some(_) => {
            // A coded body is read through its decoder; it is stored as sent.
            let mut scan = crate::meter::UsageScanner::for_response(&parts.headers);
            scan.feed(&bytes);
            let t = scan.finish().reported.unwrap_or(est.tokens);
            for rec in &mut recs {
                rec.cost.prompt_tokens = t.prompt;
                rec.cost.completion_tokens = t.completion;
            }
            est.llm_spend(t)
        }
        None => call.elements.iter().map(|e| e.estimate.spend).sum(),
    };
    cost_per_element(&call, &mut recs, spend);
    charge(&mut call, spend).await;
    let stored = crate::idempotency::stored(parts.status.as_u16(), &parts.headers, &bytes);
    if parts.status.is_server_error() {
        // A failed attempt is not the answer to keep: let the retry through.
        idem.release().await;
    } else {
        let hash = call
            .elements
            .first()
            .map(|e| e.input_hash.as_str())
            .unwrap_or("");
        idem.complete(hash, stored).await;
    }
    call.finished = true;
    write(&call, recs).await;
    let mut parts = parts;
    parts.headers.remove(http::header::CONTENT_LENGTH);
    parts.headers.remove(http::header::TRANSFER_ENCODING);
    Response::from_parts(parts, full(bytes))
}

/// A kill switch stopped an idempotent call while its answer was being buffered: nothing of
/// it reached the agent, the upstream acted, so the reserved estimate is charged (as for a
/// body that could not be read) and the claim is released for a retry.
async fn killed_buffering(
    mut call: Call,
    mut recs: Vec<AuditRecord>,
    idem: IdemGuard,
    k: crate::killswitch::inflight::Killed,
) -> Response<ResBody> {
    idem.release().await;
    let spend: i64 = call.elements.iter().map(|e| e.estimate.spend).sum();
    cost_per_element(&call, &mut recs, spend);
    charge(&mut call, spend).await;
    let r = k.refusal();
    super::finish::count_abort(&call, "response");
    for rec in &mut recs {
        rec.decision = crate::refusal::Decision::Killed.as_str().to_string();
        rec.status = r.status().as_u16();
        rec.cut = Some("killed".into());
        rec.reasons.extend(r.reasons());
    }
    call.finished = true;
    write(&call, recs).await;
    super::finish::render(&call, &r)
}

/// Settle the call at `spend` and account it: spend and overrun metrics, budget gauges.
pub(super) async fn charge(call: &mut Call, spend: i64) {
    let state = call.state.clone();
    let snap = call.snap.clone();
    let m = &state.metrics;
    let tenant = if snap.agent.tenants.contains(&call.tenant) {
        call.tenant.as_str()
    } else {
        "other"
    };
    let Some(guard) = call.budget.take() else {
        record_spend(call, spend);
        return;
    };
    let estimate = guard.estimate();
    let caps: Vec<_> = guard
        .reservation()
        .map(|r| {
            r.entries
                .iter()
                .map(|(c, _)| c.clone())
                .filter(|c| c.scope != "run")
                .collect()
        })
        .unwrap_or_default();
    guard.settle(spend).await;
    if spend > estimate {
        m.budget_overrun
            .with_label_values(&[tenant])
            .inc_by(crate::limits::to_usd(spend - estimate));
    }
    let usage = state.limits.usage(&caps).await;
    for (c, u) in caps.iter().zip(usage) {
        m.budget_cap
            .with_label_values(&[c.scope, tenant])
            .set(crate::limits::to_usd(c.cap));
        m.budget_remaining
            .with_label_values(&[c.scope, tenant])
            .set(crate::limits::to_usd(c.cap - u.spent - u.reserved));
    }
    record_spend(call, spend);
}

/// Spend metrics and the spend-today report to the operator.
fn record_spend(call: &Call, spend: i64) {
    if spend <= 0 {
        return;
    }
    let snap = &call.snap;
    let tenant = if snap.agent.tenants.contains(&call.tenant) {
        call.tenant.as_str()
    } else {
        "other"
    };
    call.state
        .metrics
        .spend
        .with_label_values(&[tenant, snap.agent.name.as_str()])
        .inc_by(crate::limits::to_usd(spend));
    let now = time::OffsetDateTime::now_utc();
    let day = format!(
        "{:04}-{:02}-{:02}",
        now.year(),
        now.month() as u8,
        now.day()
    );
    let mut today = call.state.spend_today.lock().expect("spend lock");
    if today.0 != day {
        *today = (day, Default::default());
    }
    *today.1.entry(call.tenant.clone()).or_default() += crate::limits::to_usd(spend);
}

/// Buffer a `tools/list` answer (bounded), decode it if it is coded (served decoded, labelled
/// as such), and filter it to the agent's MCP tools.
async fn filtered_tools_list(
    call: &Call,
    target: &Target,
    mut parts: http::response::Parts,
    body: Incoming,
    total: Duration,
) -> Response<ResBody> {
    let sse = crate::meter::is_sse(&parts.headers);
    let limited = Limited::new(body, crate::mcp::MAX_LIST_BYTES).collect();
    let bytes = match tokio::time::timeout(total, limited).await {
        Ok(Ok(b)) => crate::mcp::decoded_body(&mut parts.headers, &b.to_bytes()),
        _ => Err(
            "the upstream's tools/list answer could not be read (over 8 MiB, failed or timed out)"
                .to_string(),
        ),
    };
    let bytes = match bytes {
        Ok(b) => b,
        Err(reason) => return super::finish::render(call, &Refusal::UpstreamFailed(reason)),
    };
    let allowed = call.snap.catalog.mcp_tools_on(target);
    let mut mismatches = Vec::new();
    let (filtered, removed) = crate::mcp::filter_tools_list_by(&bytes, sse, |t| {
        t.get("name")
            .and_then(serde_json::Value::as_str)
            .is_some_and(|n| allowed.contains(&n))
            && crate::pins::keep_listed(&call.state, &call.snap, target, t, &mut mismatches)
    });
    if removed > 0 {
        tracing::debug!(removed, "tools/list filtered to this agent's tools");
    }
    // A withheld tool is on record before the list is served.
    for m in mismatches {
        let rec = mismatch_record(call, m, parts.status.as_u16());
        if let Err(e) = call.state.record(rec).await {
            let r = Refusal::AuditUnavailable(format!(
                "the record of a changed tool definition could not be written: {e}"
            ));
            return super::finish::render(call, &r);
        }
    }
    parts.headers.remove(http::header::CONTENT_LENGTH);
    parts.headers.remove(http::header::TRANSFER_ENCODING);
    Response::from_parts(parts, full(filtered))
}

/// The record of a pinned tool withheld from a `tools/list` answer: a `deny` decision of the
/// listing call for that tool, with the advertised hash as its input hash and the advertised
/// definition (redacted) as its input.
fn mismatch_record(call: &Call, m: crate::pins::Mismatch, status: u16) -> AuditRecord {
    let reasons = std::iter::once(format!(
        "tool_definition_changed: the server advertised sha256 {}, sha256 {} is pinned; the tool was withheld",
        m.advertised, m.pinned
    ))
    .chain(m.summary)
    .collect();
    let mut rec = call.record(
        None,
        Phase::Decision,
        crate::refusal::Decision::Deny,
        reasons,
        status,
    );
    rec.tool = m.tool;
    rec.input_hash = m.advertised;
    rec.input = call.snap.redactor.record_input(&serde_json::json!({
        "advertised_definition": m.definition,
        "pinned_sha256": m.pinned,
    }));
    rec
}
