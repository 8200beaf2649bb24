use super::*;

fn dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let p = d.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    d
}

const POLICY: &str =
    "package tollgate\nimport rego.v1\ndeny contains \"big\" if input.request.body.amount > 10\n";

#[test]
fn passing_and_failing_tests_are_reported() {
    let d = dir(&[
        ("p.rego", POLICY),
        ("p_test.rego", "package tollgate_test\nimport rego.v1\ntest_big if { count(data.tollgate.deny) == 1 with input as {\"request\": {\"body\": {\"amount\": 11}}} }\ntest_wrong if { count(data.tollgate.deny) == 0 with input as {\"request\": {\"body\": {\"amount\": 11}}} }\n"),
        ("scenarios/s.yaml", "- name: small\n  input: {request: {body: {amount: 1}}}\n  expect: {decision: allow}\n- name: wrong\n  input: {request: {body: {amount: 99}}}\n  expect: {decision: allow}\n- name: reasons\n  input: {request: {body: {amount: 99}}}\n  expect: {decision: deny, reasons_contain: [big]}\n"),
    ]);
    let r = run(d.path()).unwrap();
    assert_eq!(r.passed(), 3, "{r}");
    assert_eq!(r.failed(), 2, "{r}");
    let text = r.to_string();
    assert!(
        text.contains("FAIL")
            && text.contains("test_wrong")
            && text.contains("expected allow, got deny"),
        "{text}"
    );
    assert!(text.contains("3 passed, 2 failed"));
    assert!(r.coverage_percent() > 0.0);
}

#[test]
fn a_looping_policy_fails_instead_of_hanging() {
    let d = dir(&[
        ("p.rego", "package tollgate\nimport rego.v1\ndeny contains \"x\" if { count([y | some a in numbers.range(1, 4000); some b in numbers.range(1, 4000); y := a * b]) < 0 }\n"),
        ("scenarios/s.yaml", "- name: loops\n  expect: {decision: allow}\n"),
    ]);
    let r = run(d.path()).unwrap();
    assert_eq!(r.failed(), 1, "{r}");
}

#[test]
fn tests_are_discovered_by_rule_head() {
    let (pkg, rules) = rego_tests::discover("package a.b_test\nimport rego.v1\ntest_one if true\n# test_comment\ntest_two if {\n  true\n}\nnot_a_test if true\n");
    assert_eq!(pkg.as_deref(), Some("a.b_test"));
    assert_eq!(rules, vec!["test_one".to_string(), "test_two".to_string()]);
}
