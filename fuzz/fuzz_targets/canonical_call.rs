//! The canonical-call builder on arbitrary requests: never panics; an accepted call rebuilds
//! into an upstream request whose body and query parse back to exactly the decided call.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate_proxy::canonical::{rebuild, CallOptions, CanonicalCall, RebuildOptions};
use tollgate_proxy::target::{Scheme, Target, Via};

const TYPES: &[&str] = &[
    "application/json",
    "application/x-www-form-urlencoded",
    "text/plain",
    "application/json; charset=utf-8",
];
const CODINGS: &[&str] = &["", "gzip", "deflate", "br", "zstd", "gzip, br"];

fuzz_target!(|data: &[u8]| {
    // Layout: [content-type selector, coding selector, query length, query..., body...].
    let [ct, ce, qlen, rest @ ..] = data else { return };
    let qlen = (*qlen as usize).min(rest.len());
    let (query, body) = rest.split_at(qlen);
    let Ok(query) = std::str::from_utf8(query) else { return };
    let mut b = http::Request::builder()
        .method("POST")
        .uri("/")
        .header("content-type", TYPES[*ct as usize % TYPES.len()]);
    let coding = CODINGS[*ce as usize % CODINGS.len()];
    if !coding.is_empty() {
        b = b.header("content-encoding", coding);
    }
    let parts = b.body(()).unwrap().into_parts().0;
    let target = Target {
        scheme: Scheme::Https,
        host: "api.example.com".into(),
        port: 443,
        method: http::Method::POST,
        path: "/v1/x".into(),
        query: (!query.is_empty()).then(|| query.to_string()),
        via: Via::Connect,
    };
    let Ok(call) = CanonicalCall::build(&parts, &target, body, &CallOptions::strict(1 << 20)) else {
        return;
    };
    let opts = RebuildOptions {
        forward_headers: &[],
        credential: None,
        traceparent: "",
        idempotency: Default::default(),
        agent: "a",
        tenant: "t",
    };
    let req = rebuild(&call, &target, &parts.headers, &opts).expect("a decided call rebuilds");
    // What goes upstream reads back as what was decided.
    let (up_parts, up_body) = req.into_parts();
    let mut again_target = target.clone();
    again_target.query = up_parts.uri.query().map(str::to_owned);
    let again = CanonicalCall::build(&up_parts, &again_target, &up_body, &CallOptions::strict(1 << 20))
        .expect("the rebuilt request is itself canonical");
    assert_eq!(again.tool_input(), call.tool_input());
    assert_eq!(again.query, call.query);
});
