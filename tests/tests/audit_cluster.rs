//! Audit checkpoints in a cluster (issue 17, item 1), end to end against the in-process test
//! API server (`tollgate_operator::testapi`, a stand-in because no real API server runs here)
//! with the real `tollgate-operator`, `tollgate-proxy` and `kubectl-tollgate` binaries: a
//! sidecar publishes its signed checkpoints to the operator over the authenticated channel
//! (periodically and at SIGTERM), the operator keeps them append-only and bounded in an
//! `AuditCheckpoint` the pod cannot write, `kubectl tollgate audit checkpoints -o json`
//! exports them, and `tollgate-proxy audit verify --checkpoints` proves the pod's file against
//! them — a truncated or rewritten file fails. A checkpoint that does not extend the stored
//! chain, one under another key, a forged one and one for another pod are refused.

use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use tollgate_operator::testapi::TestApiServer;
use tollgate_proxy::audit::checkpoint::{Checkpoint, CheckpointKey};
use tollgate_tests::harness::{bin, call, eventually, free_port, get, raw, TestProxy, Upstream};

const GV: &str = "tollgate.dev/v1alpha1";

struct Operator {
    child: Child,
    port: u16,
    kubeconfig: PathBuf,
}

impl Operator {
    fn start(api: &TestApiServer, dir: &Path) -> Self {
        let port = free_port();
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
        let log = std::fs::File::create(dir.join("operator.log")).unwrap();
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new(bin("tollgate-operator"))
            .args(["run", "--listen", &listen, "--no-leader-elect"])
            .env("KUBECONFIG", &kubeconfig)
            .env("TOLLGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        eventually("operator ready", || {
            get(listen.parse().unwrap(), "/readyz").is_ok_and(|r| r.status == 200)
        });
        Self {
            child,
            port,
            kubeconfig,
        }
    }

    fn metrics(&self) -> String {
        get(
            format!("127.0.0.1:{}", self.port).parse().unwrap(),
            "/metrics",
        )
        .unwrap()
        .body_text()
    }

    /// `POST /v1/audit/checkpoints` as a sidecar holding `token` (status, body).
    fn publish(&self, token: &str, pod: &str, line: &str) -> (u16, String) {
        let body = json!({"agent": "agents/billing", "pod": pod, "checkpoint": line}).to_string();
        let r = raw(
            format!("127.0.0.1:{}", self.port).parse().unwrap(),
            format!(
                "POST /v1/audit/checkpoints HTTP/1.1\r\nHost: op\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        (r.status, r.body_text())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn seed(api: &TestApiServer, up: &Upstream) {
    // Projected tokens are bound to their pod; TokenReview says which.
    api.add_pod_token(
        "tok-pod-1",
        "system:serviceaccount:agents:billing-agent",
        &["tollgate"],
        "billing-7f9c-1",
    );
    api.add_pod_token(
        "tok-pod-2",
        "system:serviceaccount:agents:billing-agent",
        &["tollgate"],
        "billing-7f9c-2",
    );
    api.add_token(
        "tok-other",
        "system:serviceaccount:agents:other-agent",
        &["tollgate"],
    );
    api.put("tenants", json!({"apiVersion": GV, "kind": "Tenant", "metadata": {"name": "acme"}, "spec": {"budgets": {"dayUsd": 100.0}}}));
    api.put("tools", json!({"apiVersion": GV, "kind": "Tool", "metadata": {"name": "crm-note", "namespace": "agents"},
        "spec": {"match": {"host": up.addr.to_string(), "methods": ["POST"], "path": "/v1/notes"}}}));
    api.put("agentpolicies", json!({"apiVersion": GV, "kind": "AgentPolicy", "metadata": {"name": "notes", "namespace": "agents"},
        "spec": {"rego": "package tollgate\nimport rego.v1\ndeny contains \"no shouting\" if input.request.body.text == upper(input.request.body.text)\n"}}));
    api.put("agentidentities", json!({"apiVersion": GV, "kind": "AgentIdentity", "metadata": {"name": "billing", "namespace": "agents"},
        "spec": {"serviceAccount": "billing-agent", "tenants": ["acme"], "tools": ["crm-note"], "policies": ["notes"]}}));
}

/// A sidecar of pod `pod` in `dir` (kept across restarts: the audit volume and key survive a
/// container restart), checkpointing every `interval`.
fn sidecar(
    op: &Operator,
    dir: tempfile::TempDir,
    pod: &str,
    token: &str,
    interval: &str,
) -> TestProxy {
    std::fs::write(dir.path().join("token"), token).unwrap();
    let (pp, ap) = (free_port(), free_port());
    let local = format!("listen: {{proxy: \"127.0.0.1:{pp}\", admin: \"127.0.0.1:{ap}\"}}\nagent: {{name: local, tenants: []}}\naudit: {{path: audit.jsonl, checkpoints: {{path: local-checkpoints.jsonl, interval: {interval}}}}}\n");
    let token_file = dir.path().join("token").display().to_string();
    let url = format!("http://127.0.0.1:{}", op.port);
    TestProxy::start_custom(
        dir,
        &local,
        format!("127.0.0.1:{pp}").parse().unwrap(),
        format!("127.0.0.1:{ap}").parse().unwrap(),
        &[],
        &[
            ("TOLLGATE_OPERATOR", url.as_str()),
            ("TOLLGATE_AGENT", "agents/billing"),
            ("TOLLGATE_TOKEN_FILE", token_file.as_str()),
            ("POD_NAME", pod),
        ],
    )
}

fn note(p: &TestProxy, up: &Upstream, text: &str) -> u16 {
    call(
        p.proxy,
        "POST",
        &format!("http://{}/v1/notes", up.addr),
        &[
            ("X-Tollgate-Tenant", "acme"),
            ("Content-Type", "application/json"),
        ],
        Some(&json!({"text": text}).to_string()),
    )
    .status
}

/// SIGTERM, as a rollout does: the sidecar publishes its final checkpoint and exits 0. The
/// directory (its audit volume) is handed back.
fn stop(mut p: TestProxy) -> tempfile::TempDir {
    let pid = p.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = p.child.wait().unwrap();
    assert!(status.success(), "{status}: {}", p.log());
    std::mem::replace(&mut p.dir, tempfile::tempdir().unwrap())
}

fn chain(api: &TestApiServer, pod: &str) -> Option<serde_json::Value> {
    api.get(GV, "auditcheckpoints", "agents", &format!("billing.{pod}"))
}

/// `kubectl tollgate audit checkpoints billing -n agents ARGS` (exit code, stdout, stderr).
fn kubectl(op: &Operator, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("kubectl-tollgate"))
        .args(["audit", "checkpoints", "billing", "-n", "agents"])
        .args(args)
        .env("KUBECONFIG", &op.kubeconfig)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn verify(file: &Path, checkpoints: &Path) -> (i32, String) {
    let out = Command::new(bin("tollgate-proxy"))
        .args(["audit", "verify"])
        .arg(file)
        .arg("--checkpoints")
        .arg(checkpoints)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn count(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn checkpoints_published_to_the_operator_prove_the_pods_audit_file() {
    let api = TestApiServer::start();
    let up = Upstream::start();
    seed(&api, &up);
    let work = tempfile::tempdir().unwrap();
    let op = Operator::start(&api, work.path());
    let p = sidecar(
        &op,
        tempfile::tempdir().unwrap(),
        "billing-7f9c-1",
        "tok-pod-1",
        "20ms",
    );
    eventually("snapshot", || note(&p, &up, "hello") == 200);
    // Enough activity, spread over enough checkpoint intervals, to pass the stored bound.
    for i in 0..45 {
        assert_eq!(note(&p, &up, &format!("note {i}")), 200);
        std::thread::sleep(std::time::Duration::from_millis(40));
    }
    eventually("periodic checkpoints stored", || {
        chain(&api, "billing-7f9c-1").is_some_and(|c| c["status"]["accepted"].as_u64() > Some(33))
    });
    let dir = stop(p);
    let d = dir.path();
    let records = lines(&d.join("audit.jsonl")).len() as u64;
    assert!(records > 45, "{records}");
    // The final checkpoint (SIGTERM) reached the operator before the sidecar exited.
    let c = chain(&api, "billing-7f9c-1").expect("the operator holds the pod's chain");
    assert_eq!(c["status"]["seq"], records, "{c}");
    // The key registered is the sidecar's own, and the stored set is bounded.
    let public = std::fs::read_to_string(d.join("audit-checkpoint.key.pub")).unwrap();
    assert_eq!(c["spec"]["publicKey"], public.trim());
    let kept = c["status"]["checkpoints"].as_array().unwrap().len();
    assert_eq!(kept, tollgate_operator::crd::MAX_STORED_CHECKPOINTS, "{c}");
    assert!(c["status"]["pruned"].as_u64().unwrap() > 0, "{c}");
    assert!(
        count(
            &op.metrics(),
            "tollgate_operator_audit_checkpoints_total{result=\"stored\"}"
        ) > 33.0
    );

    // The SRE's path: export what the operator holds, verify the pod's file against it.
    let (code, table, err) = kubectl(&op, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        table.contains("billing-7f9c-1") && table.contains(&records.to_string()),
        "{table}"
    );
    let (code, exported, err) = kubectl(&op, &["--pod", "billing-7f9c-1", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let anchors = work.path().join("anchors.jsonl");
    std::fs::write(&anchors, &exported).unwrap();
    assert_eq!(exported.lines().count(), kept);
    let audit = d.join("audit.jsonl");
    let (code, out) = verify(&audit, &anchors);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("ok: {records} records")), "{out}");

    // A file cut short at a record boundary is still a valid chain; the operator's copy says
    // what it vouched for.
    let original = lines(&audit);
    let cut = work.path().join("cut.jsonl");
    std::fs::write(&cut, original[..original.len() - 3].join("\n") + "\n").unwrap();
    let (code, out) = verify(&cut, &anchors);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("TRUNCATED"), "{out}");
    // The whole chain rewritten, every link recomputed, is caught too.
    let mut prev = tollgate_proxy::audit::GENESIS.to_string();
    let rewritten: Vec<String> = original
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if i == 4 {
                v["status"] = 500.into();
            }
            v["prev"] = prev.clone().into();
            let text = v.to_string();
            prev = tollgate_proxy::audit::line_hash(&text);
            text
        })
        .collect();
    let rw = work.path().join("rewritten.jsonl");
    std::fs::write(&rw, rewritten.join("\n") + "\n").unwrap();
    let (code, out) = verify(&rw, &anchors);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("REWRITTEN"), "{out}");

    // With two chains, `-o json` needs a pod; an identity without chains is an error.
    let p2 = sidecar(
        &op,
        tempfile::tempdir().unwrap(),
        "billing-7f9c-2",
        "tok-pod-2",
        "1s",
    );
    eventually("second chain", || chain(&api, "billing-7f9c-2").is_some());
    let (code, _, err) = kubectl(&op, &["-o", "json"]);
    assert_ne!(code, 0);
    assert!(err.contains("--pod"), "{err}");
    drop(p2);
}

#[test]
fn the_operator_keeps_each_chain_append_only() {
    let api = TestApiServer::start();
    let up = Upstream::start();
    seed(&api, &up);
    let work = tempfile::tempdir().unwrap();
    let op = Operator::start(&api, work.path());
    let p = sidecar(
        &op,
        tempfile::tempdir().unwrap(),
        "billing-7f9c-1",
        "tok-pod-1",
        "50ms",
    );
    eventually("snapshot", || note(&p, &up, "hello") == 200);
    for i in 0..5 {
        assert_eq!(note(&p, &up, &format!("note {i}")), 200);
    }
    let dir = stop(p);
    let d = dir.path();
    let records = lines(&d.join("audit.jsonl")).len() as u64;
    eventually("final checkpoint", || {
        chain(&api, "billing-7f9c-1").is_some_and(|c| c["status"]["seq"] == records)
    });
    let stored = chain(&api, "billing-7f9c-1").unwrap();
    let last_line = stored["status"]["checkpoints"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let (last, _) = tollgate_proxy::audit::checkpoint::verify_line(&last_line).unwrap();

    // The pod's own key, a chain that goes back: refused, and nothing changes.
    let key = CheckpointKey::load_or_create(&d.join("audit-checkpoint.key")).unwrap();
    let mut shorter: Checkpoint = last.clone();
    shorter.seq -= 2;
    shorter.files[0].last_seq -= 2;
    shorter.files[0].lines -= 2;
    shorter.head = "00".repeat(32);
    shorter.files[0].last_hash = shorter.head.clone();
    let (code, body) = op.publish("tok-pod-1", "billing-7f9c-1", &key.sign_line(&shorter));
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains("not_extending") && body.contains("goes back"),
        "{body}"
    );
    // The same seq with another head: a rewritten chain.
    let mut rewritten = last.clone();
    rewritten.head = "11".repeat(32);
    rewritten.files[0].last_hash = rewritten.head.clone();
    let (code, body) = op.publish("tok-pod-1", "billing-7f9c-1", &key.sign_line(&rewritten));
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("not_extending"), "{body}");
    // A new key for the same pod (the chain started over): refused, the registered key stays.
    let other = CheckpointKey::load_or_create(&work.path().join("attacker.key")).unwrap();
    let mut fresh = last.clone();
    fresh.key_id = other.id().into();
    let (code, body) = op.publish("tok-pod-1", "billing-7f9c-1", &other.sign_line(&fresh));
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("key_mismatch"), "{body}");
    // An edited line does not verify.
    let forged = last_line.replace(
        &format!("\"seq\":{records}"),
        &format!("\"seq\":{}", records + 9),
    );
    let (code, body) = op.publish("tok-pod-1", "billing-7f9c-1", &forged);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("FORGED"), "{body}");
    // A pod cannot write another pod's chain, nor another identity's.
    let (code, body) = op.publish("tok-pod-2", "billing-7f9c-1", &last_line);
    assert_eq!(code, 403, "{body}");
    let (code, body) = op.publish("tok-other", "billing-7f9c-1", &last_line);
    assert_eq!(code, 403, "{body}");
    // A retried publication of the stored head is accepted without change.
    let (code, body) = op.publish("tok-pod-1", "billing-7f9c-1", &last_line);
    assert_eq!(code, 200, "{body}");
    let now = chain(&api, "billing-7f9c-1").unwrap();
    assert_eq!(
        now["status"]["checkpoints"],
        stored["status"]["checkpoints"]
    );
    assert_eq!(now["status"]["seq"], records);
    // The refusals are visible on the chain, for `kubectl get auditcheckpoints`.
    let intact = &now["status"]["conditions"][0];
    assert_eq!(intact["type"], "Intact");
    assert_eq!(intact["status"], "False", "{now}");
    assert_eq!(stored["status"]["conditions"][0]["status"], "True");
    let m = op.metrics();
    assert!(
        count(
            &m,
            "tollgate_operator_audit_checkpoints_total{result=\"not_extending\"}"
        ) >= 2.0,
        "{m}"
    );
    assert!(
        count(
            &m,
            "tollgate_operator_audit_checkpoints_total{result=\"key_mismatch\"}"
        ) >= 1.0,
        "{m}"
    );

    // The real attack: the tail cut off the pod's volume, then the container restarts. The
    // sidecar continues the shorter chain; its start checkpoint does not extend what the
    // operator holds, is refused, and the sidecar counts it.
    let audit = d.join("audit.jsonl");
    let all = lines(&audit);
    std::fs::write(&audit, all[..all.len() - 2].join("\n") + "\n").unwrap();
    let p = sidecar(&op, dir, "billing-7f9c-1", "tok-pod-1", "50ms");
    eventually("the sidecar counts the refusal", || {
        count(
            &p.metrics(),
            "tollgate_audit_checkpoint_failures_total{reason=\"refused\"}",
        ) >= 1.0
    });
    let c = chain(&api, "billing-7f9c-1").unwrap();
    assert_eq!(
        c["status"]["seq"], records,
        "the operator's copy still vouches for the records that were cut"
    );
    assert_eq!(
        c["status"]["conditions"][0]["reason"], "NotExtending",
        "{c}"
    );
    assert!(
        c["status"]["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("goes back"),
        "{c}"
    );
}
