//! LLM metering end to end (issue 5) against a local OpenAI-compatible and Anthropic-style
//! stand-in: usage is read from JSON and SSE responses without holding the stream back,
//! `stream_options.include_usage` is injected when configured, and each outcome record carries
//! the exact cost from the per-model price table.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tollgate_tests::harness::{call, eventually, TestProxy};

struct Llm {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Value>>>,
    _rt: tokio::runtime::Runtime,
}

fn sse(events: &[Value]) -> String {
    events
        .iter()
        .map(|e| format!("data: {e}\n\n"))
        .collect::<String>()
        + "data: [DONE]\n\n"
}

impl Llm {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
        let s2 = seen.clone();
        rt.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = s2.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            seen.lock().unwrap().push(v.clone());
                            let stream = v["stream"] == true;
                            let (ct, text) = match (path.as_str(), stream) {
                                ("/v1/chat/completions", false) => ("application/json", json!({"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}}).to_string()),
                                ("/v1/chat/completions", true) => {
                                    let mut ev = vec![json!({"choices": [{"delta": {"content": "h"}}]}), json!({"choices": [{"delta": {"content": "i"}}]})];
                                    // Like OpenAI: usage only when the client asked for it.
                                    if v["stream_options"]["include_usage"] == true {
                                        ev.push(json!({"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 50}}));
                                    }
                                    ("text/event-stream", sse(&ev))
                                }
                                ("/v1/messages", _) => ("text/event-stream", [
                                    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":200,\"output_tokens\":1}}}\n\n",
                                    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\n",
                                    "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":80}}\n\n",
                                    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
                                ].concat()),
                                _ => ("application/json", "{}".to_string()),
                            };
                            let mut r = hyper::Response::new(Full::new(Bytes::from(text)));
                            r.headers_mut().insert("content-type", ct.parse().unwrap());
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Self {
            addr,
            seen,
            _rt: rt,
        }
    }
}

#[test]
fn llm_usage_is_metered_from_json_and_sse_at_the_configured_prices() {
    let llm = Llm::start();
    let a = llm.addr;
    let config = format!(
        r#"
agent: {{name: writer, tenants: [acme]}}
tools:
  - name: openai.chat
    match: {{host: "{a}", methods: [POST], path: /v1/chat/completions}}
    llm: {{provider: openai}}
    cost:
      llm:
        prices: {{gpt-4o: {{promptPerMtok: 2.5, completionPerMtok: 10}}}}
        injectStreamUsage: true
  - name: anthropic.messages
    match: {{host: "{a}", methods: [POST], path: /v1/messages}}
    llm: {{provider: anthropic}}
    cost:
      llm:
        prices: {{claude-sonnet: {{promptPerMtok: 3, completionPerMtok: 15}}}}
tenants:
  acme: {{budgets: {{dayUsd: 5}}}}
audit: {{path: audit.jsonl}}
"#
    );
    let p = TestProxy::start(&config, &[]);
    let post = |path: &str, body: Value| {
        call(
            p.proxy,
            "POST",
            &format!("http://{a}{path}"),
            &[
                ("X-Tollgate-Tenant", "acme"),
                ("Content-Type", "application/json"),
            ],
            Some(&body.to_string()),
        )
    };
    let r = post(
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}),
    );
    assert_eq!(r.status, 200);
    let r = post(
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(r.status, 200);
    assert!(
        r.body_text().contains("\"usage\""),
        "usage chunk reached the client: {}",
        r.body_text()
    );
    let r = post(
        "/v1/messages",
        json!({"model": "claude-sonnet", "stream": true, "max_tokens": 100, "messages": []}),
    );
    assert_eq!(r.status, 200);
    assert!(r.body_text().contains("message_stop"));
    // A model without a price cannot be bounded: refused before it costs anything.
    let r = post(
        "/v1/chat/completions",
        json!({"model": "gpt-unknown", "messages": []}),
    );
    assert_eq!(r.status, 400, "{}", r.body_text());
    assert!(r.body_text().contains("no price"), "{}", r.body_text());
    // The stream request was given include_usage; the upstream saw it.
    let seen = llm.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1]["stream_options"]["include_usage"], true);
    assert!(
        seen[2].get("stream_options").is_none(),
        "not injected into other tools"
    );

    eventually("three outcome records with costs", || {
        p.audit().iter().filter(|r| r["phase"] == "outcome").count() == 3
    });
    let recs = p.audit();
    let outcomes: Vec<_> = recs.iter().filter(|r| r["phase"] == "outcome").collect();
    let cost_of = |tool: &str, n: usize| -> (f64, u64, u64) {
        let r = outcomes
            .iter()
            .filter(|r| r["tool"] == tool)
            .nth(n)
            .unwrap();
        (
            r["cost"]["usd"].as_f64().unwrap(),
            r["cost"]["prompt_tokens"].as_u64().unwrap(),
            r["cost"]["completion_tokens"].as_u64().unwrap(),
        )
    };
    // 100 * 2.5/M + 50 * 10/M = 0.00075
    let (usd, p_t, c_t) = cost_of("openai.chat", 0);
    assert_eq!((p_t, c_t), (100, 50));
    assert!((usd - 0.00075).abs() < 1e-9, "{usd}");
    let (usd, _, _) = cost_of("openai.chat", 1);
    assert!((usd - 0.00075).abs() < 1e-9, "streamed: {usd}");
    // 200 * 3/M + 80 * 15/M = 0.0018
    let (usd, p_t, c_t) = cost_of("anthropic.messages", 0);
    assert_eq!((p_t, c_t), (200, 80));
    assert!((usd - 0.0018).abs() < 1e-9, "{usd}");
    let m = p.metrics();
    let spend = m
        .lines()
        .find(|l| l.starts_with("tollgate_spend_usd_total{"))
        .unwrap();
    let v: f64 = spend.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((v - 0.0033).abs() < 1e-9, "{spend}");
}
