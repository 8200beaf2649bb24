//! Rate limits and budgets end to end (issue 5), with the same matrix on the local backend and
//! on a real redis-server: concurrency cannot beat a cap, a failed upstream releases its
//! reservation, two sidecars share one cap through Redis, a Redis outage is handled as
//! configured and recovered from, and over-budget calls escalate when the agent says so.

use std::sync::Arc;
use tollgate_tests::harness::{call, eventually, Behaviour, RedisServer, TestProxy, Upstream};

const ENV: &[(&str, &str)] = &[("ALICE_TOKEN", "tok-alice-0123456789")];

fn config(up: &Upstream, limits: &str, extra_agent: &str, tenants: &str) -> String {
    let a = up.addr;
    format!(
        r#"
agent: {{name: billing, tenants: [acme, globex]{extra_agent}}}
tools:
  - name: pay.charge
    match: {{host: "{a}", methods: [POST], path: /v1/charges}}
    cost: {{perCallUsd: 1.0}}
  - name: pay.refund
    match: {{host: "{a}", methods: [POST], path: /v1/refunds}}
    cost: {{perUnitUsd: 0.01, unitField: amount}}
  - name: crm.lookup
    match: {{host: "{a}", methods: [GET], path: /v1/customers}}
tenants:
{tenants}
limits: {limits}
audit: {{path: audit.jsonl}}
approvals:
  adminTokens: [{{approver: alice, valueFrom: {{env: ALICE_TOKEN}}}}]
"#
    )
}

fn post(
    p: &TestProxy,
    up: &Upstream,
    path: &str,
    tenant: &str,
    body: &str,
) -> tollgate_tests::harness::RawResponse {
    call(
        p.proxy,
        "POST",
        &format!("http://{}{path}", up.addr),
        &[
            ("X-Tollgate-Tenant", tenant),
            ("Content-Type", "application/json"),
        ],
        Some(body),
    )
}

/// Fire `n` charges at once; return how many were allowed.
fn burst(p: &TestProxy, up: &Upstream, n: usize) -> (usize, Vec<String>) {
    let proxy = p.proxy;
    let addr = up.addr;
    let results: Vec<_> = (0..n)
        .map(|_| {
            std::thread::spawn(move || {
                let r = call(
                    proxy,
                    "POST",
                    &format!("http://{addr}/v1/charges"),
                    &[
                        ("X-Tollgate-Tenant", "acme"),
                        ("Content-Type", "application/json"),
                    ],
                    Some("{}"),
                );
                (r.status, r.body_text())
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    let other: Vec<String> = results
        .into_iter()
        .filter(|(s, _)| *s != 200)
        .map(|(s, b)| format!("{s} {b}"))
        .collect();
    (ok, other)
}

fn concurrent_calls_never_beat_the_cap(limits: &str) {
    let up = Upstream::start();
    let p = TestProxy::start(
        &config(&up, limits, "", "  acme: {budgets: {dayUsd: 10}}"),
        ENV,
    );
    let (ok, refused) = burst(&p, &up, 200);
    assert_eq!(
        ok, 10,
        "exactly the cap's worth is forwarded; refused: {refused:?}"
    );
    assert_eq!(up.count(), 10, "the upstream saw exactly the cap's worth");
    assert!(
        refused
            .iter()
            .all(|r| r.starts_with("402") && r.contains("over_budget")),
        "{refused:?}"
    );
    let sample = refused[0].split_once(' ').unwrap().1;
    let v: serde_json::Value = serde_json::from_str(sample).unwrap();
    assert_eq!(v["budget"]["cap_usd"], 10.0);
    assert_eq!(v["budget"]["scope"], "tenant_day");
    assert!(
        v["budget"]["spent_usd"].as_f64().unwrap() + v["budget"]["reserved_usd"].as_f64().unwrap()
            <= 10.0
    );
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("tenant acme per day"),
        "{v}"
    );
    // Another tenant has no cap.
    assert_eq!(post(&p, &up, "/v1/charges", "globex", "{}").status, 200);
    // Spend is in the records and the metrics.
    eventually("records", || {
        p.audit()
            .iter()
            .filter(|r| r["phase"] == "outcome" && r["cost"]["usd"] == 1.0)
            .count()
            == 11
    });
    let m = p.metrics();
    assert!(
        m.contains("tollgate_spend_usd_total{agent=\"billing\",tenant=\"acme\"} 10"),
        "{m}"
    );
    assert!(
        m.contains("tollgate_budget_remaining_usd{scope=\"tenant_day\",tenant=\"acme\"} 0"),
        "{m}"
    );
}

#[test]
fn local_budget_holds_under_concurrency() {
    concurrent_calls_never_beat_the_cap("{backend: local}");
}

#[test]
fn redis_budget_holds_under_concurrency() {
    let redis = RedisServer::start();
    concurrent_calls_never_beat_the_cap(&format!("{{backend: redis, url: \"{}\"}}", redis.url()));
}

#[test]
fn two_sidecars_share_one_cap_through_redis() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let cfg = config(
        &up,
        &format!("{{backend: redis, url: \"{}\"}}", redis.url()),
        "",
        "  acme: {budgets: {monthUsd: 12}}",
    );
    let a = Arc::new(TestProxy::start(&cfg, ENV));
    let b = Arc::new(TestProxy::start(&cfg, ENV));
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let p = if i % 2 == 0 { a.clone() } else { b.clone() };
            let addr = up.addr;
            std::thread::spawn(move || {
                call(
                    p.proxy,
                    "POST",
                    &format!("http://{addr}/v1/charges"),
                    &[
                        ("X-Tollgate-Tenant", "acme"),
                        ("Content-Type", "application/json"),
                    ],
                    Some("{}"),
                )
                .status
            })
        })
        .collect();
    let ok = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|s| *s == 200)
        .count();
    assert_eq!(ok, 12);
    assert_eq!(up.count(), 12);
}

fn rate_limits_refuse_with_retry_after(limits: &str) {
    let up = Upstream::start();
    let tenants = "  acme:\n    rateLimits:\n      - {scope: tenant, perMinute: 3}\n      - {scope: tool, tool: crm.lookup, perHour: 100, burst: 2}";
    let p = TestProxy::start(&config(&up, limits, "", tenants), ENV);
    let get = |tenant: &str| {
        call(
            p.proxy,
            "GET",
            &format!("http://{}/v1/customers", up.addr),
            &[("X-Tollgate-Tenant", tenant)],
            None,
        )
    };
    assert_eq!(get("acme").status, 200);
    assert_eq!(get("acme").status, 200);
    // The per-tool burst of 2 is spent first.
    let r = get("acme");
    assert_eq!(r.status, 429, "{}", r.body_text());
    assert!(
        r.body_text().contains("tool crm.lookup in tenant acme"),
        "{}",
        r.body_text()
    );
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1);
    // The tenant limit (3/minute) counts every call of the tenant, including the one the
    // tool limit refused (limits are taken in order: tenant, agent, tool).
    let r = post(&p, &up, "/v1/charges", "acme", "{}");
    assert_eq!(r.status, 429);
    assert!(
        r.body_text().contains("tenant acme: 3/minute"),
        "{}",
        r.body_text()
    );
    assert_eq!(r.json()["error"], "rate_limited");
    // Other tenants are not limited by acme's limits.
    assert_eq!(get("globex").status, 200);
    assert_eq!(up.count(), 3);
    eventually("rate-limited records", || {
        p.audit()
            .iter()
            .filter(|r| r["decision"] == "rate_limited")
            .count()
            == 2
    });
    assert!(p.metrics().contains("tollgate_rate_limited_total{"));
}

#[test]
fn local_rate_limits() {
    rate_limits_refuse_with_retry_after("{backend: local}");
}

#[test]
fn redis_rate_limits() {
    let redis = RedisServer::start();
    rate_limits_refuse_with_retry_after(&format!("{{backend: redis, url: \"{}\"}}", redis.url()));
}

#[test]
fn a_failed_upstream_releases_its_reservation_and_exposure_has_its_own_cap() {
    let up = Upstream::start();
    let tenants = "  acme: {budgets: {dayUsd: 1}, exposure: {dayUsd: 50}}";
    let p = TestProxy::start(&config(&up, "{backend: local}", "", tenants), ENV);
    up.set(Behaviour::Reset);
    assert_eq!(post(&p, &up, "/v1/charges", "acme", "{}").status, 502);
    up.set(Behaviour::Echo);
    // The failed call's dollar was released, so this one fits.
    assert_eq!(post(&p, &up, "/v1/charges", "acme", "{}").status, 200);
    assert_eq!(post(&p, &up, "/v1/charges", "acme", "{}").status, 402);
    // Exposure: refunds of 3000 cents at $0.01/unit = $30 each against a $50 exposure cap,
    // independent of the spend cap.
    let r = post(&p, &up, "/v1/refunds", "acme", r#"{"amount":3000}"#);
    assert_eq!(r.status, 200, "{}", r.body_text());
    let r = post(&p, &up, "/v1/refunds", "acme", r#"{"amount":3000}"#);
    assert_eq!(r.status, 402);
    assert!(r.body_text().contains("exposure"), "{}", r.body_text());
    let r = post(&p, &up, "/v1/refunds", "acme", r#"{"amount":2000}"#);
    assert_eq!(r.status, 200, "{}", r.body_text());
}

#[test]
fn redis_outage_denies_or_falls_back_as_configured_and_recovers() {
    let mut redis = RedisServer::start();
    let up = Upstream::start();
    let tenants = "  acme: {budgets: {dayUsd: 100}}";
    let deny = TestProxy::start(
        &config(
            &up,
            &format!("{{backend: redis, url: \"{}\"}}", redis.url()),
            "",
            tenants,
        ),
        ENV,
    );
    let local = TestProxy::start(
        &config(
            &up,
            &format!(
                "{{backend: redis, url: \"{}\", onUnavailable: local}}",
                redis.url()
            ),
            "",
            tenants,
        ),
        ENV,
    );
    assert_eq!(post(&deny, &up, "/v1/charges", "acme", "{}").status, 200);
    redis.kill();
    let r = post(&deny, &up, "/v1/charges", "acme", "{}");
    assert_eq!(r.status, 503, "{}", r.body_text());
    assert_eq!(r.json()["error"], "limits_unavailable");
    assert!(deny.metrics().contains("tollgate_redis_unavailable 1"));
    // The fail-open path is explicit and counted.
    assert_eq!(post(&local, &up, "/v1/charges", "acme", "{}").status, 200);
    assert!(local
        .metrics()
        .contains("tollgate_fail_open_total{reason=\"limits_redis\"}"));
    redis.restart();
    eventually("recovers after redis restarts", || {
        post(&deny, &up, "/v1/charges", "acme", "{}").status == 200
    });
    assert!(deny.metrics().contains("tollgate_redis_unavailable 0"));
}

#[test]
fn over_budget_calls_escalate_to_an_approval_when_configured() {
    let up = Upstream::start();
    let p = TestProxy::start(
        &config(
            &up,
            "{backend: local}",
            ", overBudget: escalate, budget: {perRunUsd: 1}",
            "  acme: {}",
        ),
        ENV,
    );
    let run_id = p.new_run();
    let run = |body: &str| {
        call(
            p.proxy,
            "POST",
            &format!("http://{}/v1/charges", up.addr),
            &[
                ("X-Tollgate-Tenant", "acme"),
                ("Content-Type", "application/json"),
                ("X-Tollgate-Run", &run_id),
            ],
            Some(body),
        )
    };
    assert_eq!(run("{}").status, 200);
    let r = run(r#"{"n":2}"#);
    assert_eq!(r.status, 403, "{}", r.body_text());
    assert_eq!(r.json()["error"], "approval_required");
    assert!(
        r.body_text().contains(&format!("run {run_id}")),
        "{}",
        r.body_text()
    );
    let id = r.json()["approval"].as_str().unwrap().to_string();
    let out = std::process::Command::new(tollgate_tests::harness::bin("tollgate-proxy"))
        .args([
            "approvals",
            "approve",
            &id,
            "--admin",
            &format!("http://{}", p.admin),
            "--token",
            "tok-alice-0123456789",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        run(r#"{"n":2}"#).status,
        200,
        "the approved over-budget call goes through"
    );
    assert_eq!(up.count(), 2);
}

fn idempotency_dedupes_retries(limits: &str) {
    let up = Upstream::start();
    let p = TestProxy::start(&config(&up, limits, "", "  acme: {}"), ENV);
    let send = |key: &str, body: &str| {
        call(
            p.proxy,
            "POST",
            &format!("http://{}/v1/charges", up.addr),
            &[
                ("X-Tollgate-Tenant", "acme"),
                ("Content-Type", "application/json"),
                ("Idempotency-Key", key),
            ],
            Some(body),
        )
    };
    // Concurrent identical retries: one forward, every caller gets the same answer.
    let (proxy, addr) = (p.proxy, up.addr);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                call(
                    proxy,
                    "POST",
                    &format!("http://{addr}/v1/charges"),
                    &[
                        ("X-Tollgate-Tenant", "acme"),
                        ("Content-Type", "application/json"),
                        ("Idempotency-Key", "k-1"),
                    ],
                    Some(r#"{"amount":5}"#),
                )
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        results.iter().all(|r| r.status == 200),
        "{:?}",
        results.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(up.count(), 1, "forwarded exactly once");
    let replays = results
        .iter()
        .filter(|r| r.header("x-tollgate-idempotent-replay") == Some("true"))
        .count();
    assert_eq!(replays, 7);
    assert!(results
        .iter()
        .all(|r| r.body_text() == results[0].body_text()));
    // Later retry: replayed, not forwarded.
    let r = send("k-1", r#"{"amount":5}"#);
    assert_eq!(r.header("x-tollgate-idempotent-replay"), Some("true"));
    assert_eq!(up.count(), 1);
    // Same key, different body: 422.
    let r = send("k-1", r#"{"amount":6}"#);
    assert_eq!(r.status, 422, "{}", r.body_text());
    assert_eq!(r.json()["error"], "idempotency_conflict");
    // A failed attempt releases the key: the retry is forwarded.
    up.set(Behaviour::Reset);
    assert_eq!(send("k-2", "{}").status, 502);
    up.set(Behaviour::Echo);
    let r = send("k-2", "{}");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-tollgate-idempotent-replay"), None);
    // k-1 once, the reset attempt of k-2 (the recorder sees it before resetting), its retry.
    assert_eq!(up.count(), 3);
    eventually("replays are recorded", || {
        p.audit()
            .iter()
            .any(|r| r["reasons"].to_string().contains("idempotent replay"))
    });
}

#[test]
fn local_idempotency() {
    idempotency_dedupes_retries("{backend: local}");
}

#[test]
fn redis_idempotency_across_two_sidecars() {
    let redis = RedisServer::start();
    let limits = format!("{{backend: redis, url: \"{}\"}}", redis.url());
    idempotency_dedupes_retries(&limits);
    // Two sidecars sharing Redis never forward the same key twice.
    let up = Upstream::start();
    let a = TestProxy::start(&config(&up, &limits, "", "  acme: {}"), ENV);
    let b = TestProxy::start(&config(&up, &limits, "", "  acme: {}"), ENV);
    for p in [&a, &b, &a] {
        let r = call(
            p.proxy,
            "POST",
            &format!("http://{}/v1/charges", up.addr),
            &[
                ("X-Tollgate-Tenant", "acme"),
                ("Content-Type", "application/json"),
                ("Idempotency-Key", "shared"),
            ],
            Some("{}"),
        );
        assert_eq!(r.status, 200);
    }
    assert_eq!(up.count(), 1);
}

#[test]
fn irreversible_tools_can_require_an_idempotency_key() {
    let up = Upstream::start();
    let cfg = config(&up, "{backend: local, requireIdempotencyKeyForIrreversible: true}", "", "  acme: {}").replace(
        "    cost: {perUnitUsd: 0.01, unitField: amount}",
        "    cost: {perUnitUsd: 0.01, unitField: amount}\n    risk: {reversible: false, financial: true}",
    );
    let p = TestProxy::start(&cfg, ENV);
    let r = post(&p, &up, "/v1/refunds", "acme", r#"{"amount":1}"#);
    assert_eq!(r.status, 400, "{}", r.body_text());
    assert_eq!(r.json()["error"], "idempotency_key_required");
    assert_eq!(up.count(), 0);
    // Reversible tools are not affected.
    assert_eq!(post(&p, &up, "/v1/charges", "acme", "{}").status, 200);
}

fn rate_limits_hold_over_time_windows(limits: &str) {
    // 5 per second with a burst of 1: however fast the calls come, no more than
    // 1 + 5 x (elapsed seconds, rounded up) are let through, and calls keep getting through as
    // the window refills. (An upper bound on what passed, never a timing threshold.)
    let up = Upstream::start();
    let tenants = "  acme:\n    rateLimits:\n      - {scope: tenant, perSecond: 5, burst: 1}";
    let p = TestProxy::start(&config(&up, limits, "", tenants), ENV);
    let t0 = std::time::Instant::now();
    let mut allowed = 0u64;
    let mut limited = 0u64;
    while t0.elapsed() < std::time::Duration::from_millis(2500) {
        match call(
            p.proxy,
            "GET",
            &format!("http://{}/v1/customers", up.addr),
            &[("X-Tollgate-Tenant", "acme")],
            None,
        )
        .status
        {
            200 => allowed += 1,
            429 => limited += 1,
            s => panic!("unexpected {s}"),
        }
    }
    let bound = 1 + 5 * t0.elapsed().as_secs_f64().ceil() as u64;
    assert!(allowed <= bound, "{allowed} allowed > bound {bound}");
    assert!(allowed >= 2, "the window refills: {allowed}");
    assert!(limited > 0);
    assert_eq!(up.count() as u64, allowed);
}

#[test]
fn local_rate_limits_hold_over_time() {
    rate_limits_hold_over_time_windows("{backend: local}");
}

#[test]
fn redis_rate_limits_hold_over_time() {
    let redis = RedisServer::start();
    rate_limits_hold_over_time_windows(&format!("{{backend: redis, url: \"{}\"}}", redis.url()));
}

#[test]
fn unsettled_redis_reservations_expire() {
    // A sidecar that dies mid-call never settles: its hold must not block the cap forever.
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = tollgate_proxy::config::LimitsConfig {
            backend: tollgate_proxy::config::LimitsBackend::Redis,
            url: Some(redis.url()),
            ..Default::default()
        };
        let store = tollgate_proxy::limits::redis_store::RedisStore::new(&cfg).unwrap();
        let cap = tollgate_proxy::limits::Cap {
            name: "tenant acme per day".into(),
            scope: "tenant_day",
            key: "tenant:acme:test".into(),
            cap: 10,
            kind: tollgate_proxy::limits::CapKind::Spend,
            ttl: std::time::Duration::from_secs(60),
        };
        let hold = std::time::Duration::from_millis(200);
        assert!(store
            .reserve("crashed", std::slice::from_ref(&cap), &[10], hold)
            .await
            .unwrap()
            .is_ok());
        let e = store
            .reserve("next", std::slice::from_ref(&cap), &[1], hold)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.usage.reserved, 10);
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        assert!(
            store
                .reserve("next", std::slice::from_ref(&cap), &[1], hold)
                .await
                .unwrap()
                .is_ok(),
            "the crashed sidecar's hold expired"
        );
    });
}
