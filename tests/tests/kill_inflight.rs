//! A kill switch stops what is already running (issue 17 item 3): an LLM stream, a call
//! waiting on a slow upstream and a call held for approval, all in flight through the real
//! proxy binary, are stopped when a config reload engages a switch covering their tenant,
//! while the same calls for another tenant go on unharmed.
//!
//! The upstream ([`SlowUpstream`]) is a raw TCP server on loopback, so that it sees exactly
//! when the proxy drops its connection.

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use tollgate_operator::testapi::TestApiServer;
use tollgate_tests::harness::{call, eventually, get, raw, TestProxy};
use tollgate_tests::operator::{sidecar, Operator};
use tollgate_tests::slow_upstream::{Client, SlowUpstream};

const TOKEN: &str = "alice-token-0123456789";

fn config(a: SocketAddr, kill: &str) -> String {
    format!(
        r#"
agent: {{name: billing, tenants: [acme, globex]}}
tools:
  - name: llm.chat
    match: {{host: "{a}", methods: [POST], path: /v1/chat/completions}}
    llm: {{provider: openai}}
    timeouts: {{total: 120s, idle: 30s}}
    cost:
      llm:
        prices: {{gpt-4o: {{promptPerMtok: 2.5, completionPerMtok: 10}}}}
  - name: slow.lookup
    match: {{host: "{a}", methods: [POST], path: /slow}}
    timeouts: {{total: 120s}}
    cost: {{perCallUsd: 0.5}}
  - name: fast.echo
    match: {{host: "{a}", methods: [POST], path: /fast}}
    cost: {{perCallUsd: 0.01}}
  - name: pay.refund
    match: {{host: "{a}", methods: [POST], path: /v1/refunds}}
policies:
  modules:
    - name: r.rego
      rego: |
        package tollgate
        import rego.v1
        require_approval contains "refunds need a human" if input.request.body.amount > 500
approvals:
  maxWaitS: 120
  adminTokens:
    - {{approver: alice, valueFrom: {{env: ALICE_TOKEN}}}}
tenants:
  acme: {{budgets: {{dayUsd: 100}}}}
  globex: {{budgets: {{dayUsd: 100}}}}
audit: {{path: audit.jsonl}}
{kill}
"#
    )
}

const KILL_ACME: &str =
    "killSwitches:\n  - {name: stop-acme, scope: {tenant: acme}, reason: INC-7}\n";

fn metric(m: &str, prefix: &str) -> f64 {
    m.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn approvals(p: &TestProxy) -> Vec<Value> {
    let r = raw(
        p.admin,
        format!(
            "GET /approvals HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n",
            p.admin
        )
        .as_bytes(),
    )
    .unwrap();
    r.json()["approvals"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_kill_switch_stops_streams_slow_calls_and_held_calls_in_its_scope_and_nothing_else() {
    let up = SlowUpstream::start();
    let a = up.addr;
    let p = TestProxy::start(&config(a, ""), &[("ALICE_TOKEN", TOKEN)]);
    let llm = format!("http://{a}/v1/chat/completions");
    let chat = |tag: &str| json!({"model": "gpt-4o", "stream": true, "max_tokens": 4000, "user": tag, "messages": [{"role": "user", "content": "write a long story"}]});
    let acme = [("X-Tollgate-Tenant", "acme")];
    let globex = [("X-Tollgate-Tenant", "globex")];

    let stream_acme = Client::post(p.proxy, &llm, &acme, &chat("tag-stream-acme"));
    let stream_globex = Client::post(p.proxy, &llm, &globex, &chat("tag-stream-globex"));
    let slow_acme = Client::post(
        p.proxy,
        &format!("http://{a}/slow"),
        &acme,
        &json!({"q": "tag-slow-acme"}),
    );
    let held_acme = Client::post(
        p.proxy,
        &format!("http://{a}/v1/refunds"),
        &[("X-Tollgate-Tenant", "acme"), ("Prefer", "wait=120")],
        &json!({"amount": 900, "memo": "tag-held-acme"}),
    );
    eventually("both streams delivering and the slow call upstream", || {
        stream_acme.text().contains("more words")
            && stream_globex.text().contains("more words")
            && up.get("tag-slow-acme").is_some()
    });
    eventually("the refund held for approval", || {
        approvals(&p).iter().any(|r| r["state"] == "pending")
    });

    // Engage the switch for tenant acme by reloading the config.
    p.rewrite_config(&config(a, KILL_ACME));

    // The acme stream ends with an error event in OpenAI's envelope, not a clean [DONE].
    let text = stream_acme.wait_done();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("event: error"), "{text}");
    let data = text
        .split("event: error\ndata: ")
        .nth(1)
        .and_then(|d| d.split("\n\n").next())
        .unwrap();
    let ev: Value = serde_json::from_str(data).unwrap();
    assert_eq!(ev["error"]["code"], "killed", "{ev}");
    assert!(
        ev["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stop-acme"),
        "{ev}"
    );
    assert!(!text.contains("[DONE]"), "{text}");
    // The slow call is answered 503 killed; the held call is released with killed.
    let slow = tollgate_tests::harness::parse_response(slow_acme.wait_done().as_bytes());
    assert_eq!(slow.status, 503, "{}", slow.body_text());
    assert_eq!(slow.json()["error"], "killed");
    let held = tollgate_tests::harness::parse_response(held_acme.wait_done().as_bytes());
    assert_eq!(held.status, 503, "{}", held.body_text());
    assert_eq!(held.json()["error"], "killed");
    // The upstream saw both acme connections dropped.
    eventually(
        "the upstream saw the acme stream and slow call dropped",
        || {
            up.get("tag-stream-acme").is_some_and(|s| s.dropped)
                && up.get("tag-slow-acme").is_some_and(|s| s.dropped)
        },
    );
    // The approval that was pending is void, and cannot be decided any more.
    let list = approvals(&p);
    let voided = list
        .iter()
        .find(|r| r["summary"]["tenant"] == "acme")
        .unwrap();
    assert_eq!(voided["state"], "voided", "{voided}");
    assert_eq!(voided["voided_by"], "stop-acme");
    let id = voided["id"].as_str().unwrap();
    let approve = raw(
        p.admin,
        format!(
            "POST /approvals/{id}/approve HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            p.admin
        )
        .as_bytes(),
    )
    .unwrap();
    assert_ne!(approve.status, 200, "{}", approve.body_text());

    // Out of scope: the globex stream goes on delivering, then ends cleanly.
    let before = up.get("tag-stream-globex").unwrap().chunks;
    eventually("the globex stream still delivering after the kill", || {
        up.get("tag-stream-globex").unwrap().chunks > before + 2
    });
    let fast = call(
        p.proxy,
        "POST",
        &format!("http://{a}/fast"),
        &[
            ("X-Tollgate-Tenant", "globex"),
            ("Content-Type", "application/json"),
        ],
        Some(r#"{"q":"tag-fast-globex"}"#),
    );
    assert_eq!(fast.status, 200, "{}", fast.body_text());
    up.release.store(true, Ordering::SeqCst);
    let text = stream_globex.wait_done();
    assert!(text.contains("[DONE]"), "{text}");
    assert!(!text.contains("event: error"), "{text}");
    assert!(up.get("tag-stream-globex").unwrap().completed);

    // One terminal record per killed call, decision killed, with what was delivered.
    eventually("outcome records of the killed calls", || {
        let recs = p.audit();
        recs.iter()
            .filter(|r| r["tenant"] == "acme" && r["decision"] == "killed")
            .count()
            == 3
    });
    let recs = p.audit();
    let acme_recs: Vec<&Value> = recs.iter().filter(|r| r["tenant"] == "acme").collect();
    let by_tool = |tool: &str| -> Vec<&Value> {
        acme_recs
            .iter()
            .copied()
            .filter(|r| r["tool"] == tool)
            .collect()
    };
    // Stream: a decision record (allow), then one outcome record: killed, cut, charged
    // the prompt and the words delivered, far below the 4000-token reservation.
    let s = by_tool("llm.chat");
    assert_eq!(s.len(), 2, "{s:#?}");
    assert_eq!(
        (&s[0]["phase"], &s[0]["decision"]),
        (&json!("decision"), &json!("allow"))
    );
    let out = s[1];
    assert_eq!(out["phase"], "outcome");
    assert_eq!(out["decision"], "killed");
    assert_eq!(out["cut"], "killed");
    let completion = out["cost"]["completion_tokens"].as_u64().unwrap();
    assert!(completion > 0 && completion < 4000, "{out}");
    assert!(out["cost"]["prompt_tokens"].as_u64().unwrap() > 0, "{out}");
    let usd = out["cost"]["usd"].as_f64().unwrap();
    let reserved =
        (out["cost"]["prompt_tokens"].as_u64().unwrap() as f64 * 2.5 + 4000.0 * 10.0) / 1e6;
    assert!(usd > 0.0 && usd < reserved, "{usd} vs reserved {reserved}");
    assert!(
        out["reasons"].as_array().unwrap().iter().any(|r| r
            .as_str()
            .unwrap()
            .contains("bytes of the response were delivered")),
        "{out}"
    );
    // Slow call: decision allow, then outcome killed, charged its per-call cost (the
    // upstream had it).
    let s = by_tool("slow.lookup");
    assert_eq!(s.len(), 2, "{s:#?}");
    assert_eq!(s[1]["decision"], "killed");
    assert_eq!(s[1]["status"], 503);
    assert!((s[1]["cost"]["usd"].as_f64().unwrap() - 0.5).abs() < 1e-9);
    // Held call: one record, the killed decision; nothing forwarded.
    let s = by_tool("pay.refund");
    assert_eq!(s.len(), 1, "{s:#?}");
    assert_eq!(s[0]["decision"], "killed");
    assert!(up
        .served
        .lock()
        .unwrap()
        .iter()
        .all(|s| s.path != "/v1/refunds"));
    // No call was recorded as anything else (no client_gone, no error).
    assert!(
        acme_recs.iter().all(|r| r["decision"] != "error"),
        "{acme_recs:#?}"
    );

    // Counted once each; the aborts by stage.
    let m = p.metrics();
    let req = |tool: &str, d: &str| {
        metric(
            &m,
            &format!(
                r#"tollgate_requests_total{{agent="billing",decision="{d}",tenant="acme",tool="{tool}"}}"#
            ),
        )
    };
    assert_eq!(req("llm.chat", "allow"), 1.0, "{m}");
    assert_eq!(req("llm.chat", "killed"), 0.0, "{m}");
    assert_eq!(req("slow.lookup", "killed"), 1.0, "{m}");
    assert_eq!(req("slow.lookup", "allow"), 0.0, "{m}");
    assert_eq!(req("pay.refund", "killed"), 1.0, "{m}");
    for stage in ["stream", "upstream", "approval"] {
        assert_eq!(
            metric(
                &m,
                &format!(r#"tollgate_calls_aborted_total{{reason="killed",stage="{stage}"}}"#)
            ),
            1.0,
            "{stage}: {m}"
        );
    }
    assert!(
        m.contains(r#"tollgate_approvals_total{result="voided"} 1"#),
        "{m}"
    );

    // The budget was settled on what was delivered and nothing stays reserved: lift the
    // switch, make one cheap call, and the remaining budget is the cap minus what the
    // records charged.
    p.rewrite_config(&config(a, ""));
    let fast_acme = || {
        call(
            p.proxy,
            "POST",
            &format!("http://{a}/fast"),
            &[
                ("X-Tollgate-Tenant", "acme"),
                ("Content-Type", "application/json"),
            ],
            Some(r#"{"q":"tag-fast-acme"}"#),
        )
    };
    eventually("the switch lifted", || fast_acme().status == 200);
    eventually("the last outcome record", || {
        p.audit()
            .iter()
            .filter(|r| {
                r["tenant"] == "acme" && r["tool"] == "fast.echo" && r["phase"] == "outcome"
            })
            .count()
            == 1
    });
    let charged: f64 = p
        .audit()
        .iter()
        .filter(|r| r["tenant"] == "acme" && r["phase"] == "outcome")
        .map(|r| r["cost"]["usd"].as_f64().unwrap_or(0.0))
        .sum();
    let m = p.metrics();
    let remaining = metric(
        &m,
        r#"tollgate_budget_remaining_usd{scope="tenant_day",tenant="acme"}"#,
    );
    assert!(
        (remaining - (100.0 - charged)).abs() < 1e-6,
        "remaining {remaining}, charged {charged}: {m}"
    );
}

const GV: &str = "tollgate.dev/v1alpha1";

/// The operator binary on the in-process test API server (there is no Kubernetes API server
/// here; `tollgate_operator::testapi` says what it models), killed on drop.
fn kubectl_tollgate(dir: &std::path::Path, args: &[&str]) -> String {
    let (ok, text) = tollgate_tests::operator::kubectl_tollgate(dir, args);
    assert!(ok, "kubectl tollgate {args:?}: {text}");
    text
}

/// In a cluster: `kubectl tollgate kill` on one tool cuts that tool's stream in a running
/// sidecar and leaves a call held for another tool waiting; a second switch releases the held
/// call with `killed`, and a grant a human gives later for a request that was voided is not
/// honoured by the sidecar.
#[test]
fn in_a_cluster_kubectl_kill_cuts_streams_and_voids_approvals_in_scope() {
    let api = TestApiServer::start();
    let up = SlowUpstream::start();
    let a = up.addr;
    api.add_token(
        "tok-billing",
        "system:serviceaccount:agents:billing-agent",
        &["tollgate"],
    );
    api.put("tenants", json!({"apiVersion": GV, "kind": "Tenant", "metadata": {"name": "acme"}, "spec": {"budgets": {"dayUsd": 100.0}}}));
    api.put("tools", json!({"apiVersion": GV, "kind": "Tool", "metadata": {"name": "llm-chat", "namespace": "agents"},
        "spec": {"match": {"host": a.to_string(), "methods": ["POST"], "path": "/v1/chat/completions"},
                 "llm": {"provider": "openai"}, "timeouts": {"total": "120s", "idle": "30s"},
                 "cost": {"llm": {"prices": {"gpt-4o": {"promptPerMtok": 2.5, "completionPerMtok": 10}}}}}}));
    api.put("tools", json!({"apiVersion": GV, "kind": "Tool", "metadata": {"name": "pay-refund", "namespace": "agents"},
        "spec": {"match": {"host": a.to_string(), "methods": ["POST"], "path": "/v1/refunds"}}}));
    api.put("agentpolicies", json!({"apiVersion": GV, "kind": "AgentPolicy", "metadata": {"name": "refunds", "namespace": "agents"},
        "spec": {"rego": "package tollgate\nimport rego.v1\nrequire_approval contains \"refunds need a human\" if input.request.body.amount > 500\n"}}));
    api.put("agentidentities", json!({"apiVersion": GV, "kind": "AgentIdentity", "metadata": {"name": "billing", "namespace": "agents"},
        "spec": {"serviceAccount": "billing-agent", "tenants": ["acme"], "tools": ["llm-chat", "pay-refund"], "policies": ["refunds"]}}));
    let dir = tempfile::tempdir().unwrap();
    let op = Operator::start(&api, dir.path());
    let s = sidecar(op.port, "tok-billing");
    let acme = [("X-Tollgate-Tenant", "acme")];
    let refund_url = format!("http://{a}/v1/refunds");
    let refund = |amount: u32| {
        call(
            s.proxy,
            "POST",
            &refund_url,
            &[
                ("X-Tollgate-Tenant", "acme"),
                ("Content-Type", "application/json"),
            ],
            Some(&json!({"amount": amount}).to_string()),
        )
    };
    // A refund waiting for a human (not held), one held, and a stream.
    let asked = refund(700);
    assert_eq!(asked.status, 403, "{}", asked.body_text());
    let asked_id = asked.json()["approval"].as_str().unwrap().to_string();
    let held = Client::post(
        s.proxy,
        &refund_url,
        &[("X-Tollgate-Tenant", "acme"), ("Prefer", "wait=120")],
        &json!({"amount": 900}),
    );
    let stream = Client::post(
        s.proxy,
        &format!("http://{a}/v1/chat/completions"),
        &acme,
        &json!({"model": "gpt-4o", "stream": true, "user": "tag-cluster", "messages": []}),
    );
    eventually(
        "the stream delivering, both ApprovalRequests created",
        || {
            stream.text().contains("more words")
                && api
                    .list(GV, "approvalrequests")
                    .iter()
                    .filter(|r| r["metadata"]["namespace"] == "agents")
                    .count()
                    == 2
        },
    );

    kubectl_tollgate(
        dir.path(),
        &[
            "-n",
            "agents",
            "kill",
            "stop-chat",
            "--tool",
            "llm-chat",
            "--reason",
            "INC-9",
        ],
    );
    let text = stream.wait_done();
    assert!(text.contains("event: error"), "{text}");
    assert!(
        text.contains("stop-chat") && !text.contains("[DONE]"),
        "{text}"
    );
    eventually("the upstream saw the stream dropped", || {
        up.get("tag-cluster").is_some_and(|s| s.dropped)
    });
    assert!(
        !held.done.load(Ordering::SeqCst),
        "a held call for another tool is not in scope: {}",
        held.text()
    );

    kubectl_tollgate(
        dir.path(),
        &[
            "-n",
            "agents",
            "kill",
            "stop-refunds",
            "--tool",
            "pay-refund",
            "--reason",
            "INC-9",
        ],
    );
    let r = tollgate_tests::harness::parse_response(held.wait_done().as_bytes());
    assert_eq!(r.status, 503, "{}", r.body_text());
    assert_eq!(r.json()["error"], "killed");
    // Both requests are voided in the API: no human can approve them any more.
    let ids: Vec<String> = api
        .list(GV, "approvalrequests")
        .iter()
        .filter_map(|r| r["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(ids.len(), 2);
    eventually("the ApprovalRequests marked Voided", || {
        ids.iter().all(|id| {
            api.get(GV, "approvalrequests", "agents", id)
                .is_some_and(|r| r["status"]["phase"] == "Voided")
        })
    });
    let r = api
        .get(GV, "approvalrequests", "agents", &asked_id)
        .unwrap();
    assert!(
        r["status"]["reason"]
            .as_str()
            .unwrap()
            .contains("stop-refunds"),
        "{r}"
    );
    let (ok, out) = tollgate_tests::operator::kubectl_tollgate(
        dir.path(),
        &["-n", "agents", "approve", &asked_id],
    );
    assert!(!ok && out.contains("already Voided"), "{out}");
    // A decision that raced the void (written before the operator marked it) reaches the
    // sidecar as a grant once the switch is lifted: the sidecar does not honour it.
    let mut raced = r.clone();
    raced["status"] =
        json!({"phase": "Approved", "approver": "alice", "decidedAt": "2026-01-01T00:00:00Z"});
    api.put("approvalrequests", raced);
    kubectl_tollgate(dir.path(), &["unkill", "stop-refunds"]);
    eventually(
        "the grant in the sidecar's snapshot, the switch lifted",
        || {
            let c = get(s.admin, "/config").unwrap().json();
            c["approvalGrants"]
                .as_array()
                .is_some_and(|g| g.iter().any(|x| x == asked_id.as_str()))
                && !c.to_string().contains("stop-refunds")
        },
    );
    let retry = refund(700);
    assert_eq!(retry.status, 403, "{}", retry.body_text());
    assert_eq!(retry.json()["error"], "approval_rejected");
    assert!(
        retry.body_text().contains("voided"),
        "{}",
        retry.body_text()
    );
    assert!(up
        .served
        .lock()
        .unwrap()
        .iter()
        .all(|s| s.path != "/v1/refunds"));
    let recs = s.audit();
    assert!(
        recs.iter()
            .any(|r| r["tool"] == "llm-chat" && r["decision"] == "killed" && r["cut"] == "killed"),
        "{recs:#?}"
    );
    assert!(recs
        .iter()
        .any(|r| r["tool"] == "pay-refund" && r["decision"] == "killed"));
}
