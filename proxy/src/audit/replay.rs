//! `replay`: re-decide recorded calls under other policies and report each decision that
//! would change. This is the release gate for a policy edit.
//!
//! Only what Rego decided is replayed: a record carries the policy input it was decided on
//! (redacted) and the policy's verdict. Calls refused before policy (identity, unknown tool,
//! invalid input, kill switch, limits) carry no input and are counted as not replayable.
//! Because the input is redacted, rules that look for PII see the masks (`[REDACTED:email]`);
//! the shipped PII rules match those masks too, so their decisions replay faithfully.

use crate::policy::PolicyBundle;
use serde::Serialize;
use serde_json::Value;
use std::time::Duration;

/// One decision that would change.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Change {
    /// Audit seq of the record.
    pub seq: u64,
    /// Run.
    pub run: String,
    /// Tool.
    pub tool: String,
    /// Recorded policy decision.
    pub old: String,
    /// Decision under the new policies.
    pub new: String,
    /// Reasons under the new policies.
    pub reasons: Vec<String>,
}

/// Replay totals.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ReplayReport {
    /// Decision records read.
    pub records: u64,
    /// Records re-decided.
    pub replayed: u64,
    /// Records refused before policy (not replayable).
    pub not_replayable: u64,
    /// Decisions that change.
    pub changes: Vec<Change>,
}

/// Re-decide every replayable decision record.
pub fn replay(records: &[Value], bundle: &PolicyBundle) -> ReplayReport {
    let mut rep = ReplayReport::default();
    for r in records
        .iter()
        .filter(|r| r["phase"] != "outcome" && r["phase"] != "run")
    {
        rep.records += 1;
        let old = r["policy_decision"].as_str().unwrap_or("");
        if old.is_empty() || !r["input"].is_object() {
            rep.not_replayable += 1;
            continue;
        }
        rep.replayed += 1;
        let mut input = r["input"].clone();
        // The approval shown to the original decision is not part of what policy judges.
        input["approval"] = Value::Null;
        let (new, reasons) = match bundle.evaluate(&input) {
            Err(e) => ("error".to_string(), vec![e.to_string()]),
            Ok(d) if !d.deny.is_empty() => ("deny".to_string(), d.deny),
            Ok(d) if !d.require_approval.is_empty() => {
                ("approval_required".to_string(), d.require_approval)
            }
            Ok(_) => ("allow".to_string(), Vec::new()),
        };
        if new != old {
            rep.changes.push(Change {
                seq: r["seq"].as_u64().unwrap_or(0),
                run: r["run"].as_str().unwrap_or("").into(),
                tool: r["tool"].as_str().unwrap_or("").into(),
                old: old.into(),
                new,
                reasons,
            });
        }
    }
    rep
}

/// Compile the policies to replay against.
pub fn load_bundle(
    dir: &std::path::Path,
    data: Value,
) -> Result<PolicyBundle, crate::config::ConfigError> {
    let cfg = crate::config::PoliciesConfig {
        paths: vec![dir.display().to_string()],
        ..Default::default()
    };
    let modules = crate::snapshot::load_policy_modules(&cfg, std::path::Path::new("."))?;
    PolicyBundle::compile(&modules, &data, Duration::from_millis(200))
        .map_err(|e| crate::config::ConfigError::Policy(e.to_string()))
}
