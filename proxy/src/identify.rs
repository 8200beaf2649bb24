//! Identify: the tenant and run of a call, from `X-Tollgate-Tenant` and `X-Tollgate-Run`.
//! The sidecar serves exactly one agent, so the agent is the snapshot's.

use crate::refusal::Refusal;
use crate::snapshot::{is_token, Snapshot};
use http::HeaderMap;

/// Tenant header.
pub const TENANT_HEADER: &str = "x-tollgate-tenant";
/// Run header (echoed back on every response).
pub const RUN_HEADER: &str = "x-tollgate-run";

/// Who is acting.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Tenant id (empty when refused before it was known).
    pub tenant: String,
    /// Run id, given or generated.
    pub run: String,
}

/// Read the run id, generating one if absent. A malformed run header is refused.
pub fn run_id(headers: &HeaderMap) -> Result<String, Refusal> {
    match single(headers, RUN_HEADER)? {
        Some(r) if is_token(r) => Ok(r.to_string()),
        Some(_) => Err(Refusal::BadRequest(
            "X-Tollgate-Run must be 1-128 characters of letters, digits, '_', '-', '.', ':'".into(),
        )),
        None => Ok(new_run_id()),
    }
}

/// A fresh run id: `run_` + 16 random hex digits.
pub fn new_run_id() -> String {
    format!("run_{:016x}", rand::random::<u64>())
}

/// Read and check the tenant.
pub fn tenant(headers: &HeaderMap, snap: &Snapshot) -> Result<String, Refusal> {
    let t = single(headers, TENANT_HEADER)?.ok_or_else(|| {
        Refusal::TenantNotAllowed(format!(
            "missing X-Tollgate-Tenant header; this agent serves: {}",
            snap.agent.tenants.join(", ")
        ))
    })?;
    if !snap.agent.tenants.iter().any(|x| x == t) {
        let shown: String = t.chars().take(64).filter(|c| !c.is_control()).collect();
        return Err(Refusal::TenantNotAllowed(format!(
            "tenant {shown:?} is not one of agent {}'s tenants ({})",
            snap.agent.name,
            snap.agent.tenants.join(", ")
        )));
    }
    Ok(t.to_string())
}

fn single<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, Refusal> {
    let mut it = headers.get_all(name).iter();
    let Some(first) = it.next() else {
        return Ok(None);
    };
    if it.next().is_some() {
        return Err(Refusal::BadRequest(format!("more than one {name} header")));
    }
    let v = first
        .to_str()
        .map_err(|_| Refusal::BadRequest(format!("{name} is not visible ASCII")))?;
    if v.bytes().any(|b| b.is_ascii_control()) || v.contains(',') {
        return Err(Refusal::BadRequest(format!(
            "{name} contains control characters or a list"
        )));
    }
    Ok(Some(v.trim()))
}
