//! One call as it moves through the stages: who, what, the decided tool calls (one for an
//! HTTP call, one per element of a JSON-RPC batch), and the guards it holds.
//!
//! A `Call` that is dropped before [`super::finish`] ran — the agent disconnected and hyper
//! dropped the pipeline future, or a stage panicked — writes its own `client_gone` outcome
//! record and counts itself once in `Drop`; its budget and idempotency guards then end by
//! their own `Drop` (see [`crate::limits::guard`]). So every call is counted and recorded
//! exactly once, whatever way it ends.

use crate::audit::{AuditApproval, AuditLatency, AuditRecord, Phase};
use crate::limits::{BudgetGuard, IdemGuard};
use crate::meter::Estimate;
use crate::refusal::Decision;
use crate::snapshot::Snapshot;
use crate::state::ProxyState;
use crate::target::Target;
use serde_json::Value;
use std::sync::Arc;
use std::time::Instant;

/// One decided tool call: the whole input of an HTTP call, or one `tools/call` of an MCP
/// message.
#[derive(Debug, Default)]
pub(crate) struct Element {
    /// Tool index in the snapshot.
    pub tool: usize,
    /// Tool input (the canonical call's body, or the MCP arguments).
    pub input: Value,
    /// Canonical serialisation of the input (sorted keys): hashed, and bound by approvals.
    pub canonical: Vec<u8>,
    /// sha256 of `canonical`.
    pub input_hash: String,
    /// The policy input, once built (redacted into the record).
    pub policy_input: Value,
    /// The redacted input as the decision record wrote it; the outcome record reuses it.
    pub recorded: std::sync::OnceLock<crate::redact::RecordedInput>,
    /// What Rego decided, once it ran.
    pub policy_decision: &'static str,
    /// Policy evaluation time.
    pub policy_us: u64,
    /// Approval involved, if any.
    pub approval: Option<AuditApproval>,
    /// Estimated cost.
    pub estimate: Estimate,
}

/// Everything known about a call so far.
pub(crate) struct Call {
    pub(crate) state: Arc<ProxyState>,
    pub(crate) snap: Arc<Snapshot>,
    /// Unique id of this call.
    pub id: String,
    /// Run id.
    pub run: String,
    /// Tenant (once known).
    pub tenant: String,
    /// Target (once known).
    pub target: Option<Target>,
    /// W3C trace id.
    pub trace_id: String,
    /// The `traceparent` sent upstream.
    pub traceparent: String,
    /// The tool the target matched, before the body decided anything (labels early refusals).
    pub routed: Option<usize>,
    /// The decided tool calls.
    pub elements: Vec<Element>,
    /// The canonical call: what was decided, and what forward rebuilds the request from.
    pub canonical: Option<crate::canonical::CanonicalCall>,
    /// Hash of a message no tool decides (MCP session methods).
    pub message_hash: String,
    /// MCP JSON-RPC id(s), when the call is MCP (refusals answer in JSON-RPC).
    pub mcp_id: Option<Value>,
    /// The MCP message includes `tools/list`: its answer is filtered to this agent's tools.
    pub mcp_list: bool,
    /// `http` or `mcp`.
    pub protocol: &'static str,
    /// Request body length.
    pub body_len: usize,
    /// Started.
    pub started: Instant,
    /// Reasons a shadow-mode call would have been refused.
    pub shadow_reasons: Vec<String>,
    /// Budget held until the call ends.
    pub budget: Option<BudgetGuard>,
    /// Idempotency claim held until the response is stored.
    pub idem: Option<IdemGuard>,
    /// Where the call is, for the record of a call that never finished.
    pub stage: &'static str,
    /// The upstream may have received the call.
    pub sent: bool,
    /// Fired when a kill switch covering the call engages while it is in flight.
    pub kill: crate::killswitch::inflight::KillSignal,
    /// Keeps the call in the in-flight registry until it ends (its body included).
    pub inflight: Option<crate::killswitch::inflight::InFlightGuard>,
    /// The run's outcome, reported on this call (`X-Tollgate-Run-Outcome`): the run ends
    /// when the call does, in `Drop`, after the call's own records.
    pub report: Option<crate::outcome::Report>,
    /// `finish` ran: nothing is left for `Drop`.
    pub(crate) finished: bool,
}

impl Call {
    /// A new call on `snap`.
    pub(crate) fn new(state: Arc<ProxyState>, snap: Arc<Snapshot>, run: String) -> Self {
        Self {
            state,
            snap,
            id: format!("call_{:016x}", rand::random::<u64>()),
            run,
            tenant: String::new(),
            target: None,
            trace_id: String::new(),
            traceparent: String::new(),
            routed: None,
            elements: Vec::new(),
            canonical: None,
            message_hash: String::new(),
            mcp_id: None,
            mcp_list: false,
            protocol: "http",
            body_len: 0,
            started: Instant::now(),
            shadow_reasons: Vec::new(),
            budget: None,
            idem: None,
            stage: "intercept",
            sent: false,
            kill: Default::default(),
            inflight: None,
            report: None,
            finished: false,
        }
    }

    /// The decision of a call that passed every gate: `shadow_deny` when shadow mode noted a
    /// refusal.
    pub(crate) fn passed(&self) -> Decision {
        if self.shadow_reasons.is_empty() {
            Decision::Allow
        } else {
            Decision::ShadowDeny
        }
    }

    /// Tool name for responses and logs: the first decided element, else the routed tool.
    pub(crate) fn tool_name(&self) -> Option<&str> {
        self.elements
            .first()
            .map(|e| e.tool)
            .or(self.routed)
            .map(|i| self.snap.tools[i].name())
    }

    /// One record per decided element (one with no tool when none was decided).
    pub(crate) fn records(
        &self,
        phase: Phase,
        d: Decision,
        reasons: &[String],
        status: u16,
    ) -> Vec<AuditRecord> {
        if self.elements.is_empty() {
            return vec![self.record(None, phase, d, reasons.to_vec(), status)];
        }
        self.elements
            .iter()
            .map(|e| self.record(Some(e), phase, d, reasons.to_vec(), status))
            .collect()
    }

    /// The record of one element (or of the call, before any element).
    pub(crate) fn record(
        &self,
        e: Option<&Element>,
        phase: Phase,
        d: Decision,
        reasons: Vec<String>,
        status: u16,
    ) -> AuditRecord {
        let snap = &self.snap;
        let t = self.target.as_ref();
        let tool = e.map(|e| e.tool).or(self.routed);
        AuditRecord {
            phase: Some(phase),
            call: self.id.clone(),
            run: self.run.clone(),
            agent: snap.agent.name.clone(),
            namespace: snap.agent.namespace.clone(),
            tenant: self.tenant.clone(),
            tool: tool
                .map(|i| snap.tools[i].name().to_string())
                .unwrap_or_default(),
            via: t.map(|t| t.via.as_str().to_string()).unwrap_or_default(),
            method: t.map(|t| t.method.to_string()).unwrap_or_default(),
            scheme: t.map(|t| t.scheme.as_str().to_string()).unwrap_or_default(),
            host: t.map(|t| t.host.clone()).unwrap_or_default(),
            port: t.map(|t| t.port).unwrap_or(0),
            path: t.map(|t| t.path.clone()).unwrap_or_default(),
            input_hash: e
                .map(|e| e.input_hash.clone())
                .unwrap_or_else(|| self.message_hash.clone()),
            decision: d.as_str().to_string(),
            reasons,
            policy_decision: e.map(|e| e.policy_decision).unwrap_or("").to_string(),
            policy_bundle: snap.policy.hash().to_string(),
            snapshot_version: snap.version,
            mode: snap.agent.mode.as_str().to_string(),
            approval: e.and_then(|e| e.approval.clone()),
            status,
            latency_us: AuditLatency {
                total: self.started.elapsed().as_micros() as u64,
                policy: e.map(|e| e.policy_us).unwrap_or(0),
                upstream: 0,
            },
            trace_id: self.trace_id.clone(),
            input: e
                .map(|e| {
                    e.recorded
                        .get_or_init(|| snap.redactor.record_input(&e.policy_input))
                        .clone()
                })
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    /// Count the call once per element in `tollgate_requests_total`.
    pub(crate) fn count(&self, d: Decision) {
        let snap = &self.snap;
        let tenant = if snap.agent.tenants.contains(&self.tenant) {
            self.tenant.as_str()
        } else {
            "other"
        };
        let m = &self.state.metrics.requests;
        if self.elements.is_empty() {
            let tool = self.routed.map(|i| snap.tools[i].name()).unwrap_or("other");
            m.with_label_values(&[tenant, snap.agent.name.as_str(), tool, d.as_str()])
                .inc();
        }
        for e in &self.elements {
            let tool = snap.tools[e.tool].name();
            m.with_label_values(&[tenant, snap.agent.name.as_str(), tool, d.as_str()])
                .inc();
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let recs = if self.finished {
            Vec::new()
        } else {
            self.unfinished()
        };
        // The run (claimed when the call was admitted, so no later call of it was) ends with
        // this call in its tally.
        for r in &recs {
            self.state.note(r);
        }
        let ended = self.report.take();
        if recs.is_empty() && ended.is_none() {
            return;
        }
        // Written in one task, so a run's outcome record follows its last call's records.
        let (state, snap, run) = (self.state.clone(), self.snap.clone(), self.run.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            self.state.records_pending.spawn_on(
                async move {
                    for r in recs {
                        let _ = state.audit.append(r).await;
                    }
                    if let Some(report) = ended {
                        crate::outcome::settle(&state, &run).await;
                        let rec = crate::outcome::record(&state, &snap, &run, &report);
                        if let Err(e) = crate::outcome::commit(&state, &snap, rec).await {
                            tracing::warn!(run = %run, "the run's outcome was not recorded: {e}");
                        }
                    }
                },
                &rt,
            );
        }
    }
}

impl Call {
    /// The call was dropped before `finish` (client gone) or a stage panicked: count it once
    /// and return its outcome record.
    fn unfinished(&self) -> Vec<AuditRecord> {
        let gone = if std::thread::panicking() {
            "a stage panicked"
        } else {
            "the agent disconnected"
        };
        let reason = format!(
            "{gone} during {}; {}",
            self.stage,
            if self.sent {
                "the call may have reached the upstream and is charged its estimate"
            } else {
                "nothing was forwarded"
            }
        );
        tracing::warn!(call = %self.id, run = %self.run, stage = self.stage, "{reason}");
        self.count(Decision::Error);
        self.records(Phase::Outcome, Decision::Error, &[reason], 499)
    }
}
