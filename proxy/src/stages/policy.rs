//! Policy: build the `input` document for one element and evaluate the bundle on it. "Not
//! allowed" is an explicit `deny` or `require_approval`; an evaluation error fails closed.

use crate::meter::Estimate;
use crate::policy::input::Cost;
use crate::policy::PolicyDecision;
use crate::policy_input::{self, CallFacts};
use crate::refusal::Refusal;
use crate::snapshot::{Snapshot, Tool};
use serde_json::Value;
use std::time::{Duration, Instant};

/// What policy decided about one element.
#[derive(Debug)]
pub(crate) struct Evaluated {
    /// The input document (kept, redacted, for the record).
    pub doc: Value,
    /// Rego's verdict, or the evaluation error.
    pub verdict: Result<PolicyDecision, String>,
    /// Evaluation time.
    pub elapsed: Duration,
}

impl Evaluated {
    /// The label of what Rego alone decided.
    pub(crate) fn label(&self) -> &'static str {
        match &self.verdict {
            Err(_) => "error",
            Ok(d) if !d.deny.is_empty() => "deny",
            Ok(d) if !d.require_approval.is_empty() => "approval_required",
            Ok(_) => "allow",
        }
    }

    /// The gate: `Ok(None)` allowed, `Ok(Some(reasons))` approval required, `Err` refused.
    pub(crate) fn gate(&self) -> Result<Option<Vec<String>>, Refusal> {
        match &self.verdict {
            Err(e) => Err(Refusal::PolicyError(e.clone())),
            Ok(d) if !d.deny.is_empty() => Err(Refusal::PolicyDenied(d.deny.clone())),
            Ok(d) if !d.require_approval.is_empty() => Ok(Some(d.require_approval.clone())),
            Ok(_) => Ok(None),
        }
    }
}

/// Build the input for `tool` and evaluate.
pub(crate) fn evaluate(
    snap: &Snapshot,
    tool: &Tool,
    facts: &CallFacts<'_>,
    estimate: &Estimate,
    now: time::OffsetDateTime,
) -> Evaluated {
    let input = policy_input::build(snap, tool, facts, now).with_cost(Cost {
        estimate_usd: crate::limits::to_usd(estimate.spend),
        exposure_usd: crate::limits::to_usd(estimate.exposure),
    });
    let t0 = Instant::now();
    // A document that does not serialise is a policy error: the call fails closed.
    let (doc, verdict) = match input.to_value() {
        Ok(doc) => {
            let verdict = snap.policy.evaluate(&doc).map_err(|e| e.to_string());
            (doc, verdict)
        }
        Err(e) => (Value::Null, Err(format!("policy input: {e}"))),
    };
    Evaluated {
        doc,
        verdict,
        elapsed: t0.elapsed(),
    }
}
