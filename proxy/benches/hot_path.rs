//! Criterion micro-benchmarks of the per-call hot path: policy evaluation of the shipped
//! library (the RVM the proxy uses versus the regorus `Engine`), policy-input building and
//! redaction, tool matching as the catalog grows (10 → 10,000 tools), audit record
//! serialisation and hashing, and a GCRA check.
//! `make bench` runs them; results and the Engine/RVM finding are in docs/performance.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;
use tollgate_proxy::config::parse_str;
use tollgate_proxy::policy_input::{self, BudgetFacts, CallFacts};
use tollgate_proxy::snapshot::Snapshot;
use tollgate_proxy::target::{Scheme, Target, Via};

fn policies_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../policies")
        .canonicalize()
        .unwrap()
        .display()
        .to_string()
}

fn snapshot(tools: usize) -> Snapshot {
    let mut cfg = format!(
        "agent: {{name: billing, tenants: [acme]}}\npolicies: {{paths: [\"{}\"]}}\ntools:\n  - name: stripe.create_refund\n    match: {{host: api.stripe.com, methods: [POST], path: /v1/refunds}}\n    risk: {{financial: true, reversible: false}}\n",
        policies_dir()
    );
    for i in 0..tools {
        cfg.push_str(&format!(
            "  - name: tool{i}\n    match: {{host: api{i}.example.com, methods: [POST], path: \"/v1/r{i}/{{id}}\"}}\n"
        ));
    }
    Snapshot::build(parse_str(&cfg).unwrap(), 1, Path::new("/")).unwrap()
}

fn refund_target() -> Target {
    Target {
        scheme: Scheme::Https,
        host: "api.stripe.com".into(),
        port: 443,
        method: http::Method::POST,
        path: "/v1/refunds".into(),
        query: None,
        via: Via::Connect,
    }
}

fn input_doc(snap: &Snapshot) -> serde_json::Value {
    let target = refund_target();
    let mut headers = http::HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.insert("stripe-account", "acct_123".parse().unwrap());
    let body = serde_json::json!({"charge": "ch_3PqX", "amount": 1250, "reason": "requested_by_customer", "metadata": {"ticket": "ZD-4412", "note": "customer says duplicate"}});
    let tool = &snap.tools[snap.tool_index["stripe.create_refund"]];
    let facts = CallFacts {
        target: &target,
        headers: &headers,
        body: &body,
        tenant: "acme",
        run: "run_1",
        protocol: "http",
        budget: BudgetFacts::default(),
        query: &serde_json::Map::new(),
    };
    policy_input::build(snap, tool, &facts, time::OffsetDateTime::now_utc())
        .to_value()
        .unwrap()
}

fn policy(c: &mut Criterion) {
    let snap = snapshot(0);
    let doc = input_doc(&snap);
    let mut g = c.benchmark_group("policy");
    assert!(
        snap.policy.on_rvm(),
        "the shipped library compiles for the RVM"
    );
    // What the proxy runs per call: the RVM, one VM per thread, input converted by reference.
    g.bench_function("shipped_library", |b| {
        b.iter(|| snap.policy.evaluate(black_box(&doc)).unwrap())
    });
    // The same bundle on a clone of the prepared regorus Engine (the previous evaluator).
    g.bench_function("engine_shipped_library", |b| {
        b.iter(|| snap.policy.evaluate_with_engine(black_box(&doc)).unwrap())
    });
    g.bench_function("input_conversion", |b| {
        b.iter(|| tollgate_proxy::policy::policy_value(black_box(&doc)).unwrap())
    });
    // The fixed cost of an evaluation: one trivial rule.
    let trivial = tollgate_proxy::policy::PolicyBundle::compile(
        &[("t.rego".into(), "package tollgate\nimport rego.v1\ndeny contains \"x\" if input.request.body.amount > 100000\n".into())],
        &serde_json::Value::Null,
        Duration::from_millis(50),
    )
    .unwrap();
    g.bench_function("one_rule", |b| {
        b.iter(|| trivial.evaluate(black_box(&doc)).unwrap())
    });
    // One `regex.match` against a constant pattern: regorus 0.14 clones the cached `Regex` per
    // call, which drops its lazy-DFA cache (docs/performance.md).
    let one_regex = tollgate_proxy::policy::PolicyBundle::compile(
        &[("r.rego".into(), "package tollgate\nimport rego.v1\ndeny contains \"x\" if regex.match(`(?i)/(impersonat|switch[_-]?account|act[_-]?as|sudo)`, input.request.path)\n".into())],
        &serde_json::Value::Null,
        Duration::from_millis(50),
    )
    .unwrap();
    g.bench_function("one_regex_match", |b| {
        b.iter(|| one_regex.evaluate(black_box(&doc)).unwrap())
    });
    g.finish();
}

fn input_building(c: &mut Criterion) {
    let snap = snapshot(0);
    c.bench_function("policy_input_build", |b| {
        b.iter(|| input_doc(black_box(&snap)))
    });
    let doc = input_doc(&snap);
    c.bench_function("record_input_redact_and_serialise", |b| {
        b.iter(|| snap.redactor.record_input(black_box(&doc)))
    });
    c.bench_function("canonical_json", |b| {
        b.iter(|| tollgate_proxy::policy::canonical_json(black_box(&doc)))
    });
    let body = br#"{"charge":"ch_3PqX","amount":1250,"reason":"requested_by_customer","metadata":{"ticket":"ZD-4412"}}"#;
    c.bench_function("input_parse_json_strict", |b| {
        b.iter(|| tollgate_proxy::canonical::parse_json(black_box(body)).unwrap())
    });
}

fn matching(c: &mut Criterion) {
    let mut g = c.benchmark_group("match");
    for n in [10usize, 100, 1_000, 10_000] {
        let snap = snapshot(n);
        let t = Target {
            host: format!("api{}.example.com", n - 1),
            path: format!("/v1/r{}/abc", n - 1),
            ..refund_target()
        };
        g.bench_with_input(BenchmarkId::new("catalog", n), &t, |b, t| {
            b.iter(|| snap.catalog.match_target(black_box(t)))
        });
    }
    g.finish();
}

fn audit(c: &mut Criterion) {
    let snap = snapshot(0);
    let rec = tollgate_proxy::audit::AuditRecord {
        seq: 42,
        ts: "2026-11-25T07:00:00.000000000Z".into(),
        prev: "ab".repeat(32),
        call: "call_0123456789abcdef".into(),
        run: "run_1".into(),
        agent: "billing".into(),
        tenant: "acme".into(),
        tool: "stripe.create_refund".into(),
        decision: "allow".into(),
        input: tollgate_proxy::redact::RecordedInput::from(&input_doc(&snap)),
        ..Default::default()
    };
    c.bench_function("audit_record_serialise_and_hash", |b| {
        b.iter(|| {
            let line = serde_json::to_string(black_box(&rec)).unwrap();
            tollgate_proxy::audit::line_hash(&line)
        })
    });
}

fn gcra(c: &mut Criterion) {
    let store = tollgate_proxy::limits::local::LocalStore::default();
    let check = tollgate_proxy::limits::RateCheck {
        name: "t".into(),
        scope: "tenant",
        key: "tenant:acme".into(),
        interval: Duration::from_nanos(1),
        burst: 1_000_000,
    };
    c.bench_function("gcra_local_check", |b| {
        b.iter(|| store.gcra(black_box(&check)))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = policy, input_building, matching, audit, gcra
}
criterion_main!(benches);
