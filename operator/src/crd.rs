//! The CRDs (group `tollgate.dev`, version `v1alpha1`). Specs reuse the proxy's typed config
//! pieces (match, risk, cost, limits) so a CRD field and a standalone config field cannot
//! drift apart; free-form JSON (input schemas, Rego data) is marked
//! `x-kubernetes-preserve-unknown-fields` and nothing else is. [`crds`] renders them, made
//! structural and given their CEL rules; `crds/` holds the output (`make generate`), and a
//! test catches drift and checks the structural rules.
//!
//! (One file, about 700 lines: every kind's spec and status, so the CRDs are read and
//! reviewed together; most of it is field documentation that becomes the CRD schema.)

use kube::core::CustomResourceExt;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use tollgate_proxy::config::{
    AgentBudget, ConfigDuration, CostModel, Mode, OverBudget, RateLimitConfig, Risk, TenantBudgets,
    Timeouts, ToolMatch,
};

/// API group.
pub const GROUP: &str = "tollgate.dev";

fn preserve(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// A status condition (the usual Kubernetes shape).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Compiled`, `Valid`, `Engaged`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason.
    #[serde(default)]
    pub reason: String,
    /// Human-readable message.
    #[serde(default)]
    pub message: String,
    /// RFC 3339 time of the last change.
    #[serde(default)]
    pub last_transition_time: String,
    /// Generation the condition was computed for.
    #[serde(default)]
    pub observed_generation: i64,
}

/// Status shared by every kind.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommonStatus {
    /// Conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Last generation reconciled.
    #[serde(default)]
    pub observed_generation: i64,
}

/// Approval settings of an identity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalSettings {
    /// How long a request stays open (default 1h).
    #[serde(default)]
    pub ttl: Option<ConfigDuration>,
    /// A grant allows one identical call (default true).
    #[serde(default)]
    pub single_use: Option<bool>,
    /// Longest `Prefer: wait` hold, seconds.
    #[serde(default)]
    pub max_wait_s: Option<u64>,
}

/// One agent workflow: the identity a sidecar serves.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tollgate.dev",
    version = "v1alpha1",
    kind = "AgentIdentity",
    namespaced,
    shortname = "agent",
    shortname = "agents",
    status = "AgentIdentityStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Tenants","type":"string","jsonPath":".spec.tenants"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Snapshot","type":"integer","jsonPath":".status.snapshotVersion"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AgentIdentitySpec {
    /// ServiceAccount the agent's pods run as (created and owned if missing).
    pub service_account: String,
    /// Tenants this agent may act for.
    pub tenants: Vec<String>,
    /// `Tool` names (same namespace) the agent may call.
    #[serde(default)]
    pub tools: Vec<String>,
    /// `AgentPolicy` names (same namespace) that decide its calls.
    #[serde(default)]
    pub policies: Vec<String>,
    /// `enforce`, `shadow` or `dry-run`.
    #[serde(default)]
    pub mode: Mode,
    /// Per-run and per-day caps.
    #[serde(default)]
    pub budget: AgentBudget,
    /// Agent-wide rate limits.
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
    /// `deny` or `escalate`.
    #[serde(default)]
    pub over_budget: OverBudget,
    /// Approval settings.
    #[serde(default)]
    pub approvals: ApprovalSettings,
    /// How old a snapshot may get without an operator heartbeat (default 60s).
    #[serde(default)]
    pub max_staleness: Option<ConfigDuration>,
    /// Keep serving a stale snapshot instead of failing closed (counted).
    #[serde(default)]
    pub fail_open: bool,
    /// Labels passed to policy.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Status of an identity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentIdentityStatus {
    /// Conditions (`Ready`).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Last generation reconciled.
    #[serde(default)]
    pub observed_generation: i64,
    /// Version of the snapshot served to its sidecars.
    #[serde(default)]
    pub snapshot_version: u64,
    /// Spend today (USD) as reported by its sidecars.
    #[serde(default)]
    pub spend_today_usd: f64,
}

/// A credential injected from a Secret (mounted into the sidecar by the injector).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretCredential {
    /// Header to fill, e.g. `Authorization`.
    pub header: String,
    /// Prefix, e.g. `Bearer `.
    #[serde(default)]
    pub prefix: String,
    /// Secret name (same namespace).
    pub secret_name: String,
    /// Key in the Secret.
    pub key: String,
}

/// A typed tool.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tollgate.dev",
    version = "v1alpha1",
    kind = "Tool",
    namespaced,
    shortname = "tgtool",
    status = "ToolStatus",
    printcolumn = r#"{"name":"Host","type":"string","jsonPath":".spec.match.host"}"#,
    printcolumn = r#"{"name":"Path","type":"string","jsonPath":".spec.match.path"}"#,
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#,
    printcolumn = r#"{"name":"Pinned","type":"string","jsonPath":".status.conditions[?(@.type==\"DefinitionPinned\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ToolSpec {
    /// How calls are matched.
    #[serde(rename = "match")]
    pub matcher: ToolMatch,
    /// JSON Schema of the input.
    #[serde(default)]
    #[schemars(schema_with = "preserve")]
    pub input_schema: Option<Value>,
    /// Facts for policy.
    #[serde(default)]
    pub risk: Risk,
    /// Cost model.
    #[serde(default)]
    pub cost: Option<CostModel>,
    /// Credential from a Secret.
    #[serde(default)]
    pub credentials: Option<SecretCredential>,
    /// Upstream timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Require an `Idempotency-Key`.
    #[serde(default)]
    pub require_idempotency_key: bool,
    /// TLS passthrough (host-level policy only).
    #[serde(default)]
    pub passthrough: bool,
    /// Canonical-call options (body mode, path matching, meaning-carrying and forwarded
    /// headers, Idempotency-Key forwarding).
    #[serde(default)]
    pub request: tollgate_proxy::config::RequestOptions,
    /// The tool is an LLM API of this provider (usage shape, error envelope, stream usage).
    #[serde(default)]
    pub llm: Option<tollgate_proxy::config::LlmApi>,
    /// Largest request body buffered for this tool.
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// MCP tools: the definition the server must advertise in `tools/list` (its sha256, the
    /// full definition, or both). A different one withholds the tool and refuses its calls
    /// (`tool_definition_changed`); `kubectl tollgate tools diff|pin` review and record it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<tollgate_proxy::config::ToolPin>,
}

/// Status of a tool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolStatus {
    /// Conditions: `Valid`, and for a pinned MCP tool `DefinitionPinned` (`True`/`Matches`,
    /// `False`/`DefinitionChanged`, `Unknown`/`NotObserved`).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Last generation reconciled.
    #[serde(default)]
    pub observed_generation: i64,
    /// The definition a sidecar last reported its MCP server advertising (a changed one is
    /// kept over a matching one), for `kubectl tollgate tools diff` and `tools pin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_definition: Option<ObservedDefinition>,
}

/// A tool definition as a sidecar saw it advertised.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservedDefinition {
    /// Hex sha256 of the canonical definition.
    pub sha256: String,
    /// The canonical definition (`name`, `description`, `inputSchema`); absent when it was
    /// over the sidecar's 16 KiB bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve")]
    pub definition: Option<Value>,
    /// The identity (`namespace/name`) whose sidecar reported it.
    #[serde(default)]
    pub agent: String,
    /// When the sidecar saw it (RFC 3339).
    #[serde(default)]
    pub observed_at: String,
}

/// A Rego module.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyModule {
    /// File name used in errors.
    pub name: String,
    /// Rego source (package `tollgate`).
    pub rego: String,
}

/// Rego policy for agents.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tollgate.dev",
    version = "v1alpha1",
    kind = "AgentPolicy",
    namespaced,
    shortname = "agentpol",
    status = "CommonStatus",
    printcolumn = r#"{"name":"Compiled","type":"string","jsonPath":".status.conditions[?(@.type==\"Compiled\")].status"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Compiled\")].message"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AgentPolicySpec {
    /// One module inline.
    #[serde(default)]
    pub rego: Option<String>,
    /// Several modules.
    #[serde(default)]
    pub modules: Vec<PolicyModule>,
    /// `data.tollgate_config`.
    #[serde(default)]
    #[schemars(schema_with = "preserve")]
    pub data: Option<Value>,
}

/// Tenant-wide limits and budgets (cluster-scoped).
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tollgate.dev",
    version = "v1alpha1",
    kind = "Tenant",
    shortname = "tgtenant",
    status = "TenantStatus",
    printcolumn = r#"{"name":"Day USD","type":"number","jsonPath":".spec.budgets.dayUsd"}"#,
    printcolumn = r#"{"name":"Spent today","type":"number","jsonPath":".status.spendTodayUsd"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// Rate limits.
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
    /// Spend caps.
    #[serde(default)]
    pub budgets: TenantBudgets,
    /// Exposure caps.
    #[serde(default)]
    pub exposure: TenantBudgets,
}

/// Tenant status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    /// Conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Last generation reconciled.
    #[serde(default)]
    pub observed_generation: i64,
    /// Spend today (USD) as reported by sidecars.
    #[serde(default)]
    pub spend_today_usd: f64,
}

/// What a kill switch covers; set fields combine with AND (the sidecar's own type).
pub use tollgate_proxy::config::KillScope as KillSwitchScope;

/// An emergency stop (cluster-scoped).
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tollgate.dev",
    version = "v1alpha1",
    kind = "KillSwitch",
    shortname = "ks",
    shortname = "kill",
    status = "KillSwitchStatus",
    printcolumn = r#"{"name":"Engaged","type":"boolean","jsonPath":".spec.engaged"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".spec.reason"}"#,
    printcolumn = r#"{"name":"By","type":"string","jsonPath":".metadata.annotations.tollgate\\.dev/engaged-by"}"#,
    printcolumn = r#"{"name":"Agents","type":"integer","jsonPath":".status.affectedAgents"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct KillSwitchSpec {
    /// What it covers.
    pub scope: KillSwitchScope,
    /// Engaged (default true).
    #[serde(default = "yes")]
    pub engaged: bool,
    /// Why (shown to the agent and in audit records).
    #[serde(default)]
    pub reason: String,
}

fn yes() -> bool {
    true
}

/// Kill switch status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KillSwitchStatus {
    /// Conditions (`Engaged`).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Last generation reconciled.
    #[serde(default)]
    pub observed_generation: i64,
    /// Number of agents it affects.
    #[serde(default)]
    pub affected_agents: i64,
    /// Which (`namespace/name`).
    #[serde(default)]
    pub agents: Vec<String>,
}

/// A held call waiting for a human.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tollgate.dev",
    version = "v1alpha1",
    kind = "ApprovalRequest",
    namespaced,
    shortname = "apr",
    status = "ApprovalRequestStatus",
    printcolumn = r#"{"name":"Agent","type":"string","jsonPath":".spec.agent"}"#,
    printcolumn = r#"{"name":"Tool","type":"string","jsonPath":".spec.tool"}"#,
    printcolumn = r#"{"name":"Summary","type":"string","jsonPath":".spec.summary"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Approver","type":"string","jsonPath":".status.approver"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".spec.expiresAt"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRequestSpec {
    /// Approval key: sha256 over agent, tenant, tool and canonical input.
    pub key: String,
    /// AgentIdentity name.
    pub agent: String,
    /// The agent's ServiceAccount (it may not approve itself).
    #[serde(default)]
    pub service_account: String,
    /// Tenant.
    pub tenant: String,
    /// Run id.
    #[serde(default)]
    pub run: String,
    /// Tool name.
    pub tool: String,
    /// Human-readable summary: method, target, key fields, reasons.
    pub summary: String,
    /// Policy reasons.
    #[serde(default)]
    pub reasons: Vec<String>,
    /// Redacted input preview.
    #[serde(default)]
    #[schemars(schema_with = "preserve")]
    pub input_preview: Option<Value>,
    /// RFC 3339 expiry.
    pub expires_at: String,
}

/// Approval decision.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRequestStatus {
    /// `Pending`, `Approved`, `Denied`, or `Voided` (a kill switch engaged while it was pending).
    #[serde(default)]
    pub phase: Option<String>,
    /// Stamped from the Kubernetes user by the webhook.
    #[serde(default)]
    pub approver: Option<String>,
    /// The approver's groups.
    #[serde(default)]
    pub approver_groups: Vec<String>,
    /// When decided.
    #[serde(default)]
    pub decided_at: Option<String>,
    /// Reason given.
    #[serde(default)]
    pub reason: Option<String>,
    /// When a sidecar used this approval (single-use approvals are used once, cluster-wide:
    /// the operator records the first use with a conditional write and withdraws the grant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumed_at: Option<String>,
    /// Which sidecar used it (`namespace/agent` and the sidecar instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumed_by: Option<String>,
}

/// One sidecar's audit checkpoint chain, kept by the operator where the pod cannot change it
/// (issue 17): the pod's ServiceAccount has no access to this kind, only the operator writes
/// it. Named `<identity>.<pod>` in the identity's namespace. The spec registers the pod's
/// signing key on first use and is immutable (a CEL rule), so no one — the pod included —
/// can replace the key; the status holds the latest signed checkpoint lines, append-only
/// (each must extend the last) and bounded ([`MAX_STORED_CHECKPOINTS`] lines,
/// [`MAX_STORED_CHECKPOINT_BYTES`] bytes). `kubectl tollgate audit checkpoints` exports them
/// for `tollgate-proxy audit verify --checkpoints`.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tollgate.dev",
    version = "v1alpha1",
    kind = "AuditCheckpoint",
    namespaced,
    shortname = "auditcp",
    status = "AuditCheckpointStatus",
    printcolumn = r#"{"name":"Agent","type":"string","jsonPath":".spec.agent"}"#,
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".spec.pod"}"#,
    printcolumn = r#"{"name":"Key","type":"string","jsonPath":".spec.keyId"}"#,
    printcolumn = r#"{"name":"Seq","type":"integer","jsonPath":".status.seq"}"#,
    printcolumn = r#"{"name":"Last","type":"string","jsonPath":".status.lastCheckpointTime"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AuditCheckpointSpec {
    /// AgentIdentity name.
    pub agent: String,
    /// Pod whose sidecar signs the chain.
    pub pod: String,
    /// The sidecar's Ed25519 public key (base64), registered on first use.
    pub public_key: String,
    /// Its id (first 16 hex digits of its sha256).
    pub key_id: String,
}

/// At most this many checkpoint lines are kept per chain (the oldest go first).
pub const MAX_STORED_CHECKPOINTS: usize = 32;

/// At most this many bytes of checkpoint lines are kept per chain.
pub const MAX_STORED_CHECKPOINT_BYTES: usize = 256 * 1024;

/// The stored checkpoints of one chain.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditCheckpointStatus {
    /// Conditions (`Intact`: `False` while the latest checkpoint published for the chain was
    /// refused, with why — a truncated or rewritten audit file, or another key).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Signed checkpoint lines, oldest first, exactly as the sidecar signed them.
    #[serde(default)]
    pub checkpoints: Vec<String>,
    /// Head seq of the latest checkpoint.
    #[serde(default)]
    pub seq: u64,
    /// Head hash of the latest checkpoint.
    #[serde(default)]
    pub head: String,
    /// Time of the latest checkpoint (as signed).
    #[serde(default)]
    pub last_checkpoint_time: String,
    /// Checkpoints accepted in all (stored or aged out).
    #[serde(default)]
    pub accepted: u64,
    /// Older checkpoints dropped to keep the object bounded (the latest vouches for them).
    #[serde(default)]
    pub pruned: u64,
}

/// Make a generated schema structural: drop `additionalProperties: false` (not allowed next
/// to `properties`), turn `oneOf`/`anyOf` lists of string constants into `enum`, and drop
/// `nullable` inside `additionalProperties`.
fn make_structural(v: &mut Value) {
    match v {
        Value::Object(o) => {
            if o.get("additionalProperties") == Some(&Value::Bool(false)) {
                o.remove("additionalProperties");
            }
            for key in ["oneOf", "anyOf"] {
                let consts: Option<Vec<Value>> =
                    o.get(key).and_then(Value::as_array).and_then(|alts| {
                        alts.iter()
                            .map(|a| {
                                a.get("const").cloned().or_else(|| {
                                    a.get("enum")
                                        .and_then(|e| e.as_array())
                                        .filter(|e| e.len() == 1)
                                        .map(|e| e[0].clone())
                                })
                            })
                            .collect()
                    });
                if let Some(c) = consts {
                    o.remove(key);
                    o.insert("type".into(), json!("string"));
                    o.insert("enum".into(), Value::Array(c));
                }
            }
            for x in o.values_mut() {
                make_structural(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(make_structural),
        _ => {}
    }
}

/// Add a CEL rule at a schema path (`/spec` etc.).
fn cel(crd: &mut Value, path: &[&str], rule: &str, message: &str) {
    let mut p = String::from("/spec/versions/0/schema/openAPIV3Schema");
    for seg in path {
        p.push_str("/properties/");
        p.push_str(seg);
    }
    if let Some(Value::Object(o)) = crd.pointer_mut(&p) {
        let rules = o
            .entry("x-kubernetes-validations")
            .or_insert_with(|| json!([]));
        if let Some(a) = rules.as_array_mut() {
            a.push(json!({"rule": rule, "message": message}));
        }
    }
}

/// Every CRD as `(file name, JSON)`, structural, with CEL rules.
pub fn crds() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut add = |kind: &str, crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        let mut v = serde_json::to_value(crd).expect("CRD serialises");
        make_structural(&mut v);
        match kind {
            "KillSwitch" => cel(
                &mut v,
                &["spec", "scope"],
                "self.all || has(self.__namespace__) || has(self.tenant) || has(self.agent) || has(self.tool)",
                "set all: true or at least one of namespace, tenant, agent, tool",
            ),
            "AgentIdentity" => cel(
                &mut v,
                &["spec"],
                "size(self.tenants) > 0",
                "an agent serves at least one tenant",
            ),
            "AgentPolicy" => cel(
                &mut v,
                &["spec"],
                "has(self.rego) || size(self.modules) > 0",
                "set rego or modules",
            ),
            "Tool" => {
                cel(
                    &mut v,
                    &["spec", "pin"],
                    "has(self.sha256) || has(self.definition)",
                    "set sha256, definition, or both",
                );
                cel(
                    &mut v,
                    &["spec", "pin"],
                    "!has(self.sha256) || self.sha256.matches('^[0-9a-f]{64}$')",
                    "sha256 is 64 lowercase hex digits (the sha256 of the canonical definition)",
                );
            }
            "ApprovalRequest" => cel(
                &mut v,
                &["spec"],
                "self == oldSelf",
                "an ApprovalRequest's spec is immutable",
            ),
            "AuditCheckpoint" => cel(
                &mut v,
                &["spec"],
                "self == oldSelf",
                "an AuditCheckpoint's registered key is immutable",
            ),
            _ => {}
        }
        out.push((format!("{}.yaml", kind.to_lowercase()), v));
    };
    add("AgentIdentity", AgentIdentity::crd());
    add("Tool", Tool::crd());
    add("AgentPolicy", AgentPolicy::crd());
    add("Tenant", Tenant::crd());
    add("KillSwitch", KillSwitch::crd());
    add("ApprovalRequest", ApprovalRequest::crd());
    add("AuditCheckpoint", AuditCheckpoint::crd());
    out
}

/// Check the structural-schema rules the API server enforces; returns each violation.
pub fn structural_violations(schema: &Value, path: &str, out: &mut Vec<String>) {
    let Some(o) = schema.as_object() else {
        out.push(format!("{path}: schema is not an object"));
        return;
    };
    let preserve = o.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    let int_or_string = o.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    if !o.contains_key("type") && !preserve && !int_or_string {
        out.push(format!("{path}: no type"));
    }
    for bad in ["$ref", "definitions", "$defs", "const"] {
        if o.contains_key(bad) {
            out.push(format!("{path}: {bad} is not allowed"));
        }
    }
    if o.get("additionalProperties") == Some(&Value::Bool(false)) {
        out.push(format!("{path}: additionalProperties: false"));
    }
    if o.contains_key("properties") && o.contains_key("additionalProperties") {
        out.push(format!(
            "{path}: properties and additionalProperties together"
        ));
    }
    for key in ["oneOf", "anyOf", "allOf"] {
        if let Some(alts) = o.get(key).and_then(Value::as_array) {
            for (i, a) in alts.iter().enumerate() {
                if a.get("type").is_some() || a.get("properties").is_some() {
                    out.push(format!(
                        "{path}/{key}/{i}: types inside {key} are not structural"
                    ));
                }
            }
        }
    }
    if let Some(p) = o.get("properties").and_then(Value::as_object) {
        for (k, s) in p {
            structural_violations(s, &format!("{path}.{k}"), out);
        }
    }
    if let Some(items) = o.get("items") {
        structural_violations(items, &format!("{path}[]"), out);
    }
    if let Some(ap) = o.get("additionalProperties").filter(|a| a.is_object()) {
        structural_violations(ap, &format!("{path}{{}}"), out);
    }
}

/// Render a CRD as YAML with a generated-file header.
pub fn to_yaml(v: &Value) -> String {
    format!(
        "# Generated by `tollgate-operator crds` (make generate). Do not edit.\n{}",
        yaml_serde::to_string(v).expect("CRD renders as YAML")
    )
}
