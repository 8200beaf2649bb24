//! The request path. [`run`] is the stage list of DESIGN.md ("The request path"), one stage
//! per line, each able to end the call with a [`Refusal`]; [`finish`] is the single exit that
//! turns every outcome into the response, the metric and the outcome record, exactly once.
//!
//! Where the order differs from a naive reading of DESIGN: the budget reservation sits between
//! the rate limit and policy, as DESIGN lists it. A call that policy then refuses, or that
//! waits for an approval and is refused, releases the reservation through its guard, so
//! holding it early costs nothing and lets policy see the cost the call will be charged.
//!
//! Shadow mode is applied once, in [`gate`]: a gate refusal is noted and the call goes ahead.
//! Malformed requests, unknown tenants and unknown tools are refused in every mode.
//!
//! A kill switch that engages while the call is in flight ends it wherever it waits: the
//! stages and the wait for the upstream's headers run under [`killable`], which drops them
//! (and with them the upstream request, or the held approval wait) when the call's signal
//! fires, and the call ends through `finish` as `killed`; a body already streaming is cut by
//! [`crate::upstream::stream::ResponseStream`].

mod call;
mod finish;
mod gates;
mod passthrough;
mod respond;

pub(crate) use call::Call;
pub(crate) use finish::Outcome;
pub(crate) use passthrough::{record_passthrough, refuse_tunnel};

use crate::body::ResBody;
use crate::canonical::{CallOptions, CanonicalBody, CanonicalCall, RebuildOptions};
use crate::config::Mode;
use crate::identify;
use crate::intercept::Tunnel;
use crate::refusal::{self, Refusal};
use crate::route::RouteMatch;
use crate::stages;
use crate::state::ProxyState;
use crate::target::Target;
use crate::upstream::forward;
use http::{Request, Response};
use hyper::body::Incoming;
use std::sync::Arc;
use tracing::Instrument;

/// Handle one request on the proxy listener (forward-proxy or base-URL form).
pub(crate) async fn handle(state: Arc<ProxyState>, req: Request<Incoming>) -> Response<ResBody> {
    handle_with(state, req, None).await
}

/// Handle one request that arrived inside a tunnel (decrypted CONNECT, transparent): the same
/// pipeline, with the target pinned to the tunnel's host.
pub(crate) async fn handle_in_tunnel(
    state: Arc<ProxyState>,
    req: Request<Incoming>,
    tunnel: &Tunnel,
) -> Response<ResBody> {
    handle_with(state, req, Some(tunnel)).await
}

/// What the stages admitted.
enum Admitted {
    /// Forward the canonical call (on the call) to the target.
    Forward(Target),
    /// An identical idempotent call already completed: answer with its stored response.
    Replay(crate::idempotency::Stored),
}

async fn handle_with(
    state: Arc<ProxyState>,
    req: Request<Incoming>,
    tunnel: Option<&Tunnel>,
) -> Response<ResBody> {
    let Some(snap) = state.snapshot.load_full() else {
        let r = Refusal::Unavailable {
            code: "config_unavailable",
            reason: "no valid configuration has been loaded yet".into(),
        };
        return refusal::render(&r, None, "", None);
    };
    let (parts, body) = req.into_parts();
    let run_id = match identify::run(&parts.headers, &snap.agent.runs) {
        Ok(r) => r,
        Err(r) => return refusal::render(&r, None, "", None),
    };
    let mut call = Call::new(state, snap, run_id);
    let (traceparent, trace_id) = forward::traceparent(&parts.headers);
    call.traceparent = traceparent;
    call.trace_id = trace_id;
    let span = tracing::info_span!("call", call = %call.id, run = %call.run, trace_id = tracing::field::Empty, tool = tracing::field::Empty, decision = tracing::field::Empty);
    // With trace export on, the call span's own ids are what goes upstream and on record.
    if let Some((traceparent, trace_id)) = crate::telemetry::link(&span, &parts.headers) {
        call.traceparent = traceparent;
        call.trace_id = trace_id;
    }
    span.record("trace_id", tracing::field::display(&call.trace_id));
    // The stages, the forward and the finish are boxed: each is a large state machine, and
    // inline they would make this future (which hyper moves when it stores it) as large as
    // the largest of them.
    async move {
        let kill = call.kill.clone();
        let outcome = killable(&kill, async {
            match Box::pin(run(&mut call, &parts, body, tunnel)).await {
                Ok(Admitted::Forward(target)) => Box::pin(forward(&mut call, &parts, target)).await,
                Ok(Admitted::Replay(stored)) => Outcome::Replayed(stored),
                Err(r) => Outcome::Refused(r),
            }
        })
        .await;
        Box::pin(finish::finish(call, outcome)).await
    }
    .instrument(span)
    .await
}

/// Run `work` unless `kill` fires first; then `work` (which borrows the call) is dropped and
/// the call ends as [`Outcome::Killed`].
async fn killable(
    kill: &crate::killswitch::inflight::KillSignal,
    work: impl std::future::Future<Output = Outcome>,
) -> Outcome {
    tokio::select! {
        biased;
        killed = kill.fired() => Outcome::Killed(killed),
        outcome = work => outcome,
    }
}

/// The stage list.
async fn run(
    call: &mut Call,
    parts: &http::request::Parts,
    body: Incoming,
    tunnel: Option<&Tunnel>,
) -> Result<Admitted, Refusal> {
    let snap = call.snap.clone();
    // 1. Intercept: the target, pinned to the tunnel's host inside a tunnel.
    let target = gates::target(call, parts, tunnel)?;
    gates::fresh(call)?;
    stages::body::framing(&parts.headers)?;
    // 2. Identify.
    call.stage = "identify";
    call.tenant = identify::tenant(&parts.headers, &snap)?;
    call.state.runs.check_open(&call.run)?;
    if let Some(report) = crate::outcome::Report::from_headers(&parts.headers)? {
        // The run ends with this call, whatever its decision; no later call of it is admitted.
        call.state.runs.claim_for_call(&call.run, &report)?;
        call.report = Some(report);
    }
    // 3. Match the tool by target (an MCP host is decided by the body below).
    let route = snap.catalog.match_target(&target);
    if let RouteMatch::Tool(i) = route {
        call.routed = Some(i);
    }
    // An upgrade (WebSocket, h2c) would turn one decided call into an undecided session.
    forward::check_upgrade(parts)?;
    // 4. The canonical call: read and parse the body (within the routed tool's limit), match
    // MCP tools, validate each input.
    call.stage = "input";
    let max_body = call
        .routed
        .map_or(snap.max_body, |i| snap.tools[i].max_body);
    let bytes = stages::body::read(
        body,
        &parts.headers,
        max_body,
        snap.server.body_read_timeout,
    )
    .await?;
    call.body_len = bytes.len();
    let strict;
    let opts = match route {
        RouteMatch::Tool(i) => &snap.tools[i].call_options,
        _ => {
            strict = CallOptions::strict(max_body);
            &strict
        }
    };
    let canonical = CanonicalCall::build(parts, &target, &bytes, opts)
        .map_err(|e| stages::body::ambiguous(e, max_body))?;
    if route == RouteMatch::Mcp {
        // Bodiless session GET and DELETE; routing headers that agree with the body.
        crate::mcp::check_request(&parts.method, &parts.headers, &canonical.body)?;
    }
    let calls = stages::tools::match_calls(&snap, &target, route, &canonical, &mut call.mcp_id)?;
    gates::elements(call, calls, &canonical, parts)?;
    call.canonical = Some(canonical);
    // 5. Gates, in order: kill switch → rate limit → budget reservation → policy → approval.
    call.stage = "kill_switch";
    gates::kill_switches(call)?;
    let limits = tracing::info_span!(target: crate::telemetry::STAGE_SPANS, "limits");
    call.stage = "rate_limit";
    gates::rate_limits(call).instrument(limits.clone()).await?;
    call.stage = "budget";
    gates::budget(call, parts, &target)
        .instrument(limits)
        .await?;
    call.stage = "policy";
    let asks = gates::policy(call, parts, &target).await?;
    call.stage = "approval";
    gates::approvals(call, parts, &target, asks).await?;
    // 6. Forward what was decided — unless an identical idempotent call already completed.
    call.stage = "idempotency";
    if let Some(stored) = gates::idempotency(call, parts, &target).await? {
        return Ok(Admitted::Replay(stored));
    }
    let counted = call.elements.len() as u64;
    call.state.limits.count_run_call(&call.run, counted);
    Ok(Admitted::Forward(target))
}

/// Apply shadow mode to a gate's result: in `shadow` the refusal is noted and the call goes on.
fn gate<T: Default>(call: &mut Call, r: Result<T, Refusal>) -> Result<T, Refusal> {
    match r {
        Err(r) if call.snap.agent.mode == Mode::Shadow => {
            call.shadow_reasons.extend(r.reasons());
            Ok(T::default())
        }
        other => other,
    }
}

/// Forward an admitted call: the upstream request is rebuilt from the canonical call (see
/// [`crate::canonical::rebuild`]), never copied from the agent's bytes; then dry-run answers,
/// the durable decision record, the upstream.
async fn forward(call: &mut Call, parts: &http::request::Parts, target: Target) -> Outcome {
    let snap = call.snap.clone();
    let tool = call.elements.first().map(|e| &snap.tools[e.tool]);
    let Some(mut decided) = call.canonical.take() else {
        let r = Refusal::BadRequest("the call has no decided form".into());
        return Outcome::Refused(r);
    };
    // Streamed LLM calls are asked to report usage, when the tool says so and its declared
    // provider's API at this path takes the option.
    let inject = tool.is_some_and(|t| {
        t.config
            .cost
            .as_ref()
            .and_then(|c| c.llm.as_ref())
            .is_some_and(|l| l.inject_stream_usage)
            && crate::meter::takes_stream_usage(t.provider, &target.path)
    });
    if inject {
        if let CanonicalBody::Json(v) = &decided.body {
            if let Some(v) = crate::meter::inject_stream_usage(v) {
                decided.body = CanonicalBody::Json(v);
            }
        }
    }
    let opts = RebuildOptions {
        forward_headers: tool.map_or(&[][..], |t| &t.forward_headers),
        credential: tool.and_then(|t| t.credential.as_ref()),
        traceparent: &call.traceparent,
        idempotency: tool
            .map(|t| t.config.request.idempotency_key)
            .unwrap_or_default(),
        agent: &snap.agent.name,
        tenant: &call.tenant,
    };
    let rebuilt = match crate::canonical::rebuild(&decided, &target, &parts.headers, &opts) {
        Ok(r) => r,
        Err(e) => {
            let r = stages::body::ambiguous(e, snap.max_body);
            return Outcome::Refused(r);
        }
    };
    if snap.agent.mode == Mode::DryRun && crate::target::is_mutating(&target.method) {
        let reasons = call.shadow_reasons.clone();
        let answer = forward::dry_run_body(
            &target,
            call.tool_name().unwrap_or(""),
            rebuilt.headers(),
            rebuilt.body(),
            call.passed().as_str(),
            &reasons,
        );
        return Outcome::DryRun(answer);
    }
    // The decision record must be durable before anything leaves the pod.
    call.stage = "decision_record";
    if let Err(r) = finish::durable_decision(call).await {
        return Outcome::AuditFailed(r);
    }
    let req = rebuilt.map(http_body_util::Full::new);
    let t = tool.map(|t| (t.connect_timeout, t.header_timeout, t.total_timeout));
    let (connect, header, total) = t.unwrap_or(crate::snapshot::DEFAULT_TIMEOUTS);
    let timeouts = crate::mcp::body_timeouts(tool, &target);
    call.stage = "upstream";
    call.sent = true;
    if let Some(b) = call.budget.as_mut() {
        b.sent();
    }
    let started = std::time::Instant::now();
    let result = call
        .state
        .upstreams
        .send(req, connect, header.min(total))
        .instrument(tracing::info_span!(target: crate::telemetry::STAGE_SPANS, "upstream", host = %target.host))
        .await;
    let upstream_us = started.elapsed().as_micros() as u64;
    call.state
        .metrics
        .duration
        .with_label_values(&["upstream"])
        .observe(started.elapsed().as_secs_f64());
    match result {
        Err(e) => Outcome::UpstreamFailed(gates::upstream_refusal(call, &target, e), upstream_us),
        Ok(res) => Outcome::Answered {
            response: res,
            upstream_us,
            timeouts,
            target,
        },
    }
}
