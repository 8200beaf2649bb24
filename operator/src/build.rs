//! Pure functions from CRD objects to per-agent proxy configs and to statuses: dereference
//! (find what an identity refers to), validate (compile the Rego, check the schemas, run the
//! proxy's own snapshot validation) and build (the snapshot the sidecar receives). Nothing
//! here talks to the API server, so all of it is unit-tested.

use crate::crd::{
    AgentIdentity, AgentPolicy, ApprovalRequest, Condition, KillSwitch, Tenant, Tool,
};
use kube::ResourceExt;
use std::collections::BTreeMap;
use tollgate_proxy::config::{
    AgentConfig, ApprovalGrant, Config, Credentials, KillSwitchConfig, RegoModule, SecretSource,
    TenantConfig, ToolConfig,
};

/// Where the injector mounts a tool's credential Secret in the sidecar.
pub const SECRET_MOUNT: &str = "/var/run/tollgate/secrets";

/// Everything the operator has cached.
#[derive(Clone, Debug, Default)]
pub struct World {
    /// Identities.
    pub identities: Vec<AgentIdentity>,
    /// Tools.
    pub tools: Vec<Tool>,
    /// Policies.
    pub policies: Vec<AgentPolicy>,
    /// Tenants.
    pub tenants: Vec<Tenant>,
    /// Kill switches.
    pub kill_switches: Vec<KillSwitch>,
    /// Approval requests.
    pub approvals: Vec<ApprovalRequest>,
}

/// `namespace/name` of an object.
pub fn key_of<K: kube::Resource>(o: &K) -> String {
    format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any())
}

/// The Rego modules of a policy, named `<ns>/<policy>/<module>`.
pub fn policy_modules(p: &AgentPolicy) -> Vec<(String, String)> {
    let base = format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
    let mut out = Vec::new();
    if let Some(r) = &p.spec.rego {
        out.push((format!("{base}.rego"), r.clone()));
    }
    for m in &p.spec.modules {
        out.push((format!("{base}/{}", m.name), m.rego.clone()));
    }
    out
}

/// Validate a policy: `Ok` or the compiler's message (file and line).
pub fn validate_policy(p: &AgentPolicy) -> Result<(), String> {
    let modules = policy_modules(p);
    if modules.is_empty() {
        return Err("no Rego: set spec.rego or spec.modules".into());
    }
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(
        serde_json::json!(["policy", modules])
            .to_string()
            .as_bytes(),
    ));
    cached(hash, || {
        tollgate_policy::compile_check(&modules).map_err(|e| e.to_string())
    })
}

/// Validate a tool: its input schema and its match.
pub fn validate_tool(t: &Tool) -> Result<(), String> {
    if let Some(s) = &t.spec.input_schema {
        jsonschema::validator_for(s).map_err(|e| format!("spec.inputSchema: {e}"))?;
    }
    tollgate_proxy::route::parse_host_pattern(&t.spec.matcher.host)
        .map_err(|e| format!("spec.match.host: {e}"))?;
    if let Some(p) = &t.spec.matcher.path {
        tollgate_proxy::route::PathTemplate::parse(p)
            .map_err(|e| format!("spec.match.path: {e}"))?;
    }
    tollgate_proxy::pins::compile(&tool_config(t)).map_err(|(f, m)| format!("spec.{f}: {m}"))?;
    Ok(())
}

fn tool_config(t: &Tool) -> ToolConfig {
    let s = &t.spec;
    ToolConfig {
        name: t.name_any(),
        matcher: s.matcher.clone(),
        input_schema: s.input_schema.clone(),
        risk: s.risk.clone(),
        cost: s.cost.clone(),
        credentials: s.credentials.as_ref().map(|c| Credentials {
            header: c.header.clone(),
            prefix: c.prefix.clone(),
            value_from: SecretSource {
                env: None,
                file: Some(format!("{SECRET_MOUNT}/{}/{}", c.secret_name, c.key)),
            },
        }),
        timeouts: s.timeouts.clone(),
        labels: t.labels().clone(),
        require_idempotency_key: s.require_idempotency_key,
        passthrough: s.passthrough,
        request: s.request.clone(),
        llm: s.llm.clone(),
        max_body_bytes: s.max_body_bytes,
        pin: s.pin.clone(),
    }
}

/// Does an engaged kill switch possibly cover this agent? (Tenant and tool scopes are decided
/// per call by the sidecar.)
pub fn kill_switch_affects(k: &KillSwitch, namespace: &str, agent: &str) -> bool {
    let s = &k.spec.scope;
    k.spec.engaged
        && (s.all
            || (s.namespace.as_deref().is_none_or(|n| n == namespace)
                && s.agent.as_deref().is_none_or(|a| a == agent)))
}

/// Build the config an identity's sidecars receive, or the reasons it cannot be built.
pub fn build_agent(world: &World, id: &AgentIdentity) -> Result<Config, Vec<String>> {
    let ns = id.namespace().unwrap_or_default();
    let name = id.name_any();
    let mut problems = Vec::new();
    let mut tools = Vec::new();
    for t in &id.spec.tools {
        match world
            .tools
            .iter()
            .find(|x| x.namespace().as_deref() == Some(&ns) && &x.name_any() == t)
        {
            Some(tool) => match validate_tool(tool) {
                Ok(()) => tools.push(tool_config(tool)),
                Err(e) => problems.push(format!("Tool {t} is invalid: {e}")),
            },
            None => problems.push(format!("Tool {t} not found in namespace {ns}")),
        }
    }
    let mut modules = Vec::new();
    let mut data = serde_json::Map::new();
    for p in &id.spec.policies {
        match world
            .policies
            .iter()
            .find(|x| x.namespace().as_deref() == Some(&ns) && &x.name_any() == p)
        {
            Some(pol) => {
                if let Err(e) = validate_policy(pol) {
                    problems.push(format!("AgentPolicy {p} does not compile: {e}"));
                }
                for (name, rego) in policy_modules(pol) {
                    modules.push(RegoModule { name, rego });
                }
                if let Some(serde_json::Value::Object(d)) = &pol.spec.data {
                    data.extend(d.clone());
                }
            }
            None => problems.push(format!("AgentPolicy {p} not found in namespace {ns}")),
        }
    }
    let mut tenants = BTreeMap::new();
    for t in &id.spec.tenants {
        if let Some(tc) = world.tenants.iter().find(|x| &x.name_any() == t) {
            tenants.insert(
                t.clone(),
                TenantConfig {
                    rate_limits: tc.spec.rate_limits.clone(),
                    budgets: tc.spec.budgets.clone(),
                    exposure: tc.spec.exposure.clone(),
                },
            );
        }
    }
    let kill_switches = world
        .kill_switches
        .iter()
        .filter(|k| kill_switch_affects(k, &ns, &name))
        .map(|k| KillSwitchConfig {
            name: k.name_any(),
            scope: k.spec.scope.clone(),
            engaged: true,
            reason: k.spec.reason.clone(),
        })
        .collect();
    let granted = world
        .approvals
        .iter()
        .filter(|a| a.namespace().as_deref() == Some(&ns) && a.spec.agent == name)
        .filter_map(|a| {
            let st = a.status.as_ref()?;
            if st.consumed_at.is_some() {
                // A used single-use approval is withdrawn from every sidecar at once.
                return None;
            }
            let decision = match st.phase.as_deref()? {
                "Approved" => "approved",
                "Denied" => "denied",
                _ => return None,
            };
            Some(ApprovalGrant {
                id: a.name_any(),
                key: a.spec.key.clone(),
                decision: decision.into(),
                approver: st.approver.clone().unwrap_or_default(),
                decided_at: st.decided_at.clone().unwrap_or_default(),
                expires_at: Some(a.spec.expires_at.clone()),
                reason: st.reason.clone(),
            })
        })
        .collect();
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut config = Config {
        agent: AgentConfig {
            name: name.clone(),
            namespace: ns.clone(),
            tenants: id.spec.tenants.clone(),
            mode: id.spec.mode,
            labels: id.spec.labels.clone(),
            budget: id.spec.budget.clone(),
            rate_limits: id.spec.rate_limits.clone(),
            over_budget: id.spec.over_budget,
            max_staleness: id.spec.max_staleness,
            fail_open: id.spec.fail_open,
            runs: Default::default(),
        },
        tools,
        tenants,
        kill_switches,
        ..serde_json::from_value(serde_json::json!({"agent": {"name": name, "tenants": []}}))
            .expect("minimal config parses")
    };
    config.policies.modules = modules;
    config.policies.data = serde_json::Value::Object(data);
    config.approvals.granted = granted;
    config.approvals.ttl = id.spec.approvals.ttl;
    config.approvals.max_wait_s = id.spec.approvals.max_wait_s;
    if let Some(s) = id.spec.approvals.single_use {
        config.approvals.single_use = s;
    }
    // Run the proxy's own validation, minus credentials (their files exist only in the pod)
    // and minus the Rego, which is compiled once per distinct bundle (see [`check_bundle`]).
    let mut check = config.clone();
    for t in &mut check.tools {
        t.credentials = None;
    }
    check.policies.modules = Vec::new();
    check.policies.data = serde_json::Value::Object(Default::default());
    tollgate_proxy::snapshot::Snapshot::build(check, 0, std::path::Path::new("/"))
        .map_err(|e| vec![e.to_string()])?;
    check_bundle(&config.policies).map_err(|e| vec![e])?;
    Ok(config)
}

/// Compile results of policy bundles, by the sha256 of their modules, data and timeout: an
/// event that does not change an identity's Rego (a kill switch, an approval) does not
/// recompile it, and identities sharing a policy compile it once.
static BUNDLES: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, Result<(), String>>>,
> = std::sync::LazyLock::new(Default::default);

/// Bound on [`BUNDLES`]; past it the cache starts over.
const BUNDLE_CACHE_MAX: usize = 4096;

/// The content hash a policy bundle is cached under.
pub fn bundle_hash(p: &tollgate_proxy::config::PoliciesConfig) -> String {
    use sha2::Digest;
    let key = serde_json::json!([p.modules, p.data, p.timeout]);
    hex::encode(sha2::Sha256::digest(key.to_string().as_bytes()))
}

/// Compile an identity's policy bundle exactly as its sidecars will (the proxy's
/// `PolicyBundle`), answering from the content-hash cache when this bundle was compiled before.
pub fn check_bundle(p: &tollgate_proxy::config::PoliciesConfig) -> Result<(), String> {
    cached(bundle_hash(p), || {
        let modules: Vec<(String, String)> = p
            .modules
            .iter()
            .map(|m| (m.name.clone(), m.rego.clone()))
            .collect();
        let timeout = p
            .timeout
            .map(|d| d.get())
            .unwrap_or(tollgate_proxy::snapshot::DEFAULT_POLICY_TIMEOUT);
        tollgate_policy::PolicyBundle::compile(&modules, &p.data, timeout)
            .map(|_| ())
            .map_err(|e| format!("policies: {e}"))
    })
}

/// The cached compile result under `hash`, or `compile`'s, cached.
fn cached(hash: String, compile: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    if let Some(r) = BUNDLES.lock().expect("bundle cache").get(&hash) {
        return r.clone();
    }
    let result = compile();
    let mut cache = BUNDLES.lock().expect("bundle cache");
    if cache.len() >= BUNDLE_CACHE_MAX {
        cache.clear();
    }
    cache.insert(hash, result.clone());
    result
}

/// How many distinct policy bundles have been compiled and cached.
pub fn cached_bundles() -> usize {
    BUNDLES.lock().expect("bundle cache").len()
}

/// A condition, stamped now.
pub fn condition(type_: &str, ok: bool, reason: &str, message: &str, generation: i64) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        observed_generation: generation,
    }
}

/// Agents (`ns/name`) a kill switch affects: in its namespace/agent scope, and, for a tool
/// or tenant scope, only agents that have that tool or serve that tenant.
pub fn affected_agents(world: &World, k: &KillSwitch) -> Vec<String> {
    let s = &k.spec.scope;
    world
        .identities
        .iter()
        .filter(|i| kill_switch_affects(k, &i.namespace().unwrap_or_default(), &i.name_any()))
        .filter(|i| s.all || s.tool.as_ref().is_none_or(|t| i.spec.tools.contains(t)))
        .filter(|i| s.all || s.tenant.as_ref().is_none_or(|t| i.spec.tenants.contains(t)))
        .map(key_of)
        .collect()
}

#[cfg(test)]
mod tests;
