//! The policy `input` document the sidecar builds for a realistic call, pinned byte for byte
//! (`proxy/tests/golden/policy_input_refund.json`; `TOLLGATE_BLESS=1` rewrites it): moving or
//! retyping the builder must not change what policies and audit records see.

use std::path::Path;
use tollgate_proxy::policy::input::{Cost, PolicyInput};
use tollgate_proxy::policy_input::{build, BudgetFacts, CallFacts};
use tollgate_proxy::snapshot::Snapshot;
use tollgate_proxy::target::{Scheme, Target, Via};

const CONFIG: &str = r#"
agent:
  name: billing-dispute-v3
  namespace: payments
  tenants: [acme_co, globex]
  labels: {tollgate.dev/autonomy: supervised, team: billing}
tools:
  - name: stripe.create_refund
    match: {host: api.stripe.com, methods: [POST], path: /v1/refunds}
    risk: {financial: true, reversible: false, dataClass: pci}
    labels: {tollgate.dev/kind: refund}
    credentials: {header: Stripe-Key, valueFrom: {env: POLICY_INPUT_TEST_KEY}}
"#;

fn document() -> String {
    std::env::set_var("POLICY_INPUT_TEST_KEY", "sk_test_x");
    let cfg = tollgate_proxy::config::parse_str(CONFIG).unwrap();
    let snap = Snapshot::build(cfg, 1, Path::new("/")).unwrap();
    let tool = &snap.tools[snap.tool_index["stripe.create_refund"]];
    let target = Target {
        scheme: Scheme::Https,
        host: "api.stripe.com".into(),
        port: 443,
        method: http::Method::POST,
        path: "/v1/refunds".into(),
        query: Some("expand=charge&expand=balance&idem=1".into()),
        via: Via::Connect,
    };
    let mut headers = http::HeaderMap::new();
    for (n, v) in [
        ("content-type", "application/json"),
        ("authorization", "Bearer sk_live_secret"),
        ("cookie", "session=1"),
        ("stripe-key", "sk_injected"),
        ("x-tollgate-run", "run_7"),
        ("stripe-account", "acct_123"),
        ("accept", "application/json"),
        ("accept", "text/plain"),
    ] {
        headers.append(n, v.parse().unwrap());
    }
    let body = serde_json::json!({"charge": "ch_3PqX", "amount": 1250, "reason": "duplicate", "metadata": {"ticket": "ZD-4412", "lines": [1, 2.5, null, true]}});
    let query = serde_json::json!({"expand": ["charge", "balance"], "idem": "1"});
    let facts = CallFacts {
        target: &target,
        headers: &headers,
        body: &body,
        tenant: "acme_co",
        run: "run_7",
        protocol: "http",
        budget: BudgetFacts {
            run_calls: 3,
            run_spent_usd: 0.125,
            run_budget_usd: Some(0.4),
            tenant_spent_today_usd: 12.5,
            tenant_budget_today_usd: None,
        },
        query: query.as_object().unwrap(),
    };
    let now = time::macros::datetime!(2026-05-05 10:30:15.123456789 UTC);
    let doc = build(&snap, tool, &facts, now)
        .with_cost(Cost {
            estimate_usd: 0.0,
            exposure_usd: 12.5,
        })
        .to_value()
        .unwrap();
    // The typed document reads back as itself.
    let back = PolicyInput::from_value(&doc).unwrap();
    assert_eq!(back.to_value().unwrap(), doc);
    serde_json::to_string_pretty(&doc).unwrap() + "\n"
}

#[test]
fn the_input_for_a_refund_is_pinned() {
    let got = document();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/policy_input_refund.json"
    );
    if std::env::var_os("TOLLGATE_BLESS").is_some() {
        std::fs::write(path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(path).unwrap();
    assert_eq!(got, want, "the policy input changed");
}
