//! Embedded Rego (regorus): compiled once per snapshot into an RVM program, evaluated per call
//! on a VM kept per worker thread (no engine clone per call). A bundle the RVM cannot compile
//! (a user module with a feature it lacks) is evaluated on a clone of the prepared `Engine`
//! instead, and says so in the log. Both see the same input, plus what the proxy derives for
//! policies: `input.request.body_strings`, every string in the body (see policies/README.md).
//!
//! The contract: `data.tollgate.deny` and `data.tollgate.require_approval` must each be a set
//! of strings. Anything else — an evaluation error, the execution timer firing, a non-set or
//! a non-string entry — is an error, and the pipeline turns every policy error into a deny.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The rule every evaluation reads: both decision sets at once.
const ENTRY: &str = "data.tollgate.tollgate_internal_decision";

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
    /// Prepared engine: compile-time checks, and evaluation when `rvm` is `None`.
    engine: regorus::Engine,
    rvm: Option<Arc<RvmProgram>>,
    hash: String,
    timeout: Duration,
    modules: usize,
}

/// The bundle compiled for the RVM, with what each thread's VM is loaded with.
struct RvmProgram {
    /// Unique per compiled bundle: a thread's VM is reloaded when the bundle changes.
    id: u64,
    program: Arc<regorus::rvm::program::Program>,
    data: regorus::Value,
    timeout: Duration,
}

static NEXT_PROGRAM: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// One VM per thread (tokio worker), loaded with the last bundle this thread evaluated.
    static VM: RefCell<Option<(u64, regorus::rvm::RegoVM)>> = const { RefCell::new(None) };
}

impl RvmProgram {
    fn compile(
        engine: &mut regorus::Engine,
        data: regorus::Value,
        timeout: Duration,
    ) -> Result<Self, String> {
        let entry: Arc<str> = ENTRY.into();
        let policy = engine
            .compile_with_entrypoint(&entry)
            .map_err(|e| e.to_string())?;
        let program =
            regorus::languages::rego::compiler::Compiler::compile_from_policy(&policy, &[ENTRY])
                .map_err(|e| e.to_string())?;
        let p = Self {
            id: NEXT_PROGRAM.fetch_add(1, Ordering::Relaxed),
            program,
            data,
            timeout,
        };
        // Fail at load time, not per call, if the data does not fit the program.
        p.vm()?;
        Ok(p)
    }

    fn vm(&self) -> Result<regorus::rvm::RegoVM, String> {
        let mut vm = regorus::rvm::RegoVM::new();
        vm.load_program(self.program.clone());
        vm.set_data(self.data.clone()).map_err(|e| e.to_string())?;
        // The execution timer bounds an evaluation; the instruction cap is only a backstop.
        vm.set_max_instructions(usize::MAX);
        vm.set_execution_timer_config(Some(regorus::utils::limits::ExecutionTimerConfig {
            limit: self.timeout,
            check_interval: NonZeroU32::new(64).expect("non-zero"),
        }));
        Ok(vm)
    }

    fn eval(&self, input: regorus::Value) -> Result<regorus::Value, PolicyError> {
        VM.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().map(|(id, _)| *id) != Some(self.id) {
                *slot = Some((self.id, self.vm().map_err(PolicyError::Eval)?));
            }
            let (_, vm) = slot.as_mut().expect("loaded above");
            vm.set_input(input);
            let out = vm
                .execute_entry_point_by_name(ENTRY)
                .map_err(|e| PolicyError::Eval(e.to_string()));
            // Do not keep the call's input alive in the thread's VM.
            vm.set_input(regorus::Value::Null);
            out
        })
    }
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
        let data_value = regorus::Value::from(data_obj);
        engine
            .add_data(data_value.clone())
            .map_err(|e| PolicyError::Compile(e.to_string()))?;
        let rvm = match RvmProgram::compile(&mut engine.clone(), data_value, timeout) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                tracing::warn!(error = %e, "the policy bundle does not compile for the RVM; evaluating it on the slower regorus Engine");
                None
            }
        };
        let mut bundle = Self {
            rvm,
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

    /// Whether evaluation runs on the RVM (false: on the regorus Engine).
    pub fn on_rvm(&self) -> bool {
        self.rvm.is_some()
    }

    /// Evaluate `input` (plus the derived fields) on this thread's VM, or on a clone of the
    /// prepared engine when the bundle is not on the RVM.
    pub fn evaluate(&self, input: &serde_json::Value) -> Result<PolicyDecision, PolicyError> {
        // Only the built-in module: nothing can deny or ask, so skip the engine.
        if self.modules == 0 {
            return Ok(PolicyDecision::default());
        }
        let input = policy_value(input)?;
        match &self.rvm {
            Some(p) => decision(&p.eval(input)?),
            None => self.evaluate_on_engine(input),
        }
    }

    /// Evaluate on a clone of the prepared regorus Engine, whatever the bundle normally uses
    /// (benchmarks and the RVM/Engine agreement test).
    pub fn evaluate_with_engine(
        &self,
        input: &serde_json::Value,
    ) -> Result<PolicyDecision, PolicyError> {
        self.evaluate_on_engine(policy_value(input)?)
    }

    /// Evaluate on a clone of the prepared engine (the fallback).
    fn evaluate_on_engine(&self, input: regorus::Value) -> Result<PolicyDecision, PolicyError> {
        let mut engine = self.engine.clone();
        engine.set_input(input);
        let v = engine
            .eval_rule(ENTRY.to_string())
            .map_err(|e| PolicyError::Eval(e.to_string()))?;
        decision(&v)
    }
}

/// The policy input as regorus sees it: converted straight from the JSON tree (no copy of it),
/// with `request.body_strings` — every string value in `request.body`, at any depth, in
/// document order — which the shipped library reads instead of calling `walk`.
pub fn policy_value(input: &serde_json::Value) -> Result<regorus::Value, PolicyError> {
    let mut v =
        regorus::Value::deserialize(input).map_err(|e| PolicyError::Eval(format!("input: {e}")))?;
    if let Some(body) = input.pointer("/request/body") {
        let mut strings = Vec::new();
        string_leaves(body, &mut strings);
        if let Ok(obj) = v.as_object_mut() {
            if let Some(req) = obj.get_mut(&regorus::Value::from("request")) {
                if let Ok(req) = req.as_object_mut() {
                    req.insert(
                        regorus::Value::from("body_strings"),
                        regorus::Value::from(strings),
                    );
                }
            }
        }
    }
    Ok(v)
}

fn string_leaves(v: &serde_json::Value, out: &mut Vec<regorus::Value>) {
    match v {
        serde_json::Value::String(s) => out.push(regorus::Value::from(s.as_str())),
        serde_json::Value::Array(a) => a.iter().for_each(|x| string_leaves(x, out)),
        serde_json::Value::Object(m) => m.values().for_each(|x| string_leaves(x, out)),
        _ => {}
    }
}

/// Both sets of the decision rule's result.
fn decision(v: &regorus::Value) -> Result<PolicyDecision, PolicyError> {
    Ok(PolicyDecision {
        deny: strings(&v[&regorus::Value::from("deny")], "deny")?,
        require_approval: strings(
            &v[&regorus::Value::from("require_approval")],
            "require_approval",
        )?,
    })
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
