//! The stages as the pipeline runs them on a [`Call`]: each line of `run` is one function
//! here, which hands small inputs to a stage module (or a store) and keeps the result on the
//! call. Gates go through [`super::gate`], the one place shadow mode applies.

use super::call::{Call, Element};
use super::gate;
use crate::audit::AuditApproval;
use crate::canonical::CanonicalCall;
use crate::config::{Mode, OverBudget};
use crate::idempotency::Stored;
use crate::input::BodyKind;
use crate::intercept::Tunnel;
use crate::limits::{BudgetGuard, IdemGuard, UNCAPPED};
use crate::policy::{canonical_json, sha256_hex};
use crate::policy_input::CallFacts;
use crate::refusal::Refusal;
use crate::snapshot::Tool;
use crate::stages::{self, tools::ToolCalls};
use crate::target::Target;
use http::request::Parts;
use tracing::Instrument;

/// The call's target (from the request, or pinned to the tunnel's host), kept on the call.
pub(super) fn target(
    call: &mut Call,
    parts: &Parts,
    tunnel: Option<&Tunnel>,
) -> Result<Target, Refusal> {
    let t = match tunnel {
        None => crate::intercept::target_of(parts, &call.snap),
        Some(t) => {
            // A refusal inside a tunnel is still recorded against the tunnel's host.
            call.target = Some(super::passthrough::tunnel_target(t, parts.method.clone()));
            crate::intercept::tunnel_target(parts, t)
        }
    }?;
    call.target = Some(t.clone());
    Ok(t)
}

/// Configuration freshness (operator mode); a stale snapshot with `failOpen` is counted.
pub(super) fn fresh(call: &mut Call) -> Result<(), Refusal> {
    let f = &call.state.freshness;
    let a = &call.snap.agent;
    let checked = stages::fresh::check(f.tracked, f.age(), a.max_staleness, a.fail_open)?;
    if checked == stages::fresh::Freshness::StaleFailOpen {
        call.state
            .metrics
            .fail_open
            .with_label_values(&["config_stale"])
            .inc();
    }
    Ok(())
}

/// Turn the matched tool calls into elements: each input validated against its tool and
/// hashed in canonical form. An HTTP call's hash (and approval binding) covers the whole
/// canonical call — method, path, decoded query, body and the tool's meaning-carrying
/// headers — so an approved call cannot be replayed with another query or header.
pub(super) fn elements(
    call: &mut Call,
    calls: ToolCalls,
    decided: &CanonicalCall,
    parts: &Parts,
) -> Result<(), Refusal> {
    call.mcp_list = calls.lists_tools;
    if call.mcp_id.is_some() {
        call.protocol = "mcp";
    }
    if let Some(msg) = &calls.message {
        call.message_hash = sha256_hex(&canonical_json(msg));
    }
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let snap = call.snap.clone();
    call.elements.reserve(calls.calls.len());
    let mcp = call.mcp_id.is_some();
    for (tool, input) in calls.calls {
        let canonical = if mcp {
            canonical_json(&input)
        } else {
            canonical_json(&decided.to_value())
        };
        call.elements.push(Element {
            tool,
            input_hash: sha256_hex(&canonical),
            canonical,
            input,
            ..Default::default()
        });
        let e = call.elements.last().expect("just pushed");
        let kind = match &decided.body {
            crate::canonical::CanonicalBody::Opaque { .. } if !mcp => BodyKind::Opaque,
            _ => BodyKind::Json,
        };
        stages::tools::validate(&snap.tools[tool], kind, content_type, &e.input)?;
        // A pinned MCP tool runs only while its server advertises the reviewed definition.
        let t = &snap.tools[tool];
        call.state
            .tool_definitions
            .check(t.name(), t.pin.as_ref())?;
    }
    Ok(())
}

/// Every engaged kill switch, against every element (or the agent, for a message no tool
/// decides). The call is registered in flight first, then checked against its snapshot and
/// the live one: a switch that engages after this point fires the call's signal instead (see
/// [`crate::killswitch::inflight`] for why this order leaves no gap).
pub(super) fn kill_switches(call: &mut Call) -> Result<(), Refusal> {
    let snap = call.snap.clone();
    let tools: Vec<&str> = if call.elements.is_empty() {
        vec![""]
    } else {
        call.elements
            .iter()
            .map(|e| snap.tools[e.tool].name())
            .collect()
    };
    let scope = crate::killswitch::inflight::Scope {
        namespace: &snap.agent.namespace,
        agent: &snap.agent.name,
        tenant: &call.tenant,
        tools: tools.clone(),
    };
    call.inflight = Some(call.state.inflight.register(scope, call.kill.clone()));
    let live = call.state.snapshot.load_full();
    let r = [Some(&snap), live.as_ref()]
        .into_iter()
        .flatten()
        .try_for_each(|s| {
            tools
                .iter()
                .try_for_each(|t| crate::killswitch::check(s, &call.tenant, t))
        });
    gate(call, r)
}

/// One token from every rate limit per element.
pub(super) async fn rate_limits(call: &mut Call) -> Result<(), Refusal> {
    let snap = call.snap.clone();
    for i in 0..call.elements.len() {
        let checks = crate::limits::rate_checks(
            &snap,
            &call.tenant,
            snap.tools[call.elements[i].tool].name(),
        );
        if checks.is_empty() {
            continue;
        }
        let r = call.state.limits.check_rates(&checks).await;
        if let Err(Refusal::RateLimited { .. }) = &r {
            call.state
                .metrics
                .rate_limited
                .with_label_values(&[call.tenant.as_str(), "call"])
                .inc();
        }
        gate(call, r)?;
    }
    Ok(())
}

/// Estimate every element and reserve the call's total against every cap that applies, all
/// or nothing. Over a cap, the agent's `overBudget` decides: `deny` (402) or `escalate` (an
/// approval for this exact call over budget). Shadow mode notes what it would have said and
/// holds nothing.
pub(super) async fn budget(call: &mut Call, parts: &Parts, target: &Target) -> Result<(), Refusal> {
    let snap = call.snap.clone();
    for e in &mut call.elements {
        e.estimate =
            stages::budget::estimate(&snap.tools[e.tool], &e.input, call.body_len, &target.path)?;
    }
    let now = time::OffsetDateTime::now_utc();
    let caps = crate::limits::caps(&snap, &call.tenant, &call.run, now);
    let (caps, amounts) = stages::budget::amounts(caps, call.elements.iter().map(|e| &e.estimate));
    if caps.is_empty() {
        return Ok(());
    }
    let limits = call.state.limits.clone();
    if snap.agent.mode == Mode::Shadow {
        let usage = limits.usage(&caps).await;
        let notes = stages::budget::would_exceed(&caps, &amounts, &usage);
        call.shadow_reasons.extend(notes);
        return Ok(());
    }
    let spend: i64 = call.elements.iter().map(|e| e.estimate.spend).sum();
    let exposure: i64 = call.elements.iter().map(|e| e.estimate.exposure).sum();
    let exceeded = match limits.reserve(&caps, &amounts).await? {
        Ok(r) => {
            call.budget = Some(BudgetGuard::new(limits, r, spend, exposure));
            return Ok(());
        }
        Err(e) => e,
    };
    let refusal = crate::limits::over_budget(&exceeded);
    if snap.agent.over_budget != OverBudget::Escalate || call.elements.is_empty() {
        return Err(refusal);
    }
    // The approval covers this exact call over budget; once granted, it is charged past the
    // cap.
    let mut canonical = b"over_budget:".to_vec();
    for e in &call.elements {
        canonical.extend_from_slice(&e.canonical);
    }
    approval_gate(call, parts, target, 0, &canonical, &refusal.reasons(), now).await?;
    let uncapped: Vec<_> = caps
        .into_iter()
        .map(|mut c| {
            c.cap = UNCAPPED;
            c
        })
        .collect();
    if let Ok(r) = limits.reserve(&uncapped, &amounts).await? {
        call.budget = Some(BudgetGuard::new(limits, r, spend, exposure));
    }
    Ok(())
}

/// Policy on every element. Returns the elements whose policy asks for approval, with the
/// reasons.
pub(super) async fn policy(
    call: &mut Call,
    parts: &Parts,
    target: &Target,
) -> Result<Vec<(usize, Vec<String>)>, Refusal> {
    if call.elements.is_empty() {
        return Ok(Vec::new());
    }
    let snap = call.snap.clone();
    let now = time::OffsetDateTime::now_utc();
    let caps = crate::limits::caps(&snap, &call.tenant, &call.run, now);
    let usage = call.state.limits.usage(&caps).await;
    let run_calls = call.state.limits.run_calls(&call.run);
    let budget = stages::budget::facts(&caps, &usage, run_calls);
    let mut asks = Vec::new();
    let no_query = serde_json::Map::new();
    let span = tracing::info_span!(target: crate::telemetry::STAGE_SPANS, "policy", elements = call.elements.len());
    let _entered = span.enter();
    for i in 0..call.elements.len() {
        let e = &call.elements[i];
        let tool = &snap.tools[e.tool];
        let facts = CallFacts {
            target,
            headers: &parts.headers,
            body: &e.input,
            tenant: &call.tenant,
            run: &call.run,
            protocol: call.protocol,
            budget,
            query: call.canonical.as_ref().map_or(&no_query, |c| &c.query),
        };
        let ev = stages::policy::evaluate(&snap, tool, &facts, &e.estimate, now);
        let m = &call.state.metrics;
        m.policy_eval.observe(ev.elapsed.as_secs_f64());
        m.duration
            .with_label_values(&["policy"])
            .observe(ev.elapsed.as_secs_f64());
        let verdict = ev.gate();
        if let Err(Refusal::PolicyError(err)) = &verdict {
            m.policy_errors.inc();
            tracing::warn!(error = %err, tool = tool.name(), "policy evaluation failed; denying");
        }
        let e = &mut call.elements[i];
        e.policy_decision = ev.label();
        e.policy_us = ev.elapsed.as_micros() as u64;
        e.policy_input = ev.doc;
        e.recorded = std::sync::OnceLock::new();
        if let Some(reasons) = gate(call, verdict)? {
            asks.push((i, reasons));
        }
    }
    Ok(asks)
}

/// The approval gate for every element policy asked approval for.
pub(super) async fn approvals(
    call: &mut Call,
    parts: &Parts,
    target: &Target,
    asks: Vec<(usize, Vec<String>)>,
) -> Result<(), Refusal> {
    let now = time::OffsetDateTime::now_utc();
    for (i, reasons) in asks {
        let canonical = std::mem::take(&mut call.elements[i].canonical);
        let r = approval_gate(call, parts, target, i, &canonical, &reasons, now).await;
        call.elements[i].canonical = canonical;
        gate(call, r)?;
    }
    Ok(())
}

/// The approval gate (see approval.rs) for element `i`: a granted approval for this exact
/// call lets it through; otherwise a request is opened and the call is refused or held.
async fn approval_gate(
    call: &mut Call,
    parts: &Parts,
    target: &Target,
    i: usize,
    canonical: &[u8],
    reasons: &[String],
    now: time::OffsetDateTime,
) -> Result<(), Refusal> {
    let snap = call.snap.clone();
    let state = call.state.clone();
    let tool: &Tool = &snap.tools[call.elements[i].tool];
    let key = crate::approval::approval_key(&snap.agent.name, &call.tenant, tool.name(), canonical);
    let gate_call = crate::approval::GateCall {
        key: &key,
        summary: crate::approval::ApprovalSummary {
            agent: snap.agent.name.clone(),
            tenant: call.tenant.clone(),
            run: call.run.clone(),
            tool: tool.name().to_string(),
            target: format!("{} {}", target.method, target.uri()),
            reasons: reasons.to_vec(),
            input_preview: snap.redactor.redact_input(&call.elements[i].input),
        },
        reasons: reasons.to_vec(),
        now,
        wait: crate::approval::prefer_wait(&parts.headers, snap.approvals.max_wait),
    };
    let notify_url = snap.approvals.notify_url.as_deref();
    let on_open = |req: &crate::approval::ApprovalRequest| {
        if let Some(url) = notify_url {
            crate::approval::notify(url, req, &state.upstreams);
        }
        if let Some(ctl) = state.control.get() {
            // Operator mode: the operator turns it into an ApprovalRequest for kubectl.
            crate::control::report_approval(ctl, req, &state.upstreams);
        }
    };
    let (outcome, _opened) = state
        .approvals
        .gate(&snap, &state.snapshot, gate_call, on_open)
        .instrument(tracing::info_span!(target: crate::telemetry::STAGE_SPANS, "approval", tool = tool.name()))
        .await;
    let e = &mut call.elements[i];
    match outcome {
        Ok(g) => {
            state
                .metrics
                .approvals
                .with_label_values(&["granted_used"])
                .inc();
            if e.policy_input.is_object() {
                e.policy_input["approval"] = serde_json::json!({"id": g.id, "approver": g.approver, "granted_at": g.decided_at});
            }
            e.approval = Some(AuditApproval {
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
                e.approval = Some(AuditApproval {
                    id: approval.clone(),
                    approver: String::new(),
                });
            }
            Err(r)
        }
    }
}

/// Deduplicate a mutating call by its `Idempotency-Key`: the stored response when this is a
/// retry of a completed identical call, otherwise the claim is held (as a guard) until the
/// response is stored.
pub(super) async fn idempotency(
    call: &mut Call,
    parts: &Parts,
    target: &Target,
) -> Result<Option<Stored>, Refusal> {
    let snap = call.snap.clone();
    let Some(e) = call.elements.first() else {
        return Ok(None);
    };
    if !crate::target::is_mutating(&target.method) || snap.agent.mode == Mode::DryRun {
        return Ok(None);
    }
    let tool = &snap.tools[e.tool];
    let Some(header) = stages::idempotency::header(
        &parts.headers,
        tool,
        snap.limits.require_idempotency_key_for_irreversible,
    )?
    else {
        return Ok(None);
    };
    let limits = call.state.limits.clone();
    let key = crate::idempotency::key(&snap.agent.name, &call.tenant, tool.name(), header);
    match stages::idempotency::claim(&limits.idempotency, &key, &e.input_hash, tool, header).await?
    {
        Some(stored) => Ok(Some(stored)),
        None => {
            call.idem = Some(IdemGuard::new(limits, key));
            Ok(None)
        }
    }
}

/// The refusal for an upstream failure.
pub(super) fn upstream_refusal(
    call: &Call,
    target: &Target,
    e: crate::upstream::UpstreamError,
) -> Refusal {
    call.state
        .metrics
        .upstream_errors
        .with_label_values(&[e.kind()])
        .inc();
    match e {
        crate::upstream::UpstreamError::Timeout(d) => Refusal::UpstreamTimeout(format!(
            "{} did not answer within {}ms",
            target.authority(),
            d.as_millis()
        )),
        crate::upstream::UpstreamError::Failed(m) => {
            Refusal::UpstreamFailed(format!("{}: {m}", target.authority()))
        }
    }
}
