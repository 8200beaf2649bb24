use super::*;
use serde_json::json;

/// The document as the sidecar has produced it since version 1 (field order included): the
/// typed builder must reproduce it exactly.
fn example_literal() -> Value {
    json!({
        "version": 1,
        "agent": {"name": "billing-dispute-v3", "namespace": "default", "tenants": ["acme_co", "globex"], "mode": "enforce", "labels": {}},
        "tenant": {"id": "acme_co", "spent_today_usd": 0.0, "budget_today_usd": 50.0},
        "run": {"id": "run_1", "calls": 0, "spent_usd": 0.0, "budget_usd": 0.4},
        "tool": {"name": "stripe.get_charge", "protocol": "http", "risk": {"reversible": true, "financial": false, "data_class": "pci"}, "labels": {}},
        "request": {"method": "GET", "scheme": "https", "host": "api.stripe.com", "port": 443, "path": "/v1/charges/ch_1", "query": {}, "headers": {}, "body": {}},
        "approval": null,
        "time": {"rfc3339": "2026-05-05T10:30:00Z", "unix_ns": 1_777_977_000_000_000_000_i64, "weekday": "Tuesday", "hour": 10, "minute": 30}
    })
}

#[test]
fn example_is_the_version_1_document_byte_for_byte() {
    let v = PolicyInput::example().to_value().unwrap();
    assert_eq!(v, example_literal());
    assert_eq!(
        serde_json::to_string(&v).unwrap(),
        serde_json::to_string(&example_literal()).unwrap()
    );
}

#[test]
fn cost_comes_last_and_only_when_set() {
    let v = PolicyInput::example()
        .with_cost(Cost {
            estimate_usd: 0.25,
            exposure_usd: 12.5,
        })
        .to_value()
        .unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["version", "agent", "tenant", "run", "tool", "request", "approval", "time", "cost"]
    );
    assert_eq!(
        v["cost"],
        json!({"estimate_usd": 0.25, "exposure_usd": 12.5})
    );
}

#[test]
fn headers_drop_credentials_and_join_repeats() {
    let raw: [(&str, &[u8]); 7] = [
        ("content-type", b"application/json"),
        ("authorization", b"Bearer sk_live"),
        ("cookie", b"s=1"),
        ("stripe-key", b"injected"),
        ("x-tollgate-run", b"run_1"),
        ("accept", b"a/b"),
        ("accept", b"c/d"),
    ];
    let h = headers(raw, Some("stripe-key"));
    assert_eq!(
        Value::Object(h),
        json!({"content-type": "application/json", "accept": "a/b, c/d"})
    );
}

#[test]
fn reads_back_only_complete_version_1_documents() {
    let v = PolicyInput::example()
        .with_cost(Cost {
            estimate_usd: 1.0,
            exposure_usd: 0.0,
        })
        .to_value()
        .unwrap();
    let back = PolicyInput::from_value(&v).expect("a built document reads back");
    assert_eq!(back.to_value().unwrap(), v);
    let mut v2 = v.clone();
    v2["version"] = json!(2);
    assert!(PolicyInput::from_value(&v2).is_err());
    let mut partial = v;
    partial.as_object_mut().unwrap().remove("run");
    assert!(PolicyInput::from_value(&partial).is_err());
    assert!(PolicyInput::from_value(&Value::Null).is_err());
    // A redacted record may mask a field of any type; only its version decides replay.
    let mut masked = PolicyInput::example().to_value().unwrap();
    masked["request"]["port"] = json!("[REDACTED]");
    assert!(PolicyInput::from_value(&masked).is_err());
    assert!(is_replayable(&masked));
    masked["version"] = json!(2);
    assert!(!is_replayable(&masked));
    assert!(!is_replayable(&json!([1])));
}

#[test]
fn canonical_json_sorts_keys_at_every_depth() {
    let a = json!({"b": [{"y": 1, "x": 2}], "a": null});
    assert_eq!(canonical_json(&a), br#"{"a":null,"b":[{"x":2,"y":1}]}"#);
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}
