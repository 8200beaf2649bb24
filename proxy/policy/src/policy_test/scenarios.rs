//! The scenario bank: YAML files of cases, each an input (merged over a well-formed default
//! input) and the decision and reasons the shipped policies must reach.
//!
//! ```yaml
//! - name: refund over the threshold needs approval
//!   data: {refund_auto_approve_max: 500}
//!   input: {tool: {name: stripe.create_refund, risk: {financial: true}}, request: {body: {amount: 1200}}}
//!   expect: {decision: approval_required, reasons_contain: ["exceeds auto-approve threshold"]}
//! ```

use super::CaseResult;
use crate::{PolicyBundle, PolicyInput};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    data: Value,
    #[serde(default)]
    input: Value,
    expect: Expect,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    decision: String,
    #[serde(default)]
    reasons_contain: Vec<String>,
}

/// A complete, benign input document (version 1, [`PolicyInput::example`]); scenarios
/// override parts of it.
pub fn default_input() -> Value {
    PolicyInput::example()
        .to_value()
        .expect("the example document serialises")
}

/// Merge `over` into `base`: objects merge key by key, anything else replaces.
pub fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// Run one scenario file.
pub fn run(
    file: &Path,
    modules: &[(String, String)],
    out: &mut Vec<CaseResult>,
) -> anyhow::Result<()> {
    let cases: Vec<Case> = yaml_serde::from_str(&std::fs::read_to_string(file)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let short = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
    for c in cases {
        let name = format!("scenarios/{short}: {}", c.name);
        let data = if c.data.is_null() { json!({}) } else { c.data };
        let mut input = default_input();
        // A case without `input` decides the default document (not `null`).
        if !c.input.is_null() {
            merge(&mut input, &c.input);
        }
        // A case decides a document the sidecar could send: version 1, every field typed.
        let typed = PolicyInput::from_value(&input)
            .map(drop)
            .map_err(|e| format!("the merged input: {e}"));
        // The proxy's evaluator (the RVM) and the regorus Engine must agree on every case.
        let outcome = typed
            .and_then(|()| {
                PolicyBundle::compile(modules, &data, Duration::from_secs(1))
                    .map_err(|e| e.to_string())
            })
            .and_then(|b| {
                let d = b.evaluate(&input).map_err(|e| e.to_string())?;
                if b.on_rvm() {
                    let engine = b.evaluate_with_engine(&input).map_err(|e| e.to_string())?;
                    if engine != d {
                        return Err(format!("the RVM decided {d:?}, the Engine {engine:?}"));
                    }
                }
                Ok(d)
            });
        let (passed, message) = match outcome {
            Err(e) => (false, format!("error: {e}")),
            Ok(d) => {
                let (decision, reasons) = if !d.deny.is_empty() {
                    ("deny", d.deny)
                } else if !d.require_approval.is_empty() {
                    ("approval_required", d.require_approval)
                } else {
                    ("allow", Vec::new())
                };
                let missing: Vec<&String> = c
                    .expect
                    .reasons_contain
                    .iter()
                    .filter(|want| !reasons.iter().any(|r| r.contains(want.as_str())))
                    .collect();
                if decision != c.expect.decision {
                    (
                        false,
                        format!(
                            "expected {}, got {decision} ({})",
                            c.expect.decision,
                            reasons.join("; ")
                        ),
                    )
                } else if !missing.is_empty() {
                    (
                        false,
                        format!("reasons {reasons:?} do not mention {missing:?}"),
                    )
                } else {
                    (true, String::new())
                }
            }
        };
        out.push(CaseResult {
            name,
            passed,
            message,
        });
    }
    Ok(())
}
