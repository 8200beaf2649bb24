//! Standalone approvals (issue 10): held calls become approval requests on the admin port,
//! decided by a named approver through `tollgate-proxy approvals`, bound to the exact call.

use std::process::Command;
use std::time::Duration;
use tollgate_tests::harness::{bin, call, eventually, raw, TestProxy, Upstream};

const TOKEN: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789ab";

fn config(up: &Upstream, ttl: &str) -> String {
    let a = up.addr;
    format!(
        r#"
agent: {{name: billing, tenants: [acme]}}
tools:
  - name: pay.refund
    match: {{host: "{a}", methods: [POST], path: /v1/refunds}}
policies:
  modules:
    - name: r.rego
      rego: |
        package tollgate
        import rego.v1
        require_approval contains sprintf("refund %v over 500", [input.request.body.amount]) if input.request.body.amount > 500
approvals:
  ttl: {ttl}
  singleUse: true
  maxWaitS: 20
  adminTokens:
    - {{approver: alice, valueFrom: {{env: ALICE_TOKEN}}}}
    - {{approver: bob, valueFrom: {{env: BOB_TOKEN}}}}
"#
    )
}

fn start(up: &Upstream, ttl: &str) -> TestProxy {
    TestProxy::start(
        &config(up, ttl),
        &[("ALICE_TOKEN", TOKEN), ("BOB_TOKEN", BOB)],
    )
}

fn cli(p: &TestProxy, token: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin("tollgate-proxy"))
        .arg("approvals")
        .args(args)
        .arg("--admin")
        .arg(format!("http://{}", p.admin))
        .env("TOLLGATE_ADMIN_TOKEN", token)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn refund(p: &TestProxy, up: &Upstream, amount: u32) -> tollgate_tests::harness::RawResponse {
    call(
        p.proxy,
        "POST",
        &format!("http://{}/v1/refunds", up.addr),
        &[
            ("X-Tollgate-Tenant", "acme"),
            ("Content-Type", "application/json"),
        ],
        Some(&format!(r#"{{"charge":"c","amount":{amount}}}"#)),
    )
}

#[test]
fn approve_then_identical_retry_once_and_nothing_else() {
    let up = Upstream::start();
    let p = start(&up, "15m");
    let held = refund(&p, &up, 1200);
    assert_eq!(held.status, 403);
    let id = held.json()["approval"].as_str().unwrap().to_string();
    // A retry before the decision is the same request, not a new one.
    assert_eq!(
        refund(&p, &up, 1200).json()["approval"].as_str().unwrap(),
        id
    );
    let (code, out) = cli(&p, TOKEN, &["list"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&id) && out.contains("pending") && out.contains("refund 1200 over 500"),
        "{out}"
    );
    let (code, out) = cli(&p, TOKEN, &["approve", &id, "--reason", "verified"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("approved by alice"), "{out}");
    // Decisions are final.
    let (code, out) = cli(&p, BOB, &["deny", &id]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("already decided"), "{out}");
    assert_eq!(refund(&p, &up, 1200).status, 200);
    assert_eq!(up.count(), 1);
    let replay = refund(&p, &up, 1200);
    assert_eq!(replay.json()["error"], "approval_rejected", "single use");
    let other = refund(&p, &up, 1300);
    assert_eq!(
        other.json()["error"],
        "approval_required",
        "a different amount is a different call"
    );
    assert_ne!(other.json()["approval"], id.as_str());
    assert_eq!(up.count(), 1);
    let rec = p
        .audit()
        .into_iter()
        .find(|r| r["decision"] == "allow")
        .unwrap();
    assert_eq!(rec["approval"]["id"], id.as_str());
    assert_eq!(
        rec["approval"]["approver"], "alice",
        "the approver comes from the token, not the client"
    );
    assert_eq!(rec["input"]["approval"]["approver"], "alice");
}

#[test]
fn denied_and_expired_requests_refuse_with_a_reason() {
    let up = Upstream::start();
    let p = start(&up, "1s");
    let id = refund(&p, &up, 900).json()["approval"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, out) = cli(&p, BOB, &["deny", &id, "--reason", "duplicate refund"]);
    assert_eq!(code, 0, "{out}");
    let r = refund(&p, &up, 900);
    assert_eq!(r.json()["error"], "approval_rejected");
    assert!(r.json()["reason"]
        .as_str()
        .unwrap()
        .contains("denied by bob: duplicate refund"));
    // Expiry: an undecided request can't be approved after its TTL.
    let id2 = refund(&p, &up, 950).json()["approval"]
        .as_str()
        .unwrap()
        .to_string();
    std::thread::sleep(Duration::from_millis(1500));
    let (code, out) = cli(&p, TOKEN, &["approve", &id2]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("expired"), "{out}");
    assert_eq!(up.count(), 0);
}

#[test]
fn the_admin_api_requires_a_known_token() {
    let up = Upstream::start();
    let p = start(&up, "15m");
    let (code, out) = cli(&p, "not-a-valid-token-at-all", &["list"]);
    assert_eq!(code, 1);
    assert!(out.contains("401"), "{out}");
    let r = raw(
        p.admin,
        format!(
            "GET /approvals HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            p.admin
        )
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 401);
}

#[test]
fn prefer_wait_holds_the_call_until_it_is_approved() {
    let up = Upstream::start();
    let p = start(&up, "15m");
    let id = refund(&p, &up, 2000).json()["approval"]
        .as_str()
        .unwrap()
        .to_string();
    let proxy = p.proxy;
    let url = format!("http://{}/v1/refunds", up.addr);
    let waiter = std::thread::spawn(move || {
        call(
            proxy,
            "POST",
            &url,
            &[
                ("X-Tollgate-Tenant", "acme"),
                ("Content-Type", "application/json"),
                ("Prefer", "wait=20"),
            ],
            Some(r#"{"charge":"c","amount":2000}"#),
        )
    });
    // Wait until the held request is visible as still pending, then approve it.
    eventually("request pending", || {
        cli(&p, TOKEN, &["list"]).1.contains("pending")
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(up.count(), 0);
    let (code, out) = cli(&p, TOKEN, &["approve", &id]);
    assert_eq!(code, 0, "{out}");
    let r = waiter.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(up.count(), 1);
}

/// Held calls cannot grow memory without bound: past `approvals.maxPending` a call needing a
/// new approval is refused (counted `over_cap`), and expired requests are evicted (counted
/// `expired`) when the next one opens, making room again.
#[test]
fn pending_requests_are_capped_and_expired_ones_evicted() {
    let up = Upstream::start();
    let p = TestProxy::start(
        &format!("{}  maxPending: 3\n", config(&up, "2s")),
        &[("ALICE_TOKEN", TOKEN), ("BOB_TOKEN", BOB)],
    );
    let url = format!("http://{}/v1/refunds", up.addr);
    let refund = |amount: u32| {
        let body = format!(r#"{{"charge":"c","amount":{amount}}}"#);
        call(
            p.proxy,
            "POST",
            &url,
            &[
                ("X-Tollgate-Tenant", "acme"),
                ("Content-Type", "application/json"),
            ],
            Some(&body),
        )
    };
    let evicted = |reason: &str| -> f64 {
        let needle = format!("tollgate_approvals_evicted_total{{reason=\"{reason}\"}}");
        p.metrics()
            .lines()
            .find(|l| l.starts_with(&needle))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    for amount in [501, 502, 503] {
        assert_eq!(refund(amount).json()["error"], "approval_required");
    }
    let over = refund(504);
    assert_eq!(over.status, 403);
    assert_eq!(
        over.json()["error"],
        "approval_rejected",
        "{}",
        over.body_text()
    );
    assert!(
        over.body_text().contains("maxPending"),
        "{}",
        over.body_text()
    );
    assert_eq!(evicted("over_cap"), 1.0);
    // A call whose request is already pending is not a new one: still answered.
    assert_eq!(refund(501).json()["error"], "approval_required");
    assert_eq!(up.count(), 0);
    // Once the three expire, the next request evicts them and opens.
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(refund(505).json()["error"], "approval_required");
    assert_eq!(evicted("expired"), 3.0);
    let (code, listed) = cli(&p, TOKEN, &["list"]);
    assert_eq!(code, 0, "{listed}");
    assert_eq!(
        listed.matches("apr-").count(),
        1,
        "only the new request is held: {listed}"
    );
}
