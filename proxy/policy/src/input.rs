//! The policy `input` document, version 1: the contract between whoever builds it and the
//! Rego that reads it. Field by field it is documented in `policies/README.md`; this module is
//! its one definition in code.
//!
//! - The sidecar builds one per tool call from the facts it holds ([`PolicyInput::new`]: the
//!   agent, the matched tool, the normalised request, the tenant, the run, the budget so far
//!   and the time) and evaluates the bundle on [`PolicyInput::to_value`].
//! - `policy test` scenarios start from [`PolicyInput::example`] and override parts of it.
//! - `audit replay` re-decides a recorded (redacted) document of this version
//!   ([`is_replayable`]).
//!
//! The document is built as a `serde_json::Value` straight from these types (no JSON text);
//! field order is the declaration order below, which is also the recorded order.
//! [`canonical_json`] and [`sha256_hex`] are the hashes the proxy derives from tool inputs and
//! records.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// The version of the document this module describes (`input.version`).
pub const VERSION: u32 = 1;

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

/// The whole `input` document. Borrowed from the caller's facts while a call is decided;
/// `PolicyInput<'static>` owns its fields (as read back from a record).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyInput<'a> {
    /// Always [`VERSION`].
    pub version: u32,
    /// `input.agent`: the identity this sidecar serves.
    pub agent: Agent<'a>,
    /// `input.tenant`: the call's tenant and its spend today.
    pub tenant: Tenant<'a>,
    /// `input.run`: the run so far.
    pub run: Run<'a>,
    /// `input.tool`: the matched typed tool.
    pub tool: Tool<'a>,
    /// `input.request`: the normalised request and the tool input.
    pub request: Request<'a>,
    /// `input.approval`: the approval this call carries, once granted; `null` when decided.
    pub approval: Option<Approval>,
    /// `input.time`: when the call is decided (UTC).
    pub time: Time,
    /// `input.cost`: the call's estimate, when the sidecar decides it (absent in scenarios
    /// that do not set it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
}

/// `input.agent`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Agent<'a> {
    /// Agent name.
    pub name: Cow<'a, str>,
    /// Agent namespace.
    pub namespace: Cow<'a, str>,
    /// Tenants the agent may act for.
    pub tenants: Cow<'a, [String]>,
    /// `enforce`, `shadow` or `dry-run`.
    pub mode: Cow<'a, str>,
    /// Identity labels (e.g. `tollgate.dev/autonomy`).
    pub labels: Cow<'a, BTreeMap<String, String>>,
}

/// `input.tenant`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tenant<'a> {
    /// The call's tenant (already checked against `agent.tenants`).
    pub id: Cow<'a, str>,
    /// Spend today.
    pub spent_today_usd: f64,
    /// Daily cap (`null` = uncapped).
    pub budget_today_usd: Option<f64>,
}

/// `input.run`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run<'a> {
    /// Run id.
    pub id: Cow<'a, str>,
    /// Calls so far in this run.
    pub calls: u64,
    /// Spend so far in this run.
    pub spent_usd: f64,
    /// Run cap (`null` = uncapped).
    pub budget_usd: Option<f64>,
}

/// `input.tool`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tool<'a> {
    /// Tool name, e.g. `stripe.create_refund`.
    pub name: Cow<'a, str>,
    /// `http` or `mcp`.
    pub protocol: Cow<'a, str>,
    /// The tool's risk facts.
    pub risk: Risk<'a>,
    /// Tool labels (`tollgate.dev/kind`, `tollgate.dev/read-only`, ...).
    pub labels: Cow<'a, BTreeMap<String, String>>,
}

/// `input.tool.risk`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Risk<'a> {
    /// Can the effect be undone?
    pub reversible: bool,
    /// Does the call move money?
    pub financial: bool,
    /// Data class, e.g. `public`, `internal`, `pii`, `pci`.
    pub data_class: Cow<'a, str>,
}

/// `input.request`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request<'a> {
    /// Method, upper case.
    pub method: Cow<'a, str>,
    /// `http` or `https`.
    pub scheme: Cow<'a, str>,
    /// Normalised host.
    pub host: Cow<'a, str>,
    /// Port.
    pub port: u16,
    /// The normalised path, exactly as sent upstream.
    pub path: Cow<'a, str>,
    /// Decoded query (repeated keys as arrays of every value).
    pub query: Cow<'a, Map<String, Value>>,
    /// Lower-case header names to string values, credentials removed: see [`headers`].
    pub headers: Map<String, Value>,
    /// The tool input: parsed body or MCP `params.arguments`.
    pub body: Cow<'a, Value>,
}

/// `input.approval`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// Approval id.
    pub id: String,
    /// Who granted it.
    pub approver: String,
    /// When (RFC 3339).
    pub granted_at: String,
}

/// `input.time` (UTC).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Time {
    /// RFC 3339.
    pub rfc3339: String,
    /// Unix time in nanoseconds.
    pub unix_ns: i64,
    /// English weekday name, e.g. `Tuesday`.
    pub weekday: String,
    /// Hour (0-23).
    pub hour: u8,
    /// Minute (0-59).
    pub minute: u8,
}

/// `input.cost`: the sidecar's estimate for the call.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// Estimated spend.
    pub estimate_usd: f64,
    /// Estimated exposure (money the call can move).
    pub exposure_usd: f64,
}

/// Whether a recorded document is one this build re-decides: an object whose `version` is
/// [`VERSION`]. Only the version is checked, not the whole shape: a record's input is
/// redacted, and a field named in `redaction.fields` is masked (as a string) wherever it
/// appears, whatever its type was.
pub fn is_replayable(recorded: &Value) -> bool {
    recorded.is_object() && recorded["version"].as_u64() == Some(u64::from(VERSION))
}

/// Why a value is not a policy input document.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Another version.
    #[error("input.version is {0}, this build reads version {VERSION}")]
    Version(u32),
    /// A field is missing or has the wrong type.
    #[error("not a policy input document: {0}")]
    Shape(#[from] serde_json::Error),
}

/// The budget facts the caller measured before deciding: they fill `input.tenant` and
/// `input.run`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
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

impl<'a> PolicyInput<'a> {
    /// The document for one call, not yet approved and without a cost.
    pub fn new(
        agent: Agent<'a>,
        tool: Tool<'a>,
        request: Request<'a>,
        tenant: &'a str,
        run: &'a str,
        budget: BudgetFacts,
        now: time::OffsetDateTime,
    ) -> Self {
        PolicyInput {
            version: VERSION,
            agent,
            tenant: Tenant {
                id: Cow::Borrowed(tenant),
                spent_today_usd: budget.tenant_spent_today_usd,
                budget_today_usd: budget.tenant_budget_today_usd,
            },
            run: Run {
                id: Cow::Borrowed(run),
                calls: budget.run_calls,
                spent_usd: budget.run_spent_usd,
                budget_usd: budget.run_budget_usd,
            },
            tool,
            request,
            approval: None,
            time: Time::at(now),
            cost: None,
        }
    }

    /// With the call's cost estimate.
    pub fn with_cost(mut self, cost: Cost) -> Self {
        self.cost = Some(cost);
        self
    }

    /// The document as the engine and the audit record take it. Every map in it has string
    /// keys, so this does not fail in practice; a caller still treats an error as a policy
    /// error (fail closed).
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        serde_json::to_value(self)
    }

    /// Read a document back (a recorded input, a scenario's): only a complete
    /// version-[`VERSION`] document is one. Unknown fields are ignored.
    pub fn from_value(v: &Value) -> Result<PolicyInput<'static>, InputError> {
        let doc = PolicyInput::deserialize(v)?;
        if doc.version != VERSION {
            return Err(InputError::Version(doc.version));
        }
        Ok(doc)
    }

    /// A complete, benign document: a read-only Stripe call by the demo billing agent. The
    /// scenario bank of `policy test` merges each case over it.
    pub fn example() -> PolicyInput<'static> {
        let labels = || Cow::Owned(BTreeMap::new());
        PolicyInput::new(
            Agent {
                name: "billing-dispute-v3".into(),
                namespace: "default".into(),
                tenants: Cow::Owned(vec!["acme_co".into(), "globex".into()]),
                mode: "enforce".into(),
                labels: labels(),
            },
            Tool {
                name: "stripe.get_charge".into(),
                protocol: "http".into(),
                risk: Risk {
                    reversible: true,
                    financial: false,
                    data_class: "pci".into(),
                },
                labels: labels(),
            },
            Request {
                method: "GET".into(),
                scheme: "https".into(),
                host: "api.stripe.com".into(),
                port: 443,
                path: "/v1/charges/ch_1".into(),
                query: Cow::Owned(Map::new()),
                headers: Map::new(),
                body: Cow::Owned(Value::Object(Map::new())),
            },
            "acme_co",
            "run_1",
            BudgetFacts {
                run_budget_usd: Some(0.4),
                tenant_budget_today_usd: Some(50.0),
                ..Default::default()
            },
            time::macros::datetime!(2026-05-05 10:30 UTC),
        )
    }
}

impl Time {
    /// `input.time` at `now`.
    pub fn at(now: time::OffsetDateTime) -> Self {
        Time {
            rfc3339: now
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            unix_ns: now.unix_timestamp_nanos() as i64,
            weekday: now.weekday().to_string(),
            hour: now.hour(),
            minute: now.minute(),
        }
    }
}

/// `input.request.headers` from a request's headers (lower-case names, raw values): the
/// [`SECRET_HEADERS`], the tool's injected `credential` header and every `x-tollgate-*`
/// header are left out; a repeated header's values are joined with `, `.
pub fn headers<'h>(
    all: impl IntoIterator<Item = (&'h str, &'h [u8])>,
    credential: Option<&str>,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (n, value) in all {
        if SECRET_HEADERS.contains(&n) || Some(n) == credential || n.starts_with("x-tollgate-") {
            continue;
        }
        let v = String::from_utf8_lossy(value).into_owned();
        match out.get_mut(n) {
            Some(Value::String(s)) => {
                s.push_str(", ");
                s.push_str(&v);
            }
            _ => {
                out.insert(n.to_owned(), Value::String(v));
            }
        }
    }
    out
}

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

#[cfg(test)]
mod tests;
