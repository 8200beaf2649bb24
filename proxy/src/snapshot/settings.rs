//! The request-path settings of a snapshot, lowered from the raw config with every default
//! applied here, once: nothing on the request path reads the raw config or decides a default.

use crate::config::{
    AgentBudget, ApprovalGrant, Config, ConfigError, LimitsConfig, ListenConfig, OverBudget,
    RateLimitConfig, RedactionConfig, ServerConfig, TenantConfig,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Most pending approval requests one sidecar (one agent) holds by default.
pub(crate) const DEFAULT_MAX_PENDING: usize = 100;

/// Default `maxStaleness`.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(60);
/// Default time to receive a request body.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default approval request lifetime.
pub const DEFAULT_APPROVAL_TTL: Duration = Duration::from_secs(15 * 60);
/// Default longest `Prefer: wait`.
pub const DEFAULT_APPROVAL_MAX_WAIT: Duration = Duration::from_secs(60);
/// Default policy evaluation budget.
pub const DEFAULT_POLICY_TIMEOUT: Duration = Duration::from_millis(50);
/// (connect, response headers, total) for calls no tool times (MCP session messages).
pub const DEFAULT_TIMEOUTS: (Duration, Duration, Duration) = (
    Duration::from_secs(2),
    Duration::from_secs(30),
    Duration::from_secs(30),
);

/// Agent-level gates beyond the identity.
#[derive(Clone, Debug)]
pub(super) struct AgentGates {
    /// Keep serving on a stale snapshot (counted).
    pub fail_open: bool,
    /// What an over-budget call becomes.
    pub over_budget: OverBudget,
    /// How old a snapshot may get without a heartbeat.
    pub max_staleness: Duration,
    /// Per-run and per-agent budgets.
    pub budget: AgentBudget,
    /// Per-agent rate limits.
    pub rate_limits: Vec<RateLimitConfig>,
    /// How runs start and verify.
    pub runs: crate::identify::Runs,
}

/// Approval settings.
#[derive(Clone, Debug)]
pub struct Approvals {
    /// Lifetime of a request.
    pub ttl: Duration,
    /// A grant lets exactly one call through.
    pub single_use: bool,
    /// Operator-delivered decisions.
    pub granted: Vec<ApprovalGrant>,
    /// Longest `Prefer: wait`.
    pub max_wait: Duration,
    /// Slack-compatible webhook for new requests.
    pub notify_url: Option<String>,
    /// Most pending requests held at once.
    pub max_pending: usize,
}

/// Audit settings.
#[derive(Clone, Debug)]
pub struct Audit {
    /// Answer calls even when a record cannot be written (counted).
    pub fail_open: bool,
    /// What is redacted from recorded inputs.
    pub redaction: RedactionConfig,
    /// Log path (resolved against the config's directory at start).
    pub path: String,
    /// Also write records to stdout.
    pub stdout: bool,
    /// Rotate past this size.
    pub max_file_bytes: Option<u64>,
    /// Signed checkpoints (read at start).
    pub checkpoints: Option<crate::config::AuditCheckpointConfig>,
    /// Shipping and pruning of rotated files (read at start).
    pub retention: crate::config::AuditRetentionConfig,
}

/// Listener and connection settings.
#[derive(Clone, Debug)]
pub struct Server {
    /// Time to receive a request body.
    pub body_read_timeout: Duration,
    /// Ports a CONNECT may name.
    pub connect_ports: Vec<u16>,
    /// Connection limits (header size and timeouts), read by the listeners.
    pub connection: ServerConfig,
    /// Listen addresses (read at start).
    pub listen: ListenConfig,
    /// Extra CA for upstream TLS (read at start).
    pub extra_ca_file: Option<String>,
}

/// Everything `Snapshot::build` lowers besides tools, routes and policy.
pub(super) struct Settings {
    /// Agent-level gates.
    pub agent: AgentGates,
    /// Tenants and their limits.
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Approvals.
    pub approvals: Approvals,
    /// Audit.
    pub audit: Audit,
    /// Limits backend (read at start) and idempotency requirements.
    pub limits: LimitsConfig,
    /// Server.
    pub server: Server,
    /// The config as loaded, for `/config` (secrets are references, never values).
    pub redacted: serde_json::Value,
}

/// Lower the settings of `raw`.
pub(super) fn lower(raw: &Config, base_dir: &Path) -> Result<Settings, ConfigError> {
    let a = &raw.agent;
    let key = match &a.runs.key_from {
        None => None,
        Some(src) => {
            let k = super::read_secret(src, "agent.runs.keyFrom", base_dir)?;
            if k.len() < 16 {
                return Err(ConfigError::invalid(
                    "agent.runs.keyFrom",
                    "the run key must be at least 16 bytes",
                ));
            }
            Some(k.into_bytes())
        }
    };
    let ap = &raw.approvals;
    let au = &raw.audit;
    let sv = &raw.server;
    if let Some(c) = &au.checkpoints {
        if c.path.is_none() && !c.stdout {
            return Err(ConfigError::invalid(
                "audit.checkpoints",
                "give a path (on another volume than the audit files) and/or stdout: true",
            ));
        }
    }
    let mut redacted = serde_json::to_value(raw).unwrap_or_default();
    if let Some(o) = redacted.as_object_mut() {
        // Rego sources and data can be large and are pinned by the bundle hash instead.
        o.remove("policies");
    }
    Ok(Settings {
        agent: AgentGates {
            fail_open: a.fail_open,
            over_budget: a.over_budget,
            max_staleness: a
                .max_staleness
                .map(|d| d.get())
                .unwrap_or(DEFAULT_MAX_STALENESS),
            budget: a.budget.clone(),
            rate_limits: a.rate_limits.clone(),
            runs: crate::identify::Runs::new(a.runs.source, key),
        },
        tenants: raw.tenants.clone(),
        approvals: Approvals {
            ttl: ap.ttl.map(|d| d.get()).unwrap_or(DEFAULT_APPROVAL_TTL),
            single_use: ap.single_use,
            granted: ap.granted.clone(),
            max_wait: ap
                .max_wait_s
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_APPROVAL_MAX_WAIT),
            notify_url: ap.notify_url.clone(),
            max_pending: ap.max_pending.unwrap_or(DEFAULT_MAX_PENDING),
        },
        audit: Audit {
            fail_open: au.fail_open,
            redaction: au.redaction.clone(),
            path: au.path.clone(),
            stdout: au.stdout,
            max_file_bytes: au.max_file_bytes,
            checkpoints: au.checkpoints.clone(),
            retention: au.retention.clone(),
        },
        limits: raw.limits.clone(),
        server: Server {
            body_read_timeout: sv
                .body_read_timeout
                .map(|d| d.get())
                .unwrap_or(DEFAULT_BODY_READ_TIMEOUT),
            connect_ports: if sv.connect_ports.is_empty() {
                vec![443]
            } else {
                sv.connect_ports.clone()
            },
            connection: sv.clone(),
            listen: raw.listen.clone(),
            extra_ca_file: raw.tls.extra_ca_file.clone(),
        },
        redacted,
    })
}
