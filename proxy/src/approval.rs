//! The approval gate: a call that policy sends for approval goes ahead only with a granted,
//! unexpired approval bound to the sha256 of this exact call (agent, tenant, tool, canonical
//! input). Otherwise it is refused with `approval_required` and the approval id.

use crate::config::ApprovalGrant;
use crate::refusal::Refusal;
use crate::snapshot::Snapshot;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::sync::Mutex;

/// The approval key of a call.
pub fn approval_key(agent: &str, tenant: &str, tool: &str, canonical_input: &[u8]) -> String {
    let mut h = Sha256::new();
    for part in [agent.as_bytes(), tenant.as_bytes(), tool.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(canonical_input);
    hex::encode(h.finalize())
}

/// The approval request id for a key.
pub fn approval_id(key: &str) -> String {
    format!("apr-{}", &key[..12])
}

/// Single-use grants already consumed by this sidecar.
#[derive(Default)]
pub struct ConsumedGrants(Mutex<HashSet<String>>);

/// A grant that lets the call through.
#[derive(Clone, Debug)]
pub struct Granted {
    /// Approval id.
    pub id: String,
    /// Approver.
    pub approver: String,
    /// When.
    pub decided_at: String,
}

/// Decide the gate for a call whose policy asked for approval.
pub fn gate(
    snap: &Snapshot,
    consumed: &ConsumedGrants,
    key: &str,
    reasons: Vec<String>,
    now_rfc3339: &str,
) -> Result<Granted, Refusal> {
    let grant = snap.raw.approvals.granted.iter().find(|g| g.key == key);
    let Some(g) = grant else {
        return Err(Refusal::ApprovalRequired {
            reasons,
            approval: approval_id(key),
            retry_after_s: 30,
        });
    };
    check_grant(g, now_rfc3339)?;
    if snap.raw.approvals.single_use {
        let mut used = consumed.0.lock().expect("consumed grants lock");
        if !used.insert(g.id.clone()) {
            return Err(Refusal::ApprovalRejected(format!(
                "approval {} was single-use and has already been used",
                g.id
            )));
        }
    }
    Ok(Granted {
        id: g.id.clone(),
        approver: g.approver.clone(),
        decided_at: g.decided_at.clone(),
    })
}

fn check_grant(g: &ApprovalGrant, now: &str) -> Result<(), Refusal> {
    if g.decision != "approved" {
        let why = g
            .reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        return Err(Refusal::ApprovalRejected(format!(
            "approval {} was denied by {}{why}",
            g.id, g.approver
        )));
    }
    if let Some(exp) = &g.expires_at {
        // RFC 3339 UTC timestamps of one format compare correctly as strings.
        if exp.as_str() <= now {
            return Err(Refusal::ApprovalRejected(format!(
                "approval {} expired at {exp}",
                g.id
            )));
        }
    }
    Ok(())
}
