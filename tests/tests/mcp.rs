//! MCP over streamable HTTP through the proxy (issue 4), against a small real MCP server:
//! session methods pass, `tools/list` is filtered to the agent's tools, an allowed call is
//! forwarded with its arguments as the policy input, a denied one becomes a JSON-RPC error
//! with the same reason, a batch with one bad element is refused whole, methods outside tools
//! are refused, and an SSE result streams through without being buffered.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use tollgate_tests::harness::{call, TestProxy};

/// A minimal MCP server: JSON answers, and an SSE answer for the `stream` tool whose second
/// event waits for `release`.
struct McpServer {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<Value>>>,
    release: Arc<Notify>,
    _rt: tokio::runtime::Runtime,
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

impl McpServer {
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
        let calls: Arc<Mutex<Vec<Value>>> = Arc::default();
        let release = Arc::new(Notify::new());
        let (c2, r2) = (calls.clone(), release.clone());
        rt.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (calls, release) = (c2.clone(), r2.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (calls, release) = (calls.clone(), release.clone());
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let msg: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            calls.lock().unwrap().push(msg.clone());
                            Ok::<_, std::convert::Infallible>(answer(&msg, release))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            calls,
            release,
            _rt: rt,
        }
    }

    fn methods(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|m| m["method"].as_str().unwrap_or("?").to_string())
            .collect()
    }
}

fn answer(msg: &Value, release: Arc<Notify>) -> hyper::Response<Body> {
    let id = msg["id"].clone();
    let json_res = |result: Value| {
        let body = json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string();
        let mut r = hyper::Response::new(Full::new(Bytes::from(body)).boxed());
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    };
    match msg["method"].as_str() {
        Some("initialize") => json_res(
            json!({"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}, "serverInfo": {"name": "helpdesk", "version": "1"}}),
        ),
        Some("tools/list") => {
            // Answered as SSE, as streamable HTTP servers may.
            let list = json!({"jsonrpc": "2.0", "id": id, "result": {"tools": [
                {"name": "search_tickets", "inputSchema": {"type": "object"}},
                {"name": "delete_all_tickets", "inputSchema": {"type": "object"}},
                {"name": "create_ticket", "inputSchema": {"type": "object"}},
                {"name": "stream_report", "inputSchema": {"type": "object"}}
            ]}});
            let body = format!("event: message\ndata: {list}\n\n");
            let mut r = hyper::Response::new(Full::new(Bytes::from(body)).boxed());
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        }
        Some("tools/call") if msg["params"]["name"] == "stream_report" => {
            let first = format!(
                "event: message\ndata: {}\n\n",
                json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}})
            );
            let last = format!(
                "event: message\ndata: {}\n\n",
                json!({"jsonrpc": "2.0", "id": id, "result": {"content": [{"type": "text", "text": "report done"}]}})
            );
            let stream = futures::stream::unfold(0u8, move |state| {
                let (first, last, release) = (first.clone(), last.clone(), release.clone());
                async move {
                    match state {
                        0 => Some((Ok(Frame::data(Bytes::from(first))), 1)),
                        1 => {
                            release.notified().await;
                            Some((Ok(Frame::data(Bytes::from(last))), 2))
                        }
                        _ => None,
                    }
                }
            });
            let mut r = hyper::Response::new(StreamBody::new(stream).boxed());
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        }
        Some("tools/call") => json_res(
            json!({"content": [{"type": "text", "text": format!("ran {}", msg["params"]["name"])}]}),
        ),
        _ => json_res(json!({})),
    }
}

fn setup() -> (McpServer, TestProxy) {
    let server = McpServer::start();
    let a = server.addr;
    let config = format!(
        r#"
agent: {{name: support, tenants: [acme]}}
tools:
  - name: helpdesk.search
    match: {{host: "{a}", path: /mcp, mcpTool: search_tickets}}
  - name: helpdesk.create
    match: {{host: "{a}", path: /mcp, mcpTool: create_ticket}}
    inputSchema:
      type: object
      required: [subject]
      properties: {{subject: {{type: string}}, priority: {{enum: [low, normal, high]}}}}
  - name: helpdesk.report
    match: {{host: "{a}", path: /mcp, mcpTool: stream_report}}
audit: {{path: audit.jsonl}}
policies:
  modules:
    - name: tickets.rego
      rego: |
        package tollgate
        import rego.v1
        deny contains "high-priority tickets must be opened by a human" if {{
          input.tool.name == "helpdesk.create"
          input.request.body.priority == "high"
        }}
"#
    );
    let proxy = TestProxy::start(&config, &[]);
    (server, proxy)
}

fn rpc(p: &TestProxy, server: &McpServer, msg: &Value) -> (u16, Value, String) {
    let r = call(
        p.proxy,
        "POST",
        &format!("http://{}/mcp", server.addr),
        &[
            ("X-Tollgate-Tenant", "acme"),
            ("Content-Type", "application/json"),
            ("Accept", "application/json, text/event-stream"),
        ],
        Some(&msg.to_string()),
    );
    (r.status, r.json(), r.body_text())
}

fn tool_call(id: u64, name: &str, args: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": name, "arguments": args}})
}

#[test]
fn mcp_sessions_lists_calls_refusals_and_batches() {
    let (server, p) = setup();
    let (status, v, _) = rpc(
        &p,
        &server,
        &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}),
    );
    assert_eq!(status, 200);
    assert_eq!(v["result"]["serverInfo"]["name"], "helpdesk");
    let (status, _, _) = rpc(
        &p,
        &server,
        &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    );
    assert_eq!(status, 200);

    // tools/list (SSE) is filtered to the agent's tools.
    let (status, _, text) = rpc(
        &p,
        &server,
        &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    );
    assert_eq!(status, 200);
    assert!(
        text.contains("search_tickets") && text.contains("create_ticket"),
        "{text}"
    );
    assert!(
        !text.contains("delete_all_tickets"),
        "unlisted tools are hidden: {text}"
    );

    // Allowed call.
    let (status, v, _) = rpc(
        &p,
        &server,
        &tool_call(3, "search_tickets", json!({"q": "refund"})),
    );
    assert_eq!(status, 200);
    assert_eq!(v["result"]["content"][0]["text"], "ran \"search_tickets\"");

    let before = server.methods().len();
    // Denied by policy on the arguments: a JSON-RPC error with the policy's reason.
    let (status, v, _) = rpc(
        &p,
        &server,
        &tool_call(
            4,
            "create_ticket",
            json!({"subject": "x", "priority": "high"}),
        ),
    );
    assert_eq!(status, 200, "MCP clients read JSON-RPC errors");
    assert_eq!(v["id"], 4);
    assert_eq!(v["error"]["code"], -32001);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("policy_denied")
            && msg.contains("high-priority tickets must be opened by a human"),
        "{msg}"
    );
    // Arguments failing the tool's input schema.
    let (_, v, _) = rpc(
        &p,
        &server,
        &tool_call(5, "create_ticket", json!({"priority": "low"})),
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid_input"),
        "{v}"
    );
    // A tool the agent does not have.
    let (_, v, _) = rpc(&p, &server, &tool_call(6, "delete_all_tickets", json!({})));
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown_tool")),
        "{v}"
    );
    // Methods outside tools and the session are refused.
    let (_, v, _) = rpc(
        &p,
        &server,
        &json!({"jsonrpc": "2.0", "id": 7, "method": "resources/read", "params": {"uri": "file:///etc/passwd"}}),
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not forwarded"),
        "{v}"
    );
    // A batch with one denied element is refused whole, one error per element.
    let batch = json!([
        tool_call(8, "search_tickets", json!({"q": "a"})),
        tool_call(
            9,
            "create_ticket",
            json!({"subject": "y", "priority": "high"})
        )
    ]);
    let (status, v, _) = rpc(&p, &server, &batch);
    assert_eq!(status, 200);
    let errs = v.as_array().expect("a batch gets a batch of errors");
    assert_eq!(errs.len(), 2);
    assert_eq!(errs[0]["id"], 8);
    assert_eq!(errs[1]["id"], 9);
    assert!(errs[1]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("high-priority"));
    // A batch smuggling a hidden tool behind an allowed one.
    let sneaky = json!([
        tool_call(10, "search_tickets", json!({"q": "a"})),
        tool_call(11, "delete_all_tickets", json!({}))
    ]);
    let (_, v, _) = rpc(&p, &server, &sneaky);
    assert!(
        v.as_array()
            .is_some_and(|a| a.iter().all(|e| e["error"].is_object())),
        "{v}"
    );
    assert_eq!(
        server.methods().len(),
        before,
        "no refused message reached the server"
    );
    // A batch of allowed calls passes.
    let ok = json!([
        tool_call(12, "search_tickets", json!({"q": "a"})),
        tool_call(
            13,
            "create_ticket",
            json!({"subject": "z", "priority": "low"})
        )
    ]);
    let (status, _, _) = rpc(&p, &server, &ok);
    assert_eq!(status, 200);
    assert_eq!(server.methods().len(), before + 1);

    let recs = p.audit();
    assert!(
        recs.iter().any(|r| r["tool"] == "helpdesk.create"
            && r["decision"] == "deny"
            && r["input"]["request"]["body"]["priority"] == "high"),
        "the MCP arguments are the policy input"
    );
}

#[test]
fn sse_results_stream_through_unbuffered() {
    let (server, p) = setup();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(p.proxy).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let body = tool_call(1, "stream_report", json!({})).to_string();
        let req = hyper::Request::post(format!("http://{}/mcp", server.addr))
            .header("host", server.addr.to_string())
            .header("x-tollgate-tenant", "acme")
            .header("content-type", "application/json")
            .header("accept", "text/event-stream")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let res = sender.send_request(req).await.unwrap();
        assert_eq!(res.status(), 200);
        let mut body = res.into_body();
        // The first event arrives while the server still holds the second: not buffered.
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("\n\n") {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(20), body.frame())
                .await
                .expect("the first event must arrive before the stream ends")
                .unwrap()
                .unwrap();
            if let Ok(d) = frame.into_data() {
                got.extend_from_slice(&d);
            }
        }
        let first = String::from_utf8_lossy(&got).into_owned();
        assert!(
            first.contains("notifications/progress") && !first.contains("report done"),
            "{first}"
        );
        server.release.notify_one();
        let rest = body.collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&rest).contains("report done"));
    });
}
