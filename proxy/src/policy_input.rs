//! The proxy's side of the policy `input` document: lower a call's facts (the snapshot's agent,
//! the matched [`Tool`], the [`Target`] and the request's headers) into the typed
//! [`PolicyInput`] of the `tollgate-policy` crate, which defines the document, its version
//! and the canonical-JSON hashes.

use crate::snapshot::{Snapshot, Tool};
use crate::target::Target;
use http::HeaderMap;
use serde_json::{Map, Value};
use std::borrow::Cow;
pub use tollgate_policy::input::BudgetFacts;
use tollgate_policy::input::{self, PolicyInput};

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
    /// Budget facts: the run and the tenant's day so far.
    pub budget: BudgetFacts,
    /// The canonical call's decoded query (repeated keys as arrays of every value).
    pub query: &'a Map<String, Value>,
}

/// The policy input for `tool` on this call, borrowed from the snapshot and the facts.
pub fn build<'a>(
    snap: &'a Snapshot,
    tool: &'a Tool,
    f: &CallFacts<'a>,
    now: time::OffsetDateTime,
) -> PolicyInput<'a> {
    let a = &snap.agent;
    let t = f.target;
    let cred = tool.credential.as_ref().map(|c| c.header.as_str());
    let headers = input::headers(
        f.headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
        cred,
    );
    let r = &tool.config.risk;
    PolicyInput::new(
        input::Agent {
            name: Cow::Borrowed(&a.name),
            namespace: Cow::Borrowed(&a.namespace),
            tenants: Cow::Borrowed(&a.tenants),
            mode: Cow::Borrowed(a.mode.as_str()),
            labels: Cow::Borrowed(&a.labels),
        },
        input::Tool {
            name: Cow::Borrowed(tool.name()),
            protocol: Cow::Borrowed(f.protocol),
            risk: input::Risk {
                reversible: r.reversible,
                financial: r.financial,
                data_class: Cow::Borrowed(&r.data_class),
            },
            labels: Cow::Borrowed(&tool.config.labels),
        },
        input::Request {
            method: Cow::Borrowed(t.method.as_str()),
            scheme: Cow::Borrowed(t.scheme.as_str()),
            host: Cow::Borrowed(&t.host),
            port: t.port,
            path: Cow::Borrowed(&t.path),
            query: Cow::Borrowed(f.query),
            headers,
            body: Cow::Borrowed(f.body),
        },
        f.tenant,
        f.run,
        f.budget,
        now,
    )
}
