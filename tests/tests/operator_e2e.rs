//! The operator end to end (issue 6) against the in-process test API server
//! (`tollgate_operator::testapi`, which says what it does not model): the operator binary
//! watches the CRDs, builds each identity's snapshot and serves it to real `tollgate-proxy`
//! sidecars over the long-poll API. A kill switch reaches every sidecar (the time it took is
//! printed), status is written, a sidecar cannot read another agent's snapshot, and an
//! operator outage makes the sidecars fail closed after `maxStaleness` and recover after.

use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tollgate_operator::testapi::TestApiServer;
use tollgate_tests::harness::{bin, call, eventually, free_port, get, TestProxy, Upstream};
use tollgate_tests::operator::{kubectl_tollgate, sidecar, Operator};

const GV: &str = "tollgate.dev/v1alpha1";

fn seed(api: &TestApiServer, up: &Upstream) {
    api.add_token(
        "tok-billing",
        "system:serviceaccount:agents:billing-agent",
        &["tollgate"],
    );
    api.add_token(
        "tok-other",
        "system:serviceaccount:agents:other-agent",
        &["tollgate"],
    );
    api.add_token(
        "tok-wrong-aud",
        "system:serviceaccount:agents:billing-agent",
        &["kubernetes"],
    );
    api.put("tenants", json!({"apiVersion": GV, "kind": "Tenant", "metadata": {"name": "acme"}, "spec": {"budgets": {"dayUsd": 100.0}}}));
    api.put("tools", json!({"apiVersion": GV, "kind": "Tool", "metadata": {"name": "crm-note", "namespace": "agents"},
        "spec": {"match": {"host": up.addr.to_string(), "methods": ["POST"], "path": "/v1/notes"}}}));
    api.put("agentpolicies", json!({"apiVersion": GV, "kind": "AgentPolicy", "metadata": {"name": "notes", "namespace": "agents"},
        "spec": {"rego": "package tollgate\nimport rego.v1\ndeny contains \"no shouting\" if input.request.body.text == upper(input.request.body.text)\n"}}));
    api.put("agentidentities", json!({"apiVersion": GV, "kind": "AgentIdentity", "metadata": {"name": "billing", "namespace": "agents"},
        "spec": {"serviceAccount": "billing-agent", "tenants": ["acme"], "tools": ["crm-note"], "policies": ["notes"], "maxStaleness": "3s"}}));
}

fn note(p: &TestProxy, up: &Upstream, text: &str) -> (u16, String) {
    let r = call(
        p.proxy,
        "POST",
        &format!("http://{}/v1/notes", up.addr),
        &[
            ("X-Tollgate-Tenant", "acme"),
            ("Content-Type", "application/json"),
        ],
        Some(&json!({"text": text}).to_string()),
    );
    (r.status, r.body_text())
}

#[test]
fn snapshots_reach_sidecars_and_kill_switches_propagate() {
    let api = TestApiServer::start();
    let up = Upstream::start();
    seed(&api, &up);
    let dir = tempfile::tempdir().unwrap();
    let op = Operator::start(&api, dir.path());
    let sidecars: Vec<TestProxy> = (0..3).map(|_| sidecar(op.port, "tok-billing")).collect();
    for s in &sidecars {
        assert_eq!(note(s, &up, "hello").0, 200);
        let (code, body) = note(s, &up, "HELLO");
        assert_eq!(code, 403, "{body}");
        assert!(body.contains("no shouting"));
    }
    // Engage a kill switch scoped to the agent; time until every sidecar refuses.
    let t0 = Instant::now();
    api.put("killswitches", json!({"apiVersion": GV, "kind": "KillSwitch", "metadata": {"name": "stop-billing"},
        "spec": {"scope": {"agent": "billing"}, "engaged": true, "reason": "INC-7: runaway notes"}}));
    let mut remaining: Vec<&TestProxy> = sidecars.iter().collect();
    while !remaining.is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "kill switch did not propagate"
        );
        remaining.retain(|s| note(s, &up, "hello").0 != 503);
    }
    let lag = t0.elapsed();
    println!(
        "kill switch reached all {} sidecars in {:.1} ms",
        sidecars.len(),
        lag.as_secs_f64() * 1e3
    );
    let (code, body) = note(&sidecars[0], &up, "hello");
    assert_eq!(code, 503);
    assert!(body.contains("INC-7"), "{body}");
    // Status, written by the operator.
    eventually("kill switch status", || {
        api.get(GV, "killswitches", "", "stop-billing")
            .is_some_and(|k| {
                k["status"]["affectedAgents"] == 1 && k["status"]["agents"][0] == "agents/billing"
            })
    });
    eventually("identity Ready", || {
        api.get(GV, "agentidentities", "agents", "billing")
            .is_some_and(|i| {
                i["status"]["conditions"][0]["type"] == "Ready"
                    && i["status"]["conditions"][0]["status"] == "True"
            })
    });
    // The interception CA reaches the agent's namespace: a Secret for the sidecar, a
    // ConfigMap with the public certificate for the agent's trust store.
    eventually("CA distributed", || {
        api.get("v1", "secrets", "agents", "tollgate-intercept-ca")
            .is_some_and(|s| s["data"]["tls.key"].is_string())
            && api
                .get("v1", "configmaps", "agents", "tollgate-ca")
                .is_some_and(|c| {
                    c["data"]["ca.crt"]
                        .as_str()
                        .unwrap_or("")
                        .contains("BEGIN CERTIFICATE")
                })
    });
    // The identity's ServiceAccount exists, owned by it; transitions are announced as events.
    eventually("owned ServiceAccount", || {
        api.get("v1", "serviceaccounts", "agents", "billing-agent")
            .is_some_and(|sa| sa["metadata"]["ownerReferences"][0]["kind"] == "AgentIdentity")
    });
    eventually("events", || {
        let evs = api.list("events.k8s.io/v1", "events");
        evs.iter()
            .any(|e| e["reason"] == "Engaged" && e["regarding"]["kind"] == "KillSwitch")
            && evs.iter().any(|e| {
                e["reason"] == "SnapshotServed" && e["regarding"]["kind"] == "AgentIdentity"
            })
    });
    // The sidecars' spend today shows in the identity's and the tenant's status.
    api.put("tools", json!({"apiVersion": GV, "kind": "Tool", "metadata": {"name": "crm-note", "namespace": "agents"},
        "spec": {"match": {"host": up.addr.to_string(), "methods": ["POST"], "path": "/v1/notes"}, "cost": {"perCallUsd": 0.25}}}));
    api.delete(GV, "killswitches", "", "stop-billing");
    eventually("a costed call goes through", || {
        note(&sidecars[0], &up, "paid").0 == 200
    });
    eventually("spend in status", || {
        api.get(GV, "agentidentities", "agents", "billing")
            .and_then(|i| i["status"]["spendTodayUsd"].as_f64())
            .is_some_and(|v| v >= 0.25)
            && api
                .get(GV, "tenants", "", "acme")
                .and_then(|t| t["status"]["spendTodayUsd"].as_f64())
                .is_some_and(|v| v >= 0.25)
    });
    api.put("killswitches", json!({"apiVersion": GV, "kind": "KillSwitch", "metadata": {"name": "stop-billing"},
        "spec": {"scope": {"agent": "billing"}, "engaged": true, "reason": "INC-7: runaway notes"}}));
    eventually("killed again", || note(&sidecars[0], &up, "hello").0 == 503);
    // Lift it by deleting it.
    api.delete(GV, "killswitches", "", "stop-billing");
    eventually("lifted everywhere", || {
        sidecars.iter().all(|s| note(s, &up, "hello").0 == 200)
    });
    // A policy that does not compile: reported, and the last good snapshot keeps serving.
    api.put("agentpolicies", json!({"apiVersion": GV, "kind": "AgentPolicy", "metadata": {"name": "notes", "namespace": "agents"},
        "spec": {"rego": "package tollgate\nimport rego.v1\ndeny contains x if {\n x := \n}\n"}}));
    eventually("Compiled=False", || {
        api.get(GV, "agentpolicies", "agents", "notes")
            .is_some_and(|p| {
                p["status"]["conditions"][0]["status"] == "False"
                    && p["status"]["conditions"][0]["message"]
                        .as_str()
                        .unwrap_or("")
                        .contains("agents/notes.rego")
            })
    });
    eventually("identity not Ready", || {
        api.get(GV, "agentidentities", "agents", "billing")
            .is_some_and(|i| i["status"]["conditions"][0]["status"] == "False")
    });
    assert_eq!(
        note(&sidecars[0], &up, "HELLO").0,
        403,
        "the last good policy still decides"
    );
}

#[test]
fn a_sidecar_cannot_read_another_agents_snapshot() {
    let api = TestApiServer::start();
    let up = Upstream::start();
    seed(&api, &up);
    let dir = tempfile::tempdir().unwrap();
    let op = Operator::start(&api, dir.path());
    let addr = format!("127.0.0.1:{}", op.port).parse().unwrap();
    let ask = |token: Option<&str>| {
        let mut h = vec![];
        let auth;
        if let Some(t) = token {
            auth = format!("Bearer {t}");
            h.push(("Authorization", auth.as_str()));
        }
        call(
            addr,
            "GET",
            "/v1/snapshot?agent=agents/billing&version=0&timeoutSeconds=1",
            &h,
            None,
        )
    };
    eventually("snapshot served to its own ServiceAccount", || {
        ask(Some("tok-billing")).status == 200
    });
    let r = ask(Some("tok-billing"));
    assert_eq!(r.json()["config"]["agent"]["name"], "billing");
    // Asks refused while the operator was still starting count too: judge the four below by
    // how much they add.
    let refused = |m: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix("tollgate_operator_snapshot_refused_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let before = refused(&get(addr, "/metrics").unwrap().body_text());
    for bad in [
        Some("tok-other"),
        Some("tok-wrong-aud"),
        Some("garbage"),
        None,
    ] {
        let r = ask(bad);
        assert_eq!(r.status, 403, "{bad:?}: {}", r.body_text());
        assert!(r.json()["config"].is_null());
    }
    let m = get(addr, "/metrics").unwrap().body_text();
    assert_eq!(refused(&m), before + 4, "each refusal counted once: {m}");
}

#[test]
fn an_operator_outage_fails_closed_after_max_staleness_and_recovers() {
    let api = TestApiServer::start();
    let up = Upstream::start();
    seed(&api, &up);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let op = Operator::start_as(&api, dir.path(), port, None);
    let s = {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "tok-billing").unwrap();
        let (pp, ap) = (free_port(), free_port());
        let local = format!("listen: {{proxy: \"127.0.0.1:{pp}\", admin: \"127.0.0.1:{ap}\"}}\nagent: {{name: local, tenants: []}}\naudit: {{path: audit.jsonl}}\n");
        let tf = dir.path().join("token").display().to_string();
        let url = format!("http://127.0.0.1:{port}");
        TestProxy::start_custom(
            dir,
            &local,
            format!("127.0.0.1:{pp}").parse().unwrap(),
            format!("127.0.0.1:{ap}").parse().unwrap(),
            &[],
            &[
                ("TOLLGATE_OPERATOR", url.as_str()),
                ("TOLLGATE_AGENT", "agents/billing"),
                ("TOLLGATE_TOKEN_FILE", tf.as_str()),
            ],
        )
    };
    assert_eq!(note(&s, &up, "hello").0, 200);
    drop(op);
    // Within maxStaleness (3s) the last good snapshot serves; after it, fail closed.
    eventually("fails closed once stale", || {
        let (code, body) = note(&s, &up, "hello");
        code == 503 && body.contains("config_stale")
    });
    assert!(
        s.metrics().contains("tollgate_config_stale 1")
            || s.metrics().contains("tollgate_config_age_seconds")
    );
    let _op = Operator::start_as(&api, dir.path(), port, None);
    eventually("recovers with the operator", || {
        note(&s, &up, "hello").0 == 200
    });
}

/// Issue 10: a held call becomes an ApprovalRequest that a named human decides with
/// `kubectl tollgate`; the grant reaches the sidecar through the snapshot and covers exactly
/// that call, once.
#[test]
fn held_calls_become_approval_requests_decided_with_kubectl() {
    let api = TestApiServer::start();
    let up = Upstream::start();
    seed(&api, &up);
    api.put("agentpolicies", json!({"apiVersion": GV, "kind": "AgentPolicy", "metadata": {"name": "notes", "namespace": "agents"},
        "spec": {"rego": "package tollgate\nimport rego.v1\nrequire_approval contains \"long notes need a human\" if count(input.request.body.text) > 10\n"}}));
    let dir = tempfile::tempdir().unwrap();
    let op = Operator::start(&api, dir.path());
    let s = sidecar(op.port, "tok-billing");
    let long = "this note is long enough";
    let (code, body) = note(&s, &up, long);
    assert_eq!(code, 403, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "approval_required");
    let id = v["approval"].as_str().unwrap().to_string();
    eventually("ApprovalRequest created in the agent's namespace", || {
        api.get(GV, "approvalrequests", "agents", &id).is_some()
    });
    let apr = api.get(GV, "approvalrequests", "agents", &id).unwrap();
    assert_eq!(apr["spec"]["agent"], "billing");
    assert_eq!(apr["spec"]["serviceAccount"], "billing-agent");
    assert!(apr["spec"]["summary"]
        .as_str()
        .unwrap()
        .contains("long notes need a human"));
    assert_eq!(apr["spec"]["key"].as_str().unwrap().len(), 64);
    let (ok, out) = kubectl_tollgate(dir.path(), &["-n", "agents", "status"]);
    assert!(
        ok && out.contains("agents/billing") && out.contains("pending approvals: 1"),
        "{out}"
    );
    let (ok, out) = kubectl_tollgate(dir.path(), &["-n", "agents", "approvals"]);
    assert!(ok && out.contains(&id) && out.contains("Pending"), "{out}");
    let (ok, out) = kubectl_tollgate(
        dir.path(),
        &[
            "-n",
            "agents",
            "approve",
            &id,
            "--reason",
            "checked with the customer",
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(
        api.get(GV, "approvalrequests", "agents", &id).unwrap()["status"]["phase"],
        "Approved"
    );
    // Decisions are final.
    let (ok, out) = kubectl_tollgate(dir.path(), &["-n", "agents", "deny", &id]);
    assert!(!ok && out.contains("already Approved"), "{out}");
    // The identical retry is allowed once the grant reaches the sidecar, and only once.
    eventually("grant reaches the sidecar", || note(&s, &up, long).0 == 200);
    let (code, body) = note(&s, &up, long);
    assert_eq!(code, 403, "single use: {body}");
    // A different input is not covered.
    let (code, body) = note(&s, &up, "a different long note");
    assert_eq!(code, 403);
    assert!(body.contains("approval_required"), "{body}");
    // A client that sends Prefer: wait is held until a human decides, then let through.
    let before: Vec<String> = api
        .list(GV, "approvalrequests")
        .iter()
        .filter_map(|a| a["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    let (proxy, addr) = (s.proxy, up.addr);
    let held = std::thread::spawn(move || {
        call(
            proxy,
            "POST",
            &format!("http://{addr}/v1/notes"),
            &[
                ("X-Tollgate-Tenant", "acme"),
                ("Content-Type", "application/json"),
                ("Prefer", "wait=20"),
            ],
            Some(&json!({"text": "a note held for a human"}).to_string()),
        )
    });
    let mut held_id = String::new();
    eventually("the held call's ApprovalRequest", || {
        held_id = api
            .list(GV, "approvalrequests")
            .iter()
            .filter(|a| {
                a["spec"]["inputPreview"]
                    .to_string()
                    .contains("held for a human")
            })
            .filter_map(|a| a["metadata"]["name"].as_str().map(str::to_owned))
            .find(|n| !before.contains(n))
            .unwrap_or_default();
        !held_id.is_empty()
    });
    let (ok, out) = kubectl_tollgate(dir.path(), &["-n", "agents", "approve", &held_id]);
    assert!(ok, "{out}");
    let r = held.join().unwrap();
    assert_eq!(
        r.status,
        200,
        "the held call is released by the approval: {}\n{}",
        r.body_text(),
        s.log()
    );
    // An expired request cannot be approved.
    api.put("approvalrequests", json!({"apiVersion": GV, "kind": "ApprovalRequest", "metadata": {"name": "apr-old", "namespace": "agents"},
        "spec": {"key": "k", "agent": "billing", "tenant": "acme", "tool": "crm-note", "summary": "old", "expiresAt": "2020-01-01T00:00:00Z"}}));
    let (ok, out) = kubectl_tollgate(dir.path(), &["-n", "agents", "approve", "apr-old"]);
    assert!(!ok && out.contains("expired"), "{out}");
    // Kill switches from the plugin.
    let (ok, out) = kubectl_tollgate(
        dir.path(),
        &[
            "kill",
            "stop-notes",
            "--agent",
            "billing",
            "--reason",
            "INC-9",
        ],
    );
    assert!(ok, "{out}");
    eventually("killed", || note(&s, &up, "hi").0 == 503);
    let (ok, out) = kubectl_tollgate(dir.path(), &["unkill", "stop-notes"]);
    assert!(ok, "{out}");
    eventually("lifted", || note(&s, &up, "hi").0 == 200);
    let recs = s.audit();
    assert!(
        recs.iter()
            .any(|r| r["approval"]["id"] == id.as_str() && r["decision"] == "allow"),
        "the approval is in the record"
    );
}

/// `tollgate-operator run --webhook-listen` serves the admission webhooks with its own
/// certificate and writes that CA into the webhook configurations' `caBundle`.
#[test]
fn the_operator_serves_webhooks_and_keeps_the_ca_bundle_current() {
    let api = TestApiServer::start();
    let up = Upstream::start();
    seed(&api, &up);
    for (plural, kind) in [
        (
            "mutatingwebhookconfigurations",
            "MutatingWebhookConfiguration",
        ),
        (
            "validatingwebhookconfigurations",
            "ValidatingWebhookConfiguration",
        ),
    ] {
        api.put(plural, json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind, "metadata": {"name": "tollgate"},
            "webhooks": [{"name": "x.tollgate.dev", "clientConfig": {"service": {"name": "tollgate-operator", "namespace": "tollgate-system", "path": "/mutate"}}}]}));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inject.yaml"), "image: tollgate-proxy:test\noperatorUrl: http://tollgate-operator.tollgate-system.svc:8080\n").unwrap();
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, api.kubeconfig()).unwrap();
    let (port, wport) = (free_port(), free_port());
    let mut child = Command::new(bin("tollgate-operator"))
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--no-leader-elect",
            "--webhook-listen",
            &format!("127.0.0.1:{wport}"),
            "--inject-config",
        ])
        .arg(dir.path().join("inject.yaml"))
        .env("KUBECONFIG", &kc)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually("caBundle written", || {
        [
            "mutatingwebhookconfigurations",
            "validatingwebhookconfigurations",
        ]
        .iter()
        .all(|p| {
            api.get("admissionregistration.k8s.io/v1", p, "", "tollgate")
                .and_then(|o| {
                    o["webhooks"][0]["clientConfig"]["caBundle"]
                        .as_str()
                        .map(|b| b.len() > 100)
                })
                .unwrap_or(false)
        })
    });
    eventually("webhook port accepts TLS", || {
        std::net::TcpStream::connect(("127.0.0.1", wport)).is_ok()
    });
    // The serving certificate is kept in a Secret, so every replica presents the same one and
    // the caBundle matches it.
    let stored = api
        .get("v1", "secrets", "tollgate-system", "tollgate-webhook-tls")
        .expect("webhook TLS Secret");
    let bundle = api
        .get(
            "admissionregistration.k8s.io/v1",
            "mutatingwebhookconfigurations",
            "",
            "tollgate",
        )
        .unwrap();
    assert_eq!(
        stored["data"]["ca.crt"],
        bundle["webhooks"][0]["clientConfig"]["caBundle"]
    );
    let _ = child.kill();
    let _ = child.wait();
}

fn grants(p: &TestProxy) -> Vec<String> {
    get(p.admin, "/config")
        .ok()
        .and_then(|r| serde_json::from_str::<serde_json::Value>(&r.body_text()).ok())
        .and_then(|v| {
            v["approvalGrants"].as_array().map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Issue 18: a single-use approval is used exactly once across the cluster. Two sidecars of
/// one identity hold the grant and race the identical call: the operator arbitrates the use
/// with a conditional status write, so exactly one is forwarded; the use is recorded in the
/// `ApprovalRequest` status, the grant is withdrawn from every snapshot, and a restarted
/// sidecar (fresh memory) cannot use it again.
#[test]
fn single_use_approvals_are_used_once_across_sidecars_and_restarts() {
    let api = TestApiServer::start();
    let up = Upstream::start();
    seed(&api, &up);
    api.put("agentpolicies", json!({"apiVersion": GV, "kind": "AgentPolicy", "metadata": {"name": "notes", "namespace": "agents"},
        "spec": {"rego": "package tollgate\nimport rego.v1\nrequire_approval contains \"long notes need a human\" if count(input.request.body.text) > 10\n"}}));
    let dir = tempfile::tempdir().unwrap();
    let op = Operator::start(&api, dir.path());
    let a = sidecar(op.port, "tok-billing");
    let b = sidecar(op.port, "tok-billing");
    let refund = "refund order 1234 in full";
    let (code, body) = note(&a, &up, refund);
    assert_eq!(code, 403, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = v["approval"].as_str().unwrap().to_string();
    eventually("ApprovalRequest created", || {
        api.get(GV, "approvalrequests", "agents", &id).is_some()
    });
    let (ok, out) = kubectl_tollgate(dir.path(), &["-n", "agents", "approve", &id]);
    assert!(ok, "{out}");
    eventually("both sidecars hold the grant", || {
        grants(&a).contains(&id) && grants(&b).contains(&id)
    });
    let forwarded_before = up.count();
    let race: Vec<_> = [a.proxy, b.proxy]
        .into_iter()
        .map(|proxy| {
            let addr = up.addr;
            std::thread::spawn(move || {
                call(
                    proxy,
                    "POST",
                    &format!("http://{addr}/v1/notes"),
                    &[
                        ("X-Tollgate-Tenant", "acme"),
                        ("Content-Type", "application/json"),
                    ],
                    Some(&json!({"text": refund}).to_string()),
                )
            })
        })
        .collect();
    let codes: Vec<u16> = race.into_iter().map(|t| t.join().unwrap().status).collect();
    assert_eq!(
        codes.iter().filter(|c| **c == 200).count(),
        1,
        "exactly one of the racing sidecars goes through: {codes:?}\n{}\n{}",
        a.log(),
        b.log()
    );
    assert_eq!(
        up.count(),
        forwarded_before + 1,
        "the upstream saw one refund"
    );
    let status = api.get(GV, "approvalrequests", "agents", &id).unwrap()["status"].clone();
    assert_eq!(status["phase"], "Approved");
    assert!(
        status["consumedAt"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{status}"
    );
    assert!(
        status["consumedBy"]
            .as_str()
            .unwrap()
            .contains("agents/billing"),
        "{status}"
    );
    eventually("the grant is withdrawn from every snapshot", || {
        !grants(&a).contains(&id) && !grants(&b).contains(&id)
    });
    // Neither sidecar, nor a restarted one, can use it again.
    drop(a);
    let restarted = sidecar(op.port, "tok-billing");
    for s in [&restarted, &b] {
        let (code, body) = note(s, &up, refund);
        assert_eq!(code, 403, "{body}");
    }
    assert_eq!(up.count(), forwarded_before + 1, "still one refund");
}

fn identity_ready(api: &TestApiServer) -> (String, String, String) {
    let id = api.get(GV, "agentidentities", "agents", "billing").unwrap();
    let c = &id["status"]["conditions"][0];
    (
        c["status"].as_str().unwrap_or("").to_string(),
        c["reason"].as_str().unwrap_or("").to_string(),
        c["message"].as_str().unwrap_or("").to_string(),
    )
}

/// Issue 18: a running sidecar can always apply its snapshot, and one it cannot apply is not
/// fresh. A Tool with credentials added to a running identity works at once (the operator
/// delivers the Secret's value with the snapshot; the pod has no mount for it). A snapshot the
/// sidecar rejects (its Secret does not exist) is reported: the identity goes `Ready=False`
/// with the sidecar's reason, heartbeats no longer count, and past `maxStaleness` the sidecar
/// fails closed (503 `config_stale`) and is not ready; once the Secret exists it recovers.
#[test]
fn snapshots_reach_running_sidecars_and_a_rejected_one_is_not_fresh() {
    let api = TestApiServer::start();
    let up = Upstream::start();
    seed(&api, &up);
    let dir = tempfile::tempdir().unwrap();
    let op = Operator::start(&api, dir.path());
    let s = sidecar(op.port, "tok-billing");
    assert_eq!(note(&s, &up, "hello").0, 200);
    // A Tool with credentials, added while the sidecar runs.
    api.put("secrets", json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "crm-key", "namespace": "agents"},
        "stringData": {"token": "s3cret-value"}}));
    api.put("tools", json!({"apiVersion": GV, "kind": "Tool", "metadata": {"name": "crm-secret", "namespace": "agents"},
        "spec": {"match": {"host": up.addr.to_string(), "methods": ["POST"], "path": "/v1/secret"},
                 "credentials": {"secretName": "crm-key", "key": "token", "header": "Authorization", "prefix": "Bearer "}}}));
    api.put("agentidentities", json!({"apiVersion": GV, "kind": "AgentIdentity", "metadata": {"name": "billing", "namespace": "agents"},
        "spec": {"serviceAccount": "billing-agent", "tenants": ["acme"], "tools": ["crm-note", "crm-secret"], "policies": ["notes"], "maxStaleness": "3s"}}));
    let post = |path: &str| {
        call(
            s.proxy,
            "POST",
            &format!("http://{}{path}", up.addr),
            &[
                ("X-Tollgate-Tenant", "acme"),
                ("Content-Type", "application/json"),
            ],
            Some(r#"{"text": "hello"}"#),
        )
    };
    eventually("the new tool works in the running sidecar", || {
        post("/v1/secret").status == 200
    });
    let seen = up.seen();
    let last = seen.iter().rev().find(|r| r.path == "/v1/secret").unwrap();
    assert_eq!(last.header("authorization"), Some("Bearer s3cret-value"));
    assert!(
        !s.log().contains("s3cret-value"),
        "the secret is never logged"
    );
    // A Tool whose Secret does not exist: the sidecar cannot apply the snapshot.
    api.put("tools", json!({"apiVersion": GV, "kind": "Tool", "metadata": {"name": "crm-missing", "namespace": "agents"},
        "spec": {"match": {"host": up.addr.to_string(), "methods": ["POST"], "path": "/v1/missing"},
                 "credentials": {"secretName": "crm-missing-key", "key": "token", "header": "Authorization"}}}));
    api.put("agentidentities", json!({"apiVersion": GV, "kind": "AgentIdentity", "metadata": {"name": "billing", "namespace": "agents"},
        "spec": {"serviceAccount": "billing-agent", "tenants": ["acme"], "tools": ["crm-note", "crm-secret", "crm-missing"], "policies": ["notes"], "maxStaleness": "3s"}}));
    eventually("the identity reports the rejection", || {
        let (status, reason, message) = identity_ready(&api);
        status == "False" && reason == "SnapshotRejected" && message.contains("crm-missing-key")
    });
    eventually("past maxStaleness the sidecar fails closed", || {
        let (code, body) = note(&s, &up, "hello");
        code == 503 && body.contains("config_stale")
    });
    assert_eq!(
        get(s.admin, "/readyz").unwrap().status,
        503,
        "not ready while stale"
    );
    let metrics = get(s.admin, "/metrics").unwrap().body_text();
    assert!(metrics.contains("tollgate_config_stale 1"), "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tollgate_config_reload_errors_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    let op_metrics = get(
        format!("127.0.0.1:{}", op.port).parse().unwrap(),
        "/metrics",
    )
    .unwrap()
    .body_text();
    assert!(
        op_metrics.lines().any(
            |l| l.starts_with("tollgate_operator_snapshots_rejected_total ") && !l.ends_with(" 0")
        ),
        "{op_metrics}"
    );
    // The Secret appears: the sidecar retries, applies, and is fresh and ready again.
    api.put("secrets", json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "crm-missing-key", "namespace": "agents"},
        "stringData": {"token": "other"}}));
    eventually("recovered", || note(&s, &up, "hello").0 == 200);
    assert_eq!(get(s.admin, "/readyz").unwrap().status, 200);
    eventually("the identity is Ready again", || {
        identity_ready(&api).0 == "True"
    });
}

fn lease(api: &TestApiServer) -> serde_json::Value {
    api.get(
        "coordination.k8s.io/v1",
        "leases",
        "tollgate-system",
        "tollgate-operator",
    )
    .map(|l| l["spec"].clone())
    .unwrap_or_default()
}

/// Issue 18: leadership acts at once. Renewals keep `acquireTime`; a leader that is stopped
/// (SIGTERM, as in a rollout) releases the Lease, so the other replica takes over without
/// waiting out the 15 s lease, and the new leader reconciles what was created during the
/// failover without waiting for another watch event.
#[test]
fn a_new_leader_takes_over_at_once_and_reconciles_everything() {
    let api = TestApiServer::start();
    let up = Upstream::start();
    seed(&api, &up);
    let dir = tempfile::tempdir().unwrap();
    let mut a = Operator::start_as(&api, dir.path(), free_port(), Some("replica-a"));
    eventually("replica-a leads", || {
        lease(&api)["holderIdentity"] == "replica-a"
    });
    let first = lease(&api);
    eventually("the lease is renewed", || {
        lease(&api)["renewTime"] != first["renewTime"]
    });
    assert_eq!(
        lease(&api)["acquireTime"],
        first["acquireTime"],
        "renewals keep acquireTime"
    );
    let b = Operator::start_as(&api, dir.path(), free_port(), Some("replica-b"));
    eventually("the identity has status", || {
        api.get(GV, "agentidentities", "agents", "billing").unwrap()["status"]["conditions"][0]
            ["status"]
            == "True"
    });
    // Stop the leader the way Kubernetes does.
    let pid = a.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let exit = a.child.wait().unwrap();
    assert!(exit.success(), "a clean shutdown: {exit:?}");
    let released = lease(&api);
    assert_ne!(
        released["holderIdentity"], "replica-a",
        "released on shutdown: {released}"
    );
    // Created during the failover: only a leader that reconciles on gaining the Lease writes
    // its status (nothing else changes afterwards to trigger a watch event).
    api.put("agentidentities", json!({"apiVersion": GV, "kind": "AgentIdentity", "metadata": {"name": "late", "namespace": "newns"},
        "spec": {"serviceAccount": "late-agent", "tenants": ["acme"]}}));
    let taken = std::time::Instant::now();
    eventually("replica-b leads", || {
        lease(&api)["holderIdentity"] == "replica-b"
    });
    println!("takeover after shutdown: {:?}", taken.elapsed());
    assert_eq!(lease(&api)["leaseTransitions"], 1);
    eventually(
        "the new leader reconciled the identity created during the failover",
        || {
            api.get(GV, "agentidentities", "newns", "late").unwrap()["status"]["conditions"][0]
                ["status"]
                == "True"
                && api
                    .get("v1", "serviceaccounts", "newns", "late-agent")
                    .is_some()
        },
    );
    drop(b);
}

/// Issue 18, the admin's path: `kubectl tollgate kill --tool` keeps the tool's namespace, the
/// KillSwitch status counts only agents that have the tool, and a new ApprovalRequest shows
/// phase `Pending` (the PHASE column) before anyone decides it.
#[test]
fn kill_by_tool_is_namespaced_counted_right_and_pending_approvals_show_a_phase() {
    let api = TestApiServer::start();
    let up = Upstream::start();
    seed(&api, &up);
    api.put("agentpolicies", json!({"apiVersion": GV, "kind": "AgentPolicy", "metadata": {"name": "notes", "namespace": "agents"},
        "spec": {"rego": "package tollgate\nimport rego.v1\nrequire_approval contains \"long notes need a human\" if count(input.request.body.text) > 10\n"}}));
    let dir = tempfile::tempdir().unwrap();
    let op = Operator::start(&api, dir.path());
    let s = sidecar(op.port, "tok-billing");
    let (code, body) = note(&s, &up, "a note long enough to hold");
    assert_eq!(code, 403, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["approval"]
        .as_str()
        .unwrap()
        .to_string();
    eventually("the pending request shows its phase", || {
        api.get(GV, "approvalrequests", "agents", &id)
            .is_some_and(|a| a["status"]["phase"] == "Pending")
    });
    let (ok, out) = kubectl_tollgate(
        dir.path(),
        &[
            "-n",
            "agents",
            "kill",
            "stop-notes",
            "--tool",
            "crm-note",
            "--reason",
            "INC-7",
        ],
    );
    assert!(ok, "{out}");
    let ks = api.get(GV, "killswitches", "", "stop-notes").unwrap();
    assert_eq!(ks["spec"]["scope"]["namespace"], "agents", "{ks}");
    assert_eq!(ks["spec"]["scope"]["tool"], "crm-note");
    eventually("the sidecar is stopped for that tool", || {
        note(&s, &up, "hi").0 == 503
    });
    eventually("status counts the agent that has the tool", || {
        api.get(GV, "killswitches", "", "stop-notes").unwrap()["status"]["affectedAgents"] == 1
    });
    let (ok, out) = kubectl_tollgate(
        dir.path(),
        &[
            "-n",
            "agents",
            "kill",
            "stop-merges",
            "--tool",
            "github-merge",
            "--reason",
            "INC-8",
        ],
    );
    assert!(ok, "{out}");
    eventually("status counts no agent for a tool nobody has", || {
        let k = api.get(GV, "killswitches", "", "stop-merges").unwrap();
        k["status"]["affectedAgents"] == 0 && k["status"]["observedGeneration"] == 1
    });
}
