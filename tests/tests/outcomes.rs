//! Cost per outcome (issue 17, item 4) on the real binary with a real upstream on loopback:
//! an orchestrator ends a run with its business outcome — on the run's last call
//! (`X-Tollgate-Run-Outcome`) or on the admin endpoint — and the run's record joins it to what
//! the run cost, retries and refused calls included; the metrics count it; a run that ended
//! takes no more calls; `audit runs --by-outcome` computes the same figures from the files.

use std::process::Command;
use tollgate_tests::harness::{bin, call, eventually, raw, RawResponse, TestProxy, Upstream};

fn config(up: &Upstream) -> String {
    let a = up.addr;
    format!(
        r#"
agent: {{name: support, tenants: [acme, globex]}}
tools:
  - name: crm.note
    match: {{host: "{a}", methods: [POST], path: /v1/notes}}
    cost: {{perCallUsd: 0.5}}
audit: {{path: audit.jsonl}}
"#
    )
}

fn in_run(
    p: &TestProxy,
    up: &Upstream,
    run: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> RawResponse {
    let mut headers = vec![
        ("X-Tollgate-Tenant", "acme"),
        ("Content-Type", "application/json"),
        ("X-Tollgate-Run", run),
    ];
    headers.extend_from_slice(extra);
    call(
        p.proxy,
        "POST",
        &format!("http://{}{path}", up.addr),
        &headers,
        Some(r#"{"text":"customer called back"}"#),
    )
}

fn report(p: &TestProxy, run: &str, body: &str) -> RawResponse {
    raw(
        p.admin,
        format!(
            "POST /runs/{run}/outcome HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            p.admin,
            body.len()
        )
        .as_bytes(),
    )
    .unwrap()
}

fn run_records(p: &TestProxy) -> Vec<serde_json::Value> {
    p.audit()
        .into_iter()
        .filter(|r| r["phase"] == "run")
        .collect()
}

fn cli(args: &[&str], file: &std::path::Path) -> (i32, String) {
    let out = Command::new(bin("tollgate-proxy"))
        .args(args)
        .arg(file)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn a_reported_outcome_joins_the_runs_cost_its_metrics_and_the_offline_report() {
    let up = Upstream::start();
    let p = TestProxy::start(&config(&up), &[]);

    // Run A: a call, its retry, a refused call, and the last call reporting the outcome.
    let a = p.new_run();
    assert_eq!(in_run(&p, &up, &a, "/v1/notes", &[]).status, 200);
    assert_eq!(in_run(&p, &up, &a, "/v1/notes", &[]).status, 200);
    let refused = in_run(&p, &up, &a, "/v1/unknown", &[]);
    assert_eq!(refused.status, 403, "{}", refused.body_text());
    let last = in_run(
        &p,
        &up,
        &a,
        "/v1/notes",
        &[("X-Tollgate-Run-Outcome", "resolved; label=ticket_closed")],
    );
    assert_eq!(last.status, 200, "{}", last.body_text());
    // The report is Tollgate's, never the upstream's.
    assert_eq!(up.count(), 3);
    assert!(up
        .seen()
        .iter()
        .all(|s| s.header("x-tollgate-run-outcome").is_none()));
    // The run record is the run as it stood when its last call ended.
    eventually("run A's record", || run_records(&p).len() == 1);
    let rec = &run_records(&p)[0];
    // The run has ended: a further call on it is refused and not forwarded, and recorded.
    let after = in_run(&p, &up, &a, "/v1/notes", &[]);
    assert_eq!(after.status, 409, "{}", after.body_text());
    assert_eq!(after.json()["error"], "run_ended", "{}", after.body_text());
    assert_eq!(up.count(), 3);
    assert_eq!(rec["run"], a.as_str());
    assert_eq!(rec["agent"], "support");
    assert_eq!(rec["tenant"], "acme");
    assert_eq!(rec["decision"], "resolved");
    assert_eq!(
        rec["cost"]["usd"], 1.5,
        "three forwarded calls at $0.50: {rec}"
    );
    let o = &rec["run_outcome"];
    assert_eq!(o["outcome"], "resolved");
    assert_eq!(o["label"], "ticket_closed");
    assert_eq!(o["reported_via"], "header");
    assert_eq!(o["calls"], 4, "{o}");
    assert_eq!(o["refused"], 1, "{o}");
    assert_eq!(
        o["retries"], 2,
        "the second and the last note repeat the first: {o}"
    );
    assert!(o["duration_ms"].is_u64() && !o["started"].as_str().unwrap().is_empty());
    // The run record is written after the run's last call, so it counts every call.
    let seqs: Vec<(u64, String)> = p
        .audit()
        .iter()
        .filter(|r| r["run"] == a.as_str())
        .map(|r| {
            (
                r["seq"].as_u64().unwrap(),
                r["phase"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let run_seq = seqs.iter().find(|(_, ph)| ph == "run").unwrap().0;
    let refused_after = p
        .audit()
        .into_iter()
        .find(|r| r["run"] == a.as_str() && r["decision"] == "deny" && r["status"] == 409)
        .expect("the refused call after the outcome is on record");
    assert!(refused_after["seq"].as_u64().unwrap() > run_seq);
    let before_run: Vec<_> = seqs.iter().filter(|(s, _)| *s < run_seq).collect();
    assert_eq!(
        before_run.len(),
        7,
        "4 decision + 3 outcome records: {seqs:?}"
    );

    // Run B: one call, the outcome on the admin endpoint.
    let b = p.new_run();
    assert_eq!(in_run(&p, &up, &b, "/v1/notes", &[]).status, 200);
    let r = report(&p, &b, r#"{"outcome":"abandoned","label":"customer_left"}"#);
    assert_eq!(r.status, 200, "{}", r.body_text());
    let v = r.json();
    assert_eq!(v["run"], b.as_str());
    assert_eq!(v["cost"]["usd"], 0.5);
    assert_eq!(v["outcome"]["outcome"], "abandoned");
    assert_eq!(v["outcome"]["reported_via"], "endpoint");
    assert_eq!(v["outcome"]["calls"], 1);
    // Once only; only runs this sidecar started; only known outcomes.
    let again = report(&p, &b, r#"{"outcome":"resolved"}"#);
    assert_eq!(
        (again.status, again.json()["error"].clone()),
        (409, "run_ended".into())
    );
    let unknown = report(&p, &p.new_run(), r#"{"outcome":"resolved"}"#);
    assert_eq!(unknown.status, 404, "{}", unknown.body_text());
    assert_eq!(unknown.json()["error"], "run_unknown");
    let forged = report(&p, "run_0123.abcdef", r#"{"outcome":"resolved"}"#);
    assert_eq!(
        (forged.status, forged.json()["error"].clone()),
        (400, "invalid_run".into())
    );
    let c = p.new_run();
    assert_eq!(in_run(&p, &up, &c, "/v1/notes", &[]).status, 200);
    for bad in [
        r#"{"outcome":"won"}"#,
        r#"{"outcome":"resolved","by":"me"}"#,
        "not json",
    ] {
        let r = report(&p, &c, bad);
        assert_eq!(r.status, 400, "{bad}: {}", r.body_text());
        assert_eq!(r.json()["error"], "invalid_outcome", "{bad}");
    }
    // A report on a run's only call ends it at once: the very next call is refused, before
    // the run record is even written.
    let d = p.new_run();
    let only = in_run(
        &p,
        &up,
        &d,
        "/v1/notes",
        &[("X-Tollgate-Run-Outcome", "escalated")],
    );
    assert_eq!(only.status, 200, "{}", only.body_text());
    assert_eq!(in_run(&p, &up, &d, "/v1/notes", &[]).status, 409);
    // A malformed outcome header is refused before anything is forwarded.
    let n = up.count();
    let bad = in_run(
        &p,
        &up,
        &c,
        "/v1/notes",
        &[("X-Tollgate-Run-Outcome", "won")],
    );
    assert_eq!(bad.status, 400, "{}", bad.body_text());
    assert!(
        bad.body_text().contains("x-tollgate-run-outcome"),
        "{}",
        bad.body_text()
    );
    assert_eq!(up.count(), n);

    // Metrics: cost per run by outcome, outcomes counted.
    let m = p.metrics();
    for line in [
        r#"tollgate_run_outcomes_total{agent="support",outcome="resolved",tenant="acme"} 1"#,
        r#"tollgate_run_outcomes_total{agent="support",outcome="abandoned",tenant="acme"} 1"#,
        r#"tollgate_run_cost_usd_sum{agent="support",outcome="resolved",tenant="acme"} 1.5"#,
        r#"tollgate_run_cost_usd_count{agent="support",outcome="resolved",tenant="acme"} 1"#,
        r#"tollgate_run_cost_usd_bucket{agent="support",outcome="resolved",tenant="acme",le="1"} 0"#,
        r#"tollgate_run_cost_usd_bucket{agent="support",outcome="resolved",tenant="acme",le="2.5"} 1"#,
    ] {
        assert!(m.contains(line), "missing {line} in\n{m}");
    }

    // The chain still verifies with run records in it.
    let file = p.dir.path().join("audit.jsonl");
    let (code, out) = cli(&["audit", "verify"], &file);
    assert_eq!(code, 0, "{out}");

    // Offline: the same costs per outcome, and the cost per resolved run, over a period.
    let (code, out) = cli(
        &["audit", "runs", "--by-outcome", "--json", "--since", "1h"],
        &file,
    );
    assert_eq!(code, 0, "{out}");
    let agent: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(agent["agent"], "support");
    let row = |o: &str| {
        agent["outcomes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["outcome"] == o)
            .cloned()
            .unwrap_or_else(|| panic!("no {o} row in {agent}"))
    };
    let resolved = row("resolved");
    assert_eq!(resolved["runs"], 1);
    assert_eq!(
        resolved["cost_usd"], rec["cost"]["usd"],
        "offline equals the sidecar's tally"
    );
    assert_eq!(
        resolved["calls"], 5,
        "the refused call after the outcome is the run's too"
    );
    assert_eq!(resolved["refused"], 2);
    assert_eq!(resolved["retries"], 3);
    assert_eq!(row("abandoned")["cost_usd"], 0.5);
    assert_eq!(row("unreported")["runs"], 1, "run C");
    assert_eq!(row("escalated")["cost_usd"], 0.5, "run D");
    assert_eq!(agent["resolved"], 1);
    assert_eq!(agent["cost_usd"], 3.0);
    assert_eq!(
        agent["cost_per_resolved_run_usd"], 3.0,
        "every run's cost over the one resolved run"
    );
    let (code, text) = cli(&["audit", "runs", "--by-outcome"], &file);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("cost per resolved run=$3.000000"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("resolved") && l.contains("$1.500000")),
        "{text}"
    );
    // A period after every run: nothing.
    let (code, out) = cli(
        &[
            "audit",
            "runs",
            "--by-outcome",
            "--json",
            "--since",
            "2099-01-01T00:00:00Z",
        ],
        &file,
    );
    assert_eq!((code, out.trim()), (0, ""));
    let (code, out) = cli(&["audit", "runs", "--since", "yesterday-ish"], &file);
    assert_eq!(code, 2, "{out}");
    // Per run, the reported outcome is next to the inferred one.
    let (_, out) = cli(&["audit", "runs", "--json"], &file);
    let summary: serde_json::Value = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["run_id"] == a.as_str())
        .unwrap();
    assert_eq!(summary["reported"]["outcome"], "resolved");
    assert_eq!(summary["reported"]["label"], "ticket_closed");
}

#[test]
fn replay_skips_run_records() {
    // A run record is not a call: `replay` re-decides calls only.
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/allow.rego"),
        "package tollgate\nimport rego.v1\ndeny contains \"never\" if input.tool.name == \"nope\"\n",
    )
    .unwrap();
    let cfg = config(&up) + "policies: {paths: [policies]}\n";
    let p = TestProxy::start_in(dir, &cfg, &[]);
    let run = p.new_run();
    assert_eq!(in_run(&p, &up, &run, "/v1/notes", &[]).status, 200);
    assert_eq!(report(&p, &run, r#"{"outcome":"escalated"}"#).status, 200);
    eventually("run record", || run_records(&p).len() == 1);
    let out = Command::new(bin("tollgate-proxy"))
        .args(["replay", "--json", "--audit"])
        .arg(p.dir.path().join("audit.jsonl"))
        .arg("--policies")
        .arg(p.dir.path().join("policies"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rep: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(rep["records"], 1, "{rep}");
}

#[test]
fn a_run_ended_during_a_stream_waits_for_its_cost_and_admits_no_new_call() {
    use std::sync::atomic::Ordering;
    use tollgate_tests::slow_upstream::{Client, SlowUpstream};
    let up = SlowUpstream::start();
    let a = up.addr;
    let cfg = format!(
        r#"
agent: {{name: support, tenants: [acme]}}
tools:
  - name: llm.chat
    match: {{host: "{a}", methods: [POST], path: /v1/chat/completions}}
    llm: {{provider: openai}}
    timeouts: {{total: 120s, idle: 30s}}
    cost:
      llm:
        prices: {{gpt-4o: {{promptPerMtok: 2.5, completionPerMtok: 10}}}}
  - name: fast.echo
    match: {{host: "{a}", methods: [POST], path: /fast}}
    cost: {{perCallUsd: 0.01}}
audit: {{path: audit.jsonl}}
"#
    );
    let p = TestProxy::start(&cfg, &[]);
    let run = p.new_run();
    let h = [
        ("X-Tollgate-Tenant", "acme"),
        ("X-Tollgate-Run", run.as_str()),
    ];
    let body = serde_json::json!({"model": "gpt-4o", "stream": true, "max_tokens": 4000, "user": "tag-long",
        "messages": [{"role": "user", "content": "write a long story"}]});
    let stream = Client::post(
        p.proxy,
        &format!("http://{a}/v1/chat/completions"),
        &h,
        &body,
    );
    eventually("the stream delivering", || {
        stream.text().contains("more words")
    });
    // The report waits for the stream: its cost is only known at its end.
    let (admin, r) = (p.admin, run.clone());
    let reporter = std::thread::spawn(move || {
        let body = r#"{"outcome":"resolved"}"#;
        raw(
            admin,
            format!(
                "POST /runs/{r}/outcome HTTP/1.1\r\nHost: {admin}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap()
    });
    // Meanwhile the run admits no new call (a call sent before the report reached the
    // sidecar is the run's as usual, and counted below).
    let mut attempts = 0;
    let mut allowed = 0;
    eventually("the run is claimed", || {
        attempts += 1;
        let r = Client::post(
            p.proxy,
            &format!("http://{a}/fast"),
            &h,
            &serde_json::json!({"q": 1}),
        );
        let text = r.wait_done();
        allowed += u64::from(text.starts_with("HTTP/1.1 200"));
        text.starts_with("HTTP/1.1 409")
    });
    up.release.store(true, Ordering::SeqCst);
    let streamed = stream.wait_done();
    assert!(streamed.contains("[DONE]"), "{streamed}");
    let answer = reporter.join().unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body_text());
    let v = answer.json();
    let outcome_rec = p
        .audit()
        .into_iter()
        .find(|r| r["phase"] == "outcome" && r["tool"] == "llm.chat")
        .expect("the stream's outcome record");
    assert!(
        outcome_rec["cost"]["usd"].as_f64().unwrap() > 0.0,
        "{outcome_rec}"
    );
    let expected = outcome_rec["cost"]["usd"].as_f64().unwrap() + 0.01 * allowed as f64;
    assert!(
        (v["cost"]["usd"].as_f64().unwrap() - expected).abs() < 1e-6,
        "the run's cost is the stream's metered cost (and any call before the report): {v}"
    );
    assert_eq!(
        v["outcome"]["calls"],
        1 + attempts,
        "the stream and every /fast attempt: {v}"
    );
    assert!(v["outcome"].get("in_flight").is_none(), "{v}");
}
