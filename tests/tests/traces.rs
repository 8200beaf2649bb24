//! Traces (issue 15): with `OTEL_EXPORTER_OTLP_ENDPOINT` set, the real binary exports one
//! `call` span per call with `limits`, `policy` and `upstream` children over OTLP/HTTP to a
//! loopback receiver; the span is a child of the agent's `traceparent`, the upstream gets a
//! `traceparent` naming the exported call span, and the audit record carries the same trace
//! id. JSON logs carry the call's ids.

use tollgate_tests::harness::{call, eventually, TestProxy, Upstream};

const T: (&str, &str) = ("X-Tollgate-Tenant", "acme");
const JSON: (&str, &str) = ("Content-Type", "application/json");
const AGENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const AGENT_SPAN: &str = "00f067aa0ba902b7";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn calls_are_exported_as_otlp_spans_under_the_agents_trace() {
    let up = Upstream::start();
    let collector = Upstream::start();
    let a = up.addr;
    let config = format!(
        r#"
agent: {{name: billing, tenants: [acme]}}
tools:
  - name: pay.refund
    match: {{host: "{a}", methods: [POST], path: /v1/refunds}}
audit: {{path: audit.jsonl}}
"#
    );
    let endpoint = format!("http://{}", collector.addr);
    let p = TestProxy::start(
        &config,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_SERVICE_NAME", "tollgate-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let tp = format!("00-{AGENT_TRACE}-{AGENT_SPAN}-01");
    let r = call(
        p.proxy,
        "POST",
        &format!("http://{a}/v1/refunds"),
        &[T, JSON, ("traceparent", &tp)],
        Some(r#"{"amount":1}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body_text());

    // The upstream continues the agent's trace under a span Tollgate exported.
    let sent = up.seen().last().unwrap().clone();
    let upstream_tp = sent.header("traceparent").unwrap().to_string();
    let parts: Vec<&str> = upstream_tp.split('-').collect();
    assert_eq!(parts[1], AGENT_TRACE, "{upstream_tp}");
    assert_ne!(parts[2], AGENT_SPAN, "a new span, not the agent's");
    let call_span = hex(parts[2]);

    // The audit record has the same trace id.
    let rec = p.audit().last().unwrap().clone();
    assert_eq!(rec["trace_id"], AGENT_TRACE, "{rec}");

    // The collector receives OTLP protobuf carrying the trace, the call span and its children.
    eventually("spans exported", || {
        collector
            .seen()
            .iter()
            .any(|s| s.path == "/v1/traces" && contains(&s.body, &call_span))
    });
    let export: Vec<u8> = collector
        .seen()
        .iter()
        .filter(|s| s.path == "/v1/traces")
        .flat_map(|s| {
            assert_eq!(s.method, "POST");
            assert_eq!(s.header("content-type"), Some("application/x-protobuf"));
            s.body.to_vec()
        })
        .collect();
    assert!(contains(&export, &hex(AGENT_TRACE)), "trace id exported");
    assert!(
        contains(&export, &hex(AGENT_SPAN)),
        "the agent's span is the parent"
    );
    for name in ["call", "limits", "policy", "upstream"] {
        // Span names are length-prefixed protobuf strings (field 5, wire type 2: 0x2a).
        let mut field = vec![0x2a, name.len() as u8];
        field.extend_from_slice(name.as_bytes());
        assert!(contains(&export, &field), "span {name:?} exported");
    }
    assert!(contains(&export, b"tollgate-test"), "service name");
}

#[test]
fn json_logs_carry_the_call_ids() {
    let up = Upstream::start();
    let a = up.addr;
    let config = format!(
        r#"
agent: {{name: billing, tenants: [acme]}}
tools:
  - name: pay.refund
    match: {{host: "{a}", methods: [POST], path: /v1/refunds}}
    inputSchema: {{type: object, required: [amount]}}
audit: {{path: audit.jsonl}}
"#
    );
    let p = TestProxy::start(&config, &[("TOLLGATE_LOG_JSON", "true")]);
    let r = call(
        p.proxy,
        "POST",
        &format!("http://{a}/v1/refunds"),
        &[T, JSON],
        Some(r#"{"other":1}"#),
    );
    assert_eq!(r.status, 400, "{}", r.body_text());
    let rec = p.audit().last().unwrap().clone();
    let trace = rec["trace_id"].as_str().unwrap().to_string();
    let run = rec["run"].as_str().unwrap().to_string();
    eventually("a log line of the call", || {
        p.log().lines().any(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                v["span"]["trace_id"] == trace.as_str() && v["span"]["run"] == run.as_str()
            })
        })
    });
}
