//! `test_*` rules in `*_test.rego`, evaluated like `opa test`: a test passes only if it is
//! exactly `true`.

use super::{CaseResult, FileCoverage};
use std::num::NonZeroU32;
use std::time::Duration;

/// The package and `test_*` rule names declared in a test module.
pub fn discover(source: &str) -> (Option<String>, Vec<String>) {
    let mut package = None;
    let mut rules = Vec::new();
    for line in source.lines() {
        if let Some(p) = line.strip_prefix("package ") {
            package = Some(p.trim().to_string());
        }
        if line.starts_with("test_") {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !rules.contains(&name) {
                rules.push(name);
            }
        }
    }
    (package, rules)
}

/// Run the Rego tests; returns coverage of the non-test modules.
pub fn run(
    modules: &[(String, String)],
    tests: &[(String, String)],
    out: &mut Vec<CaseResult>,
) -> anyhow::Result<Vec<FileCoverage>> {
    let mut engine = regorus::Engine::new();
    engine.set_rego_v0(false);
    engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
        limit: Duration::from_secs(2),
        check_interval: NonZeroU32::new(64).expect("non-zero"),
    });
    engine.add_policy("tollgate/base.rego".into(), crate::BASE_MODULE.into())?;
    for (name, src) in modules.iter().chain(tests) {
        engine
            .add_policy(name.clone(), src.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    engine.add_data(regorus::Value::from(
        serde_json::json!({"tollgate_config": {}}),
    ))?;
    engine.set_enable_coverage(true);
    let mut coverage = CovMap::new();
    for (file, src) in tests {
        let (package, rules) = discover(src);
        let Some(package) = package else {
            out.push(CaseResult {
                name: file.clone(),
                passed: false,
                message: "no package declaration".into(),
            });
            continue;
        };
        for rule in rules {
            let name = format!("{file}: {rule}");
            let mut e = engine.clone();
            let result = e.eval_rule(format!("data.{package}.{rule}"));
            let (passed, message) = match result {
                Ok(regorus::Value::Bool(true)) => (true, String::new()),
                Ok(regorus::Value::Undefined) => (
                    false,
                    "undefined (a condition in the test body did not hold)".into(),
                ),
                Ok(v) => (
                    false,
                    format!("expected true, got {}", v.to_json_str().unwrap_or_default()),
                ),
                Err(err) => (false, format!("error: {err}")),
            };
            if let Ok(report) = e.get_coverage_report() {
                merge_into(&mut coverage, &report);
            }
            out.push(CaseResult {
                name,
                passed,
                message,
            });
        }
    }
    Ok(coverage
        .into_iter()
        .filter(|(p, _)| modules.iter().any(|(m, _)| m == p))
        .map(|(path, (covered, all))| FileCoverage {
            covered: covered.len(),
            not_covered: all.difference(&covered).count(),
            path,
        })
        .collect())
}

/// path → (covered lines, all coverable lines).
type CovMap = std::collections::BTreeMap<
    String,
    (
        std::collections::BTreeSet<u32>,
        std::collections::BTreeSet<u32>,
    ),
>;

fn merge_into(map: &mut CovMap, report: &regorus::coverage::Report) {
    for f in &report.files {
        let entry = map.entry(f.path.clone()).or_default();
        entry.0.extend(f.covered.iter().copied());
        entry.1.extend(f.covered.iter().copied());
        entry.1.extend(f.not_covered.iter().copied());
    }
}
