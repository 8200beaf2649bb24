//! The validated, internal form of a config: built once per file load or operator snapshot
//! (`Snapshot::build`), then shared read-only behind an `Arc` and swapped atomically.
//!
//! Everything that can fail — tool templates, schemas, credentials, Rego — fails here, at load
//! time, with the field named; the request path never re-parses raw config.
//!
//! (One file, about 600 lines: `Snapshot::build` and the per-part compilers it calls; the
//! settings it lowers live in `settings.rs`.)

mod settings;

pub use settings::{
    Approvals, Audit, Server, DEFAULT_APPROVAL_MAX_WAIT, DEFAULT_APPROVAL_TTL,
    DEFAULT_BODY_READ_TIMEOUT, DEFAULT_MAX_STALENESS, DEFAULT_POLICY_TIMEOUT, DEFAULT_TIMEOUTS,
};

use crate::config::{
    self, AgentBudget, Config, ConfigError, KillSwitchConfig, LimitsConfig, Mode, OverBudget,
    RateLimitConfig, TenantConfig, ToolConfig,
};
use crate::policy::PolicyBundle;
use crate::route::{parse_host_pattern, Catalog, MatchRule, PathTemplate};
use crate::target::{parse_authority, Scheme};
use http::{HeaderName, HeaderValue};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Default body buffer limit.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;

/// Default body buffer limit of an `llm` tool: requests carry images and long contexts.
pub const LLM_MAX_BODY: usize = 32 * 1024 * 1024;

/// One tool, compiled.
pub struct Tool {
    /// Raw definition (for policy input and `/config`).
    pub config: ToolConfig,
    /// Compiled input schema.
    pub schema: Option<Arc<jsonschema::Validator>>,
    /// Injected credential header.
    pub credential: Option<Credential>,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Time to response headers.
    pub header_timeout: Duration,
    /// Whole call.
    pub total_timeout: Duration,
    /// Longest pause between two pieces of a response body.
    pub idle_timeout: Duration,
    /// Request body limit.
    pub max_body: usize,
    /// How a call to this tool is canonicalised (built once here, not per call).
    pub call_options: crate::canonical::CallOptions,
    /// Agent headers this tool forwards beyond the default set.
    pub forward_headers: Vec<http::HeaderName>,
    /// Declared LLM provider (`llm.provider`).
    pub provider: Option<config::LlmProvider>,
    /// Mutating (anything but GET/HEAD/OPTIONS) — computed per call, kept for MCP tools.
    pub mcp: bool,
    /// The definition its MCP server must advertise (see [`crate::pins`]).
    pub pin: Option<crate::pins::Pin>,
}

impl std::fmt::Debug for Tool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tool")
            .field("name", &self.config.name)
            .finish()
    }
}

impl Tool {
    /// Tool name.
    pub fn name(&self) -> &str {
        &self.config.name
    }
}

/// A credential resolved from env or file. The value is marked sensitive.
#[derive(Clone, Debug)]
pub struct Credential {
    /// Header name.
    pub header: HeaderName,
    /// Full header value (prefix + secret).
    pub value: HeaderValue,
}

/// A base-URL upstream (`/u/<name>/…`).
#[derive(Clone, Debug)]
pub struct Upstream {
    /// Scheme.
    pub scheme: Scheme,
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path prefix to prepend (no trailing slash; empty for none).
    pub base_path: String,
}

/// The agent this sidecar serves.
#[derive(Clone, Debug)]
pub struct Agent {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Tenants.
    pub tenants: Vec<String>,
    /// Mode.
    pub mode: Mode,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Keep serving on a stale snapshot (counted).
    pub fail_open: bool,
    /// What an over-budget call becomes.
    pub over_budget: OverBudget,
    /// How old a snapshot may get without an operator heartbeat.
    pub max_staleness: Duration,
    /// Per-run and per-agent budgets.
    pub budget: AgentBudget,
    /// Per-agent rate limits.
    pub rate_limits: Vec<RateLimitConfig>,
    /// How runs start and how their ids verify.
    pub runs: crate::identify::Runs,
}

/// The validated snapshot.
pub struct Snapshot {
    /// Monotonic version (file reload count, or the operator's version).
    pub version: u64,
    /// sha256 of the raw config (secrets are references, never values).
    pub hash: String,
    /// Agent.
    pub agent: Agent,
    /// Tools, indexed by the catalog.
    pub tools: Vec<Tool>,
    /// Tool name → index.
    pub tool_index: HashMap<String, usize>,
    /// Matcher.
    pub catalog: Catalog,
    /// Base-URL upstreams.
    pub upstreams: HashMap<String, Upstream>,
    /// Compiled policy.
    pub policy: PolicyBundle,
    /// Compiled audit redaction (`audit.redaction`).
    pub redactor: crate::redact::Redactor,
    /// Engaged kill switches.
    pub kill_switches: Vec<KillSwitchConfig>,
    /// Body limit.
    pub max_body: usize,
    /// Admin approval API tokens: (token, approver name).
    pub admin_tokens: Vec<(String, String)>,
    /// Interception CA (`tls.intercept`), for CONNECT and transparent mode.
    pub intercept: Option<Arc<crate::ca::InterceptCa>>,
    /// Tenants and their limits.
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Approval settings.
    pub approvals: Approvals,
    /// Audit settings.
    pub audit: Audit,
    /// Limits backend (read at start) and idempotency requirements.
    pub limits: LimitsConfig,
    /// Listener, connection and body settings.
    pub server: Server,
    /// The config as loaded, for `/config` (secrets are references, never values).
    pub redacted: serde_json::Value,
    /// When it was built.
    pub loaded_at: SystemTime,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("version", &self.version)
            .field("hash", &self.hash)
            .finish()
    }
}

impl Snapshot {
    /// Validate and compile a raw config. `base_dir` resolves relative policy paths.
    pub fn build(raw: Config, version: u64, base_dir: &Path) -> Result<Self, ConfigError> {
        let lowered = settings::lower(&raw, base_dir)?;
        let max_body = raw.server.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY);
        let agent = validate_agent(&raw, lowered.agent)?;
        let mut tools = Vec::with_capacity(raw.tools.len());
        let mut rules = Vec::new();
        let mut tool_index = HashMap::new();
        for (i, t) in raw.tools.iter().enumerate() {
            let field = format!("tools[{i}]");
            if t.name.trim().is_empty() {
                return Err(ConfigError::invalid(
                    format!("{field}.name"),
                    "must not be empty",
                ));
            }
            if tool_index.insert(t.name.clone(), i).is_some() {
                return Err(ConfigError::invalid(
                    format!("{field}.name"),
                    format!("duplicate tool {:?}", t.name),
                ));
            }
            rules.push(compile_match(i, t, &field)?);
            tools.push(compile_tool(t, &field, base_dir, max_body)?);
        }
        let mut upstreams = HashMap::new();
        for (name, url) in &raw.upstreams {
            upstreams.insert(
                name.clone(),
                parse_upstream(url)
                    .map_err(|m| ConfigError::invalid(format!("upstreams.{name}"), m))?,
            );
        }
        for (i, ks) in raw.kill_switches.iter().enumerate() {
            let s = &ks.scope;
            if !s.all
                && s.namespace.is_none()
                && s.tenant.is_none()
                && s.agent.is_none()
                && s.tool.is_none()
            {
                return Err(ConfigError::invalid(
                    format!("killSwitches[{i}].scope"),
                    "set `all: true` or at least one of namespace, tenant, agent, tool",
                ));
            }
        }
        for (id, tenant) in &raw.tenants {
            for (i, rl) in tenant.rate_limits.iter().enumerate() {
                let n = [rl.per_second, rl.per_minute, rl.per_hour]
                    .iter()
                    .filter(|x| x.is_some())
                    .count();
                if n != 1 {
                    return Err(ConfigError::invalid(
                        format!("tenants.{id}.rateLimits[{i}]"),
                        "set exactly one of perSecond, perMinute, perHour",
                    ));
                }
            }
        }
        let intercept = match &raw.tls.intercept {
            None => None,
            Some(ic) => Some(Arc::new(
                crate::ca::InterceptCa::load(
                    &resolve(base_dir, &ic.ca_cert),
                    &resolve(base_dir, &ic.ca_key),
                )
                .map_err(|e| ConfigError::invalid("tls.intercept", e.to_string()))?,
            )),
        };
        let modules = load_policy_modules(&raw.policies, base_dir)?;
        let timeout = raw
            .policies
            .timeout
            .map(|d| d.get())
            .unwrap_or(DEFAULT_POLICY_TIMEOUT);
        let policy = PolicyBundle::compile(&modules, &raw.policies.data, timeout)
            .map_err(|e| ConfigError::Policy(e.to_string()))?;
        let hash = hex::encode(Sha256::digest(serde_json::to_vec(&raw).unwrap_or_default()));
        let mut admin_tokens = Vec::new();
        for (i, t) in raw.approvals.admin_tokens.iter().enumerate() {
            let field = format!("approvals.adminTokens[{i}]");
            let token = read_secret(&t.value_from, &field, base_dir)?;
            if token.len() < 16 {
                return Err(ConfigError::invalid(
                    field,
                    "token must be at least 16 characters",
                ));
            }
            admin_tokens.push((token, t.approver.clone()));
        }
        Ok(Self {
            version,
            hash,
            agent,
            catalog: Catalog::new(rules),
            tools,
            tool_index,
            upstreams,
            policy,
            redactor: crate::redact::Redactor::new(&raw.audit.redaction),
            kill_switches: raw
                .kill_switches
                .iter()
                .filter(|k| k.engaged)
                .cloned()
                .collect(),
            max_body,
            admin_tokens,
            intercept,
            tenants: lowered.tenants,
            approvals: lowered.approvals,
            audit: lowered.audit,
            limits: lowered.limits,
            server: lowered.server,
            redacted: lowered.redacted,
            loaded_at: SystemTime::now(),
        })
    }

    /// Look a tool up by name.
    pub fn tool(&self, name: &str) -> Option<&Tool> {
        self.tool_index.get(name).map(|&i| &self.tools[i])
    }
}

fn validate_agent(raw: &Config, g: settings::AgentGates) -> Result<Agent, ConfigError> {
    let a = &raw.agent;
    if a.name.trim().is_empty() {
        return Err(ConfigError::invalid("agent.name", "must not be empty"));
    }
    if a.tenants.is_empty() {
        return Err(ConfigError::invalid(
            "agent.tenants",
            "list at least one tenant",
        ));
    }
    for (i, t) in a.tenants.iter().enumerate() {
        if !is_token(t) {
            return Err(ConfigError::invalid(
                format!("agent.tenants[{i}]"),
                format!("{t:?} must be letters, digits, '_', '-', '.' only"),
            ));
        }
    }
    Ok(Agent {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        tenants: a.tenants.clone(),
        mode: a.mode,
        labels: a.labels.clone(),
        fail_open: g.fail_open,
        over_budget: g.over_budget,
        max_staleness: g.max_staleness,
        budget: g.budget,
        rate_limits: g.rate_limits,
        runs: g.runs,
    })
}

/// Header-safe identifier: tenant and run ids.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

fn compile_match(i: usize, t: &ToolConfig, field: &str) -> Result<MatchRule, ConfigError> {
    let m = &t.matcher;
    let (host, port) = parse_host_pattern(&m.host)
        .map_err(|e| ConfigError::invalid(format!("{field}.match.host"), e))?;
    let methods = m
        .methods
        .iter()
        .map(|s| {
            s.to_ascii_uppercase().parse::<http::Method>().map_err(|_| {
                ConfigError::invalid(
                    format!("{field}.match.methods"),
                    format!("bad method {s:?}"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let path = m
        .path
        .as_deref()
        .map(PathTemplate::parse)
        .transpose()
        .map_err(|e| ConfigError::invalid(format!("{field}.match.path"), e))?;
    let scheme = match &m.scheme {
        None => None,
        Some(s) => Some(Scheme::parse(s).ok_or_else(|| {
            ConfigError::invalid(format!("{field}.match.scheme"), "must be http or https")
        })?),
    };
    if path.is_none() && m.mcp_tool.is_none() && methods.is_empty() {
        // A bare host would make every path on it one tool: allowed, but only explicitly.
        tracing::warn!(tool = %t.name, "tool matches every method and path on its host");
    }
    Ok(MatchRule {
        tool: i,
        host,
        port,
        scheme,
        methods,
        path,
        mcp_tool: m.mcp_tool.clone(),
        path_case_insensitive: t.request.path_case_insensitive,
        path_params: t.request.path_params,
    })
}

fn compile_tool(
    t: &ToolConfig,
    field: &str,
    base_dir: &Path,
    max_body: usize,
) -> Result<Tool, ConfigError> {
    let schema = match &t.input_schema {
        None => None,
        Some(s) => Some(Arc::new(jsonschema::validator_for(s).map_err(|e| {
            ConfigError::invalid(
                format!("{field}.inputSchema"),
                format!("not a valid JSON Schema: {e}"),
            )
        })?)),
    };
    let credential = t
        .credentials
        .as_ref()
        .map(|c| resolve_credential(c, &format!("{field}.credentials"), base_dir))
        .transpose()?;
    crate::canonical::validate_options(t)
        .map_err(|(f, m)| ConfigError::invalid(format!("{field}.request.{f}"), m))?;
    let pin = crate::pins::compile(t)
        .map_err(|(f, m)| ConfigError::invalid(format!("{field}.{f}"), m))?;
    let to = &t.timeouts;
    let provider = t.llm.as_ref().map(|l| l.provider);
    // LLM answers stream for minutes; other tools answer in seconds.
    let (default_total, default_idle) = match provider {
        Some(_) => (Duration::from_secs(15 * 60), Duration::from_secs(5 * 60)),
        None => (Duration::from_secs(30), Duration::from_secs(30)),
    };
    let total = to.total.map(|d| d.get()).unwrap_or(default_total);
    let idle = to.idle.map(|d| d.get()).unwrap_or(default_idle).min(total);
    let inject = t
        .cost
        .as_ref()
        .and_then(|c| c.llm.as_ref())
        .is_some_and(|l| l.inject_stream_usage);
    let openai_style = matches!(
        provider,
        Some(config::LlmProvider::Openai | config::LlmProvider::OpenaiCompatible)
    );
    if inject && !openai_style {
        return Err(ConfigError::invalid(
            format!("{field}.cost.llm.injectStreamUsage"),
            "stream_options.include_usage exists only in OpenAI-style APIs: declare `llm: {provider: openai}` or `openai-compatible` on the tool",
        ));
    }
    if let Some(cost) = &t.cost {
        if cost.per_unit_usd.is_some() != cost.unit_field.is_some() {
            return Err(ConfigError::invalid(
                format!("{field}.cost"),
                "perUnitUsd and unitField go together",
            ));
        }
    }
    let tool_max_body = t.max_body_bytes.unwrap_or(match provider {
        Some(_) => LLM_MAX_BODY,
        None => max_body,
    });
    Ok(Tool {
        config: t.clone(),
        schema,
        credential,
        connect_timeout: to
            .connect
            .map(|d| d.get())
            .unwrap_or(Duration::from_secs(2)),
        header_timeout: to.header.map(|d| d.get()).unwrap_or(total),
        total_timeout: total,
        idle_timeout: idle,
        max_body: tool_max_body,
        call_options: crate::canonical::CallOptions::for_tool(t, tool_max_body),
        forward_headers: t
            .request
            .forward_headers
            .iter()
            .filter_map(|h| http::HeaderName::from_bytes(h.as_bytes()).ok())
            .collect(),
        provider,
        mcp: t.matcher.mcp_tool.is_some(),
        pin,
    })
}

/// Resolve a secret from env or file (relative to `base_dir`).
pub fn read_secret(
    src: &config::SecretSource,
    field: &str,
    base_dir: &Path,
) -> Result<String, ConfigError> {
    match (&src.env, &src.file) {
        (Some(var), None) => std::env::var(var).map_err(|_| {
            ConfigError::invalid(
                format!("{field}.valueFrom.env"),
                format!("environment variable {var} is not set"),
            )
        }),
        (None, Some(file)) => {
            let p = resolve(base_dir, file);
            std::fs::read_to_string(&p)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| {
                    ConfigError::invalid(
                        format!("{field}.valueFrom.file"),
                        format!("cannot read {}: {e}", p.display()),
                    )
                })
        }
        _ => Err(ConfigError::invalid(
            format!("{field}.valueFrom"),
            "set exactly one of env, file",
        )),
    }
}

fn resolve_credential(
    c: &config::Credentials,
    field: &str,
    base_dir: &Path,
) -> Result<Credential, ConfigError> {
    let header = HeaderName::from_bytes(c.header.as_bytes())
        .map_err(|_| ConfigError::invalid(format!("{field}.header"), "not a valid header name"))?;
    let secret = read_secret(&c.value_from, field, base_dir)?;
    let mut value = HeaderValue::from_str(&format!("{}{}", c.prefix, secret)).map_err(|_| {
        ConfigError::invalid(
            format!("{field}.valueFrom"),
            "secret is not a valid header value",
        )
    })?;
    value.set_sensitive(true);
    Ok(Credential { header, value })
}

fn parse_upstream(url: &str) -> Result<Upstream, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("must be an absolute http(s) URL")?;
    let scheme = Scheme::parse(scheme).ok_or("scheme must be http or https")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (host, port) = parse_authority(authority, scheme).map_err(|e| e.to_string())?;
    let base_path = if path.is_empty() || path == "/" {
        String::new()
    } else {
        crate::target::normalise_path(path)
            .map_err(|e| e.to_string())?
            .trim_end_matches('/')
            .to_string()
    };
    Ok(Upstream {
        scheme,
        host,
        port,
        base_path,
    })
}

/// Resolve a possibly relative path against the config's directory.
pub fn resolve(base_dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    }
}

/// Collect Rego modules from `policies.paths` (files and directories, recursively, skipping
/// `*_test.rego`) and `policies.modules`.
pub fn load_policy_modules(
    p: &config::PoliciesConfig,
    base_dir: &Path,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (i, path) in p.paths.iter().enumerate() {
        let full = resolve(base_dir, path);
        let mut files = Vec::new();
        collect_rego(&full, &mut files).map_err(|e| {
            ConfigError::invalid(
                format!("policies.paths[{i}]"),
                format!("{}: {e}", full.display()),
            )
        })?;
        if files.is_empty() {
            return Err(ConfigError::invalid(
                format!("policies.paths[{i}]"),
                format!("no .rego files under {}", full.display()),
            ));
        }
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| {
                ConfigError::invalid(
                    format!("policies.paths[{i}]"),
                    format!("{}: {e}", f.display()),
                )
            })?;
            out.push((f.display().to_string(), text));
        }
    }
    for m in &p.modules {
        out.push((m.name.clone(), m.rego.clone()));
    }
    Ok(out)
}

fn collect_rego(p: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let meta = std::fs::metadata(p)?;
    if meta.is_file() {
        out.push(p.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<_> = std::fs::read_dir(p)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let path = e.path();
        if path.is_dir() {
            collect_rego(&path, out)?;
        } else if path.extension().is_some_and(|x| x == "rego")
            && !path.to_string_lossy().ends_with("_test.rego")
        {
            out.push(path);
        }
    }
    Ok(())
}
