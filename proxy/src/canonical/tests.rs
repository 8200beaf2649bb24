//! Tests of the canonical call: one per class of refusal and rebuild rule, then the property
//! tests (about 700 lines, by design: each row of SECURITY.md's table has its test here).

use super::*;
use crate::target::{Scheme, Via};
use http::HeaderValue;
use proptest::prelude::*;
use std::io::Write;

fn target(method: &str, path: &str, query: Option<&str>) -> Target {
    Target {
        scheme: Scheme::Https,
        host: "api.example.com".into(),
        port: 443,
        method: method.parse().unwrap(),
        path: path.into(),
        query: query.map(str::to_owned),
        via: Via::ForwardProxy,
    }
}

fn parts(method: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::builder().method(method).uri("/");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn build(
    method: &str,
    path: &str,
    query: Option<&str>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<CanonicalCall, CanonicalError> {
    CanonicalCall::build(
        &parts(method, headers),
        &target(method, path, query),
        body,
        &CallOptions::strict(1024 * 1024),
    )
}

fn code(r: Result<CanonicalCall, CanonicalError>) -> &'static str {
    r.expect_err("expected a refusal").code()
}

const JSON: (&str, &str) = ("content-type", "application/json");
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

#[test]
fn a_form_of_no_fields_is_decided_as_bodiless() {
    let call = build("POST", "/x", Some("a=1"), &[FORM], b"&&").unwrap();
    assert_eq!(call.body, CanonicalBody::Empty);
    assert_eq!(call.tool_input(), serde_json::json!({"a": 1}));
}

#[test]
fn json_and_form_bodies_are_decided() {
    let c = build("POST", "/v1/refunds", None, &[JSON], br#"{"amount":100}"#).unwrap();
    assert_eq!(c.tool_input(), json!({"amount": 100}));
    assert_eq!(c.body.kind(), "json");
    let c = build(
        "POST",
        "/v1/refunds",
        None,
        &[FORM],
        b"amount=100&metadata[o]=7",
    )
    .unwrap();
    assert_eq!(c.tool_input(), json!({"amount": 100, "metadata": {"o": 7}}));
    // No Content-Type: the body must be JSON.
    let c = build("POST", "/x", None, &[], br#"[1,2]"#).unwrap();
    assert_eq!(c.tool_input(), json!([1, 2]));
    assert_eq!(
        code(build("POST", "/x", None, &[], b"amount=1")),
        "unparsable_body"
    );
}

#[test]
fn duplicate_and_case_colliding_keys_are_refused_recursively() {
    for body in [
        br#"{"amount":1,"amount":5000}"#.as_slice(),
        br#"{"amount":1,"AMOUNT":5000}"#,
        br#"{"a":{"amount":1,"Amount":5000}}"#,
        br#"[{"x":1},{"k":1,"K":2}]"#,
        br#"{"jsonrpc":"2.0","method":"tools/list","Method":"tools/call"}"#,
        "{\"status\":1,\"\u{17f}tatus\":2}".as_bytes(),
        "{\"kind\":1,\"\u{212a}ind\":2}".as_bytes(),
    ] {
        assert_eq!(
            code(build("POST", "/x", None, &[JSON], body)),
            "unparsable_body"
        );
    }
    for body in [
        &b"amount=1&AMOUNT=5000"[..],
        b"m[a]=1&m[A]=2",
        b"amount=1&amount=2",
    ] {
        assert_eq!(
            code(build("POST", "/x", None, &[FORM], body)),
            "unparsable_body"
        );
    }
    assert_eq!(
        code(build("GET", "/x", Some("amount=1&Amount=2"), &[], b"")),
        "unparsable_query"
    );
}

#[test]
fn json_numbers_depth_and_trailing_bytes_are_strict() {
    for body in [
        &br#"{"amount": 100000000000000000000001}"#[..],
        br#"{"amount": 1e400}"#,
        br#"{"a":1} {"a":2}"#,
        b"\xef\xbb\xbf{}",
        br#"{"a":"\ud800"}"#,
    ] {
        assert_eq!(
            code(build("POST", "/x", None, &[JSON], body)),
            "unparsable_body"
        );
    }
    let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
    assert_eq!(
        code(build("POST", "/x", None, &[JSON], deep.as_bytes())),
        "unparsable_body"
    );
}

#[test]
fn form_and_query_escapes_are_strict() {
    for body in [
        &b"amount=%zz"[..],
        b"amount=%c3%28",
        b"=1",
        b"a=1;amount=5000",
        b"a[b=1",
    ] {
        assert_eq!(
            code(build("POST", "/x", None, &[FORM], body)),
            "unparsable_body",
            "{body:?}"
        );
    }
    for q in ["amount=%zz", "a=1;amount=5000", "=1", "a=1&a[b]=2"] {
        assert_eq!(
            code(build("GET", "/x", Some(q), &[], b"")),
            "unparsable_query",
            "{q}"
        );
    }
}

#[test]
fn query_keeps_every_value() {
    let c = build(
        "GET",
        "/v1/charges",
        Some("amount=100&amount=5000&expand[]=a&q=a+b"),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(
        c.tool_input(),
        json!({"amount": [100, 5000], "expand": ["a"], "q": "a b"})
    );
    assert_eq!(c.query_pairs.len(), 4);
}

#[test]
fn query_and_body_may_not_both_name_a_field() {
    assert_eq!(
        code(build(
            "POST",
            "/x",
            Some("amount=5000"),
            &[FORM],
            b"amount=100"
        )),
        "query_body_conflict"
    );
    assert_eq!(
        code(build(
            "POST",
            "/x",
            Some("Amount=5000"),
            &[JSON],
            br#"{"amount":100}"#
        )),
        "query_body_conflict"
    );
    let c = build(
        "POST",
        "/x",
        Some("expand=a"),
        &[JSON],
        br#"{"amount":100}"#,
    )
    .unwrap();
    assert_eq!(c.to_value()["query"], json!({"expand": "a"}));
}

#[test]
fn method_overrides_are_refused() {
    for h in [
        "x-http-method-override",
        "X-HTTP-Method",
        "x-method-override",
    ] {
        assert_eq!(
            code(build("POST", "/x", None, &[JSON, (h, "DELETE")], b"{}")),
            "method_override"
        );
    }
    assert_eq!(
        code(build("POST", "/x", None, &[FORM], b"_method=DELETE&a=1")),
        "method_override"
    );
    assert_eq!(
        code(build(
            "POST",
            "/x",
            None,
            &[JSON],
            br#"{"_METHOD":"DELETE"}"#
        )),
        "method_override"
    );
    assert_eq!(
        code(build("POST", "/x", Some("_method=DELETE"), &[], b"")),
        "method_override"
    );
}

#[test]
fn ambiguous_headers_are_refused() {
    let two_ct = [JSON, ("content-type", "application/x-www-form-urlencoded")];
    assert_eq!(
        code(build("POST", "/x", None, &two_ct, b"{}")),
        "repeated_header"
    );
    assert_eq!(
        code(build(
            "POST",
            "/x",
            None,
            &[("host", "a"), ("host", "b")],
            b""
        )),
        "repeated_header"
    );
    assert_eq!(
        code(build(
            "POST",
            "/x",
            None,
            &[JSON, ("connection", "close, Content-Type")],
            b"{}"
        )),
        "connection_names_end_to_end_header"
    );
    assert!(build(
        "POST",
        "/x",
        None,
        &[JSON, ("connection", "keep-alive, TE")],
        b"{}"
    )
    .is_ok());
    // `Connection` may name a header of the agent's own (it is dropped), never one the
    // decision reads or the proxy forwards.
    for named in [
        "authorization",
        "x-tollgate-tenant",
        "idempotency-key",
        "accept",
    ] {
        assert_eq!(
            code(build("GET", "/x", None, &[("connection", named)], b"")),
            "connection_names_end_to_end_header",
            "{named}"
        );
    }
    let mut opts = CallOptions::strict(1024);
    opts.meaning_headers = vec![HeaderName::from_static("stripe-account")];
    let hop = parts("GET", &[("connection", "Stripe-Account")]);
    let r = CanonicalCall::build(&hop, &target("GET", "/x", None), b"", &opts);
    assert_eq!(code(r), "connection_names_end_to_end_header");
    assert!(build("GET", "/x", None, &[("connection", "x-hop")], b"").is_ok());
    for ct in [
        "application/json, text/plain",
        "application/json; charset=utf-16",
        "application/json; charset=utf-8; charset=latin1",
        "json",
    ] {
        assert_eq!(
            code(build("POST", "/x", None, &[("content-type", ct)], b"{}")),
            "bad_content_type",
            "{ct}"
        );
    }
}

#[test]
fn unknown_media_types_are_refused_unless_opaque() {
    for ct in [
        "text/plain",
        "application/octet-stream",
        "multipart/form-data; boundary=x",
    ] {
        assert_eq!(
            code(build(
                "POST",
                "/x",
                None,
                &[("content-type", ct)],
                b"amount=5000"
            )),
            "unsupported_media_type"
        );
    }
    let opts = CallOptions {
        body: BodyMode::Opaque,
        ..CallOptions::strict(1024)
    };
    let c = CanonicalCall::build(
        &parts("POST", &[("content-type", "text/plain")]),
        &target("POST", "/x", None),
        b"hello",
        &opts,
    )
    .unwrap();
    let v = c.tool_input();
    assert_eq!(v["opaque"], json!(true));
    assert_eq!(v["media_type"], json!("text/plain"));
    assert_eq!(v["bytes"], json!(5));
    assert_eq!(v["sha256"].as_str().unwrap().len(), 64);
}

#[test]
fn encoded_bodies_are_decided_decoded() {
    let body = gzip(b"amount=5000");
    let c = build(
        "POST",
        "/x",
        None,
        &[FORM, ("content-encoding", "gzip")],
        &body,
    )
    .unwrap();
    assert_eq!(c.tool_input(), json!({"amount": 5000}));
    assert_eq!(
        code(build(
            "POST",
            "/x",
            None,
            &[FORM, ("content-encoding", "compress")],
            b"x"
        )),
        "unsupported_content_encoding"
    );
    assert_eq!(
        code(build(
            "POST",
            "/x",
            None,
            &[FORM, ("content-encoding", "gzip")],
            b"amount=1"
        )),
        "corrupt_content_encoding"
    );
    let bomb = gzip(&vec![b'a'; 8 * 1024 * 1024]);
    let err = build(
        "POST",
        "/x",
        None,
        &[FORM, ("content-encoding", "gzip")],
        &bomb,
    )
    .unwrap_err();
    assert_eq!(err.code(), "decompression_ratio_exceeded");
}

#[test]
fn path_parameters_need_an_opt_in() {
    assert_eq!(
        code(build("GET", "/v1/charges;x=1", None, &[], b"")),
        "path_parameter"
    );
    let opts = CallOptions {
        path_params: true,
        ..CallOptions::strict(1024)
    };
    let b = |p: &str| CanonicalCall::build(&parts("GET", &[]), &target("GET", p, None), b"", &opts);
    assert!(b("/v1/charges;jsessionid=1/x").is_ok());
    for p in ["/v1/..;/admin", "/v1/.;x/admin", "/v1/;x/admin"] {
        assert_eq!(code(b(p)), "path_parameter", "{p}");
    }
}

#[test]
fn schema_spelling_is_enforced() {
    let opts = CallOptions {
        schema: Some(
            json!({"type":"object","properties":{"amount":{"type":"integer"},"meta":{"properties":{"order":{}}}}}),
        ),
        ..CallOptions::strict(1024)
    };
    let b = |body: &[u8]| {
        CanonicalCall::build(
            &parts("POST", &[JSON]),
            &target("POST", "/x", None),
            body,
            &opts,
        )
    };
    assert_eq!(code(b(br#"{"AMOUNT":5000}"#)), "case_variant_key");
    assert_eq!(code(b(br#"{"meta":{"Order":1}}"#)), "case_variant_key");
    assert!(b(br#"{"amount":5000,"other":1}"#).is_ok());
}

#[test]
fn meaning_headers_and_idempotency_keys_are_part_of_the_call() {
    let opts = CallOptions {
        meaning_headers: vec![HeaderName::from_static("stripe-account")],
        ..CallOptions::strict(1024)
    };
    let b = |h: &[(&str, &str)]| {
        CanonicalCall::build(
            &parts("POST", h),
            &target("POST", "/x", None),
            br#"{"a":1}"#,
            &opts,
        )
    };
    let a = b(&[JSON, ("stripe-account", "acct_1")]).unwrap();
    let c = b(&[JSON, ("stripe-account", "acct_2")]).unwrap();
    assert_eq!(a.headers["stripe-account"], "acct_1");
    assert_ne!(
        a.hash(),
        c.hash(),
        "the approval hash binds meaning-carrying headers"
    );
    assert_eq!(
        code(b(&[JSON, ("stripe-account", "a"), ("stripe-account", "b")])),
        "repeated_header"
    );
    let k = b(&[JSON, ("idempotency-key", "k1")]).unwrap();
    assert_eq!(k.idempotency_key.as_deref(), Some("k1"));
    assert_eq!(
        code(b(&[
            JSON,
            ("idempotency-key", "a"),
            ("idempotency-key", "b")
        ])),
        "repeated_header"
    );
}

#[test]
fn hash_covers_method_path_query_and_body() {
    let base = build("POST", "/x", Some("a=1"), &[JSON], br#"{"b":1}"#).unwrap();
    for other in [
        build("PUT", "/x", Some("a=1"), &[JSON], br#"{"b":1}"#),
        build("POST", "/y", Some("a=1"), &[JSON], br#"{"b":1}"#),
        build("POST", "/x", Some("a=2"), &[JSON], br#"{"b":1}"#),
        build("POST", "/x", Some("a=1"), &[JSON], br#"{"b":2}"#),
    ] {
        assert_ne!(base.hash(), other.unwrap().hash());
    }
    // Key order is not meaning.
    let same = build("POST", "/x", Some("a=1"), &[JSON], br#"{ "b" : 1 }"#).unwrap();
    assert_eq!(base.hash(), same.hash());
}

fn rebuild_opts<'a>(cred: Option<&'a Credential>, fwd: &'a [HeaderName]) -> RebuildOptions<'a> {
    RebuildOptions {
        forward_headers: fwd,
        credential: cred,
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        idempotency: crate::config::IdempotencyKeyForwarding::Namespaced,
        agent: "agent-a",
        tenant: "acme",
    }
}

use crate::snapshot::Credential;

#[test]
fn agent_hop_by_hop_headers_are_dropped_unless_forwarded() {
    let h = parts(
        "GET",
        &[("connection", "x-hop"), ("x-hop", "1"), ("x-keep", "2")],
    );
    let call = CanonicalCall::build(
        &h,
        &target("GET", "/x", None),
        b"",
        &CallOptions::strict(1024),
    )
    .unwrap();
    let t = target("GET", "/x", None);
    let fwd = [
        HeaderName::from_static("x-hop"),
        HeaderName::from_static("x-keep"),
    ];
    // A tool that forwards the header cannot have it dropped by the agent.
    let e = rebuild(&call, &t, &h.headers, &rebuild_opts(None, &fwd)).unwrap_err();
    assert_eq!(e.code(), "connection_names_end_to_end_header");
    let fwd = [HeaderName::from_static("x-keep")];
    let req = rebuild(&call, &t, &h.headers, &rebuild_opts(None, &fwd)).unwrap();
    assert!(req.headers().get("x-hop").is_none());
    assert!(req.headers().get("connection").is_none());
    assert_eq!(req.headers()["x-keep"], "2");
}

#[test]
fn rebuild_sends_the_decided_form_only() {
    let agent_headers = [
        FORM,
        ("content-encoding", "gzip"),
        ("accept", "application/json"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-for", "1.2.3.4"),
        ("forwarded", "for=1.2.3.4"),
        ("x-original-url", "/admin"),
        ("x-tollgate-tenant", "acme"),
        ("x-custom", "1"),
        ("authorization", "Bearer agent"),
        ("idempotency-key", "k1"),
    ];
    let p = parts("POST", &agent_headers);
    let body = gzip(b"amount=100&metadata[o]=7&q=a%20b");
    let call = CanonicalCall::build(
        &p,
        &target("POST", "/v1/refunds", Some("expand[]=x&expand[]=y")),
        &body,
        &CallOptions::strict(1 << 20),
    )
    .unwrap();
    let cred = Credential {
        header: HeaderName::from_static("authorization"),
        value: HeaderValue::from_static("Bearer secret"),
    };
    let req = rebuild(
        &call,
        &target("POST", "/v1/refunds", None),
        &p.headers,
        &rebuild_opts(Some(&cred), &[]),
    )
    .unwrap();
    assert_eq!(
        req.uri().to_string(),
        "https://api.example.com/v1/refunds?expand%5B%5D=x&expand%5B%5D=y"
    );
    let h = req.headers();
    assert_eq!(h["content-type"], "application/x-www-form-urlencoded");
    assert!(!h.contains_key("content-encoding"));
    assert_eq!(h["host"], "api.example.com");
    assert_eq!(h["accept"], "application/json");
    assert_eq!(h["x-forwarded-host"], "api.example.com");
    assert!(h.get("x-forwarded-for").is_none());
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["authorization"], "Bearer secret");
    for gone in [
        "forwarded",
        "x-original-url",
        "x-tollgate-tenant",
        "x-custom",
    ] {
        assert!(!h.contains_key(gone), "{gone} forwarded");
    }
    assert_eq!(
        h["idempotency-key"],
        namespaced_idempotency_key("agent-a", "acme", "k1").as_str()
    );
    assert_eq!(req.body().as_ref(), b"amount=100&metadata%5Bo%5D=7&q=a+b");
    assert_eq!(h["content-length"], req.body().len().to_string().as_str());
    // The rebuilt body parses back to the decided value.
    assert_eq!(
        Value::Object(parse_form(req.body()).unwrap()),
        call.tool_input()
    );
    // A tool's forwardHeaders extend the default set, never past NEVER_FORWARD_HEADERS.
    let fwd = [
        HeaderName::from_static("x-custom"),
        HeaderName::from_static("x-original-url"),
    ];
    let req = rebuild(
        &call,
        &target("POST", "/v1/refunds", None),
        &p.headers,
        &rebuild_opts(None, &fwd),
    )
    .unwrap();
    assert_eq!(req.headers()["x-custom"], "1");
    assert!(!req.headers().contains_key("x-original-url"));
    assert_eq!(req.headers()["authorization"], "Bearer agent");
}

#[test]
fn idempotency_keys_are_namespaced_or_refused() {
    let a = namespaced_idempotency_key("agent", "t1", "k");
    assert_ne!(a, namespaced_idempotency_key("agent", "t2", "k"));
    assert_ne!(a, namespaced_idempotency_key("agent2", "t1", "k"));
    assert_ne!(
        namespaced_idempotency_key("a", "bc", "k"),
        namespaced_idempotency_key("ab", "c", "k")
    );
    let p = parts("POST", &[JSON, ("idempotency-key", "k1")]);
    let t = target("POST", "/x", None);
    let call = CanonicalCall::build(&p, &t, b"{}", &CallOptions::strict(1024)).unwrap();
    let cred = Credential {
        header: HeaderName::from_static("authorization"),
        value: HeaderValue::from_static("Bearer secret"),
    };
    let mut o = rebuild_opts(Some(&cred), &[]);
    o.idempotency = crate::config::IdempotencyKeyForwarding::Verbatim;
    assert_eq!(
        rebuild(&call, &t, &p.headers, &o).unwrap_err().code(),
        "bad_idempotency_key"
    );
    o.credential = None;
    let req = rebuild(&call, &t, &p.headers, &o).unwrap();
    assert_eq!(req.headers()["idempotency-key"], "k1");
}

#[test]
fn json_is_reserialised_not_copied() {
    let raw = br#"{ "amount" : 1.2e3, "s": "\u0041" }"#;
    let p = parts(
        "POST",
        &[("content-type", "application/vnd.api+json; charset=UTF-8")],
    );
    let t = target("POST", "/x", None);
    let call = CanonicalCall::build(&p, &t, raw, &CallOptions::strict(1024)).unwrap();
    let req = rebuild(&call, &t, &p.headers, &rebuild_opts(None, &[])).unwrap();
    assert_eq!(req.body().as_ref(), br#"{"amount":1200.0,"s":"A"}"#);
    assert_eq!(req.headers()["content-type"], "application/json");
}

proptest! {
    // Form serialisation is the inverse of parsing on everything the parser returns.
    #[test]
    fn form_round_trips(pairs in proptest::collection::vec(("[a-zA-Z_]{1,6}(\\[[a-z0-9]{0,3}\\])?", "[ -~]{0,8}"), 0..8)) {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &pairs {
            s.append_pair(k, v);
        }
        let body = s.finish();
        if let Ok(parsed) = parse_form(body.as_bytes()) {
            let again = serialize_form(&parsed).unwrap();
            prop_assert_eq!(parse_form(again.as_bytes()).unwrap(), parsed);
        }
    }

    // The rebuilt JSON body parses, strictly, to the decided value.
    #[test]
    fn json_round_trips(v in any_json()) {
        let raw = serde_json::to_vec(&v).unwrap();
        if let Ok(call) = build("POST", "/x", None, &[JSON], &raw) {
            let t = target("POST", "/x", None);
            let req = rebuild(&call, &t, &http::HeaderMap::new(), &rebuild_opts(None, &[])).unwrap();
            prop_assert_eq!(parse_json(req.body()).unwrap(), call.tool_input());
        }
    }

    // The builder never panics, whatever the bytes.
    #[test]
    fn builder_never_panics(body in proptest::collection::vec(any::<u8>(), 0..64), q in "[ -~]{0,16}", ct in 0..3usize) {
        let cts = ["application/json", "application/x-www-form-urlencoded", "text/plain"];
        let _ = build("POST", "/x", Some(&q), &[("content-type", cts[ct])], &body);
    }
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-1_000_000i64..1_000_000).prop_map(Value::from),
        "[a-zA-Z0-9 _]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
