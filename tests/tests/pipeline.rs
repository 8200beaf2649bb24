//! The request path as an attacker tests it (issue 15): each budget bug reproduced against the
//! real binary and a real loopback upstream, judged by what the upstream executed and what
//! was charged; and every exit of the pipeline counted once and recorded once.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::time::Duration;
use tollgate_tests::harness::{call, eventually, Behaviour, TestProxy, Upstream};

const T: (&str, &str) = ("X-Tollgate-Tenant", "acme");
const JSON: (&str, &str) = ("Content-Type", "application/json");

fn metric(p: &TestProxy, name: &str) -> f64 {
    p.metrics()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn rpc(p: &TestProxy, up: &Upstream, body: &Value) -> (u16, Value) {
    let r = call(
        p.proxy,
        "POST",
        &format!("http://{}/mcp", up.addr),
        &[T, JSON, ("Accept", "application/json, text/event-stream")],
        Some(&body.to_string()),
    );
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

fn tool_call(id: u64, name: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": name, "arguments": {}}})
}

/// `[expensive, free]` used to reserve and record only its last (free) element, so it passed
/// a cap that allows one expensive call as often as the agent liked.
#[test]
fn a_batch_reserves_and_records_every_element() {
    let up = Upstream::start();
    let a = up.addr;
    let p = TestProxy::start(
        &format!(
            r#"
agent: {{name: billing, tenants: [acme]}}
tools:
  - name: gpu.render
    match: {{host: "{a}", path: /mcp, mcpTool: render}}
    cost: {{perCallUsd: 1.0}}
  - name: gpu.status
    match: {{host: "{a}", path: /mcp, mcpTool: status}}
tenants:
  acme: {{budgets: {{dayUsd: 1.5}}}}
audit: {{path: audit.jsonl}}
"#
        ),
        &[],
    );
    let batch = json!([tool_call(1, "render"), tool_call(2, "status")]);
    let (status, _) = rpc(&p, &up, &batch);
    assert_eq!(status, 200);
    for _ in 0..3 {
        let (_, v) = rpc(&p, &up, &batch);
        let errs = v
            .as_array()
            .expect("a refused batch gets one error per element");
        assert!(
            errs.iter()
                .all(|e| e["error"]["data"]["error"] == "over_budget"),
            "{v}"
        );
    }
    assert_eq!(
        up.count(),
        1,
        "the upstream executed the cap's worth and no more"
    );
    eventually("spend settled", || {
        metric(&p, "tollgate_spend_usd_total") == 1.0
    });
    // A batch over the cap as a whole is refused whole, even when each element fits alone.
    let up2 = Upstream::start();
    let b = up2.addr;
    let p2 = TestProxy::start(
        &format!(
            r#"
agent: {{name: billing, tenants: [acme]}}
tools:
  - name: gpu.render
    match: {{host: "{b}", path: /mcp, mcpTool: render}}
    cost: {{perCallUsd: 1.0}}
tenants:
  acme: {{budgets: {{dayUsd: 1.5}}}}
audit: {{path: audit.jsonl}}
"#
        ),
        &[],
    );
    let (_, v) = rpc(
        &p2,
        &up2,
        &json!([tool_call(1, "render"), tool_call(2, "render")]),
    );
    assert!(
        v.as_array()
            .is_some_and(|a| a.len() == 2 && a.iter().all(|e| e["error"].is_object())),
        "{v}"
    );
    assert_eq!(up2.count(), 0);
    // Every element of the forwarded batch has its own decision and outcome record.
    eventually("records", || {
        p.audit().iter().filter(|r| r["status"] == 200).count() >= 2
    });
    let recs = p.audit();
    let first_call = recs[0]["call"].clone();
    let tools: Vec<_> = recs
        .iter()
        .filter(|r| r["call"] == first_call)
        .map(|r| {
            (
                r["phase"].as_str().unwrap().to_string(),
                r["tool"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for want in [
        ("decision", "gpu.render"),
        ("decision", "gpu.status"),
        ("outcome", "gpu.render"),
        ("outcome", "gpu.status"),
    ] {
        assert!(tools.contains(&(want.0.into(), want.1.into())), "{tools:?}");
    }
}

/// Send a call and hang up before the upstream answers.
fn cut(proxy: std::net::SocketAddr, up: std::net::SocketAddr, after: Duration) {
    let mut s = std::net::TcpStream::connect(proxy).unwrap();
    let body = "{}";
    write!(
        s,
        "POST http://{a}/v1/render HTTP/1.1\r\nHost: {a}\r\nX-Tollgate-Tenant: acme\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len(),
        a = up
    )
    .unwrap();
    s.set_read_timeout(Some(after)).unwrap();
    let mut buf = [0u8; 64];
    let _ = s.read(&mut buf);
}

/// A client that disconnects mid-call drops the pipeline future. Its reservation used to
/// expire uncharged, so calls cut short executed again and again against a cap of five.
#[test]
fn a_client_that_hangs_up_is_still_charged_for_what_the_upstream_executed() {
    let up = Upstream::start();
    up.set(Behaviour::Delay(1500));
    let a = up.addr;
    let p = TestProxy::start(
        &format!(
            r#"
agent: {{name: billing, tenants: [acme]}}
tools:
  - name: gpu.render
    match: {{host: "{a}", methods: [POST], path: /v1/render}}
    cost: {{perCallUsd: 1.0}}
    timeouts: {{total: 5s}}
tenants:
  acme: {{budgets: {{dayUsd: 5}}}}
limits: {{reservationTtl: 1s}}
audit: {{path: audit.jsonl}}
"#
        ),
        &[],
    );
    for _round in 0..3 {
        let threads: Vec<_> = (0..5)
            .map(|_| {
                let (proxy, upa) = (p.proxy, up.addr);
                std::thread::spawn(move || cut(proxy, upa, Duration::from_millis(600)))
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Past the reservation TTL: an uncharged reservation would have expired by now.
        std::thread::sleep(Duration::from_millis(2500));
    }
    assert_eq!(
        up.count(),
        5,
        "the upstream executed the cap's worth and no more"
    );
    eventually("charged", || {
        metric(
            &p,
            "tollgate_guards_dropped_total{guard=\"budget_charged\"}",
        ) == 5.0
    });
    // Every cut call has its decision record and a client_gone outcome.
    eventually("client_gone records", || {
        p.audit()
            .iter()
            .filter(|r| {
                r["status"] == 499
                    && r["reasons"][0]
                        .as_str()
                        .is_some_and(|s| s.contains("disconnected"))
            })
            .count()
            == 5
    });
    let r = call(
        p.proxy,
        "POST",
        &format!("http://{a}/v1/render"),
        &[T, JSON],
        Some("{}"),
    );
    assert_eq!(r.status, 402, "{}", r.body_text());
}

/// One call asking for `n: 25` choices used to reserve one choice's worth and spend 5x a day
/// cap.
#[test]
fn an_llm_call_reserves_every_choice_it_asks_for() {
    let up = Upstream::start();
    let a = up.addr;
    let p = TestProxy::start(
        &format!(
            r#"
agent: {{name: writer, tenants: [acme]}}
tools:
  - name: llm.chat
    match: {{host: "{a}", methods: [POST], path: /v1/chat/completions}}
    cost: {{llm: {{prices: {{gpt-4o: {{promptPerMtok: 2.5, completionPerMtok: 10.0}}}}}}}}
tenants:
  acme: {{budgets: {{dayUsd: 1.0}}}}
audit: {{path: audit.jsonl}}
"#
        ),
        &[],
    );
    let send = |n: u64| {
        call(
            p.proxy,
            "POST",
            &format!("http://{a}/v1/chat/completions"),
            &[T, JSON],
            Some(
                &json!({"model": "gpt-4o", "max_tokens": 20000, "n": n, "messages": []})
                    .to_string(),
            ),
        )
    };
    // 20,000 tokens at $10/Mtok is $0.20 a choice: 25 choices are $5, over the $1 cap.
    let r = send(25);
    assert_eq!(r.status, 402, "{}", r.body_text());
    assert_eq!(up.count(), 0, "nothing over the cap was executed");
    assert_eq!(send(2).status, 200);
    assert_eq!(up.count(), 1);
}

/// `input.run.calls` and `input.run.spent_usd` are real, so run policies fire; a run id the
/// sidecar did not mint is refused, so an agent cannot start itself a fresh run budget.
#[test]
fn run_facts_are_real_and_runs_cannot_be_forged() {
    let up = Upstream::start();
    let a = up.addr;
    let p = TestProxy::start(
        &format!(
            r#"
agent: {{name: billing, tenants: [acme], budget: {{perRunUsd: 10}}}}
tools:
  - name: pay.charge
    match: {{host: "{a}", methods: [POST], path: /v1/charges}}
    cost: {{perCallUsd: 1.0}}
policies:
  modules:
    - name: runs.rego
      rego: |
        package tollgate
        import rego.v1
        deny contains sprintf("run has made %v calls and spent %v", [input.run.calls, input.run.spent_usd]) if {{
          input.run.calls >= 2
        }}
audit: {{path: audit.jsonl}}
"#
        ),
        &[],
    );
    let run = p.new_run();
    let charge = |run: &str| {
        call(
            p.proxy,
            "POST",
            &format!("http://{a}/v1/charges"),
            &[T, JSON, ("X-Tollgate-Run", run)],
            Some("{}"),
        )
    };
    assert_eq!(charge(&run).status, 200);
    assert_eq!(charge(&run).status, 200);
    let r = charge(&run);
    assert_eq!(r.status, 403, "{}", r.body_text());
    assert!(
        r.body_text().contains("made 2 calls and spent 2"),
        "{}",
        r.body_text()
    );
    for forged in [
        "run_fresh",
        &format!("{run}0"),
        &run.replacen("run_", "run_f", 1),
    ] {
        let r = charge(forged);
        assert_eq!(r.status, 400, "{forged}: {}", r.body_text());
    }
    assert_eq!(up.count(), 2);
}

/// Every exit of the pipeline — each refusal class, a replay, a failed upstream, an answer —
/// counts the call once in `tollgate_requests_total` and records it once: one decision record
/// for a refusal or replay, a decision and an outcome record for a forwarded call.
#[test]
fn every_exit_counts_once_and_records_once() {
    let up = Upstream::start();
    let a = up.addr;
    let p = TestProxy::start(
        &format!(
            r#"
agent: {{name: billing, tenants: [acme]}}
tools:
  - name: pay.charge
    match: {{host: "{a}", methods: [POST], path: /v1/charges}}
    inputSchema: {{type: object, properties: {{amount: {{type: integer}}}}}}
    cost: {{perCallUsd: 1.0}}
  - name: pay.lookup
    match: {{host: "{a}", methods: [GET], path: /v1/customers}}
  - name: pay.killed
    match: {{host: "{a}", methods: [POST], path: /v1/killed}}
  - name: dead.call
    match: {{host: "127.0.0.1:9", methods: [GET], path: /x}}
    timeouts: {{connect: 200ms}}
tenants:
  acme:
    budgets: {{dayUsd: 3}}
    rateLimits: [{{scope: tool, tool: pay.lookup, perMinute: 1}}]
killSwitches:
  - {{name: stop, scope: {{tool: pay.killed}}, engaged: true, reason: INC-9}}
policies:
  modules:
    - name: p.rego
      rego: |
        package tollgate
        import rego.v1
        deny contains "amount too large" if {{ input.request.body.amount > 100 }}
audit: {{path: audit.jsonl}}
"#
        ),
        &[],
    );
    let post = |path: &str, body: &str, extra: &[(&str, &str)]| {
        let mut h = vec![T, JSON];
        h.extend_from_slice(extra);
        call(
            p.proxy,
            "POST",
            &format!("http://{a}{path}"),
            &h,
            Some(body),
        )
        .status
    };
    let get = |url: &str, h: &[(&str, &str)]| call(p.proxy, "GET", url, h, None).status;
    let mut exits = vec![
        ("answered", post("/v1/charges", r#"{"amount":1}"#, &[]), 2),
        (
            "invalid input",
            post("/v1/charges", r#"{"amount":"x"}"#, &[]),
            1,
        ),
        (
            "policy deny",
            post("/v1/charges", r#"{"amount":500}"#, &[]),
            1,
        ),
        ("kill switch", post("/v1/killed", "{}", &[]), 1),
        ("unknown tool", post("/v1/nothing", "{}", &[]), 1),
        (
            "idempotent first",
            post(
                "/v1/charges",
                r#"{"amount":2}"#,
                &[("Idempotency-Key", "k1")],
            ),
            2,
        ),
        (
            "idempotent replay",
            post(
                "/v1/charges",
                r#"{"amount":2}"#,
                &[("Idempotency-Key", "k1")],
            ),
            1,
        ),
        ("rate ok", get(&format!("http://{a}/v1/customers"), &[T]), 2),
        (
            "rate limited",
            get(&format!("http://{a}/v1/customers"), &[T]),
            1,
        ),
        ("upstream failed", get("http://127.0.0.1:9/x", &[T]), 2),
        (
            "no tenant",
            get(&format!("http://{a}/v1/customers"), &[]),
            1,
        ),
    ];
    exits.push((
        "third charge",
        post("/v1/charges", r#"{"amount":3}"#, &[]),
        2,
    ));
    exits.push((
        "over budget",
        post("/v1/charges", r#"{"amount":4}"#, &[]),
        1,
    ));
    let statuses: Vec<_> = exits.iter().map(|(n, s, _)| (*n, *s)).collect();
    assert_eq!(
        statuses,
        vec![
            ("answered", 200),
            ("invalid input", 400),
            ("policy deny", 403),
            ("kill switch", 503),
            ("unknown tool", 403),
            ("idempotent first", 200),
            ("idempotent replay", 200),
            ("rate ok", 200),
            ("rate limited", 429),
            ("upstream failed", 502),
            ("no tenant", 403),
            ("third charge", 200),
            ("over budget", 402),
        ]
    );
    let want_records: usize = exits.iter().map(|(_, _, n)| n).sum();
    eventually("every record", || p.audit().len() == want_records);
    let recs = p.audit();
    let mut per_call = std::collections::BTreeMap::<String, Vec<String>>::new();
    for r in &recs {
        per_call
            .entry(r["call"].as_str().unwrap().to_string())
            .or_default()
            .push(r["phase"].as_str().unwrap().to_string());
    }
    assert_eq!(per_call.len(), exits.len(), "one call id per request");
    for phases in per_call.values() {
        assert!(
            phases == &["decision"] || phases == &["decision", "outcome"],
            "{phases:?}"
        );
    }
    assert_eq!(
        metric(&p, "tollgate_requests_total"),
        exits.len() as f64,
        "each call counted exactly once"
    );
    eventually("charged", || metric(&p, "tollgate_spend_usd_total") == 3.0);
}
