//! Criterion micro-benchmarks of the per-call hot path: policy evaluation of the shipped
//! library (regorus `Engine` versus the RVM), policy-input building, tool matching as the
//! catalog grows (10 → 10,000 tools), audit record serialisation and hashing, and a GCRA check.
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
    };
    policy_input::build(snap, tool, &facts, time::OffsetDateTime::now_utc())
}

fn policy(c: &mut Criterion) {
    let snap = snapshot(0);
    let doc = input_doc(&snap);
    let mut g = c.benchmark_group("policy");
    g.bench_function("engine_shipped_library", |b| {
        b.iter(|| snap.policy.evaluate(black_box(&doc)).unwrap())
    });
    // The fixed cost of an evaluation: one trivial rule.
    let trivial = tollgate_proxy::policy::PolicyBundle::compile(
        &[("t.rego".into(), "package tollgate\nimport rego.v1\ndeny contains \"x\" if input.request.body.amount > 100000\n".into())],
        &serde_json::Value::Null,
        Duration::from_millis(50),
    )
    .unwrap();
    g.bench_function("engine_one_rule", |b| {
        b.iter(|| trivial.evaluate(black_box(&doc)).unwrap())
    });
    // The same library on regorus's RVM.
    let mut engine = regorus::Engine::new();
    engine.set_rego_v0(false);
    for e in std::fs::read_dir(policies_dir()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".rego") && !name.ends_with("_test.rego") {
            engine
                .add_policy(name, std::fs::read_to_string(&p).unwrap())
                .unwrap();
        }
    }
    engine
        .add_data(regorus::Value::from(
            serde_json::json!({"tollgate_config": {}}),
        ))
        .unwrap();
    let entry: std::sync::Arc<str> = "data.tollgate.deny".into();
    let rvm = engine
        .compile_with_entrypoint(&entry)
        .map_err(|e| e.to_string())
        .and_then(|cp| {
            regorus::languages::rego::compiler::Compiler::compile_from_policy(
                &cp,
                &["data.tollgate.deny"],
            )
            .map_err(|e| e.to_string())
        });
    match rvm {
        Ok(program) => {
            let input = regorus::Value::from(doc.clone());
            let mut vm = regorus::rvm::RegoVM::new();
            vm.load_program(program);
            vm.set_data(regorus::Value::from(
                serde_json::json!({"tollgate_config": {}}),
            ))
            .unwrap();
            g.bench_function("rvm_shipped_library_deny", |b| {
                b.iter(|| {
                    vm.set_input(input.clone());
                    vm.execute().unwrap()
                })
            });
        }
        Err(e) => eprintln!("RVM could not compile the shipped library ({e}); Engine only"),
    }
    g.finish();
}

fn input_building(c: &mut Criterion) {
    let snap = snapshot(0);
    c.bench_function("policy_input_build", |b| {
        b.iter(|| input_doc(black_box(&snap)))
    });
    let body = br#"{"charge":"ch_3PqX","amount":1250,"reason":"requested_by_customer","metadata":{"ticket":"ZD-4412"}}"#;
    c.bench_function("input_parse_json_strict", |b| {
        b.iter(|| tollgate_proxy::input::parse_json(black_box(body)).unwrap())
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
        input: input_doc(&snap),
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
