//! The audit record: the fields DESIGN.md names, in a stable order.

use serde::{Deserialize, Serialize};

/// Which record this is. A refused call has one `decision` record; a forwarded call has its
/// `decision` record (durable before forwarding) and then an `outcome` record. A run whose
/// business outcome was reported ends with one `run` record (see [`crate::outcome`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Written before forwarding (or as the only record of a refusal).
    Decision,
    /// Written after the upstream answered or failed.
    Outcome,
    /// A run's reported outcome and what the run cost: not a call.
    Run,
}

/// Approval details of a call.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditApproval {
    /// Approval request id.
    pub id: String,
    /// Who approved (empty while pending).
    #[serde(default)]
    pub approver: String,
}

/// Cost of a call.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditCost {
    /// Spend in USD.
    pub usd: f64,
    /// Prompt tokens (LLM calls).
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Completion tokens (LLM calls).
    #[serde(default)]
    pub completion_tokens: u64,
}

/// Latency split in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditLatency {
    /// Whole call as seen by the proxy.
    pub total: u64,
    /// Policy evaluation.
    pub policy: u64,
    /// Upstream round trip.
    pub upstream: u64,
}

/// One audit line. `seq`, `ts` and `prev` are filled in by the writer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Sequence number, gap-free within a chain.
    #[serde(default)]
    pub seq: u64,
    /// RFC 3339 UTC time the record was committed.
    #[serde(default)]
    pub ts: String,
    /// Hex sha256 of the previous line (without its newline).
    #[serde(default)]
    pub prev: String,
    /// `decision` or `outcome`.
    pub phase: Option<Phase>,
    /// The call went through a TLS passthrough tunnel: only host-level policy applied.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub passthrough: bool,
    /// Call id, shared by a call's decision and outcome records.
    pub call: String,
    /// Run id.
    pub run: String,
    /// Agent name.
    pub agent: String,
    /// Agent namespace.
    pub namespace: String,
    /// Tenant id (empty if none was given).
    pub tenant: String,
    /// Tool name (empty if none matched).
    pub tool: String,
    /// Interception mode.
    pub via: String,
    /// Method.
    pub method: String,
    /// Scheme.
    pub scheme: String,
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Normalised path.
    pub path: String,
    /// sha256 of the canonical, unredacted input.
    pub input_hash: String,
    /// Decision label.
    pub decision: String,
    /// Reasons.
    pub reasons: Vec<String>,
    /// What Rego alone decided (`allow`, `deny`, `approval_required`, `error`), or empty when
    /// the call was refused before policy ran. Replay compares against this.
    #[serde(default)]
    pub policy_decision: String,
    /// sha256 of the policy bundle.
    pub policy_bundle: String,
    /// Snapshot version.
    pub snapshot_version: u64,
    /// Enforcement mode.
    pub mode: String,
    /// Approval, if any.
    pub approval: Option<AuditApproval>,
    /// HTTP status returned to the agent (0 in a decision record of a forwarded call).
    pub status: u16,
    /// Cost.
    pub cost: AuditCost,
    /// Latency split.
    pub latency_us: AuditLatency,
    /// W3C trace id.
    pub trace_id: String,
    /// How the response body was cut short (`total_timeout`, `idle_timeout`,
    /// `upstream_error`, `client_gone`), in an outcome record; absent when it ended normally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<String>,
    /// In a `run` record: the reported outcome and the run's totals (its cost is `cost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_outcome: Option<crate::outcome::RunRecord>,
    /// The policy input, redacted, for replay: serialised once per call, shared by its
    /// decision and outcome records. The last field (the writer splices it in).
    pub input: crate::redact::RecordedInput,
}
