//! The shipped policy library passes its own tests, and every module has tests and scenarios.

use std::path::Path;

#[test]
fn shipped_library_passes_its_tests_and_scenarios() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let report = tollgate_proxy::policy_test::run(&dir).unwrap();
    assert_eq!(report.failed(), 0, "{report}");
    assert!(report.passed() >= 40, "{report}");
    let (modules, tests, scenarios) = tollgate_proxy::policy_test::collect(&dir).unwrap();
    assert!(!scenarios.is_empty());
    for m in &modules {
        let stem = m.file_stem().unwrap().to_str().unwrap();
        assert!(
            tests
                .iter()
                .any(|t| t.file_name().unwrap().to_str().unwrap() == format!("{stem}_test.rego")),
            "{stem} has no _test.rego"
        );
        assert!(
            report
                .cases
                .iter()
                .any(|c| c.name.contains(&format!("{stem}_test.rego"))),
            "{stem} tests did not run"
        );
    }
    // The library compiles into a proxy snapshot as-is.
    let modules: Vec<(String, String)> = modules
        .iter()
        .map(|p| (p.display().to_string(), std::fs::read_to_string(p).unwrap()))
        .collect();
    tollgate_proxy::policy::PolicyBundle::compile(
        &modules,
        &serde_json::json!({}),
        std::time::Duration::from_millis(50),
    )
    .unwrap();
}
