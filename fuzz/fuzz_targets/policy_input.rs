//! Building the policy input from an arbitrary parsed body: never panics, always an object
//! that carries the body unchanged.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tollgate_proxy::policy_input::{build, BudgetFacts, CallFacts};
use tollgate_proxy::snapshot::Snapshot;
use tollgate_proxy::target::{Scheme, Target, Via};

fn snap() -> &'static Snapshot {
    static S: OnceLock<Snapshot> = OnceLock::new();
    S.get_or_init(|| {
        let cfg = "agent: {name: f, tenants: [t]}\ntools:\n  - {name: a, match: {host: api.example.com, methods: [POST], path: /v1/x}}\n";
        Snapshot::build(tollgate_proxy::config::parse_str(cfg).unwrap(), 1, std::path::Path::new("/")).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(body) = tollgate_proxy::canonical::parse_json(data) else { return };
    let target = Target { scheme: Scheme::Https, host: "api.example.com".into(), port: 443, method: http::Method::POST, path: "/v1/x".into(), query: None, via: Via::Connect };
    let headers = http::HeaderMap::new();
    let facts = CallFacts { target: &target, headers: &headers, body: &body, tenant: "t", run: "r", protocol: "http", budget: BudgetFacts::default(), query: &serde_json::Map::new() };
    let doc = build(snap(), &snap().tools[0], &facts, time::OffsetDateTime::UNIX_EPOCH).to_value().unwrap();
    assert!(doc.is_object());
    assert_eq!(doc["request"]["body"], body);
});
