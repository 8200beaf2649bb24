//! The standalone config file and the operator snapshot share this one schema.
//!
//! These are the *raw* serde types: camelCase, unknown fields rejected, JSON Schema generated
//! from them (`tollgate-proxy schema`). Nothing downstream reads them directly: they are lowered
//! into a validated [`crate::snapshot::Snapshot`] with `TryFrom`, and only that is served.
//!
//! (One file, about 900 lines: the raw schema types, one per config block, each small; the
//! schema generator needs them in one module tree.)

mod duration;
mod load;

pub use duration::ConfigDuration;
pub use load::{load_file, parse_str, ConfigError};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A whole standalone config file, or the body of an operator snapshot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Listener addresses. Ignored in snapshots served by the operator.
    #[serde(default)]
    pub listen: ListenConfig,
    /// The one agent identity this sidecar serves.
    pub agent: AgentConfig,
    /// Named upstreams for base-URL mode: `http://<proxy>/u/<name>/...`.
    #[serde(default)]
    pub upstreams: BTreeMap<String, String>,
    /// The typed tool catalog. A call that matches no tool is denied.
    #[serde(default)]
    pub tools: Vec<ToolConfig>,
    /// Per-tenant limits and budgets, keyed by tenant id.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Rego modules and their data.
    #[serde(default)]
    pub policies: PoliciesConfig,
    /// Kill switches; an engaged one refuses every call in its scope with 503.
    #[serde(default)]
    pub kill_switches: Vec<KillSwitchConfig>,
    /// Approval gate settings.
    #[serde(default)]
    pub approvals: ApprovalsConfig,
    /// Where rate limits, budgets and idempotency records live.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The audit trail.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Upstream trust and TLS interception.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Connection and body limits of the listeners.
    #[serde(default)]
    pub server: ServerConfig,
}

/// Listener addresses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenConfig {
    /// Forward-proxy and base-URL listener.
    #[serde(default = "default_proxy_addr")]
    pub proxy: String,
    /// Admin listener: `/metrics`, `/healthz`, `/readyz`, `/config`, approvals.
    #[serde(default = "default_admin_addr")]
    pub admin: String,
    /// Transparent-mode listener (iptables REDIRECT target). Off when absent.
    #[serde(default)]
    pub transparent: Option<String>,
}

fn default_proxy_addr() -> String {
    "127.0.0.1:15001".into()
}
fn default_admin_addr() -> String {
    "127.0.0.1:15090".into()
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            proxy: default_proxy_addr(),
            admin: default_admin_addr(),
            transparent: None,
        }
    }
}

/// The agent identity this sidecar serves.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// Agent workflow name, e.g. `billing-dispute-v3`.
    pub name: String,
    /// Kubernetes namespace (or a label in standalone mode).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Tenants this agent may act for. Any other tenant is denied.
    pub tenants: Vec<String>,
    /// `enforce` (default), `shadow` or `dry-run`.
    #[serde(default)]
    pub mode: Mode,
    /// Free-form labels passed to policy as `input.agent.labels`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Per-run and per-agent budgets.
    #[serde(default)]
    pub budget: AgentBudget,
    /// Per-agent rate limits (`scope: agent`, or `scope: tool` for every tenant).
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
    /// What an over-budget call becomes: `deny` (402, default) or `escalate` (approval).
    #[serde(default)]
    pub over_budget: OverBudget,
    /// How old a snapshot may get without an operator heartbeat before calls fail with 503.
    #[serde(default)]
    pub max_staleness: Option<ConfigDuration>,
    /// Keep serving on a stale snapshot instead of failing closed. Counted in a metric.
    #[serde(default)]
    pub fail_open: bool,
    /// How runs start and how run ids are verified.
    #[serde(default)]
    pub runs: RunsConfig,
}

/// Runs: who starts them, and the key their ids are signed with.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunsConfig {
    /// `sidecar` (default): a call without `X-Tollgate-Run` starts a run; `orchestrator`: only
    /// a holder of the key starts runs, and calls without a run id are refused.
    #[serde(default)]
    pub source: RunSource,
    /// HMAC key shared with a trusted orchestrator (at least 16 bytes). Without it the sidecar
    /// signs with a random per-process key.
    #[serde(default)]
    pub key_from: Option<SecretSource>,
}

/// Who starts runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RunSource {
    /// The sidecar mints a run for a call that names none.
    #[default]
    Sidecar,
    /// Only the orchestrator (holding `keyFrom`) starts runs.
    Orchestrator,
}

fn default_namespace() -> String {
    "default".into()
}

/// Enforcement mode of an identity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Refusals are enforced.
    #[default]
    Enforce,
    /// Decide and record, but forward anyway (rollout).
    Shadow,
    /// Decide and record; never forward mutating calls, answer a synthetic 200.
    DryRun,
}

impl Mode {
    /// The name used in config, policy input and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
            Mode::DryRun => "dry-run",
        }
    }
}

/// What happens to a call that would exceed a budget cap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OverBudget {
    /// 402 `over_budget`.
    #[default]
    Deny,
    /// Turn the call into an approval request.
    Escalate,
}

/// Agent-level budget caps, in USD.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentBudget {
    /// Cap on the spend of one run.
    #[serde(default)]
    pub per_run_usd: Option<f64>,
    /// Cap on this agent's spend per UTC day.
    #[serde(default)]
    pub day_usd: Option<f64>,
}

/// One tool in the catalog.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToolConfig {
    /// Typed tool name, e.g. `stripe.create_refund`.
    pub name: String,
    /// How calls are matched to this tool.
    #[serde(rename = "match")]
    pub matcher: ToolMatch,
    /// JSON Schema the tool input must satisfy.
    #[serde(default)]
    #[schemars(schema_with = "any_json")]
    pub input_schema: Option<serde_json::Value>,
    /// Risk facts passed to policy.
    #[serde(default)]
    pub risk: Risk,
    /// Cost model.
    #[serde(default)]
    pub cost: Option<CostModel>,
    /// Credential the sidecar injects; the agent never sees it.
    #[serde(default)]
    pub credentials: Option<Credentials>,
    /// Upstream timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Labels passed to policy as `input.tool.labels`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Require an `Idempotency-Key` header on calls to this tool.
    #[serde(default)]
    pub require_idempotency_key: bool,
    /// Forward TLS to this tool's host without interception (host-level policy only).
    #[serde(default)]
    pub passthrough: bool,
    /// How calls to this tool are canonicalised and rebuilt for the upstream (see SECURITY.md,
    /// "Forwarding what was decided"). Every default is the strict choice.
    #[serde(default)]
    pub request: RequestOptions,
    /// The tool is an LLM API of this provider: usage is read in its shape, refusals are
    /// answered in its error envelope, and `injectStreamUsage` applies only where it works.
    #[serde(default)]
    pub llm: Option<LlmApi>,
    /// Largest request body buffered for this tool (default `server.maxBodyBytes`, or
    /// 32 MiB for an `llm` tool, whose requests carry images and long contexts).
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// MCP tools: the definition the upstream must advertise in `tools/list` (see
    /// [`crate::pins`]). A different one withholds the tool and refuses its calls with
    /// `tool_definition_changed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<ToolPin>,
}

/// The reviewed definition of an MCP tool: its hash, its full definition, or both (which must
/// agree). The hash is the hex sha256 of the canonical form documented in [`crate::pins`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToolPin {
    /// Hex sha256 (64 lowercase digits) of the canonical definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The full definition (name, description, inputSchema), for a readable diff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<PinnedDefinition>,
}

/// The parts of an MCP tool definition that are pinned.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PinnedDefinition {
    /// The MCP tool name (the tool's `match.mcpTool`).
    pub name: String,
    /// The description the model reads (absent when the server sends none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The input schema the server advertises (absent when the server sends none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub input_schema: Option<serde_json::Value>,
}

/// A free-form JSON object kept as written (an MCP `inputSchema` is always an object), marked
/// for Kubernetes so a CRD can carry it.
pub fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// Canonical-call options of a tool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestOptions {
    /// `parsed` (default): JSON or form bodies only, anything else refused. `opaque`: any body
    /// is forwarded as sent (decoded), and policy sees `{"opaque": true, "media_type", "bytes",
    /// "sha256"}` instead of fields; an input schema cannot apply.
    #[serde(default)]
    pub body: BodyMode,
    /// Match literal path segments case-insensitively, for upstreams that route that way
    /// (Express, ASP.NET). Default false: matching is exact.
    #[serde(default)]
    pub path_case_insensitive: bool,
    /// Accept `;` matrix parameters in path segments (stripped for matching, forwarded as
    /// sent). Default false: a `;` in the path is refused.
    #[serde(default)]
    pub path_params: bool,
    /// Headers that change what the call means (e.g. `Stripe-Account`): part of the canonical
    /// call, so policy, the approval hash and the audit record see them; forwarded.
    #[serde(default)]
    pub meaning_headers: Vec<String>,
    /// Headers forwarded besides the default set (see `canonical::DEFAULT_FORWARD_HEADERS`).
    #[serde(default)]
    pub forward_headers: Vec<String>,
    /// How an agent's `Idempotency-Key` reaches the upstream: `namespaced` (default, a hash of
    /// agent, tenant and key) or `verbatim` (only when the agent brings its own credential;
    /// refused when Tollgate injects one, as keys would then be shared across tenants).
    #[serde(default)]
    pub idempotency_key: IdempotencyKeyForwarding,
}

/// What a tool's body may be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BodyMode {
    /// JSON or form-urlencoded, parsed strictly.
    #[default]
    Parsed,
    /// Any media type, not parsed.
    Opaque,
}

/// How the `Idempotency-Key` is forwarded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum IdempotencyKeyForwarding {
    /// `hex(sha256("tollgate-idempotency-v1" NUL agent NUL tenant NUL key))`.
    #[default]
    Namespaced,
    /// The agent's key unchanged (refused under an injected credential).
    Verbatim,
}

/// An LLM API declaration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LlmApi {
    /// Whose API this is.
    pub provider: LlmProvider,
}

/// LLM API providers whose request, usage and error shapes Tollgate speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum LlmProvider {
    /// OpenAI: chat/completions, completions, responses.
    Openai,
    /// An OpenAI-compatible server (vLLM, llama.cpp, LiteLLM, Ollama's `/v1`).
    OpenaiCompatible,
    /// Anthropic messages.
    Anthropic,
    /// Google Gemini `generateContent` / `streamGenerateContent`.
    Gemini,
}

/// Free-form JSON (schemas, Rego data): any value.
pub fn any_json(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({})
}

/// Matching rule of a tool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToolMatch {
    /// Host name or IP, optionally `:port`; `*.example.com` wildcards one or more labels.
    pub host: String,
    /// HTTP methods; empty means any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Path template, e.g. `/v1/charges/{id}`; `{name}` matches one segment, a final `{*rest}` the remainder.
    #[serde(default)]
    pub path: Option<String>,
    /// MCP tool name for JSON-RPC `tools/call`.
    #[serde(default)]
    pub mcp_tool: Option<String>,
    /// Scheme; when absent both `http` and `https` match.
    #[serde(default)]
    pub scheme: Option<String>,
}

/// Risk facts of a tool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Risk {
    /// Can the effect be undone?
    #[serde(default = "yes")]
    pub reversible: bool,
    /// Does the call move money?
    #[serde(default)]
    pub financial: bool,
    /// Data class, e.g. `public`, `internal`, `pii`, `pci`.
    #[serde(default = "default_data_class")]
    pub data_class: String,
}

fn yes() -> bool {
    true
}
fn default_data_class() -> String {
    "internal".into()
}

impl Default for Risk {
    fn default() -> Self {
        Self {
            reversible: true,
            financial: false,
            data_class: default_data_class(),
        }
    }
}

/// How a call's cost is estimated and metered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CostModel {
    /// Fixed spend per call.
    #[serde(default)]
    pub per_call_usd: Option<f64>,
    /// Exposure per unit of `unitField` (e.g. refund amount in cents).
    #[serde(default)]
    pub per_unit_usd: Option<f64>,
    /// Input field (dotted path) counted by `perUnitUsd`.
    #[serde(default)]
    pub unit_field: Option<String>,
    /// LLM token pricing; cost comes from the response `usage`.
    #[serde(default)]
    pub llm: Option<LlmCost>,
}

/// LLM token prices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LlmCost {
    /// Prices per model name.
    pub prices: BTreeMap<String, ModelPrice>,
    /// `max_tokens` assumed for the estimate when the request sets none.
    #[serde(default)]
    pub default_max_tokens: Option<u64>,
    /// Inject `stream_options.include_usage` into streamed requests that lack it.
    #[serde(default)]
    pub inject_stream_usage: bool,
}

/// Price of one model, in USD per million tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelPrice {
    /// USD per million prompt (input) tokens.
    pub prompt_per_mtok: f64,
    /// USD per million completion (output) tokens.
    pub completion_per_mtok: f64,
    /// This model's output limit, assumed when a request sets no `max_tokens` (before the
    /// tool's `defaultMaxTokens`).
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
}

/// A credential injected into the upstream request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Credentials {
    /// Header to set, e.g. `Authorization`.
    pub header: String,
    /// Prefix before the secret, e.g. `Bearer `.
    #[serde(default)]
    pub prefix: String,
    /// Where the secret comes from.
    pub value_from: SecretSource,
}

/// Where a secret value is read from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretSource {
    /// Environment variable name.
    #[serde(default)]
    pub env: Option<String>,
    /// File path (e.g. a mounted Secret key); trailing newline trimmed.
    #[serde(default)]
    pub file: Option<String>,
}

/// Upstream timeouts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// TCP+TLS connect timeout (default 2s).
    #[serde(default)]
    pub connect: Option<ConfigDuration>,
    /// Time to response headers (default: the total).
    #[serde(default)]
    pub header: Option<ConfigDuration>,
    /// Whole call, body included (default 30s; 15m for an `llm` tool, whose answers stream).
    #[serde(default)]
    pub total: Option<ConfigDuration>,
    /// Longest pause between two pieces of a response body, e.g. SSE events (default 5m
    /// for an `llm` tool, else the total). A stream cut by either timeout ends with an error
    /// the client sees and is recorded as cut.
    #[serde(default)]
    pub idle: Option<ConfigDuration>,
}

/// Per-tenant limits and budgets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantConfig {
    /// Rate limits in this tenant.
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
    /// Spend caps of this tenant.
    #[serde(default)]
    pub budgets: TenantBudgets,
    /// Caps on financial exposure (sum of `perUnitUsd` cost), separate from spend.
    #[serde(default)]
    pub exposure: TenantBudgets,
}

/// Tenant caps in USD.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantBudgets {
    /// Cap per UTC day.
    #[serde(default)]
    pub day_usd: Option<f64>,
    /// Cap per UTC calendar month.
    #[serde(default)]
    pub month_usd: Option<f64>,
}

/// One rate limit. Exactly one of `perSecond`, `perMinute`, `perHour` is set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitConfig {
    /// `tenant`, `agent` or `tool` (per tenant and tool).
    pub scope: RateLimitScope,
    /// Tool name, for `scope: tool`.
    #[serde(default)]
    pub tool: Option<String>,
    /// Calls per second.
    #[serde(default)]
    pub per_second: Option<u32>,
    /// Calls per minute.
    #[serde(default)]
    pub per_minute: Option<u32>,
    /// Calls per hour.
    #[serde(default)]
    pub per_hour: Option<u32>,
    /// Burst size (default: the rate's count).
    #[serde(default)]
    pub burst: Option<u32>,
}

/// What a rate limit is keyed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RateLimitScope {
    /// The whole tenant.
    Tenant,
    /// The agent (across tenants).
    Agent,
    /// One tool within a tenant.
    Tool,
}

/// Rego sources and data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoliciesConfig {
    /// `.rego` files and directories, relative to the config file.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Inline modules (the operator ships `AgentPolicy` Rego this way).
    #[serde(default)]
    pub modules: Vec<RegoModule>,
    /// Data exposed to policy as `data.tollgate_config`.
    #[serde(default)]
    #[schemars(schema_with = "any_json")]
    pub data: serde_json::Value,
    /// Evaluation time limit per call (default 50ms). Exceeding it denies.
    #[serde(default)]
    pub timeout: Option<ConfigDuration>,
}

/// One inline Rego module.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegoModule {
    /// Name used in error messages, e.g. `default/refund-limits.rego`.
    pub name: String,
    /// Rego source.
    pub rego: String,
}

/// A kill switch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KillSwitchConfig {
    /// Name, shown in the refusal.
    pub name: String,
    /// Which calls it stops. Every set field must match; `all: true` matches everything.
    pub scope: KillScope,
    /// Whether it is engaged (default true).
    #[serde(default = "yes")]
    pub engaged: bool,
    /// Why, e.g. an incident id.
    #[serde(default)]
    pub reason: String,
}

/// Kill switch scope.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KillScope {
    /// Every call.
    #[serde(default)]
    pub all: bool,
    /// Agents in this namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Calls for this tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    /// This agent.
    #[serde(default)]
    pub agent: Option<String>,
    /// This tool.
    #[serde(default)]
    pub tool: Option<String>,
}

/// Approval gate settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// How long a request (and a grant) stays valid (default 15m).
    #[serde(default)]
    pub ttl: Option<ConfigDuration>,
    /// A grant allows exactly one identical call (default true).
    #[serde(default = "yes")]
    pub single_use: bool,
    /// Grants delivered by the operator snapshot.
    #[serde(default)]
    pub granted: Vec<ApprovalGrant>,
    /// Standalone: bearer tokens for the admin approval API, each bound to an approver name.
    #[serde(default)]
    pub admin_tokens: Vec<AdminToken>,
    /// Longest `Prefer: wait=N` hold, in seconds (default 60).
    #[serde(default)]
    pub max_wait_s: Option<u64>,
    /// Most approval requests this agent may have pending at once (default 100); past it,
    /// calls needing a new approval are refused until some are decided or expire.
    #[serde(default)]
    pub max_pending: Option<usize>,
    /// Slack-compatible webhook URL notified of new requests.
    #[serde(default)]
    pub notify_url: Option<String>,
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        Self {
            ttl: None,
            single_use: true,
            granted: Vec::new(),
            admin_tokens: Vec::new(),
            max_wait_s: None,
            max_pending: None,
            notify_url: None,
        }
    }
}

/// A decided approval, bound to the sha256 of one exact call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApprovalGrant {
    /// Approval request name/id.
    pub id: String,
    /// Hex sha256 of (agent, tenant, tool, canonical input).
    pub key: String,
    /// `approved` or `denied`.
    pub decision: String,
    /// Who decided.
    #[serde(default)]
    pub approver: String,
    /// RFC 3339 time of the decision.
    #[serde(default)]
    pub decided_at: String,
    /// RFC 3339 expiry.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// Reason given by the approver.
    #[serde(default)]
    pub reason: Option<String>,
}

/// An admin API token and the approver it stands for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminToken {
    /// Approver name recorded in the audit trail.
    pub approver: String,
    /// Where the token comes from.
    pub value_from: SecretSource,
}

/// Limits backend.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsConfig {
    /// `local` (default) or `redis`.
    #[serde(default)]
    pub backend: LimitsBackend,
    /// Redis URL of a single node (`redis://`, `rediss://`).
    #[serde(default)]
    pub url: Option<String>,
    /// Redis Sentinel instead of `url`: the sentinels are asked for the primary.
    #[serde(default)]
    pub sentinel: Option<RedisSentinelConfig>,
    /// Redis Cluster instead of `url`: seed nodes; the slot map is discovered.
    #[serde(default)]
    pub cluster: Option<RedisClusterConfig>,
    /// Hash tag of every limits key (default `tg`): all keys of one reservation share it, so
    /// they live in one Cluster slot. Sidecars that share budgets must use the same tag.
    #[serde(default)]
    pub hash_tag: Option<String>,
    /// Replicas that must acknowledge a budget reservation (Redis `WAIT`) before the call is
    /// forwarded (default 0). With 1 or more, a reservation survives the loss of its primary;
    /// one that is not acknowledged in time is released and handled as `onUnavailable`.
    #[serde(default)]
    pub min_replicas: u32,
    /// When Redis is unreachable: `deny` (default) or `local`.
    #[serde(default)]
    pub on_unavailable: OnUnavailable,
    /// Idempotency record lifetime (default 24h).
    #[serde(default)]
    pub idempotency_ttl: Option<ConfigDuration>,
    /// Reservation lifetime before an unsettled one is released (default 5m).
    #[serde(default)]
    pub reservation_ttl: Option<ConfigDuration>,
    /// Require an `Idempotency-Key` on mutating calls to tools with `risk.reversible: false`.
    #[serde(default)]
    pub require_idempotency_key_for_irreversible: bool,
}

/// `limits.sentinel`: Redis Sentinel.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisSentinelConfig {
    /// Sentinel URLs (`redis://host:26379`), asked in turn.
    pub urls: Vec<String>,
    /// The monitored primary's name (`sentinel monitor NAME ...`).
    pub master_name: String,
}

/// `limits.cluster`: Redis Cluster.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisClusterConfig {
    /// Seed node URLs (`redis://host:7000`); credentials are taken from the first.
    pub urls: Vec<String>,
}

/// Limits backend kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LimitsBackend {
    /// In-process.
    #[default]
    Local,
    /// Cluster-wide on Redis.
    Redis,
}

/// Fallback when Redis is unreachable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OnUnavailable {
    /// Refuse calls (503).
    #[default]
    Deny,
    /// Fall back to local limits (fail-open path; counted).
    Local,
}

/// Audit trail.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditConfig {
    /// JSONL file path (default `audit.jsonl`).
    #[serde(default = "default_audit_path")]
    pub path: String,
    /// Also write each record to stdout.
    #[serde(default)]
    pub stdout: bool,
    /// Forward calls even when the record cannot be made durable. Counted.
    #[serde(default)]
    pub fail_open: bool,
    /// Rotate the file after this many bytes (default 100 MiB).
    #[serde(default)]
    pub max_file_bytes: Option<u64>,
    /// Longest wait for a group commit (default 2ms).
    #[serde(default)]
    pub commit_interval: Option<ConfigDuration>,
    /// Redaction rules for recorded input.
    #[serde(default)]
    pub redaction: RedactionConfig,
    /// Signed checkpoints of the chain, published to a second sink (off when absent).
    #[serde(default)]
    pub checkpoints: Option<AuditCheckpointConfig>,
    /// Shipping and pruning of rotated files.
    #[serde(default)]
    pub retention: AuditRetentionConfig,
}

/// Signed checkpoints of the audit chain (record count, head hash, file set), written
/// periodically and at shutdown to a sink the writer's volume does not hold, so that
/// `audit verify --checkpoints` detects truncation, a rewritten chain and a replaced file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditCheckpointConfig {
    /// JSONL file the checkpoints are appended to (on another volume than the audit files).
    #[serde(default)]
    pub path: Option<String>,
    /// Also print each checkpoint to stdout (for the log pipeline).
    #[serde(default)]
    pub stdout: bool,
    /// Time between checkpoints (default 60s). One is also written at start and at shutdown.
    #[serde(default)]
    pub interval: Option<ConfigDuration>,
    /// Ed25519 signing key (PKCS#8, base64), generated at first start with mode 0600; its
    /// public half is written beside it as `<keyFile>.pub` (default `audit-checkpoint.key`).
    #[serde(default)]
    pub key_file: Option<String>,
}

/// Shipping and pruning of rotated audit files.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditRetentionConfig {
    /// Delete rotated files whose last write is older than this (never the live file). With a
    /// `shipCommand`, only files it has shipped successfully are deleted.
    #[serde(default)]
    pub max_age: Option<ConfigDuration>,
    /// Command run for every rotated file, with the file's path appended as the last
    /// argument (e.g. `[sh, -c, 'cp "$0" /archive/']`); exit 0 means shipped. It runs again
    /// for rotated files found at start, so it must be idempotent.
    #[serde(default)]
    pub ship_command: Vec<String>,
}

fn default_audit_path() -> String {
    "audit.jsonl".into()
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            path: default_audit_path(),
            stdout: false,
            fail_open: false,
            max_file_bytes: None,
            commit_interval: None,
            redaction: RedactionConfig::default(),
            checkpoints: None,
            retention: AuditRetentionConfig::default(),
        }
    }
}

/// What is masked in recorded input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedactionConfig {
    /// Mask emails, card numbers, SSNs, phone numbers and bearer tokens (default true).
    #[serde(default = "yes")]
    pub pii: bool,
    /// Extra header names to drop (auth headers are always dropped).
    #[serde(default)]
    pub headers: Vec<String>,
    /// Body field names whose values are masked wherever they appear.
    #[serde(default)]
    pub fields: Vec<String>,
    /// Extra regexes masked in string values.
    #[serde(default)]
    pub patterns: Vec<String>,
}

impl Default for RedactionConfig {
    fn default() -> Self {
        Self {
            pii: true,
            headers: Vec::new(),
            fields: Vec::new(),
            patterns: Vec::new(),
        }
    }
}

/// TLS settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// Extra CA (PEM) trusted for upstreams, beside the webpki roots.
    #[serde(default)]
    pub extra_ca_file: Option<String>,
    /// Interception CA for CONNECT and transparent mode.
    #[serde(default)]
    pub intercept: Option<InterceptConfig>,
}

/// Interception CA files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InterceptConfig {
    /// CA certificate (PEM).
    pub ca_cert: String,
    /// CA private key (PEM).
    pub ca_key: String,
}

/// Listener limits.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerConfig {
    /// Largest request body buffered (default 1 MiB); larger gets 413.
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// Time allowed to send request headers (default 10s).
    #[serde(default)]
    pub header_read_timeout: Option<ConfigDuration>,
    /// Time allowed to send the request body (default 30s).
    #[serde(default)]
    pub body_read_timeout: Option<ConfigDuration>,
    /// Largest total request header size (default 64 KiB).
    #[serde(default)]
    pub max_header_bytes: Option<usize>,
    /// Most request headers (default 100).
    #[serde(default)]
    pub max_headers: Option<usize>,
    /// Ports a CONNECT may target (default [443]).
    #[serde(default)]
    pub connect_ports: Vec<u16>,
    /// An agent connection (HTTP/1 keep-alive, h2c, HTTP/2 in a tunnel) with no request in
    /// flight for this long is closed gracefully (default 60s).
    #[serde(default)]
    pub idle_timeout: Option<ConfigDuration>,
}

/// The JSON Schema of [`Config`], as published in `proxy/config.schema.json`.
pub fn json_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(Config);
    serde_json::to_value(schema).expect("schema serialises")
}
