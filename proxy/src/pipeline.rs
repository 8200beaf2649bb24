//! The request path, assembled in one place in the order DESIGN.md gives:
//!
//! intercept → identify → match tool → read and validate input → kill switch → (rate limit →
//! budget) → policy → approval → record → forward → meter and record.
//!
//! Each stage returns `Result<_, Refusal>`; [`handle`] is the single rescue point that turns a
//! refusal into the JSON answer, the metric and the audit record. In `shadow` mode, gate
//! refusals are recorded as `shadow_deny` and the call goes ahead; malformed requests and
//! unknown tenants are refused in every mode.

use crate::audit::{AuditApproval, AuditLatency, AuditRecord, Phase};
use crate::config::Mode;
use crate::forward;
use crate::identify::{self, RUN_HEADER};
use crate::input::{self, BodyKind};
use crate::intercept::Tunnel;
use crate::policy_input::{self, BudgetFacts, CallFacts};
use crate::refusal::{Decision, Refusal};
use crate::route::RouteMatch;
use crate::snapshot::{Snapshot, Tool};
use crate::state::ProxyState;
use crate::target::Target;
use crate::upstream::{full, ResBody};
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything known about a call so far; carried through the stages and into the record.
pub struct CallContext {
    /// Unique id of this call.
    pub call_id: String,
    /// Run id.
    pub run: String,
    /// Tenant (once known).
    pub tenant: String,
    /// Tool index (once matched).
    pub tool: Option<usize>,
    /// Target (once known).
    pub target: Option<Target>,
    /// Tool input (once parsed).
    pub input: Value,
    /// Canonical input hash.
    pub input_hash: String,
    /// Redacted policy input, for the record.
    pub policy_input: Value,
    /// Approval involved, if any.
    pub approval: Option<AuditApproval>,
    /// Trace id.
    pub trace_id: String,
    /// MCP JSON-RPC id, when the call is an MCP `tools/call` (refusals answer in JSON-RPC).
    pub mcp_id: Option<Value>,
    /// The MCP message includes `tools/list`: its response is filtered to this agent's tools.
    pub mcp_list: bool,
    /// Request body length.
    pub body_len: usize,
    /// Estimated cost.
    pub estimate: crate::metering::Estimate,
    /// Budget held until the call settles.
    pub reservation: Option<crate::limits::Reservation>,
    /// Idempotency key this call owns, until its response is stored.
    pub idem_key: Option<String>,
    /// Started.
    pub started: Instant,
    /// Policy time.
    pub policy_us: u64,
    /// Reasons a shadow-mode call would have been refused.
    pub shadow_reasons: Vec<String>,
    /// What Rego decided, once it ran.
    pub policy_decision: &'static str,
}

impl CallContext {
    fn new(run: String) -> Self {
        Self {
            call_id: format!("call_{:016x}", rand::random::<u64>()),
            run,
            tenant: String::new(),
            tool: None,
            target: None,
            input: Value::Null,
            input_hash: String::new(),
            policy_input: Value::Null,
            approval: None,
            trace_id: String::new(),
            mcp_id: None,
            mcp_list: false,
            body_len: 0,
            estimate: Default::default(),
            reservation: None,
            idem_key: None,
            started: Instant::now(),
            policy_us: 0,
            shadow_reasons: Vec::new(),
            policy_decision: "",
        }
    }
}

/// A call that passed every gate and is ready to forward.
struct Admitted {
    body: Bytes,
    decision: Decision,
    /// The stored response of an identical earlier call (idempotent replay).
    replay: Option<crate::idempotency::Stored>,
}

/// Handle one request on the proxy listener (forward-proxy or base-URL form).
pub async fn handle(state: Arc<ProxyState>, req: Request<Incoming>) -> Response<ResBody> {
    handle_with(state, req, None).await
}

/// Handle one request that arrived inside a tunnel (decrypted CONNECT, transparent): the same
/// pipeline, with the target pinned to the tunnel's host.
pub async fn handle_in_tunnel(
    state: Arc<ProxyState>,
    req: Request<Incoming>,
    tunnel: &Tunnel,
) -> Response<ResBody> {
    handle_with(state, req, Some(tunnel)).await
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
        return refusal_response(&r, None, &identify::new_run_id(), None);
    };
    let (parts, body) = req.into_parts();
    let run = match identify::run_id(&parts.headers) {
        Ok(r) => r,
        Err(r) => return refusal_response(&r, None, &identify::new_run_id(), None),
    };
    let mut ctx = CallContext::new(run);
    let (traceparent, trace_id) = forward::traceparent(&parts.headers);
    ctx.trace_id = trace_id;
    let target = match tunnel {
        None => crate::intercept::target_of(&parts, &snap),
        Some(t) => crate::intercept::tunnel_target(&parts, t),
    };
    match target {
        Ok(t) => run_pipeline(state, snap, ctx, parts, body, t, traceparent).await,
        Err(r) => {
            if let Some(t) = tunnel {
                ctx.target = Some(Target {
                    scheme: t.scheme,
                    host: t.host.clone(),
                    port: t.port,
                    method: parts.method.clone(),
                    path: String::new(),
                    query: None,
                    via: t.via,
                });
            }
            finish_refused(&state, &snap, ctx, r).await
        }
    }
}

/// Refuse a tunnel before any request inside it (a CONNECT or transparent connection to a
/// host no tool serves, a bad ClientHello): recorded and counted like any refused call, and
/// counted in `tollgate_tunnels_refused_total{via,reason}`.
pub async fn refuse_tunnel(
    state: &ProxyState,
    snap: &Snapshot,
    tunnel: &Tunnel,
    tenant: String,
    r: Refusal,
) -> Response<ResBody> {
    state
        .metrics
        .tunnels_refused
        .with_label_values(&[tunnel.via.as_str(), r.code()])
        .inc();
    tracing::warn!(via = tunnel.via.as_str(), host = %tunnel.host, port = tunnel.port, reason = %r.reasons().join("; "), "tunnel refused");
    let mut ctx = CallContext::new(identify::new_run_id());
    ctx.target = Some(tunnel_target_stub(tunnel));
    ctx.tenant = tenant;
    finish_refused(state, snap, ctx, r).await
}

/// Record a TLS passthrough tunnel before it opens: host-level policy only, marked as such.
pub async fn record_passthrough(
    state: &ProxyState,
    snap: &Snapshot,
    tunnel: &Tunnel,
    tenant: String,
    run: String,
    tool: usize,
) -> Result<(), Refusal> {
    let mut ctx = CallContext::new(run);
    ctx.target = Some(tunnel_target_stub(tunnel));
    ctx.tenant = tenant;
    ctx.tool = Some(tool);
    let reasons =
        vec!["TLS passthrough: the tunnel is not decrypted; host-level policy only".into()];
    let mut rec = record(snap, &ctx, Phase::Decision, Decision::Allow, reasons, 200);
    rec.passthrough = true;
    write_record(state, snap, rec).await?;
    count(state, snap, &ctx, Decision::Allow);
    Ok(())
}

fn tunnel_target_stub(t: &Tunnel) -> Target {
    Target {
        scheme: t.scheme,
        host: t.host.clone(),
        port: t.port,
        method: http::Method::CONNECT,
        path: String::new(),
        query: None,
        via: t.via,
    }
}

async fn run_pipeline(
    state: Arc<ProxyState>,
    snap: Arc<Snapshot>,
    mut ctx: CallContext,
    parts: http::request::Parts,
    body: Incoming,
    target: Target,
    traceparent: String,
) -> Response<ResBody> {
    ctx.target = Some(target.clone());
    match admit(&state, &snap, &mut ctx, &parts, body, &target).await {
        Ok(admitted) => forward_call(state, snap, ctx, parts, target, admitted, traceparent).await,
        Err(r) => finish_refused(&state, &snap, ctx, r).await,
    }
}

/// Stages up to and including the approval gate.
async fn admit(
    state: &ProxyState,
    snap: &Snapshot,
    ctx: &mut CallContext,
    parts: &http::request::Parts,
    body: Incoming,
    target: &Target,
) -> Result<Admitted, Refusal> {
    // Stale configuration: fail closed unless the identity opted into failOpen.
    if state.freshness.tracked && state.freshness.age() > ProxyState::max_staleness(snap) {
        if snap.raw.agent.fail_open {
            state
                .metrics
                .fail_open
                .with_label_values(&["config_stale"])
                .inc();
        } else {
            return Err(Refusal::Unavailable {
                code: "config_stale",
                reason: format!(
                    "configuration is {}s old without an operator heartbeat (maxStaleness {}s)",
                    state.freshness.age().as_secs(),
                    ProxyState::max_staleness(snap).as_secs()
                ),
            });
        }
    }
    reject_smuggling(&parts.headers)?;
    // Identify.
    ctx.tenant = identify::tenant(&parts.headers, snap)?;
    let shadow = snap.agent.mode == Mode::Shadow;
    // Match the tool by target; MCP hosts are decided by the body below.
    let route = snap.catalog.match_target(target);
    if let RouteMatch::Tool(i) = route {
        ctx.tool = Some(i);
    }
    // An upgrade (WebSocket, h2c) is refused unless decided like any call; see forward.rs.
    crate::forward::check_upgrade(parts)?;
    // Read and parse the body, within the matched tool's limit.
    let max_body = ctx.tool.map_or(snap.max_body, |i| snap.tools[i].max_body);
    let body = read_body(body, &parts.headers, max_body, body_timeout(snap)).await?;
    ctx.body_len = body.len();
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let kind = input::body_kind(content_type, &body);
    let parsed = match kind {
        BodyKind::Empty => None,
        BodyKind::Json => Some(input::parse_json(&body).map_err(Refusal::UnparsableBody)?),
        BodyKind::Form => Some(input::parse_form(&body).map_err(Refusal::UnparsableBody)?),
        BodyKind::Opaque => None,
    };
    let mut protocol = "http";
    let mut batch_head: Vec<(usize, Value)> = Vec::new();
    if route == RouteMatch::Mcp {
        protocol = "mcp";
        // `Value::Null` for a bodiless session GET (server stream) or DELETE (end session).
        let msg = crate::mcp::message(&parts.method, &parts.headers, parsed)?;
        ctx.mcp_id = crate::mcp::reply_id(&msg);
        let mcp = crate::mcp::classify(&msg, snap, target)?;
        ctx.mcp_list = mcp.lists_tools;
        ctx.input = msg;
        let Some(((last_tool, last_input), head)) = mcp.tool_calls.split_last() else {
            // Session methods only (initialize, ping, tools/list, notifications): no tool
            // decides them; an engaged kill switch for the agent still does.
            let gate_result = crate::killswitch::check(snap, &ctx.tenant, "");
            if let Err(r) = gate_result {
                if !shadow {
                    return Err(r);
                }
                ctx.shadow_reasons.extend(r.reasons());
            }
            ctx.input_hash = policy_input::sha256_hex(&policy_input::canonical_json(&ctx.input));
            let decision = if ctx.shadow_reasons.is_empty() {
                Decision::Allow
            } else {
                Decision::ShadowDeny
            };
            return Ok(Admitted {
                body,
                decision,
                replay: None,
            });
        };
        batch_head = head.to_vec();
        ctx.tool = Some(*last_tool);
        ctx.input = last_input.clone();
    } else {
        ctx.input = match (parsed, kind) {
            (Some(v), _) => v,
            (None, BodyKind::Opaque) => Value::Null,
            (None, _) => target
                .query
                .as_deref()
                .and_then(|q| input::parse_form(q.as_bytes()).ok())
                .unwrap_or_else(|| Value::Object(Default::default())),
        };
    }
    let tool_idx = match ctx.tool {
        Some(i) => i,
        None => {
            let r = Refusal::UnknownTool(format!(
                "{} {}://{}{} matches none of this agent's tools",
                target.method,
                target.scheme.as_str(),
                target.authority(),
                target.path
            ));
            return Err(r);
        }
    };
    // A JSON-RPC batch is decided element by element; one refused element refuses the batch.
    let (last_tool, last_input) = (tool_idx, std::mem::take(&mut ctx.input));
    for (i, input) in batch_head {
        ctx.tool = Some(i);
        ctx.input = input;
        gate_tool(
            state,
            snap,
            ctx,
            parts,
            target,
            i,
            kind,
            content_type,
            protocol,
            shadow,
        )
        .await?;
    }
    ctx.tool = Some(last_tool);
    ctx.input = last_input;
    gate_tool(
        state,
        snap,
        ctx,
        parts,
        target,
        tool_idx,
        kind,
        content_type,
        protocol,
        shadow,
    )
    .await?;
    if let Some(stored) = idempotency(state, snap, ctx, parts, target).await? {
        return Ok(Admitted {
            body,
            decision: Decision::Allow,
            replay: Some(stored),
        });
    }
    if shadow {
        // Shadow mode notes what the budget would have said, and holds nothing.
        let (caps, amounts) = caps_and_amounts(snap, ctx);
        let usage = state.limits.usage(&caps).await;
        for ((cap, amount), usage) in caps.into_iter().zip(amounts).zip(usage) {
            if usage.spent + usage.reserved + amount > cap.cap {
                let e = crate::limits::Exceeded { cap, usage, amount };
                ctx.shadow_reasons
                    .extend(crate::limits::over_budget(&e).reasons());
            }
        }
    } else {
        reserve(state, snap, ctx, parts, target).await?;
    }
    let decision = if ctx.shadow_reasons.is_empty() {
        Decision::Allow
    } else {
        Decision::ShadowDeny
    };
    Ok(Admitted {
        body,
        decision,
        replay: None,
    })
}

/// Deduplicate a mutating call by its `Idempotency-Key` (see idempotency.rs). Returns the
/// stored response when this is a retry of a completed identical call.
async fn idempotency(
    state: &ProxyState,
    snap: &Snapshot,
    ctx: &mut CallContext,
    parts: &http::request::Parts,
    target: &Target,
) -> Result<Option<crate::idempotency::Stored>, Refusal> {
    let Some(tool) = ctx.tool.map(|i| &snap.tools[i]) else {
        return Ok(None);
    };
    if !forward::is_mutating(&target.method) || snap.agent.mode == Mode::DryRun {
        return Ok(None);
    }
    let values: Vec<_> = parts.headers.get_all("idempotency-key").iter().collect();
    if values.len() > 1 {
        return Err(Refusal::BadRequest(
            "more than one Idempotency-Key header".into(),
        ));
    }
    let header = match values.first() {
        Some(v) => v
            .to_str()
            .ok()
            .filter(|v| !v.is_empty() && v.len() <= 255)
            .ok_or_else(|| {
                Refusal::BadRequest("Idempotency-Key must be 1-255 visible ASCII characters".into())
            })?,
        None => {
            let required = tool.config.require_idempotency_key
                || (snap.raw.limits.require_idempotency_key_for_irreversible
                    && !tool.config.risk.reversible);
            return if required {
                Err(Refusal::IdempotencyKeyRequired)
            } else {
                Ok(None)
            };
        }
    };
    let key = crate::idempotency::key(&snap.agent.name, &ctx.tenant, tool.name(), header);
    let claim = state
        .limits
        .idempotency
        .claim(&key, &ctx.input_hash, tool.total_timeout)
        .await
        .map_err(|e| Refusal::Unavailable {
            code: "idempotency_unavailable",
            reason: e,
        })?;
    match claim {
        crate::idempotency::Claim::Owned => {
            ctx.idem_key = Some(key);
            Ok(None)
        }
        crate::idempotency::Claim::Replay(stored) => Ok(Some(stored)),
        crate::idempotency::Claim::Conflict => Err(Refusal::IdempotencyConflict(format!(
            "Idempotency-Key {header:?} was already used for a different {} request",
            tool.name()
        ))),
    }
}

/// The per-tool gates: input schema, kill switch, Rego policy, approval. In shadow mode a
/// refusal is noted in the context and the call continues.
#[allow(clippy::too_many_arguments)]
async fn gate_tool(
    state: &ProxyState,
    snap: &Snapshot,
    ctx: &mut CallContext,
    parts: &http::request::Parts,
    target: &Target,
    tool_idx: usize,
    kind: BodyKind,
    content_type: Option<&str>,
    protocol: &'static str,
    shadow: bool,
) -> Result<(), Refusal> {
    let tool = &snap.tools[tool_idx];
    if kind == BodyKind::Opaque && tool.schema.is_some() {
        return Err(Refusal::UnparsableBody(format!(
            "tool {} takes JSON or form input, not {:?}",
            tool.name(),
            content_type.unwrap_or("")
        )));
    }
    let canonical = policy_input::canonical_json(&ctx.input);
    ctx.input_hash = policy_input::sha256_hex(&canonical);
    if let Some(schema) = &tool.schema {
        input::validate(schema, &ctx.input).map_err(Refusal::InvalidInput)?;
    }
    // Gates. In shadow mode a gate refusal is noted and the call continues.
    let gate = |r: Result<(), Refusal>, ctx: &mut CallContext| -> Result<(), Refusal> {
        match r {
            Err(r) if shadow => {
                ctx.shadow_reasons.extend(r.reasons());
                Ok(())
            }
            other => other,
        }
    };
    gate(
        crate::killswitch::check(snap, &ctx.tenant, tool.name()),
        ctx,
    )?;
    // Rate limits.
    let checks = crate::limits::rate_checks(snap, &ctx.tenant, tool.name());
    if !checks.is_empty() {
        gate(state.limits.check_rates(&checks).await, ctx)?;
    }
    // Cost estimate and budget facts (the reservation follows policy and approval).
    let now = time::OffsetDateTime::now_utc();
    ctx.estimate = match &tool.config.cost {
        Some(cost) => {
            crate::metering::estimate_call(cost, &ctx.input, ctx.body_len, Some(&target.path))
                .map_err(|m| Refusal::InvalidInput(vec![m]))?
        }
        None => Default::default(),
    };
    let caps = crate::limits::caps(snap, &ctx.tenant, &ctx.run, now);
    let usage = state.limits.usage(&caps).await;
    let budget = budget_facts(&caps, &usage);
    // Policy.
    let facts = CallFacts {
        target,
        headers: &parts.headers,
        body: &ctx.input,
        tenant: &ctx.tenant,
        run: &ctx.run,
        protocol,
        budget,
    };
    let mut doc = policy_input::build(snap, tool, &facts, now);
    doc["cost"] = serde_json::json!({
        "estimate_usd": crate::limits::to_usd(ctx.estimate.spend),
        "exposure_usd": crate::limits::to_usd(ctx.estimate.exposure),
    });
    let t0 = Instant::now();
    let decision = snap.policy.evaluate(&doc);
    let elapsed = t0.elapsed();
    ctx.policy_us = elapsed.as_micros() as u64;
    state.metrics.policy_eval.observe(elapsed.as_secs_f64());
    state
        .metrics
        .duration
        .with_label_values(&["policy"])
        .observe(elapsed.as_secs_f64());
    ctx.policy_input = doc;
    ctx.policy_decision = match &decision {
        Err(_) => "error",
        Ok(d) if !d.deny.is_empty() => "deny",
        Ok(d) if !d.require_approval.is_empty() => "approval_required",
        Ok(_) => "allow",
    };
    let decision = match decision {
        Ok(d) => d,
        Err(e) => {
            state.metrics.policy_errors.inc();
            tracing::warn!(error = %e, tool = tool.name(), "policy evaluation failed; denying");
            gate(Err(Refusal::PolicyError(e.to_string())), ctx)?;
            Default::default()
        }
    };
    if !decision.deny.is_empty() {
        gate(Err(Refusal::PolicyDenied(decision.deny.clone())), ctx)?;
    } else if !decision.require_approval.is_empty() {
        let r = approval_gate(
            state,
            snap,
            ctx,
            parts,
            target,
            tool,
            &canonical,
            &decision.require_approval,
            now,
        )
        .await;
        gate(r, ctx)?;
    }
    Ok(())
}

/// Budget facts for the policy input from the caps that apply and their usage.
fn budget_facts(caps: &[crate::limits::Cap], usage: &[crate::limits::Usage]) -> BudgetFacts {
    let mut f = BudgetFacts::default();
    for (c, u) in caps.iter().zip(usage) {
        let spent = crate::limits::to_usd(u.spent);
        match c.scope {
            "run" => {
                f.run_spent_usd = spent;
                f.run_budget_usd = Some(crate::limits::to_usd(c.cap));
            }
            "tenant_day" => {
                f.tenant_spent_today_usd = spent;
                f.tenant_budget_today_usd = Some(crate::limits::to_usd(c.cap));
            }
            _ => {}
        }
    }
    f
}

/// The caps that apply to the call in `ctx`, with this call's amount for each (caps it adds
/// nothing to are left out).
fn caps_and_amounts(snap: &Snapshot, ctx: &CallContext) -> (Vec<crate::limits::Cap>, Vec<i64>) {
    use crate::limits::CapKind;
    let now = time::OffsetDateTime::now_utc();
    let est = &ctx.estimate;
    crate::limits::caps(snap, &ctx.tenant, &ctx.run, now)
        .into_iter()
        .map(|c| {
            let a = match c.kind {
                CapKind::Spend => est.spend,
                CapKind::Exposure => est.exposure,
            };
            (c, a)
        })
        .filter(|(_, a)| *a > 0)
        .unzip()
}

/// Reserve the call's estimated cost against every cap that applies. Over a cap, the agent's
/// `overBudget` decides: `deny` (402) or `escalate` (an approval request for this call).
async fn reserve(
    state: &ProxyState,
    snap: &Snapshot,
    ctx: &mut CallContext,
    parts: &http::request::Parts,
    target: &Target,
) -> Result<(), Refusal> {
    let (caps, amounts) = caps_and_amounts(snap, ctx);
    if caps.is_empty() {
        return Ok(());
    }
    let exceeded = match state.limits.reserve(&caps, &amounts).await? {
        Ok(r) => {
            ctx.reservation = Some(r);
            return Ok(());
        }
        Err(e) => e,
    };
    let refusal = crate::limits::over_budget(&exceeded);
    if snap.raw.agent.over_budget != crate::config::OverBudget::Escalate {
        return Err(refusal);
    }
    let Some(tool_idx) = ctx.tool else {
        return Err(refusal);
    };
    let tool = &snap.tools[tool_idx];
    // The approval covers this exact call over budget; once granted, the call is charged past
    // the cap.
    let mut canonical = b"over_budget:".to_vec();
    canonical.extend_from_slice(&policy_input::canonical_json(&ctx.input));
    let now = time::OffsetDateTime::now_utc();
    approval_gate(
        state,
        snap,
        ctx,
        parts,
        target,
        tool,
        &canonical,
        &refusal.reasons(),
        now,
    )
    .await?;
    let uncapped: Vec<_> = caps
        .into_iter()
        .map(|mut c| {
            c.cap = i64::MAX / 4;
            c
        })
        .collect();
    if let Ok(r) = state.limits.reserve(&uncapped, &amounts).await? {
        ctx.reservation = Some(r);
    }
    Ok(())
}

/// Settle the call's reservation: `Some(spend)` charges that spend (and the estimated
/// exposure), `None` releases it.
async fn settle(state: &ProxyState, ctx: &CallContext, spend: Option<i64>) {
    let Some(r) = &ctx.reservation else {
        return;
    };
    let actual: Vec<i64> = r
        .entries
        .iter()
        .map(|(c, _)| match (spend, c.kind) {
            (None, _) => 0,
            (Some(s), crate::limits::CapKind::Spend) => s,
            (Some(_), crate::limits::CapKind::Exposure) => ctx.estimate.exposure,
        })
        .collect();
    state.limits.settle(r, &actual).await;
}

/// The approval gate (see approval.rs): a granted approval for this exact call lets it
/// through; otherwise a request is opened and the call is refused or held.
#[allow(clippy::too_many_arguments)]
async fn approval_gate(
    state: &ProxyState,
    snap: &Snapshot,
    ctx: &mut CallContext,
    parts: &http::request::Parts,
    target: &Target,
    tool: &Tool,
    canonical: &[u8],
    reasons: &[String],
    now: time::OffsetDateTime,
) -> Result<(), Refusal> {
    let key = crate::approval::approval_key(&snap.agent.name, &ctx.tenant, tool.name(), canonical);
    let call = approval_call(snap, ctx, parts, target, tool, &key, reasons, now);
    let notify_url = snap.raw.approvals.notify_url.clone();
    let on_open = |req: &crate::approval::ApprovalRequest| {
        if let Some(url) = notify_url.as_deref() {
            crate::approval::notify(url, req, &state.upstreams);
        }
        if let Some(ctl) = state.control.get() {
            // Operator mode: the operator turns it into an ApprovalRequest for kubectl.
            crate::control::report_approval(ctl, req, &state.upstreams);
        }
    };
    let (outcome, _opened) = state
        .approvals
        .gate(snap, &state.snapshot, call, on_open)
        .await;
    match outcome {
        Ok(g) => {
            state
                .metrics
                .approvals
                .with_label_values(&["granted_used"])
                .inc();
            ctx.policy_input["approval"] =
                serde_json::json!({"id": g.id, "approver": g.approver, "granted_at": g.decided_at});
            ctx.approval = Some(AuditApproval {
                id: g.id,
                approver: g.approver,
            });
            Ok(())
        }
        Err(r) => {
            let label = if matches!(r, Refusal::ApprovalRequired { .. }) {
                "required"
            } else {
                "rejected"
            };
            state.metrics.approvals.with_label_values(&[label]).inc();
            if let Refusal::ApprovalRequired { approval, .. } = &r {
                ctx.approval = Some(AuditApproval {
                    id: approval.clone(),
                    approver: String::new(),
                });
            }
            Err(r)
        }
    }
}

/// The approval gate's view of a call.
#[allow(clippy::too_many_arguments)]
fn approval_call<'k>(
    snap: &Snapshot,
    ctx: &CallContext,
    parts: &http::request::Parts,
    target: &Target,
    tool: &Tool,
    key: &'k str,
    reasons: &[String],
    now: time::OffsetDateTime,
) -> crate::approval::GateCall<'k> {
    let max_wait = Duration::from_secs(snap.raw.approvals.max_wait_s.unwrap_or(60));
    crate::approval::GateCall {
        key,
        summary: crate::approval::ApprovalSummary {
            agent: snap.agent.name.clone(),
            tenant: ctx.tenant.clone(),
            run: ctx.run.clone(),
            tool: tool.name().to_string(),
            target: format!("{} {}", target.method, target.uri()),
            reasons: reasons.to_vec(),
            input_preview: crate::redact::redact_input(&ctx.input, &snap.raw.audit.redaction),
        },
        reasons: reasons.to_vec(),
        now,
        wait: crate::approval::prefer_wait(&parts.headers, max_wait),
    }
}

/// Refuse request framings that different HTTP parsers read differently.
fn reject_smuggling(h: &http::HeaderMap) -> Result<(), Refusal> {
    if h.contains_key(http::header::TRANSFER_ENCODING)
        && h.contains_key(http::header::CONTENT_LENGTH)
    {
        return Err(Refusal::BadRequest(
            "both Transfer-Encoding and Content-Length are set".into(),
        ));
    }
    if h.get_all(http::header::CONTENT_LENGTH).iter().count() > 1 {
        return Err(Refusal::BadRequest(
            "more than one Content-Length header".into(),
        ));
    }
    for te in h.get_all(http::header::TRANSFER_ENCODING) {
        let v = te.to_str().unwrap_or("").trim().to_ascii_lowercase();
        if v != "chunked" {
            return Err(Refusal::BadRequest(format!(
                "unsupported Transfer-Encoding {v:?}"
            )));
        }
    }
    Ok(())
}

fn body_timeout(snap: &Snapshot) -> Duration {
    snap.raw
        .server
        .body_read_timeout
        .map(|d| d.get())
        .unwrap_or(Duration::from_secs(30))
}

async fn read_body(
    body: Incoming,
    headers: &http::HeaderMap,
    max: usize,
    timeout: Duration,
) -> Result<Bytes, Refusal> {
    if let Some(len) = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max as u64 {
            return Err(Refusal::PayloadTooLarge(max));
        }
    }
    match tokio::time::timeout(timeout, Limited::new(body, max).collect()).await {
        Err(_) => Err(Refusal::BadRequest(format!(
            "request body not received within {}s",
            timeout.as_secs()
        ))),
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(Refusal::PayloadTooLarge(max))
            } else {
                Err(Refusal::BadRequest(format!(
                    "could not read request body: {e}"
                )))
            }
        }
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

async fn forward_call(
    state: Arc<ProxyState>,
    snap: Arc<Snapshot>,
    mut ctx: CallContext,
    parts: http::request::Parts,
    target: Target,
    admitted: Admitted,
    traceparent: String,
) -> Response<ResBody> {
    let tool = ctx.tool.map(|i| &snap.tools[i]);
    let tool_name = tool.map(|t| t.name().to_string()).unwrap_or_default();
    let decision = admitted.decision;
    let reasons = ctx.shadow_reasons.clone();
    if let Some(stored) = admitted.replay {
        let rec = record(
            &snap,
            &ctx,
            Phase::Decision,
            decision,
            vec!["idempotent replay: an identical call with this Idempotency-Key already completed; not forwarded".into()],
            stored.status,
        );
        if let Err(r) = write_record(&state, &snap, rec).await {
            return refusal_response(&r, Some(&tool_name), &ctx.run, ctx.mcp_id.as_ref());
        }
        count(&state, &snap, &ctx, decision);
        return crate::idempotency::replay_response(stored, &ctx.run);
    }
    // Dry-run: decide and record; answer mutating calls synthetically.
    if snap.agent.mode == Mode::DryRun && forward::is_mutating(&target.method) {
        let headers = forward::upstream_headers(
            &parts.headers,
            &target,
            tool,
            &traceparent,
            admitted.body.len(),
        );
        let body = forward::dry_run_body(
            &target,
            &tool_name,
            &headers,
            &admitted.body,
            decision.as_str(),
            &reasons,
        );
        // Nothing is spent when nothing is sent.
        settle(&state, &ctx, None).await;
        let rec = record(&snap, &ctx, Phase::Decision, decision, reasons, 200);
        if let Err(r) = write_record(&state, &snap, rec).await {
            return refusal_response(&r, Some(&tool_name), &ctx.run, ctx.mcp_id.as_ref());
        }
        count(&state, &snap, &ctx, decision);
        return json_response(
            StatusCode::OK,
            &body,
            &ctx.run,
            &[("x-tollgate-dry-run", "true")],
        );
    }
    // The decision record must be durable before anything leaves the pod.
    let rec = record(&snap, &ctx, Phase::Decision, decision, reasons.clone(), 0);
    if let Err(r) = write_record(&state, &snap, rec).await {
        settle(&state, &ctx, None).await;
        release_idem(&state, &ctx).await;
        count(&state, &snap, &ctx, Decision::Error);
        return refusal_response(&r, Some(&tool_name), &ctx.run, ctx.mcp_id.as_ref());
    }
    count(&state, &snap, &ctx, decision);
    // Streamed LLM calls are asked to report usage, when the tool says so.
    let inject = tool.is_some_and(|t| {
        t.config
            .cost
            .as_ref()
            .and_then(|c| c.llm.as_ref())
            .is_some_and(|l| l.inject_stream_usage)
            && crate::metering::takes_stream_usage(t.provider, &target.path)
    });
    let body = match inject
        .then(|| crate::metering::inject_stream_usage(&ctx.input))
        .flatten()
    {
        Some(v) => Bytes::from(serde_json::to_vec(&v).unwrap_or_default()),
        None => admitted.body,
    };
    let headers =
        forward::upstream_headers(&parts.headers, &target, tool, &traceparent, body.len());
    let mut req = Request::builder()
        .method(target.method.clone())
        .uri(target.uri())
        .body(Full::new(body))
        .expect("valid request parts");
    *req.headers_mut() = headers;
    let (connect, header_to, total) = tool
        .map(|t| (t.connect_timeout, t.header_timeout, t.total_timeout))
        .unwrap_or((
            Duration::from_secs(2),
            Duration::from_secs(30),
            Duration::from_secs(30),
        ));
    let up_start = Instant::now();
    let result = state
        .upstreams
        .send(req, connect, header_to.min(total))
        .await;
    let upstream_us = up_start.elapsed().as_micros() as u64;
    state
        .metrics
        .duration
        .with_label_values(&["upstream"])
        .observe(up_start.elapsed().as_secs_f64());
    match result {
        Err(e) => {
            state
                .metrics
                .upstream_errors
                .with_label_values(&[e.kind()])
                .inc();
            let r = match e {
                crate::upstream::UpstreamError::Timeout(d) => Refusal::UpstreamTimeout(format!(
                    "{} did not answer within {}ms",
                    target.authority(),
                    d.as_millis()
                )),
                crate::upstream::UpstreamError::Failed(m) => {
                    Refusal::UpstreamFailed(format!("{}: {m}", target.authority()))
                }
            };
            let mut rec = record(
                &snap,
                &ctx,
                Phase::Outcome,
                Decision::Error,
                r.reasons(),
                r.status().as_u16(),
            );
            rec.latency_us.upstream = upstream_us;
            settle(&state, &ctx, None).await;
            release_idem(&state, &ctx).await;
            let _ = write_record(&state, &snap, rec).await;
            let provider = tool.and_then(|t| t.provider);
            refusal_response_as(
                &r,
                Some(&tool_name),
                &ctx.run,
                ctx.mcp_id.as_ref(),
                provider,
            )
        }
        Ok(res) => {
            let status = res.status();
            let (mut rparts, rbody) = res.into_parts();
            forward::response_headers(&mut rparts.headers, &ctx.run);
            let mut rec = record(
                &snap,
                &ctx,
                Phase::Outcome,
                decision,
                reasons,
                status.as_u16(),
            );
            rec.latency_us.upstream = upstream_us;
            observe_total(&state, &ctx, upstream_us);
            ctx.policy_input = Value::Null;
            if let Some(key) = ctx.idem_key.clone() {
                return stored_for_replay(state, snap, ctx, rec, rparts, rbody, total, key).await;
            }
            let timeouts = crate::mcp::body_timeouts(tool, &target);
            let in_band = !crate::mcp::is_mcp(&snap, &target);
            if ctx.estimate.llm.is_some() {
                // LLM usage is known at the end of the body: the outcome record and the
                // settlement wait for it, the stream does not.
                let (st, sn) = (state.clone(), snap.clone());
                let done: crate::stream::OnEnd = Box::new(move |end| {
                    let Ok(rt) = tokio::runtime::Handle::try_current() else {
                        return;
                    };
                    rt.spawn(async move {
                        // No usage reported: charge the estimate, the bound we reserved; cut
                        // short: charge what was delivered.
                        let t = crate::metering::charged_tokens(
                            &ctx.estimate,
                            &end.scanned,
                            end.cut.is_some(),
                        );
                        let spend = ctx.estimate.llm_spend(t);
                        charge(&st, &sn, &ctx, spend).await;
                        rec.cost.usd = crate::limits::to_usd(spend);
                        rec.cost.prompt_tokens = t.prompt;
                        rec.cost.completion_tokens = t.completion;
                        if let Some(cut) = &end.cut {
                            crate::stream::record_cut(&st, &mut rec, cut);
                        }
                        let _ = write_record(&st, &sn, rec).await;
                    });
                });
                let body = crate::stream::ResponseStream::new(
                    rbody,
                    &rparts.headers,
                    timeouts,
                    true,
                    done,
                )
                .in_band_errors(in_band)
                .boxed();
                return Response::from_parts(rparts, body);
            }
            let spend = ctx.estimate.spend;
            rec.cost.usd = crate::limits::to_usd(spend);
            charge(&state, &snap, &ctx, spend).await;
            // The outcome record does not gate the response: the decision record already made
            // the call accountable. It is written in the background.
            let st = state.clone();
            let sn = snap.clone();
            tokio::spawn(async move {
                let _ = write_record(&st, &sn, rec).await;
            });
            if ctx.mcp_list {
                return filtered_tools_list(
                    &snap,
                    &target,
                    rparts,
                    rbody,
                    crate::stream::BodyTimeouts::of(tool).total,
                )
                .await;
            }
            let st = state.clone();
            let done: crate::stream::OnEnd = Box::new(move |end| {
                if let Some(cut) = &end.cut {
                    crate::stream::count_cut(&st, cut);
                }
            });
            let body =
                crate::stream::ResponseStream::new(rbody, &rparts.headers, timeouts, false, done)
                    .in_band_errors(in_band)
                    .boxed();
            Response::from_parts(rparts, body)
        }
    }
}

/// Buffer a `tools/list` answer (bounded) and filter it to the agent's MCP tools.
async fn filtered_tools_list(
    snap: &Snapshot,
    target: &Target,
    mut parts: http::response::Parts,
    body: Incoming,
    total: Duration,
) -> Response<ResBody> {
    const MAX_LIST_BYTES: usize = 8 * 1024 * 1024;
    let sse = crate::metering::is_sse(&parts.headers);
    let collected = tokio::time::timeout(total, Limited::new(body, MAX_LIST_BYTES).collect()).await;
    // A compressed list is decoded (bounded) and served decoded, labelled as such.
    let bytes = match collected {
        Ok(Ok(b)) => crate::mcp::decoded_body(&mut parts.headers, &b.to_bytes()),
        _ => Err("the upstream's tools/list answer could not be read".to_string()),
    };
    let bytes = match bytes {
        Ok(b) => b,
        Err(reason) => {
            let r = Refusal::UpstreamFailed(reason);
            return refusal_response(&r, None, "", None);
        }
    };
    let allowed = snap.catalog.mcp_tools_on(target);
    let (filtered, removed) = crate::mcp::filter_tools_list(&bytes, sse, &allowed);
    if removed > 0 {
        tracing::debug!(removed, "tools/list filtered to this agent's tools");
    }
    parts.headers.remove(http::header::CONTENT_LENGTH);
    parts.headers.remove(http::header::TRANSFER_ENCODING);
    Response::from_parts(parts, full(filtered))
}

/// Give up the idempotency claim of a call that got no response.
async fn release_idem(state: &ProxyState, ctx: &CallContext) {
    if let Some(k) = &ctx.idem_key {
        state.limits.idempotency.release(k).await;
    }
}

/// An idempotent call's response: buffered (bounded), stored for replays, charged, recorded,
/// and returned.
#[allow(clippy::too_many_arguments)]
async fn stored_for_replay(
    state: Arc<ProxyState>,
    snap: Arc<Snapshot>,
    ctx: CallContext,
    mut rec: AuditRecord,
    parts: http::response::Parts,
    body: Incoming,
    total: Duration,
    key: String,
) -> Response<ResBody> {
    let collected = tokio::time::timeout(
        total,
        Limited::new(body, crate::idempotency::MAX_STORED_BODY).collect(),
    )
    .await;
    let bytes = match collected {
        Ok(Ok(b)) => b.to_bytes(),
        _ => {
            state.limits.idempotency.release(&key).await;
            settle(&state, &ctx, None).await;
            let r = Refusal::UpstreamFailed(
                "the response of an idempotent call could not be read (over 1 MiB or failed)"
                    .into(),
            );
            let _ = write_record(&state, &snap, rec).await;
            return refusal_response(&r, None, &ctx.run, ctx.mcp_id.as_ref());
        }
    };
    let spend = match ctx.estimate.llm {
        Some(_) => {
            let mut scan = crate::metering::UsageScanner::for_response(&parts.headers);
            scan.feed(&bytes);
            let t = scan.finish().reported.unwrap_or(ctx.estimate.tokens);
            rec.cost.prompt_tokens = t.prompt;
            rec.cost.completion_tokens = t.completion;
            ctx.estimate.llm_spend(t)
        }
        None => ctx.estimate.spend,
    };
    rec.cost.usd = crate::limits::to_usd(spend);
    charge(&state, &snap, &ctx, spend).await;
    let stored = crate::idempotency::stored(parts.status.as_u16(), &parts.headers, &bytes);
    if parts.status.is_server_error() {
        // A failed attempt is not the answer to keep: let the retry through.
        state.limits.idempotency.release(&key).await;
    } else {
        state
            .limits
            .idempotency
            .complete(&key, &ctx.input_hash, stored)
            .await;
    }
    let _ = write_record(&state, &snap, rec).await;
    let mut parts = parts;
    parts.headers.remove(http::header::CONTENT_LENGTH);
    parts.headers.remove(http::header::TRANSFER_ENCODING);
    Response::from_parts(parts, full(bytes))
}

/// Settle the call at `spend` and account it: spend and overrun metrics, budget gauges.
async fn charge(state: &ProxyState, snap: &Snapshot, ctx: &CallContext, spend: i64) {
    settle(state, ctx, Some(spend)).await;
    let m = &state.metrics;
    let tenant = if snap.agent.tenants.contains(&ctx.tenant) {
        ctx.tenant.as_str()
    } else {
        "other"
    };
    if spend > 0 {
        m.spend
            .with_label_values(&[tenant, snap.agent.name.as_str()])
            .inc_by(crate::limits::to_usd(spend));
        let now = time::OffsetDateTime::now_utc();
        let day = format!(
            "{:04}-{:02}-{:02}",
            now.year(),
            now.month() as u8,
            now.day()
        );
        let mut today = state.spend_today.lock().expect("spend lock");
        if today.0 != day {
            *today = (day, Default::default());
        }
        *today.1.entry(ctx.tenant.clone()).or_default() += crate::limits::to_usd(spend);
    }
    if ctx.reservation.is_some() && spend > ctx.estimate.spend {
        m.budget_overrun
            .with_label_values(&[tenant])
            .inc_by(crate::limits::to_usd(spend - ctx.estimate.spend));
    }
    if let Some(r) = &ctx.reservation {
        let caps: Vec<_> = r
            .entries
            .iter()
            .map(|(c, _)| c.clone())
            .filter(|c| c.scope != "run")
            .collect();
        let usage = state.limits.usage(&caps).await;
        for (c, u) in caps.iter().zip(usage) {
            let cap = crate::limits::to_usd(c.cap);
            let remaining = crate::limits::to_usd(c.cap - u.spent - u.reserved);
            m.budget_cap.with_label_values(&[c.scope, tenant]).set(cap);
            m.budget_remaining
                .with_label_values(&[c.scope, tenant])
                .set(remaining);
        }
    }
}

fn observe_total(state: &ProxyState, ctx: &CallContext, upstream_us: u64) {
    let total = ctx.started.elapsed();
    state
        .metrics
        .duration
        .with_label_values(&["total"])
        .observe(total.as_secs_f64());
    let overhead = total.as_micros().saturating_sub(upstream_us as u128) as f64 / 1e6;
    state
        .metrics
        .duration
        .with_label_values(&["overhead"])
        .observe(overhead);
}

/// Build a record from the context.
fn record(
    snap: &Snapshot,
    ctx: &CallContext,
    phase: Phase,
    decision: Decision,
    reasons: Vec<String>,
    status: u16,
) -> AuditRecord {
    let t = ctx.target.as_ref();
    AuditRecord {
        phase: Some(phase),
        call: ctx.call_id.clone(),
        run: ctx.run.clone(),
        agent: snap.agent.name.clone(),
        namespace: snap.agent.namespace.clone(),
        tenant: ctx.tenant.clone(),
        tool: ctx
            .tool
            .map(|i| snap.tools[i].name().to_string())
            .unwrap_or_default(),
        via: t.map(|t| t.via.as_str().to_string()).unwrap_or_default(),
        method: t.map(|t| t.method.to_string()).unwrap_or_default(),
        scheme: t.map(|t| t.scheme.as_str().to_string()).unwrap_or_default(),
        host: t.map(|t| t.host.clone()).unwrap_or_default(),
        port: t.map(|t| t.port).unwrap_or(0),
        path: t.map(|t| t.path.clone()).unwrap_or_default(),
        input_hash: ctx.input_hash.clone(),
        decision: decision.as_str().to_string(),
        reasons,
        policy_decision: ctx.policy_decision.to_string(),
        policy_bundle: snap.policy.hash().to_string(),
        snapshot_version: snap.version,
        mode: snap.agent.mode.as_str().to_string(),
        approval: ctx.approval.clone(),
        status,
        latency_us: AuditLatency {
            total: ctx.started.elapsed().as_micros() as u64,
            policy: ctx.policy_us,
            upstream: 0,
        },
        trace_id: ctx.trace_id.clone(),
        input: crate::redact::redact_input(&ctx.policy_input, &snap.raw.audit.redaction),
        ..Default::default()
    }
}

/// Write a record; on failure, fail closed unless `audit.failOpen` (counted).
async fn write_record(
    state: &ProxyState,
    snap: &Snapshot,
    rec: AuditRecord,
) -> Result<(), Refusal> {
    match state.audit.append(rec).await {
        Ok(_) => Ok(()),
        Err(e) => {
            if snap.raw.audit.fail_open {
                state.metrics.fail_open.with_label_values(&["audit"]).inc();
                Ok(())
            } else {
                Err(Refusal::AuditUnavailable(format!(
                    "the audit record could not be written ({e}); the call was not forwarded"
                )))
            }
        }
    }
}

fn count(state: &ProxyState, snap: &Snapshot, ctx: &CallContext, d: Decision) {
    let tenant = if snap.agent.tenants.contains(&ctx.tenant) {
        ctx.tenant.as_str()
    } else {
        "other"
    };
    let tool = ctx.tool.map(|i| snap.tools[i].name()).unwrap_or("other");
    state
        .metrics
        .requests
        .with_label_values(&[tenant, snap.agent.name.as_str(), tool, d.as_str()])
        .inc();
}

async fn finish_refused(
    state: &ProxyState,
    snap: &Snapshot,
    ctx: CallContext,
    r: Refusal,
) -> Response<ResBody> {
    let tool = ctx.tool.map(|i| snap.tools[i].name().to_string());
    let d = r.decision();
    if let Refusal::RateLimited { .. } = r {
        state
            .metrics
            .rate_limited
            .with_label_values(&[ctx.tenant.as_str(), "call"])
            .inc();
    }
    let rec = record(
        snap,
        &ctx,
        Phase::Decision,
        d,
        r.reasons(),
        r.status().as_u16(),
    );
    count(state, snap, &ctx, d);
    // A refusal is answered even if its record cannot be written: nothing was forwarded, and
    // the write error is counted and logged by the writer.
    let _ = state.audit.append(rec).await;
    state
        .metrics
        .duration
        .with_label_values(&["total"])
        .observe(ctx.started.elapsed().as_secs_f64());
    tracing::info!(run = %ctx.run, tenant = %ctx.tenant, tool = tool.as_deref().unwrap_or(""), decision = d.as_str(), reason = %r.reasons().join("; "), "refused");
    let provider = crate::refusal::provider_for(snap, ctx.tool, ctx.target.as_ref());
    refusal_response_as(&r, tool.as_deref(), &ctx.run, ctx.mcp_id.as_ref(), provider)
}

/// The JSON (or JSON-RPC, for MCP calls) refusal response.
pub fn refusal_response(
    r: &Refusal,
    tool: Option<&str>,
    run: &str,
    mcp_id: Option<&Value>,
) -> Response<ResBody> {
    refusal_response_as(r, tool, run, mcp_id, None)
}

/// [`refusal_response`] in the envelope of the call's LLM provider, if it has one.
fn refusal_response_as(
    r: &Refusal,
    tool: Option<&str>,
    run: &str,
    mcp_id: Option<&Value>,
    provider: Option<crate::config::LlmProvider>,
) -> Response<ResBody> {
    use crate::refusal::Envelope;
    let envelope = match (mcp_id, provider) {
        (Some(id), _) => Envelope::JsonRpc(id),
        (None, Some(p)) => Envelope::Provider(p),
        (None, None) => Envelope::Tollgate,
    };
    crate::refusal::response(r, tool, run, envelope)
}

fn json_response(
    status: StatusCode,
    body: &Value,
    run: &str,
    extra: &[(&str, &str)],
) -> Response<ResBody> {
    let mut res = Response::new(full(serde_json::to_vec(body).unwrap_or_default()));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(run) {
        h.insert(RUN_HEADER, v);
    }
    for (k, v) in extra {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.insert(k, v);
        }
    }
    res
}

/// Tool of a context, for callers outside this module.
pub fn tool_of<'s>(snap: &'s Snapshot, ctx: &CallContext) -> Option<&'s Tool> {
    ctx.tool.map(|i| &snap.tools[i])
}
