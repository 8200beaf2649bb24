//! The real-cluster suite (`operator/tests/cluster.rs`, issue 18) is exercised here although
//! no real API server runs on CI machines: its test binary is run as a developer would run
//! it, (1) with no cluster configured (every test skips, exit 0), (2) with
//! `TOLLGATE_TEST_REQUIRE_CLUSTER=1` and no cluster (exit non-zero: a missing cluster is a
//! failure, not a silent pass), (3) against the in-process test API server through a
//! kubeconfig pointing at it (`tollgate_operator::testapi`, a stand-in that says what it does
//! not model): every test that needs only an API server runs and passes, with the real
//! operator and sidecar binaries, and the ones that need pods and admission skip, and (4) the
//! same with `TOLLGATE_TEST_REQUIRE_CLUSTER=1`, where those fail.

use std::path::PathBuf;
use std::process::{Command, Output};
use tollgate_operator::testapi::TestApiServer;

/// The compiled `cluster` test binary of the operator crate: the newest `cluster-<hash>`
/// executable beside this test's own binary (a workspace build, as `make test` and CI run,
/// builds it in the same step). Building it here with `cargo test -p tollgate-operator` would
/// resolve features per package and rebuild the operator a second time.
fn cluster_binary() -> PathBuf {
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    std::fs::read_dir(&deps)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.strip_prefix("cluster-")
                .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
                && std::os::unix::fs::PermissionsExt::mode(&p.metadata().unwrap().permissions())
                    & 0o111
                    != 0
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| {
            panic!(
                "no cluster test binary in {}: build it with `cargo nextest run --workspace --no-run` (or `cargo build -p tollgate-operator --tests`)",
                deps.display()
            )
        })
}

fn run(bin: &PathBuf, env: &[(&str, &str)], args: &[&str]) -> (Output, String) {
    let mut cmd = Command::new(bin);
    cmd.args(["--test-threads", "2", "--nocapture"])
        .args(args)
        .env_remove("TOLLGATE_TEST_KUBECONFIG")
        .env_remove("TOLLGATE_TEST_REQUIRE_CLUSTER");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out, text)
}

/// The tests that need only an API server (out-of-cluster operator).
const API_ONLY: &[&str] = &[
    "crds_apply_and_every_kind_is_accepted",
    "reconcile_serve_propagate_and_report",
    "the_examples_reconcile_to_ready",
    "approvals_are_single_use_across_two_operator_replicas",
    "leader_failover_reconciles_at_once",
];

/// The tests that need a real server (pods, admission, CEL on custom objects).
const REAL_ONLY: &[&str] = &[
    "cel_rules_reject_invalid_objects",
    "the_chart_installs_and_injects_pods",
];

#[test]
fn the_cluster_suite_skips_fails_when_required_and_runs_against_an_api_server() {
    let bin = cluster_binary();

    let (out, text) = run(&bin, &[], &[]);
    assert!(
        out.status.success(),
        "without a cluster every test skips: {text}"
    );
    assert!(
        text.contains("skipped: set TOLLGATE_TEST_KUBECONFIG"),
        "{text}"
    );
    assert!(!text.contains("cluster-suite:"), "nothing ran: {text}");

    let (out, text) = run(&bin, &[("TOLLGATE_TEST_REQUIRE_CLUSTER", "1")], &[]);
    assert!(
        !out.status.success(),
        "TOLLGATE_TEST_REQUIRE_CLUSTER=1 without a cluster must fail: {text}"
    );
    assert!(
        text.contains("TOLLGATE_TEST_KUBECONFIG is not set"),
        "{text}"
    );

    let api = TestApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let kc = kubeconfig.to_str().unwrap();
    let (out, text) = run(&bin, &[("TOLLGATE_TEST_KUBECONFIG", kc)], &[]);
    assert!(
        out.status.success(),
        "against the in-process API server: {text}"
    );
    for t in API_ONLY {
        assert!(
            text.contains(&format!("cluster-suite: {t} passed")),
            "{t} ran against the API server: {text}"
        );
    }
    for t in REAL_ONLY {
        assert!(
            !text.contains(&format!("cluster-suite: {t} passed")),
            "{t} cannot run here: {text}"
        );
    }
    assert!(text.contains("needs a real API server"), "{text}");

    let (out, text) = run(
        &bin,
        &[
            ("TOLLGATE_TEST_KUBECONFIG", kc),
            ("TOLLGATE_TEST_REQUIRE_CLUSTER", "1"),
        ],
        &["--exact", "the_chart_installs_and_injects_pods"],
    );
    assert!(
        !out.status.success(),
        "a test that needs a real server fails under REQUIRE_CLUSTER=1 on the in-process one: {text}"
    );
    assert!(text.contains("in-process test server"), "{text}");
}
