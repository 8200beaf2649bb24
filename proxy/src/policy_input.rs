//! Building the policy `input` document (version 1, see `policies/README.md`), the canonical
//! form of the tool input, and the hashes derived from it.

use crate::snapshot::{Snapshot, Tool};
use crate::target::Target;
use http::HeaderMap;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// Headers never shown to policy or recorded: they carry credentials.
pub const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-auth-token",
];

/// Serialise JSON with object keys sorted, recursively: equal inputs hash equally however the
/// agent ordered its keys. Written straight from the value (no sorted copy of the tree).
pub fn canonical_json(v: &Value) -> Vec<u8> {
    struct Sorted<'a>(&'a Value);
    impl serde::Serialize for Sorted<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::{SerializeMap, SerializeSeq};
            match self.0 {
                Value::Object(m) => {
                    let mut entries: Vec<(&String, &Value)> = m.iter().collect();
                    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                    let mut map = s.serialize_map(Some(entries.len()))?;
                    for (k, v) in entries {
                        map.serialize_entry(k, &Sorted(v))?;
                    }
                    map.end()
                }
                Value::Array(a) => {
                    let mut seq = s.serialize_seq(Some(a.len()))?;
                    for x in a {
                        seq.serialize_element(&Sorted(x))?;
                    }
                    seq.end()
                }
                other => other.serialize(s),
            }
        }
    }
    serde_json::to_vec(&Sorted(v)).unwrap_or_default()
}

/// Hex sha256.
pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Per-call facts that feed the input beside the snapshot.
pub struct CallFacts<'a> {
    /// Target.
    pub target: &'a Target,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// Tool input (parsed body or MCP arguments).
    pub body: &'a Value,
    /// Tenant.
    pub tenant: &'a str,
    /// Run id.
    pub run: &'a str,
    /// Protocol: `http` or `mcp`.
    pub protocol: &'a str,
    /// Budget facts: (run calls, run spent, run budget, tenant spent today, tenant budget today).
    pub budget: BudgetFacts,
    /// The canonical call's decoded query (repeated keys as arrays of every value).
    pub query: &'a Map<String, Value>,
}

/// Budget facts shown to policy.
#[derive(Clone, Copy, Debug, Default)]
pub struct BudgetFacts {
    /// Calls so far in this run.
    pub run_calls: u64,
    /// Spend so far in this run.
    pub run_spent_usd: f64,
    /// Run cap (None = uncapped).
    pub run_budget_usd: Option<f64>,
    /// Tenant spend today.
    pub tenant_spent_today_usd: f64,
    /// Tenant daily cap.
    pub tenant_budget_today_usd: Option<f64>,
}

/// Build the policy input.
pub fn build(snap: &Snapshot, tool: &Tool, f: &CallFacts<'_>, now: time::OffsetDateTime) -> Value {
    let a = &snap.agent;
    let t = f.target;
    let mut headers = Map::new();
    let cred = tool.credential.as_ref().map(|c| c.header.as_str());
    for (name, value) in f.headers {
        let n = name.as_str();
        if SECRET_HEADERS.contains(&n) || Some(n) == cred || n.starts_with("x-tollgate-") {
            continue;
        }
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(n) {
            Some(Value::String(s)) => {
                s.push_str(", ");
                s.push_str(&v);
            }
            _ => {
                headers.insert(n.to_owned(), Value::String(v));
            }
        }
    }
    let query = Value::Object(f.query.clone());
    let r = &tool.config.risk;
    json!({
        "version": 1,
        "agent": {"name": a.name, "namespace": a.namespace, "tenants": a.tenants, "mode": a.mode.as_str(), "labels": a.labels},
        "tenant": {"id": f.tenant, "spent_today_usd": f.budget.tenant_spent_today_usd, "budget_today_usd": f.budget.tenant_budget_today_usd},
        "run": {"id": f.run, "calls": f.budget.run_calls, "spent_usd": f.budget.run_spent_usd, "budget_usd": f.budget.run_budget_usd},
        "tool": {"name": tool.name(), "protocol": f.protocol, "risk": {"reversible": r.reversible, "financial": r.financial, "data_class": r.data_class}, "labels": tool.config.labels},
        "request": {"method": t.method.as_str(), "scheme": t.scheme.as_str(), "host": t.host, "port": t.port, "path": t.path, "query": query, "headers": headers, "body": f.body},
        "approval": Value::Null,
        "time": time_doc(now),
    })
}

/// `input.time`.
pub fn time_doc(now: time::OffsetDateTime) -> Value {
    let rfc = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    json!({
        "rfc3339": rfc,
        "unix_ns": now.unix_timestamp_nanos() as i64,
        "weekday": now.weekday().to_string(),
        "hour": now.hour(),
        "minute": now.minute(),
    })
}
