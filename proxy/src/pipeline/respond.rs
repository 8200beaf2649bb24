//! The answered exit: the upstream's response goes back to the agent, the reservation is
//! settled at the metered cost, and the outcome record is written — at once for plain
//! answers, at the end of the body for metered LLM streams, after buffering for idempotent
//! calls (whose response is stored for replays) and for filtered MCP `tools/list` answers.

use super::call::Call;
use crate::audit::{AuditRecord, Phase};
use crate::limits::IdemGuard;
use crate::target::Target;
use crate::upstream::{full, ResBody};
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::future::Future;
use std::time::Duration;

/// Build the agent's response from the upstream's and end the call.
pub(super) async fn answered(
    mut call: Call,
    res: Response<Incoming>,
    upstream_us: u64,
    total: Duration,
    target: Target,
) -> Response<ResBody> {
    let (mut parts, body) = res.into_parts();
    crate::forward::response_headers(&mut parts.headers, &call.run);
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
        return stored_for_replay(call, recs, parts, body, total, idem).await;
    }
    let llm = call.elements.len() == 1 && call.elements[0].estimate.llm.is_some();
    if llm {
        // LLM usage is known at the end of the body: the outcome record and the settlement
        // wait for it, the stream does not.
        let sse = is_sse(&parts);
        let done: crate::metering::OnDone = Box::new(move |tokens| {
            let Ok(rt) = tokio::runtime::Handle::try_current() else {
                return;
            };
            rt.spawn(async move {
                let mut call = call;
                let est = call.elements[0].estimate.clone();
                // No usage reported: charge the estimate, the bound we reserved.
                let t = tokens.unwrap_or(est.tokens);
                let spend = est.llm_spend(t);
                charge(&mut call, spend).await;
                for rec in &mut recs {
                    rec.cost.usd = crate::limits::to_usd(spend);
                    rec.cost.prompt_tokens = t.prompt;
                    rec.cost.completion_tokens = t.completion;
                }
                call.finished = true;
                write(&call, recs).await;
            });
        });
        let metered = crate::metering::MeteredBody::new(body, sse, done);
        return Response::from_parts(parts, TotalTimeout::new(metered, total).boxed());
    }
    let spend: i64 = call.elements.iter().map(|e| e.estimate.spend).sum();
    cost_per_element(&call, &mut recs, spend);
    charge(&mut call, spend).await;
    call.finished = true;
    // The outcome record does not gate the response: the decision record already made the
    // call accountable. It is written in the background.
    let state = call.state.clone();
    tokio::spawn(async move {
        for rec in recs {
            let _ = state.audit.append(rec).await;
        }
    });
    if call.mcp_list {
        return filtered_tools_list(&call, &target, parts, body, total).await;
    }
    Response::from_parts(parts, TotalTimeout::new(body, total).boxed())
}

/// Each element's cost in its record: the whole spend for a single call, each element's
/// estimate in a batch.
fn cost_per_element(call: &Call, recs: &mut [AuditRecord], spend: i64) {
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
        let _ = call.state.audit.append(rec).await;
    }
}

fn is_sse(parts: &http::response::Parts) -> bool {
    parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
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
    let collected = tokio::time::timeout(
        total,
        Limited::new(body, crate::idempotency::MAX_STORED_BODY).collect(),
    )
    .await;
    let bytes = match collected {
        Ok(Ok(b)) => b.to_bytes(),
        _ => {
            idem.release().await;
            // The upstream may have executed it: charge the estimate that was reserved.
            let spend: i64 = call.elements.iter().map(|e| e.estimate.spend).sum();
            charge(&mut call, spend).await;
            let r = crate::refusal::Refusal::UpstreamFailed(
                "the response of an idempotent call could not be read (over 1 MiB or failed)"
                    .into(),
            );
            call.finished = true;
            write(&call, recs).await;
            return crate::refusal::render(&r, call.tool_name(), &call.run, call.mcp_id.as_ref());
        }
    };
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let est = call
        .elements
        .first()
        .map(|e| e.estimate.clone())
        .unwrap_or_default();
    let spend = match est.llm {
        Some(_) => {
            let sse = is_sse(&parts);
            let mut scan = crate::metering::UsageScanner::new(sse);
            scan.feed(&bytes);
            let t = scan.finish().unwrap_or(est.tokens);
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
    let stored = crate::idempotency::stored(parts.status.as_u16(), content_type, &bytes);
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

/// Settle the call at `spend` and account it: spend and overrun metrics, budget gauges.
async fn charge(call: &mut Call, spend: i64) {
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

/// Buffer a `tools/list` answer (bounded) and filter it to the agent's MCP tools.
async fn filtered_tools_list(
    call: &Call,
    target: &Target,
    mut parts: http::response::Parts,
    body: Incoming,
    total: Duration,
) -> Response<ResBody> {
    const MAX_LIST_BYTES: usize = 8 * 1024 * 1024;
    let sse = is_sse(&parts);
    let bytes =
        match tokio::time::timeout(total, Limited::new(body, MAX_LIST_BYTES).collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            _ => {
                let mut res = Response::new(full(Bytes::new()));
                *res.status_mut() = StatusCode::BAD_GATEWAY;
                return res;
            }
        };
    let allowed = call.snap.catalog.mcp_tools_on(target);
    let (filtered, removed) = crate::mcp::filter_tools_list(&bytes, sse, &allowed);
    if removed > 0 {
        tracing::debug!(removed, "tools/list filtered to this agent's tools");
    }
    parts.headers.remove(http::header::CONTENT_LENGTH);
    parts.headers.remove(http::header::TRANSFER_ENCODING);
    Response::from_parts(parts, full(filtered))
}

pin_project_lite::pin_project! {
    /// A response body that ends once the tool's total timeout has passed.
    pub struct TotalTimeout<B> {
        #[pin]
        inner: B,
        #[pin]
        deadline: tokio::time::Sleep,
    }
}

impl<B> TotalTimeout<B> {
    fn new(inner: B, total: Duration) -> Self {
        Self {
            inner,
            deadline: tokio::time::sleep(total),
        }
    }
}

impl<B: http_body::Body<Data = Bytes, Error = hyper::Error>> http_body::Body for TotalTimeout<B> {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        if this.deadline.poll(cx).is_ready() {
            // Ending the stream early surfaces as a truncated body to the agent; the upstream
            // connection is dropped with it.
            return std::task::Poll::Ready(None);
        }
        this.inner.poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
