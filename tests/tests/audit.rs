//! The audit trail end to end (issue 3): tamper detection, rotation, a crash under load, a
//! full disk, replay against a tightened policy, and run summaries — all on the real binary.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tollgate_tests::harness::{bin, call, eventually, TestProxy, Upstream};

fn config(up: &Upstream, audit: &str, policy: &str) -> String {
    let a = up.addr;
    format!(
        r#"
agent: {{name: billing, tenants: [acme]}}
tools:
  - name: pay.refund
    match: {{host: "{a}", methods: [POST], path: /v1/refunds}}
    risk: {{financial: true, reversible: false}}
  - name: crm.note
    match: {{host: "{a}", methods: [POST], path: /v1/notes}}
audit: {audit}
{policy}
"#
    )
}

fn post(p: &TestProxy, up: &Upstream, path: &str, body: &str) -> u16 {
    call(
        p.proxy,
        "POST",
        &format!("http://{}{path}", up.addr),
        &[
            ("X-Tollgate-Tenant", "acme"),
            ("Content-Type", "application/json"),
        ],
        Some(body),
    )
    .status
}

fn verify(files: &[std::path::PathBuf], extra: &[&str]) -> (i32, String) {
    let out = Command::new(bin("tollgate-proxy"))
        .args(["audit", "verify"])
        .args(extra)
        .args(files)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn make_log(n: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<String>) {
    let up = Upstream::start();
    let p = TestProxy::start(&config(&up, "{path: audit.jsonl}", ""), &[]);
    for i in 0..n {
        assert_eq!(
            post(
                &p,
                &up,
                "/v1/notes",
                &format!(r#"{{"n":{i},"text":"mail me at x{i}@example.com"}}"#)
            ),
            200
        );
    }
    eventually("all records", || p.audit().len() == 2 * n);
    let text = std::fs::read_to_string(p.dir.path().join("audit.jsonl")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("audit.jsonl");
    std::fs::write(&path, &text).unwrap();
    (out, path, text.lines().map(str::to_owned).collect())
}

#[test]
fn tampering_is_detected_and_located() {
    let (dir, path, lines) = make_log(4);
    assert_eq!(verify(std::slice::from_ref(&path), &[]).0, 0);
    // Records carry redacted input but the hash of the real input.
    assert!(
        !lines.iter().any(|l| l.contains("@example.com")),
        "PII must be masked in records"
    );
    let write = |name: &str, lines: &[String]| {
        let p = dir.path().join(name);
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        p
    };
    let mut edited = lines.clone();
    edited[2] = edited[2].replace("\"decision\":\"allow\"", "\"decision\":\"deny\"");
    assert_ne!(edited[2], lines[2]);
    let (code, out) = verify(&[write("edited.jsonl", &edited)], &[]);
    assert_eq!(code, 1);
    assert!(
        out.contains("edited.jsonl:4") && out.contains("edited"),
        "{out}"
    );
    let mut deleted = lines.clone();
    deleted.remove(3);
    let (code, out) = verify(&[write("deleted.jsonl", &deleted)], &[]);
    assert_eq!(code, 1);
    assert!(
        out.contains("deleted.jsonl:4") && out.contains("deleted"),
        "{out}"
    );
    let mut reordered = lines.clone();
    reordered.swap(4, 5);
    let (code, out) = verify(&[write("reordered.jsonl", &reordered)], &[]);
    assert_eq!(code, 1);
    assert!(out.contains("reordered.jsonl:5"), "{out}");
    let mut first_gone = lines.clone();
    first_gone.remove(0);
    assert_eq!(
        verify(&[write("head.jsonl", &first_gone)], &[]).0,
        1,
        "the chain must start at seq 1"
    );
    let full = lines.join("\n") + "\n";
    let cut = dir.path().join("truncated.jsonl");
    std::fs::write(&cut, &full[..full.len() - 40]).unwrap();
    let (code, out) = verify(std::slice::from_ref(&cut), &[]);
    assert_eq!(code, 1);
    assert!(
        out.contains("TRUNCATED") && out.contains("7 records before it chain correctly"),
        "{out}"
    );
    assert_eq!(verify(&[cut], &["--allow-torn-tail"]).0, 0);
}

#[test]
fn rotation_keeps_the_chain_across_files() {
    let up = Upstream::start();
    let p = TestProxy::start(
        &config(&up, "{path: audit.jsonl, maxFileBytes: 3000}", ""),
        &[],
    );
    for i in 0..12 {
        assert_eq!(post(&p, &up, "/v1/notes", &format!(r#"{{"n":{i}}}"#)), 200);
    }
    eventually("rotated files", || {
        p.dir.path().join("audit.jsonl.2").exists()
    });
    // Outcome records may still rotate into another file: list the files on every check.
    let list = || {
        let mut files: Vec<_> = std::fs::read_dir(p.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|f| {
                f.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with("audit.jsonl")
            })
            .collect();
        files.sort();
        files
    };
    eventually("all records written", || {
        let (code, out) = verify(&list(), &[]);
        code == 0 && out.contains("24 records")
    });
    let files = list();
    assert!(files.len() >= 3, "{files:?}");
    // The live file alone starts mid-chain, which is allowed only because .1 exists beside it.
    let (code, out) = verify(&[p.dir.path().join("audit.jsonl")], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("from seq"), "{out}");
    // Tampering with a middle file breaks the chain at the start of the next one.
    let mid = p.dir.path().join("audit.jsonl.2");
    let text = std::fs::read_to_string(&mid).unwrap();
    std::fs::write(&mid, text.replacen("\"status\":200", "\"status\":201", 1)).unwrap();
    assert_eq!(verify(&files, &[]).0, 1);
}

#[test]
fn a_kill_9_under_load_leaves_a_verifiable_chain_and_no_unrecorded_forward() {
    let up = Upstream::start();
    let mut p = TestProxy::start(&config(&up, "{path: audit.jsonl}", ""), &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (stop, proxy, addr) = (stop.clone(), p.proxy, up.addr);
        workers.push(std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < 2000 {
                let body = format!(r#"{{"n":{}}}"#, w * 100_000 + i);
                let _ = std::panic::catch_unwind(|| {
                    call(
                        proxy,
                        "POST",
                        &format!("http://{addr}/v1/notes"),
                        &[
                            ("X-Tollgate-Tenant", "acme"),
                            ("Content-Type", "application/json"),
                        ],
                        Some(&body),
                    )
                });
                i += 1;
            }
        }));
    }
    eventually("load flowing", || up.count() >= 50);
    p.child.kill().unwrap(); // SIGKILL
    p.child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let path = p.dir.path().join("audit.jsonl");
    let (code, out) = verify(std::slice::from_ref(&path), &["--allow-torn-tail"]);
    assert_eq!(code, 0, "{out}");
    let recorded: std::collections::HashSet<i64> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["phase"] == "decision")
        .filter_map(|r| r["input"]["request"]["body"]["n"].as_i64())
        .collect();
    let forwarded: Vec<i64> = up
        .seen()
        .iter()
        .map(|s| {
            serde_json::from_slice::<serde_json::Value>(&s.body).unwrap()["n"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert!(forwarded.len() >= 50);
    for n in &forwarded {
        assert!(
            recorded.contains(n),
            "call {n} reached the upstream without a durable decision record"
        );
    }
    println!(
        "kill -9 drill: {} calls forwarded, all with records; {} decision records",
        forwarded.len(),
        recorded.len()
    );
}

#[test]
fn a_full_audit_disk_fails_closed_unless_fail_open() {
    for fail_open in [false, true] {
        let up = Upstream::start();
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("audit");
        std::fs::create_dir_all(&mnt).unwrap();
        // A 64 KiB tmpfs in a private mount namespace, mostly filled before the proxy starts.
        let wrapper = format!("mount -t tmpfs -o size=64k tmpfs {m} && dd if=/dev/zero of={m}/fill bs=1k count=56 2>/dev/null", m = mnt.display());
        let cfg = config(
            &up,
            &format!("{{path: audit/audit.jsonl, failOpen: {fail_open}}}"),
            "",
        );
        let p = TestProxy::start_wrapped(dir, &cfg, &[], Some(&wrapper));
        let mut statuses = Vec::new();
        for i in 0..40 {
            statuses.push(post(
                &p,
                &up,
                "/v1/notes",
                &format!(r#"{{"n":{i},"pad":"{}"}}"#, "x".repeat(400)),
            ));
        }
        if fail_open {
            assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
            assert_eq!(up.count(), 40);
            let m = p.metrics();
            assert!(
                m.contains("tollgate_fail_open_total{reason=\"audit\"}"),
                "{m}"
            );
        } else {
            assert!(statuses.contains(&503), "the disk filled up: {statuses:?}");
            let forwarded = statuses.iter().filter(|s| **s == 200).count();
            assert_eq!(
                up.count(),
                forwarded,
                "a 503 audit_unavailable call must never be forwarded"
            );
            let r = call(
                p.proxy,
                "POST",
                &format!("http://{}/v1/notes", up.addr),
                &[("X-Tollgate-Tenant", "acme")],
                Some("{}"),
            );
            assert_eq!(r.json()["error"], "audit_unavailable");
            assert!(
                p.metrics()
                    .lines()
                    .any(|l| l.starts_with("tollgate_audit_errors_total") && !l.ends_with(" 0")),
                "{}",
                p.metrics()
            );
            assert!(p.log().contains("audit write failed"));
        }
    }
}

#[test]
fn replay_flips_exactly_the_calls_a_tightened_policy_changes() {
    let up = Upstream::start();
    let p = TestProxy::start(&config(&up, "{path: audit.jsonl}", ""), &[]);
    for amount in [100, 600, 2000, 50] {
        assert_eq!(
            post(
                &p,
                &up,
                "/v1/refunds",
                &format!(r#"{{"charge":"ch_1","amount":{amount}}}"#)
            ),
            200
        );
    }
    // A call refused before policy: not replayable.
    call(
        p.proxy,
        "POST",
        &format!("http://{}/v1/nothing", up.addr),
        &[("X-Tollgate-Tenant", "acme")],
        Some("{}"),
    );
    eventually("records", || p.audit().len() == 9);
    let audit = p.dir.path().join("audit.jsonl");
    let data = p.dir.path().join("data.yaml");
    std::fs::write(
        &data,
        "refund_auto_approve_max: 500\nrefund_hard_cap: 1000\n",
    )
    .unwrap();
    let policies = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let out = Command::new(bin("tollgate-proxy"))
        .arg("replay")
        .arg("--audit")
        .arg(&audit)
        .arg("--policies")
        .arg(&policies)
        .arg("--data")
        .arg(&data)
        .arg("--fail-on-change")
        .arg("--json")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let changes = rep["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 2, "{rep}");
    assert_eq!(
        (changes[0]["old"].as_str(), changes[0]["new"].as_str()),
        (Some("allow"), Some("approval_required"))
    );
    assert!(changes[0]["reasons"][0].as_str().unwrap().contains("600"));
    assert_eq!(
        (changes[1]["old"].as_str(), changes[1]["new"].as_str()),
        (Some("allow"), Some("deny"))
    );
    assert_eq!(rep["replayed"], 4);
    assert_eq!(rep["not_replayable"], 1);
    // Unchanged policy: nothing flips, exit 0.
    let loose = p.dir.path().join("loose.yaml");
    std::fs::write(
        &loose,
        "refund_auto_approve_max: 5000\nrefund_hard_cap: 10000\n",
    )
    .unwrap();
    let out = Command::new(bin("tollgate-proxy"))
        .arg("replay")
        .arg("--audit")
        .arg(&audit)
        .arg("--policies")
        .arg(&policies)
        .arg("--data")
        .arg(&loose)
        .arg("--fail-on-change")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 changed"));
}

#[test]
fn run_summaries_follow_the_run_record_shape() {
    let up = Upstream::start();
    // Use the shipped library so a refund over the threshold escalates.
    let dir = tempfile::tempdir().unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap().path();
        if e.extension().is_some_and(|x| x == "rego") {
            std::fs::copy(&e, dir.path().join("policies").join(e.file_name().unwrap())).unwrap();
        }
    }
    let p = TestProxy::start_in(
        dir,
        &config(&up, "{path: audit.jsonl}", "policies: {paths: [policies]}"),
        &[],
    );
    // Run ids are minted by the sidecar; both calls name the same run.
    let run_id = p.new_run();
    let in_run = |path: &str, body: &str| {
        call(
            p.proxy,
            "POST",
            &format!("http://{}{path}", up.addr),
            &[
                ("X-Tollgate-Tenant", "acme"),
                ("Content-Type", "application/json"),
                ("X-Tollgate-Run", &run_id),
            ],
            Some(body),
        )
    };
    let first = in_run("/v1/notes", r#"{"text":"hello"}"#);
    assert_eq!(first.status, 200, "{}", first.body_text());
    assert_eq!(
        in_run("/v1/refunds", r#"{"charge":"ch_1","amount":900}"#).status,
        403
    );
    eventually("records", || p.audit().len() == 3);
    let out = Command::new(bin("tollgate-proxy"))
        .args(["audit", "runs", "--json"])
        .arg(p.dir.path().join("audit.jsonl"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let run: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(run["run_id"], run_id.as_str());
    assert_eq!(run["agent"], "billing");
    assert_eq!(run["tenant_id"], "acme");
    assert_eq!(run["tool_calls"].as_array().unwrap().len(), 2);
    assert_eq!(run["tool_calls"][0]["status"], "ok");
    assert_eq!(run["tool_calls"][1]["status"], "approval_required");
    assert!(run["tool_calls"][0]["input_hash"].as_str().unwrap().len() == 64);
    assert!(run["tool_calls"][0]["latency_ms"].is_number());
    assert_eq!(run["approvals"][0]["required"], true);
    assert_eq!(run["approvals"][0]["approved"], false);
    assert_eq!(run["outcome"]["status"], "escalated");
    assert!(run["outcome"]["reason"]
        .as_str()
        .unwrap()
        .contains("exceeds auto-approve threshold"));
    assert!(run["cost"]["usd"].is_number());
}
