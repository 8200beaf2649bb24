//! Identify: the tenant and run of a call, from `X-Tollgate-Tenant` and `X-Tollgate-Run`.
//! The sidecar serves exactly one agent, so the agent is the snapshot's.
//!
//! Run ids are unforgeable: `run_<nonce>.<mac>`, where `mac` is the first 32 hex digits of
//! HMAC-SHA256(key, nonce). The sidecar mints one for a call without a run header and echoes
//! it; a trusted orchestrator holding the same key (`agent.runs.keyFrom`) can start runs
//! itself. A run header whose MAC does not verify is refused, so an agent cannot name a run
//! it was not given — in particular not a fresh one with a fresh `perRunUsd` budget. With
//! `agent.runs.source: orchestrator` a call without a run id is refused too, so only the
//! orchestrator starts runs; with the default `sidecar`, an agent that drops its run id gets
//! a new run, and only the per-agent and per-tenant caps bound it (see SECURITY.md).

use crate::config::RunSource;
use crate::refusal::Refusal;
use crate::snapshot::{is_token, Snapshot};
use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::Sha256;
use std::sync::{Arc, OnceLock};

/// Tenant header.
pub const TENANT_HEADER: &str = "x-tollgate-tenant";
/// Run header (echoed back on every response).
pub const RUN_HEADER: &str = "x-tollgate-run";

/// How runs are started and verified (lowered from `agent.runs`).
#[derive(Clone)]
pub struct Runs {
    /// Who may start a run.
    pub source: RunSource,
    /// HMAC-SHA256 keyed once: each MAC clones this state instead of re-keying (which would
    /// hash the padded key again, two SHA-256 blocks, on every call).
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for Runs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runs")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Runs {
    /// Runs signed with `key`; `None` uses this process's random key (runs then verify only
    /// on this sidecar, for its lifetime).
    pub fn new(source: RunSource, key: Option<Vec<u8>>) -> Self {
        static PROCESS_KEY: OnceLock<Arc<Vec<u8>>> = OnceLock::new();
        let key = match key {
            Some(k) => Arc::new(k),
            None => PROCESS_KEY
                .get_or_init(|| Arc::new(rand::random::<[u8; 32]>().to_vec()))
                .clone(),
        };
        Self {
            source,
            mac: keyed(&key),
        }
    }
}

fn keyed(key: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length")
}

/// 32 hex digits of the MAC of `nonce` under the keyed state `mac`.
fn mac_hex(mac: &Hmac<Sha256>, nonce: &str) -> String {
    let mut m = mac.clone();
    m.update(nonce.as_bytes());
    hex::encode(&m.finalize().into_bytes()[..16])
}

/// The MAC of a run nonce: 32 hex digits of HMAC-SHA256(key, nonce).
pub fn sign(key: &[u8], nonce: &str) -> String {
    mac_hex(&keyed(key), nonce)
}

/// A fresh, signed run id.
pub fn mint(runs: &Runs) -> String {
    use std::fmt::Write;
    let mut id = String::with_capacity(4 + 32 + 1 + 32);
    let _ = write!(id, "run_{:032x}", rand::random::<u128>());
    let mac = mac_hex(&runs.mac, &id[4..]);
    id.push('.');
    id.push_str(&mac);
    id
}

/// Does `id` carry a valid MAC?
pub fn verify(runs: &Runs, id: &str) -> bool {
    let Some((nonce, mac)) = id.strip_prefix("run_").and_then(|r| r.rsplit_once('.')) else {
        return false;
    };
    let mut m = runs.mac.clone();
    m.update(nonce.as_bytes());
    let Ok(given) = hex::decode(mac) else {
        return false;
    };
    given.len() == 16 && m.verify_truncated_left(&given).is_ok()
}

/// The run of a call: the verified run header, or a freshly minted run.
pub fn run(headers: &HeaderMap, runs: &Runs) -> Result<String, Refusal> {
    match single(headers, RUN_HEADER)? {
        Some(r) if !is_token(r) => Err(Refusal::BadRequest(
            "X-Tollgate-Run must be 1-128 characters of letters, digits, '_', '-', '.', ':'".into(),
        )),
        Some(r) if verify(runs, r) => Ok(r.to_string()),
        Some(_) => Err(Refusal::BadRequest(
            "X-Tollgate-Run is not a run this sidecar or its orchestrator started; omit it to start a run and send back the X-Tollgate-Run you are given".into(),
        )),
        None if runs.source == RunSource::Orchestrator => Err(Refusal::BadRequest(
            "this agent's runs are started by its orchestrator: X-Tollgate-Run is required".into(),
        )),
        None => Ok(mint(runs)),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(run: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(r) = run {
            h.insert(RUN_HEADER, r.parse().unwrap());
        }
        h
    }

    #[test]
    fn minted_runs_verify_and_forged_ones_do_not() {
        let runs = Runs::new(RunSource::Sidecar, Some(b"k".to_vec()));
        let id = run(&headers(None), &runs).unwrap();
        assert!(id.starts_with("run_"), "{id}");
        // The cached keyed state gives the MAC a freshly keyed HMAC gives.
        let (nonce, mac) = id["run_".len()..].rsplit_once('.').unwrap();
        assert_eq!((nonce.len(), mac), (32, sign(b"k", nonce).as_str()));
        assert_eq!(run(&headers(Some(&id)), &runs).unwrap(), id);
        // A fresh name, a tampered nonce, another key's run: all refused.
        assert!(run(&headers(Some("run_fresh")), &runs).is_err());
        let tampered = id.replacen("run_", "run_0", 1);
        assert!(run(&headers(Some(&tampered)), &runs).is_err());
        let other = Runs::new(RunSource::Sidecar, Some(b"other".to_vec()));
        assert!(run(&headers(Some(&mint(&other))), &runs).is_err());
    }

    #[test]
    fn an_orchestrator_with_the_key_starts_runs() {
        let runs = Runs::new(RunSource::Orchestrator, Some(b"shared".to_vec()));
        assert!(
            run(&headers(None), &runs).is_err(),
            "agents cannot start runs"
        );
        let id = format!("run_job-42.{}", sign(b"shared", "job-42"));
        assert_eq!(run(&headers(Some(&id)), &runs).unwrap(), id);
    }
}
