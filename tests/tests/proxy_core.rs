//! End-to-end tests of the proxy core (issue 2): the real `tollgate-proxy` binary against real
//! upstream servers on loopback (HTTP, and HTTPS with a test CA).

use serde_json::Value;
use std::time::Duration;
use tollgate_tests::harness::{
    call, eventually, get, raw, Behaviour, TestPki, TestProxy, Upstream,
};

const POLICY: &str = r#"
policies:
  modules:
    - name: refunds.rego
      rego: |
        package tollgate
        import rego.v1
        require_approval contains sprintf("refund amount %v exceeds auto-approve threshold %v", [input.request.body.amount, data.tollgate_config.max]) if {
          input.tool.name == "pay.refund"
          input.request.body.amount > data.tollgate_config.max
        }
        deny contains "refunds to charge ch_blocked are forbidden" if {
          input.tool.name == "pay.refund"
          input.request.body.charge == "ch_blocked"
        }
  data: {max: 500}
"#;

fn config(up: &Upstream, mode: &str, extra: &str) -> String {
    let a = up.addr;
    format!(
        r#"
agent: {{name: billing, namespace: test, tenants: [acme, globex], mode: {mode}}}
upstreams: {{pay: "http://{a}/base"}}
tools:
  - name: pay.get_charge
    match: {{host: "{a}", methods: [GET], path: "/v1/charges/{{id}}"}}
  - name: pay.refund
    match: {{host: "{a}", methods: [POST], path: /v1/refunds}}
    inputSchema: {{type: object, required: [charge, amount], properties: {{amount: {{type: integer}}, charge: {{type: string}}}}}}
    credentials: {{header: Authorization, prefix: "Bearer ", valueFrom: {{env: PAY_KEY}}}}
    timeouts: {{connect: 1s, total: 2s}}
  - name: pay.base_get
    match: {{host: "{a}", methods: [GET], path: "/base/v1/items/{{id}}"}}
  - name: support.macro
    match: {{host: "{a}", methods: [POST], path: "/macros/{{id}}"}}
{POLICY}
killSwitches:
  - {{name: stop-macros, scope: {{tool: support.macro}}, engaged: true, reason: INC-1}}
{extra}
"#
    )
}

const T: (&str, &str) = ("X-Tollgate-Tenant", "acme");
const JSON: (&str, &str) = ("Content-Type", "application/json");

fn start(up: &Upstream, mode: &str, extra: &str) -> TestProxy {
    TestProxy::start(
        &config(up, mode, extra),
        &[("PAY_KEY", "sk_live_real_secret")],
    )
}

#[test]
fn allowed_call_is_forwarded_with_credentials_injected_and_tollgate_headers_stripped() {
    let up = Upstream::start();
    let p = start(&up, "enforce", "");
    let url = format!("http://{}/v1/refunds", up.addr);
    let run = p.new_run();
    let r = call(
        p.proxy,
        "POST",
        &url,
        &[
            T,
            JSON,
            ("X-Tollgate-Run", &run),
            ("Authorization", "Bearer agent-guess"),
            ("Connection", "close, X-Hop"),
            ("X-Hop", "1"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ],
        Some(r#"{"charge":"ch_1","amount":100}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.header("x-tollgate-run"), Some(run.as_str()));
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.path, "/v1/refunds");
    assert_eq!(s.body.as_ref(), br#"{"charge":"ch_1","amount":100}"#);
    assert_eq!(
        s.header("authorization"),
        Some("Bearer sk_live_real_secret"),
        "credential injected, agent value removed"
    );
    assert_eq!(
        s.headers
            .iter()
            .filter(|(k, _)| k == "authorization")
            .count(),
        1
    );
    assert!(s.header("x-tollgate-tenant").is_none() && s.header("x-tollgate-run").is_none());
    assert!(
        s.header("x-hop").is_none(),
        "headers named in Connection are hop-by-hop"
    );
    let tp = s.header("traceparent").unwrap();
    assert!(
        tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "{tp}"
    );
    // The decision record precedes the outcome record, and nothing leaks the secret.
    eventually("outcome record", || p.audit().len() >= 2);
    let audit = p.audit();
    assert_eq!(audit[0]["phase"], "decision");
    assert_eq!(audit[0]["decision"], "allow");
    assert_eq!(audit[1]["phase"], "outcome");
    assert_eq!(audit[1]["status"], 200);
    let text = std::fs::read_to_string(p.dir.path().join("audit.jsonl")).unwrap();
    assert!(!text.contains("sk_live_real_secret") && !text.contains("agent-guess"));
}

#[test]
fn missing_run_id_is_generated_and_echoed() {
    let up = Upstream::start();
    let p = start(&up, "enforce", "");
    let r = call(
        p.proxy,
        "GET",
        &format!("http://{}/v1/charges/ch_1", up.addr),
        &[T],
        None,
    );
    assert_eq!(r.status, 200);
    let run = r.header("x-tollgate-run").unwrap();
    assert!(run.starts_with("run_") && run.len() > 8, "{run}");
}

#[test]
fn every_refusal_class_answers_with_the_documented_status_and_json() {
    let up = Upstream::start();
    let p = start(&up, "enforce", "server: {maxBodyBytes: 2048}");
    let a = up.addr;
    let refund = format!("http://{a}/v1/refunds");
    let big = format!(
        r#"{{"charge":"ch_1","amount":1,"pad":"{}"}}"#,
        "x".repeat(4096)
    );
    type Case<'a> = (
        &'a str,
        u16,
        &'a str,
        Vec<(&'a str, &'a str)>,
        String,
        Option<String>,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "missing tenant",
            403,
            "tenant_not_allowed",
            vec![JSON],
            refund.clone(),
            Some(r#"{"charge":"c","amount":1}"#.into()),
        ),
        (
            "foreign tenant",
            403,
            "tenant_not_allowed",
            vec![("X-Tollgate-Tenant", "initech"), JSON],
            refund.clone(),
            Some(r#"{"charge":"c","amount":1}"#.into()),
        ),
        (
            "unknown tool",
            403,
            "unknown_tool",
            vec![T, JSON],
            format!("http://{a}/v1/payouts"),
            Some("{}".into()),
        ),
        (
            "wrong method",
            403,
            "unknown_tool",
            vec![T],
            refund.clone(),
            None,
        ),
        (
            "invalid input",
            400,
            "invalid_input",
            vec![T, JSON],
            refund.clone(),
            Some(r#"{"charge":"c","amount":"100"}"#.into()),
        ),
        (
            "unparsable body",
            400,
            "unparsable_body",
            vec![T, JSON],
            refund.clone(),
            Some("{not json".into()),
        ),
        (
            "duplicate keys",
            400,
            "unparsable_body",
            vec![T, JSON],
            refund.clone(),
            Some(r#"{"charge":"c","amount":1,"amount":900}"#.into()),
        ),
        (
            "too large",
            413,
            "payload_too_large",
            vec![T, JSON],
            refund.clone(),
            Some(big),
        ),
        (
            "policy deny",
            403,
            "policy_denied",
            vec![T, JSON],
            refund.clone(),
            Some(r#"{"charge":"ch_blocked","amount":1}"#.into()),
        ),
        (
            "approval",
            403,
            "approval_required",
            vec![T, JSON],
            refund.clone(),
            Some(r#"{"charge":"c","amount":1200}"#.into()),
        ),
        (
            "kill switch",
            503,
            "killed",
            vec![T, JSON],
            format!("http://{a}/macros/1"),
            Some("{}".into()),
        ),
    ];
    for (name, status, code, headers, url, body) in cases {
        let method = if name == "wrong method" {
            "DELETE"
        } else {
            "POST"
        };
        let r = call(p.proxy, method, &url, &headers, body.as_deref());
        assert_eq!(r.status, status, "{name}: {}", r.body_text());
        let j = r.json();
        assert_eq!(j["error"], code, "{name}: {j}");
        assert!(
            j["reason"].as_str().is_some_and(|s| !s.is_empty()),
            "{name}: {j}"
        );
        assert!(j["hint"].is_string(), "{name}");
        assert!(
            j["run"].as_str().is_some_and(|s| s.starts_with("run_")),
            "{name}"
        );
        if code == "approval_required" {
            assert!(j["approval"].as_str().unwrap().starts_with("apr-"));
            assert_eq!(j["retry_after_s"], 30);
            assert!(j["reason"]
                .as_str()
                .unwrap()
                .contains("1200 exceeds auto-approve threshold 500"));
        }
        if code == "invalid_input" {
            assert!(
                j["schema_errors"][0].as_str().unwrap().contains("/amount"),
                "{j}"
            );
        }
    }
    assert_eq!(up.count(), 0, "no refused call reached the upstream");
    eventually("a record per refusal", || p.audit().len() == 11);
    let decisions: Vec<String> = p
        .audit()
        .iter()
        .map(|r| r["decision"].as_str().unwrap().to_string())
        .collect();
    assert!(
        decisions.contains(&"killed".to_string())
            && decisions.contains(&"approval_required".to_string())
    );
    let m = p.metrics();
    assert!(m.contains(r#"tollgate_requests_total{agent="billing",decision="killed",tenant="acme",tool="support.macro"} 1"#), "{m}");
    // A tenant that is not the agent's collapses to "other" in metrics.
    assert!(m.contains(r#"tenant="other""#));
    assert!(!m.contains("initech"));
}

#[test]
fn approval_ids_are_bound_to_the_exact_input() {
    let up = Upstream::start();
    let p = start(&up, "enforce", "");
    let url = format!("http://{}/v1/refunds", up.addr);
    let a1 = call(
        p.proxy,
        "POST",
        &url,
        &[T, JSON],
        Some(r#"{"charge":"c","amount":1200}"#),
    )
    .json();
    let a2 = call(
        p.proxy,
        "POST",
        &url,
        &[T, JSON],
        Some(r#"{"amount":1200,"charge":"c"}"#),
    )
    .json();
    let a3 = call(
        p.proxy,
        "POST",
        &url,
        &[T, JSON],
        Some(r#"{"charge":"c","amount":1300}"#),
    )
    .json();
    let b1 = call(
        p.proxy,
        "POST",
        &url,
        &[("X-Tollgate-Tenant", "globex"), JSON],
        Some(r#"{"charge":"c","amount":1200}"#),
    )
    .json();
    assert_eq!(
        a1["approval"], a2["approval"],
        "key order does not change the call"
    );
    assert_ne!(
        a1["approval"], a3["approval"],
        "a different amount is a different call"
    );
    assert_ne!(
        a1["approval"], b1["approval"],
        "a different tenant is a different call"
    );
}

#[test]
fn granted_approval_allows_the_identical_call_once() {
    let up = Upstream::start();
    let p = start(&up, "enforce", "");
    let url = format!("http://{}/v1/refunds", up.addr);
    let body = r#"{"charge":"c","amount":1200}"#;
    let first = call(p.proxy, "POST", &url, &[T, JSON], Some(body)).json();
    let id = first["approval"].as_str().unwrap().to_string();
    let key = p.audit().last().unwrap()["input_hash"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!key.is_empty());
    // The same body under another query is another call: another approval.
    let with_query = call(
        p.proxy,
        "POST",
        &format!("{url}?note=x"),
        &[T, JSON],
        Some(body),
    );
    let other_id = with_query.json()["approval"].as_str().unwrap().to_string();
    assert_ne!(other_id, id, "the approval binds the query too");
    // Compute the approval key the same way the proxy does, from the canonical call: method,
    // path, decoded query, body and the tool's meaning-carrying headers, keys sorted.
    let canonical = br#"{"body":{"amount":1200,"charge":"c"},"headers":{},"method":"POST","path":"/v1/refunds","query":{}}"#;
    let mut h = sha2::Sha256::default();
    use sha2::Digest;
    for part in ["billing", "acme", "pay.refund"] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.update(canonical);
    let approval_key = hex::encode(h.finalize());
    assert_eq!(format!("apr-{}", &approval_key[..12]), id);
    let grant = format!("approvals: {{granted: [{{id: {id}, key: {approval_key}, decision: approved, approver: alice, decidedAt: \"2026-01-01T00:00:00Z\", expiresAt: \"2999-01-01T00:00:00Z\"}}]}}");
    p.rewrite_config(&config(&up, "enforce", &grant));
    eventually("grant loaded", || {
        call(p.proxy, "POST", &url, &[T, JSON], Some(body)).status == 200
    });
    assert_eq!(up.count(), 1);
    let again = call(p.proxy, "POST", &url, &[T, JSON], Some(body));
    assert_eq!(again.status, 403, "single use");
    assert_eq!(again.json()["error"], "approval_rejected");
    let other = call(
        p.proxy,
        "POST",
        &url,
        &[T, JSON],
        Some(r#"{"charge":"c","amount":1201}"#),
    );
    assert_eq!(
        other.json()["error"],
        "approval_required",
        "a different amount is not covered"
    );
    let rec = p
        .audit()
        .into_iter()
        .find(|r| r["decision"] == "allow" && r["tool"] == "pay.refund")
        .unwrap();
    assert_eq!(rec["approval"]["approver"], "alice");
}

#[test]
fn base_url_mode_forwards_under_the_upstream_prefix() {
    let up = Upstream::start();
    let p = start(&up, "enforce", "");
    let r = raw(p.proxy, format!("GET /u/pay/v1/items/7?x=1 HTTP/1.1\r\nHost: {}\r\nX-Tollgate-Tenant: acme\r\nConnection: close\r\n\r\n", p.proxy).as_bytes()).unwrap();
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(up.seen()[0].path, "/base/v1/items/7?x=1");
    let r = raw(p.proxy, format!("GET /u/nope/v1 HTTP/1.1\r\nHost: {}\r\nX-Tollgate-Tenant: acme\r\nConnection: close\r\n\r\n", p.proxy).as_bytes()).unwrap();
    assert_eq!(r.status, 403);
    assert!(
        r.json()["reason"].as_str().unwrap().contains("pay"),
        "names the configured upstreams"
    );
    let r = raw(p.proxy, format!("GET /u/pay/base/../../v1/items/7 HTTP/1.1\r\nHost: {}\r\nX-Tollgate-Tenant: acme\r\nConnection: close\r\n\r\n", p.proxy).as_bytes()).unwrap();
    assert_eq!(r.status, 400, "cannot climb out of the upstream prefix");
}

#[test]
fn shadow_mode_records_but_forwards() {
    let up = Upstream::start();
    let p = start(&up, "shadow", "");
    let r = call(
        p.proxy,
        "POST",
        &format!("http://{}/v1/refunds", up.addr),
        &[T, JSON],
        Some(r#"{"charge":"ch_blocked","amount":1}"#),
    );
    assert_eq!(r.status, 200);
    let r = call(
        p.proxy,
        "POST",
        &format!("http://{}/macros/1", up.addr),
        &[T, JSON],
        Some("{}"),
    );
    assert_eq!(r.status, 200, "kill switch is only recorded in shadow mode");
    assert_eq!(up.count(), 2);
    let rec = p
        .audit()
        .into_iter()
        .find(|r| r["phase"] == "decision")
        .unwrap();
    assert_eq!(rec["decision"], "shadow_deny");
    assert!(rec["reasons"][0].as_str().unwrap().contains("ch_blocked"));
    // Identity still holds in shadow mode.
    let r = call(
        p.proxy,
        "POST",
        &format!("http://{}/v1/refunds", up.addr),
        &[("X-Tollgate-Tenant", "initech"), JSON],
        Some(r#"{"charge":"c","amount":1}"#),
    );
    assert_eq!(r.status, 403);
}

#[test]
fn dry_run_never_forwards_mutating_calls() {
    let up = Upstream::start();
    let p = start(&up, "dry-run", "");
    let r = call(
        p.proxy,
        "POST",
        &format!("http://{}/v1/refunds", up.addr),
        &[T, JSON],
        Some(r#"{"charge":"c","amount":5}"#),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-tollgate-dry-run"), Some("true"));
    let j = r.json();
    assert_eq!(j["dry_run"], true);
    assert_eq!(
        j["would_send"]["url"],
        format!("http://{}/v1/refunds", up.addr)
    );
    assert_eq!(j["would_send"]["headers"]["authorization"], "[redacted]");
    assert_eq!(up.count(), 0);
    let r = call(
        p.proxy,
        "GET",
        &format!("http://{}/v1/charges/ch_1", up.addr),
        &[T],
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(up.count(), 1, "reads are forwarded in dry-run");
    // Refusals are still enforced in dry-run.
    let r = call(
        p.proxy,
        "POST",
        &format!("http://{}/v1/refunds", up.addr),
        &[T, JSON],
        Some(r#"{"charge":"ch_blocked","amount":5}"#),
    );
    assert_eq!(r.status, 403);
}

#[test]
fn upstream_failures_map_to_502_and_504_with_records() {
    let up = Upstream::start();
    let p = start(&up, "enforce", "");
    let url = format!("http://{}/v1/refunds", up.addr);
    up.set(Behaviour::Hang);
    let r = call(
        p.proxy,
        "POST",
        &url,
        &[T, JSON],
        Some(r#"{"charge":"c","amount":1}"#),
    );
    assert_eq!(r.status, 504, "{}", r.body_text());
    assert_eq!(r.json()["error"], "upstream_timeout");
    up.set(Behaviour::Reset);
    let r = call(
        p.proxy,
        "POST",
        &url,
        &[T, JSON],
        Some(r#"{"charge":"c","amount":2}"#),
    );
    assert_eq!(r.status, 502, "{}", r.body_text());
    assert_eq!(r.json()["error"], "upstream_failed");
    // Nothing listening at all.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    drop(std::net::TcpListener::bind(dead));
    let cfg = config(&up, "enforce", "").replace(&up.addr.to_string(), &dead.to_string());
    let p2 = TestProxy::start(&cfg, &[("PAY_KEY", "k")]);
    let r = call(
        p2.proxy,
        "GET",
        &format!("http://{dead}/v1/charges/x"),
        &[T],
        None,
    );
    assert_eq!(r.status, 502, "{}", r.body_text());
    eventually("error outcome records", || {
        p.audit()
            .iter()
            .filter(|r| r["phase"] == "outcome" && r["decision"] == "error")
            .count()
            == 2
    });
}

#[test]
fn https_upstreams_are_verified_against_the_extra_ca() {
    let pki = TestPki::new();
    let up = Upstream::start_tls(&pki);
    let port = up.addr.port();
    let tools = format!(
        "agent: {{name: a, tenants: [acme]}}\ntools:\n  - name: secure.get\n    match: {{host: \"localhost:{port}\", methods: [GET], path: /things}}\n"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    let p = TestProxy::start_in(dir, &format!("{tools}tls: {{extraCaFile: ca.pem}}\n"), &[]);
    // The agent speaks plain HTTP to the proxy; the proxy originates TLS.
    let mut cfg_https = tools.clone();
    cfg_https.push_str("tls: {extraCaFile: ca.pem}\n");
    let r = call(
        p.proxy,
        "GET",
        &format!("http://localhost:{port}/things"),
        &[T],
        None,
    );
    // Scheme is part of the target: an http:// URL goes to the upstream over plain HTTP, which
    // this TLS-only upstream refuses.
    assert_eq!(r.status, 502);
    // Base-URL mode maps to an https upstream.
    let p2dir = tempfile::tempdir().unwrap();
    std::fs::write(p2dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    let p2 = TestProxy::start_in(p2dir, &format!("{tools}upstreams: {{sec: \"https://localhost:{port}\"}}\ntls: {{extraCaFile: ca.pem}}\n"), &[]);
    let r = raw(p2.proxy, b"GET /u/sec/things HTTP/1.1\r\nHost: x\r\nX-Tollgate-Tenant: acme\r\nConnection: close\r\n\r\n").unwrap();
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(up.count(), 1);
    // Without the CA, verification fails closed.
    let p3 = TestProxy::start(
        &format!("{tools}upstreams: {{sec: \"https://localhost:{port}\"}}\n"),
        &[],
    );
    let r = raw(p3.proxy, b"GET /u/sec/things HTTP/1.1\r\nHost: x\r\nX-Tollgate-Tenant: acme\r\nConnection: close\r\n\r\n").unwrap();
    assert_eq!(r.status, 502, "{}", r.body_text());
    assert_eq!(up.count(), 1);
    drop(p);
}

#[test]
fn hot_reload_applies_good_edits_and_keeps_the_old_config_on_bad_ones() {
    let up = Upstream::start();
    let p = start(&up, "enforce", "");
    let url = format!("http://{}/macros/1", up.addr);
    assert_eq!(
        call(p.proxy, "POST", &url, &[T, JSON], Some("{}")).status,
        503
    );
    // Lift the kill switch.
    p.rewrite_config(&config(&up, "enforce", "").replace("engaged: true", "engaged: false"));
    eventually("kill switch lifted", || {
        call(p.proxy, "POST", &url, &[T, JSON], Some("{}")).status == 200
    });
    let v1 = get(p.admin, "/config").unwrap().json()["version"]
        .as_u64()
        .unwrap();
    // A bad edit: invalid YAML field, then bad Rego. Both rejected; old config stays.
    p.rewrite_config("agent: {name: x, tenants: [acme]}\ntools: [{name: t, match: {hots: h}}]\n");
    eventually("reload error counted", || {
        p.metrics()
            .contains("tollgate_config_reload_errors_total 1")
    });
    p.rewrite_config(&config(&up, "enforce", "").replace(
        "import rego.v1",
        "import rego.v1\n        deny contains x if {",
    ));
    eventually("second reload error counted", || {
        p.metrics()
            .contains("tollgate_config_reload_errors_total 2")
    });
    assert_eq!(
        get(p.admin, "/config").unwrap().json()["version"]
            .as_u64()
            .unwrap(),
        v1
    );
    assert_eq!(
        call(p.proxy, "POST", &url, &[T, JSON], Some("{}")).status,
        200
    );
    assert!(p.log().contains("config reload rejected"), "{}", p.log());
}

#[test]
fn admin_endpoints_report_health_config_and_metrics_without_secrets() {
    let up = Upstream::start();
    let p = start(&up, "enforce", "");
    assert_eq!(get(p.admin, "/healthz").unwrap().status, 200);
    assert_eq!(get(p.admin, "/readyz").unwrap().status, 200);
    let c = get(p.admin, "/config").unwrap();
    let j: Value = c.json();
    assert_eq!(j["version"], 1);
    assert_eq!(j["hash"].as_str().unwrap().len(), 64);
    assert!(!c.body_text().contains("sk_live_real_secret"));
    call(
        p.proxy,
        "GET",
        &format!("http://{}/v1/charges/ch_1", up.addr),
        &[T],
        None,
    );
    let m = p.metrics();
    for name in [
        "tollgate_requests_total",
        "tollgate_request_duration_seconds_bucket",
        "tollgate_policy_evaluation_seconds_bucket",
        "tollgate_config_version 1",
        "tollgate_kill_switch_engaged{name=\"stop-macros\"} 1",
        "tollgate_audit_records_total",
    ] {
        assert!(m.contains(name), "missing {name} in {m}");
    }
}

#[test]
fn check_command_exits_0_for_good_and_64_for_bad_configs_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bin = tollgate_tests::harness::bin("tollgate-proxy");
    let run = |text: &str| {
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(&bin)
            .arg("check")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let good = "agent: {name: a, tenants: [t]}\ntools: [{name: x, match: {host: api.example.com, path: /v1}}]\n";
    assert_eq!(run(good).0, 0);
    let (code, out) =
        run("agent: {name: a, tenants: [t]}\ntools: [{name: x, match: {hots: api.example.com}}]\n");
    assert_eq!(code, 64);
    assert!(
        out.contains("tools[0].match") && out.contains("hots"),
        "{out}"
    );
    let (code, out) = run("agent: {name: a, tenants: [t]}\ntools: [{name: x, match: {host: api.example.com, path: \"/v1/{\"}}]\n");
    assert_eq!(code, 64);
    assert!(out.contains("tools[0].match.path"), "{out}");
    let (code, out) = run(&format!("{good}policies:\n  modules:\n    - name: bad.rego\n      rego: \"package tollgate\\nimport rego.v1\\n\\ndeny contains x if {{\\n  x := \\n}}\\n\"\n"));
    assert_eq!(code, 64);
    assert!(
        out.contains("bad.rego:"),
        "names the Rego file and line: {out}"
    );
    let (code, out) = run("agent: {name: a, tenants: [t]}\ntools: [{name: x, match: {host: h}, credentials: {header: Authorization, valueFrom: {env: TOLLGATE_SURELY_UNSET}}}]\n");
    assert_eq!(code, 64);
    assert!(out.contains("TOLLGATE_SURELY_UNSET"), "{out}");
    let out = std::process::Command::new(&bin)
        .arg("check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "usage error");
}

#[test]
fn slow_clients_are_cut_off_and_malformed_requests_refused() {
    let up = Upstream::start();
    let p = start(
        &up,
        "enforce",
        "server: {headerReadTimeout: 1s, maxHeaders: 30}",
    );
    // Slowloris: headers never finish; the proxy closes the connection.
    let mut s = std::net::TcpStream::connect(p.proxy).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"GET http://x/ HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = Vec::new();
    let n = s.read_to_end(&mut buf);
    assert!(
        n.is_ok(),
        "connection closed by the proxy rather than hanging"
    );
    // Too many headers.
    let mut req = format!(
        "GET http://{}/v1/charges/c HTTP/1.1\r\nHost: {}\r\nX-Tollgate-Tenant: acme\r\n",
        up.addr, up.addr
    );
    for i in 0..200 {
        req.push_str(&format!("X-Pad-{i}: v\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    let r = raw(p.proxy, req.as_bytes()).unwrap();
    assert!(
        r.status == 431 || r.status == 400 || r.status == 0,
        "{}",
        r.status
    );
    // Garbage.
    let r = raw(p.proxy, b"\x16\x03\x01garbage\r\n\r\n").unwrap();
    assert!(r.status == 400 || r.status == 0);
    assert_eq!(up.count(), 0);
}
