//! Embedded Rego (regorus): compiled once per snapshot, evaluated per call on a clone.
//!
//! The contract: `data.tollgate.deny` and `data.tollgate.require_approval` must each be a set
//! of strings. Anything else — an evaluation error, the execution timer firing, a non-set or
//! a non-string entry — is an error, and the pipeline turns every policy error into a deny.

use sha2::{Digest, Sha256};
use std::num::NonZeroU32;
use std::time::Duration;

/// Always loaded, so both partial sets are defined even when no module adds to them.
pub const BASE_MODULE: &str = r#"package tollgate
import rego.v1

deny contains "tollgate: unreachable" if { false }
require_approval contains "tollgate: unreachable" if { false }

# Both sets in one evaluation (rules they share are computed once).
tollgate_internal_decision := {"deny": deny, "require_approval": require_approval}
"#;

/// A policy failure. Fail closed: the caller denies.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A module does not parse or compile.
    #[error("{0}")]
    Compile(String),
    /// Evaluation failed or the execution timer fired.
    #[error("policy evaluation failed: {0}")]
    Eval(String),
    /// The result was not a set of strings.
    #[error("policy result {rule} is not a set of strings: {got}")]
    Malformed {
        /// Rule path.
        rule: &'static str,
        /// What was returned.
        got: String,
    },
}

/// The outcome of one evaluation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyDecision {
    /// Entries of `deny`: any → 403.
    pub deny: Vec<String>,
    /// Entries of `require_approval`: any (and no deny) → approval gate.
    pub require_approval: Vec<String>,
}

/// A compiled policy bundle.
#[derive(Clone)]
pub struct PolicyBundle {
    engine: regorus::Engine,
    hash: String,
    timeout: Duration,
    modules: usize,
}

impl std::fmt::Debug for PolicyBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyBundle")
            .field("hash", &self.hash)
            .field("modules", &self.modules)
            .finish()
    }
}

impl PolicyBundle {
    /// Compile modules `(name, source)` with `data` exposed as `data.tollgate_config`.
    pub fn compile(
        modules: &[(String, String)],
        data: &serde_json::Value,
        timeout: Duration,
    ) -> Result<Self, PolicyError> {
        let mut engine = regorus::Engine::new();
        engine.set_rego_v0(false);
        engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
            limit: timeout,
            check_interval: NonZeroU32::new(64).expect("non-zero"),
        });
        let mut hasher = Sha256::new();
        engine
            .add_policy("tollgate/base.rego".into(), BASE_MODULE.into())
            .map_err(|e| PolicyError::Compile(e.to_string()))?;
        let mut sorted: Vec<&(String, String)> = modules.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, rego) in sorted {
            hasher.update(name.as_bytes());
            hasher.update([0]);
            hasher.update(rego.as_bytes());
            hasher.update([0]);
            engine
                .add_policy(name.clone(), rego.clone())
                .map_err(|e| PolicyError::Compile(e.to_string()))?;
        }
        // Absent data is an empty object, so `object.get(data.tollgate_config, ...)` defaults work.
        let data = if data.is_null() {
            &serde_json::json!({})
        } else {
            data
        };
        let data_obj = serde_json::json!({ "tollgate_config": data });
        hasher.update(serde_json::to_vec(&data_obj).unwrap_or_default());
        engine
            .add_data(regorus::Value::from(data_obj))
            .map_err(|e| PolicyError::Compile(e.to_string()))?;
        let mut bundle = Self {
            engine,
            hash: hex::encode(hasher.finalize()),
            timeout,
            modules: modules.len(),
        };
        // Evaluate once on an empty input: this prepares the engine (clones then share the
        // prepared state) and surfaces rule-level errors at load time rather than per call.
        // (On the bundle's own engine, not a clone, so the prepared state is what clones copy.)
        bundle.engine.set_input(regorus::Value::new_object());
        for rule in ["data.tollgate.tollgate_internal_decision"] {
            if let Err(e) = bundle.engine.eval_rule(rule.to_string()) {
                let msg = e.to_string();
                // Runtime errors on an empty input are expected (a rule reading a field that
                // is absent); parse and semantic errors are not.
                if msg.contains("error:") && !msg.contains("expects") && !msg.contains("undefined")
                {
                    tracing::debug!(error = %msg, rule, "policy probe on an empty input failed");
                }
            }
        }
        bundle.engine.set_input(regorus::Value::new_object());
        Ok(bundle)
    }

    /// sha256 over the module sources and data: the `policy_bundle` of audit records.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Configured evaluation time limit.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Evaluate on a clone of the prepared engine.
    pub fn evaluate(&self, input: &serde_json::Value) -> Result<PolicyDecision, PolicyError> {
        // Only the built-in module: nothing can deny or ask, so skip the engine.
        if self.modules == 0 {
            return Ok(PolicyDecision::default());
        }
        self.evaluate_value(regorus::Value::from(input.clone()))
    }

    fn evaluate_value(&self, input: regorus::Value) -> Result<PolicyDecision, PolicyError> {
        let mut engine = self.engine.clone();
        engine.set_input(input);
        let v = engine
            .eval_rule("data.tollgate.tollgate_internal_decision".to_string())
            .map_err(|e| PolicyError::Eval(e.to_string()))?;
        Ok(PolicyDecision {
            deny: strings(&v[&regorus::Value::from("deny")], "deny")?,
            require_approval: strings(
                &v[&regorus::Value::from("require_approval")],
                "require_approval",
            )?,
        })
    }
}

fn strings(v: &regorus::Value, rule: &'static str) -> Result<Vec<String>, PolicyError> {
    let set = v.as_set().map_err(|_| PolicyError::Malformed {
        rule,
        got: short(v),
    })?;
    let mut out = Vec::with_capacity(set.len());
    for item in set.iter() {
        match item {
            regorus::Value::String(s) => out.push(s.to_string()),
            other => {
                return Err(PolicyError::Malformed {
                    rule,
                    got: short(other),
                })
            }
        }
    }
    Ok(out)
}

fn short(v: &regorus::Value) -> String {
    let mut s = v.to_json_str().unwrap_or_else(|_| "undefined".into());
    s.truncate(120);
    s
}

/// Compile-check Rego sources without data (used by `check` and admission).
pub fn compile_check(modules: &[(String, String)]) -> Result<(), PolicyError> {
    PolicyBundle::compile(modules, &serde_json::Value::Null, Duration::from_millis(50)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(rego: &str) -> Result<PolicyBundle, PolicyError> {
        PolicyBundle::compile(
            &[("t.rego".into(), rego.into())],
            &serde_json::json!({"max": 500}),
            Duration::from_millis(200),
        )
    }

    #[test]
    fn deny_and_approval_sets_are_read() {
        let b = bundle(
            r#"package tollgate
import rego.v1
deny contains "too big" if input.amount > data.tollgate_config.max * 2
require_approval contains sprintf("amount %v over %v", [input.amount, data.tollgate_config.max]) if input.amount > data.tollgate_config.max
"#,
        )
        .unwrap();
        assert_eq!(
            b.evaluate(&serde_json::json!({"amount": 10})).unwrap(),
            PolicyDecision::default()
        );
        let d = b.evaluate(&serde_json::json!({"amount": 700})).unwrap();
        assert!(d.deny.is_empty());
        assert_eq!(d.require_approval, vec!["amount 700 over 500".to_string()]);
        assert_eq!(
            b.evaluate(&serde_json::json!({"amount": 1200}))
                .unwrap()
                .deny,
            vec!["too big".to_string()]
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = bundle("package tollgate\nimport rego.v1\ndeny contains x if {\n  x := \n}\n")
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("t.rego"), "{msg}");
        assert!(msg.contains(":4") || msg.contains(":5"), "{msg}");
    }

    #[test]
    fn malformed_results_are_errors() {
        let b = bundle("package tollgate\nimport rego.v1\ndeny contains 7 if true\n").unwrap();
        assert!(matches!(
            b.evaluate(&serde_json::json!({})),
            Err(PolicyError::Malformed { .. })
        ));
        let b = bundle("package tollgate\nimport rego.v1\ndeny := 1\n");
        assert!(b.is_err() || b.unwrap().evaluate(&serde_json::json!({})).is_err());
    }

    #[test]
    fn runaway_policies_hit_the_timer() {
        let b = PolicyBundle::compile(
            &[(
                "loop.rego".into(),
                "package tollgate\nimport rego.v1\ndeny contains \"x\" if { count([y | some a in numbers.range(1, 3000); some b in numbers.range(1, 3000); y := a * b]) < 0 }\n".into(),
            )],
            &serde_json::Value::Null,
            Duration::from_millis(20),
        );
        // Either the probe at compile time or the per-call evaluation must fail, never hang.
        if let Ok(b) = b {
            assert!(b.evaluate(&serde_json::json!({})).is_err());
        }
    }
}
