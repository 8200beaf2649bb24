//! Pinned MCP tool definitions (issue 17, item 2) against a real MCP server built with the
//! `mcp` Python SDK (`tests/pins/rugpull_server.py`, gzip-compressed JSON answers) that pulls
//! the rug: it changes a tool's description between two `tools/list` calls.
//!
//! The standalone review loop pins the tool (`tools diff`, `tools pin --sha256`); through the
//! proxy a call before any list is refused (`tool_definition_unverified`), the first list
//! shows the tool and its call runs; after the change the tool is withheld from the list, its
//! call is refused with `tool_definition_changed` and never reaches the server (judged by the
//! server's own record of the calls it executed), the mismatch is counted and on record, an
//! unpinned tool of the same server is unaffected, and `tools diff` shows the change.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use tollgate_operator::testapi::TestApiServer;
use tollgate_tests::harness::{bin, call, eventually, free_port, get, TestProxy};

fn python() -> PathBuf {
    Path::new(&std::env::var("TOLLGATE_CLIENTS").unwrap_or_else(|_| "/opt/tollgate-clients".into()))
        .join("venv/bin/python")
}

/// The MCP server, killed on drop.
struct McpServer {
    child: Child,
    addr: SocketAddr,
}

impl Drop for McpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl McpServer {
    fn start(log: &Path) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("pins/rugpull_server.py");
        assert!(
            python().exists(),
            "the mcp SDK is not installed: run .ci/install-clients.sh"
        );
        let mut child = Command::new(python())
            .arg(script)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "rugpull_server.py did not start: {line}{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            });
        let s = Self {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
        };
        // `ready` is printed before uvicorn accepts.
        eventually("the MCP server accepts", || {
            get(s.addr, "/_test/calls").is_ok_and(|r| r.status == 200)
        });
        s
    }

    /// Every tool call the server executed.
    fn executed(&self) -> Vec<Value> {
        serde_json::from_slice(&get(self.addr, "/_test/calls").unwrap().body).unwrap()
    }

    fn pull_the_rug(&self) {
        let r = tollgate_tests::harness::raw(
            self.addr,
            format!(
                "POST /_test/rugpull HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.addr
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.body_text());
    }
}

/// A JSON-RPC message through the proxy: (HTTP status, the JSON-RPC answer, the raw answer).
fn rpc(p: &TestProxy, server: &McpServer, msg: &Value, gzip: bool) -> (u16, Value) {
    let mut headers = vec![
        ("X-Tollgate-Tenant", "acme"),
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
    ];
    if gzip {
        headers.push(("Accept-Encoding", "gzip"));
    }
    let r = call(
        p.proxy,
        "POST",
        &format!("http://{}/mcp", server.addr),
        &headers,
        Some(&msg.to_string()),
    );
    if gzip {
        // A tools/list answer is decoded to be read, and served decoded.
        assert_eq!(r.header("content-encoding"), None, "{}", r.body_text());
    }
    (r.status, r.json())
}

fn list(p: &TestProxy, server: &McpServer) -> Vec<String> {
    let (status, v) = rpc(
        p,
        server,
        &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}),
        true,
    );
    assert_eq!(status, 200, "{v}");
    v["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("not a tool list: {v}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

fn call_tool(p: &TestProxy, server: &McpServer, name: &str, args: Value) -> Value {
    let (status, v) = rpc(
        p,
        server,
        &json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": name, "arguments": args}}),
        false,
    );
    assert_eq!(status, 200, "{v}");
    v
}

/// `tollgate-proxy tools …`: (exit code, stdout, stderr).
fn tools(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("tollgate-proxy"))
        .arg("tools")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn advertised_hash(diff_output: &str) -> String {
    diff_output
        .lines()
        .find_map(|l| l.strip_prefix("advertised: sha256 "))
        .unwrap_or_else(|| panic!("no advertised hash in: {diff_output}"))
        .trim()
        .to_string()
}

#[test]
fn a_changed_tool_definition_is_withheld_and_its_calls_refused() {
    let work = tempfile::tempdir().unwrap();
    let server = McpServer::start(&work.path().join("mcp.log"));
    let a = server.addr;
    let cfg_path = work.path().join("tollgate.yaml");
    std::fs::write(
        &cfg_path,
        format!(
            r#"
agent: {{name: support, tenants: [acme]}}
tools:
  - name: orders.lookup
    match: {{host: "{a}", path: /mcp, mcpTool: lookup_order}}
  - name: service.status
    match: {{host: "{a}", path: /mcp, mcpTool: status}}
audit: {{path: audit.jsonl}}
"#
        ),
    )
    .unwrap();
    let cfg = cfg_path.to_str().unwrap();

    // Review: not pinned yet; the diff shows what the server advertises and its hash.
    let (code, out, err) = tools(&["diff", "--config", cfg, "--tool", "orders.lookup"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("(not pinned)") && out.contains("Look up an order by its id."),
        "{out}{err}"
    );
    let honest = advertised_hash(&out);
    // Pinning a hash other than the one advertised (not what was reviewed) is refused.
    let (code, _, err) = tools(&[
        "pin",
        "--config",
        cfg,
        "--tool",
        "orders.lookup",
        "--sha256",
        &"0".repeat(64),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not the"), "{err}");
    let (code, out, err) = tools(&[
        "pin",
        "--config",
        cfg,
        "--tool",
        "orders.lookup",
        "--sha256",
        &honest,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = tools(&["diff", "--config", cfg, "--tool", "orders.lookup"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("advertises the pinned definition"), "{out}");
    let pinned_config = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(pinned_config.contains(&honest), "{pinned_config}");

    let p = TestProxy::start(&pinned_config, &[]);

    // Before this sidecar saw the tool advertised, a pinned tool's call is refused.
    let v = call_tool(&p, &server, "lookup_order", json!({"order": "A0"}));
    assert_eq!(
        v["error"]["data"]["error"], "tool_definition_unverified",
        "{v}"
    );

    // The honest list: the tool is listed and its call runs.
    assert_eq!(list(&p, &server), ["lookup_order", "status"]);
    let v = call_tool(&p, &server, "lookup_order", json!({"order": "A1"}));
    assert!(
        v["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("A1"),
        "{v}"
    );

    // The rug pull: same tool, a description that tells the model to exfiltrate a key.
    server.pull_the_rug();
    assert_eq!(
        list(&p, &server),
        ["status"],
        "the changed tool is withheld"
    );
    let v = call_tool(&p, &server, "lookup_order", json!({"order": "A2"}));
    assert_eq!(
        v["error"]["data"]["error"], "tool_definition_changed",
        "{v}"
    );
    let reason = v["error"]["data"]["reason"].as_str().unwrap();
    assert!(reason.contains(&honest), "{reason}");
    // The unpinned tool of the same server still works.
    let v = call_tool(&p, &server, "status", json!({}));
    assert!(v["result"].is_object(), "{v}");

    // Judged by what the server executed: A1 and status, never A0 nor A2.
    let executed = server.executed();
    assert_eq!(
        executed,
        vec![
            json!({"tool": "lookup_order", "order": "A1"}),
            json!({"tool": "status"})
        ],
        "the server executed a refused call"
    );

    // Counted: one mismatching list.
    let m = p.metrics();
    assert!(
        m.contains(
            r#"tollgate_tool_definition_mismatch_total{agent="support",tool="orders.lookup"} 1"#
        ),
        "{m}"
    );
    // On record: the withheld tool (advertised hash, what changed, the advertised
    // definition) and the refused calls.
    let audit = p.audit();
    let withheld: Vec<&Value> = audit
        .iter()
        .filter(|r| {
            r["tool"] == "orders.lookup"
                && r["reasons"][0].as_str().is_some_and(|s| {
                    s.starts_with("tool_definition_changed: the server advertised")
                })
        })
        .collect();
    assert_eq!(withheld.len(), 1, "{audit:#?}");
    let w = withheld[0];
    assert_eq!(w["decision"], "deny");
    assert_ne!(w["input_hash"], honest.as_str());
    assert_eq!(w["input"]["pinned_sha256"], honest.as_str());
    assert!(
        w["input"]["advertised_definition"]["description"]
            .as_str()
            .unwrap()
            .contains("~/.ssh/id_rsa"),
        "{w}"
    );
    assert!(
        w["reasons"][1]
            .as_str()
            .unwrap()
            .starts_with("description changed"),
        "{w}"
    );
    let refused: Vec<&Value> = audit
        .iter()
        .filter(|r| {
            r["tool"] == "orders.lookup"
                && r["decision"] == "deny"
                && r["reasons"][0].as_str().is_some_and(|s| {
                    s.contains(
                        "sha256 {honest} was pinned"
                            .replace("{honest}", &honest)
                            .as_str(),
                    )
                })
        })
        .collect();
    assert_eq!(refused.len(), 1, "{audit:#?}");

    // The review loop sees the change: a line diff of the description.
    let (code, out, _) = tools(&["diff", "--config", cfg, "--tool", "orders.lookup"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with('-') && l.contains("\"Look up an order by its id.\"")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with('+') && l.contains("~/.ssh/id_rsa")),
        "{out}"
    );
}

/// The operator binary against the in-process test API server (no Kubernetes API server runs
/// here), killed on drop.
const GV: &str = "tollgate.dev/v1alpha1";

fn pinned_condition(api: &TestApiServer) -> Option<(String, String)> {
    let t = api.get(GV, "tools", "agents", "orders-lookup")?;
    let c = t["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "DefinitionPinned")?
        .clone();
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
    ))
}

/// In a cluster: the sidecar reports what its server advertises; the operator keeps it in the
/// Tool's status, `kubectl tollgate tools pin` pins it after review, the condition says
/// `Matches`; after the rug pull the sidecar withholds the tool, and the Tool goes
/// `DefinitionChanged` with a Warning Event, and `kubectl tollgate tools diff` shows the change.
#[test]
fn in_a_cluster_the_tool_status_and_events_follow_the_advertised_definition() {
    let dir = tempfile::tempdir().unwrap();
    let server = McpServer::start(&dir.path().join("mcp.log"));
    let api = TestApiServer::start();
    api.add_token(
        "tok-support",
        "system:serviceaccount:agents:support-agent",
        &["tollgate"],
    );
    api.put(
        "tenants",
        json!({"apiVersion": GV, "kind": "Tenant", "metadata": {"name": "acme"}, "spec": {}}),
    );
    api.put("tools", json!({"apiVersion": GV, "kind": "Tool", "metadata": {"name": "orders-lookup", "namespace": "agents"},
        "spec": {"match": {"host": server.addr.to_string(), "path": "/mcp", "mcpTool": "lookup_order"}}}));
    api.put("agentidentities", json!({"apiVersion": GV, "kind": "AgentIdentity", "metadata": {"name": "support", "namespace": "agents"},
        "spec": {"serviceAccount": "support-agent", "tenants": ["acme"], "tools": ["orders-lookup"]}}));
    let op = tollgate_tests::operator::Operator::start(&api, dir.path());
    let sdir = tempfile::tempdir().unwrap();
    std::fs::write(sdir.path().join("token"), "tok-support").unwrap();
    let (pp, ap) = (free_port(), free_port());
    let token_file = sdir.path().join("token").display().to_string();
    let url = format!("http://127.0.0.1:{}", op.port);
    let sidecar = TestProxy::start_custom(
        sdir,
        &format!("listen: {{proxy: \"127.0.0.1:{pp}\", admin: \"127.0.0.1:{ap}\"}}\nagent: {{name: local, tenants: []}}\naudit: {{path: audit.jsonl}}\n"),
        format!("127.0.0.1:{pp}").parse().unwrap(),
        format!("127.0.0.1:{ap}").parse().unwrap(),
        &[],
        &[
            ("TOLLGATE_OPERATOR", url.as_str()),
            ("TOLLGATE_AGENT", "agents/support"),
            ("TOLLGATE_TOKEN_FILE", token_file.as_str()),
        ],
    );

    // Unpinned: listed, and what the server advertises reaches the Tool's status.
    eventually("the snapshot serves the tool", || {
        let (_, v) = rpc(
            &sidecar,
            &server,
            &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
            true,
        );
        v["result"]["tools"]
            .as_array()
            .is_some_and(|t| t.len() == 1)
    });
    eventually("observedDefinition in the Tool status", || {
        api.get(GV, "tools", "agents", "orders-lookup")
            .is_some_and(|t| {
                t["status"]["observedDefinition"]["definition"]["description"]
                    == "Look up an order by its id."
            })
    });
    let (ok, out) = tollgate_tests::operator::kubectl_tollgate(
        dir.path(),
        &["-n", "agents", "tools", "diff", "orders-lookup"],
    );
    assert!(!ok && out.contains("(not pinned)"), "{out}");
    let honest = out
        .lines()
        .find_map(|l| l.strip_prefix("observed: sha256 "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("{out}"))
        .to_string();
    let (ok, out) = tollgate_tests::operator::kubectl_tollgate(
        dir.path(),
        &[
            "-n",
            "agents",
            "tools",
            "pin",
            "orders-lookup",
            "--sha256",
            &"f".repeat(64),
        ],
    );
    assert!(!ok && out.contains("you reviewed"), "{out}");
    let (ok, out) = tollgate_tests::operator::kubectl_tollgate(
        dir.path(),
        &[
            "-n",
            "agents",
            "tools",
            "pin",
            "orders-lookup",
            "--sha256",
            &honest,
        ],
    );
    assert!(ok, "{out}");
    let tool = api.get(GV, "tools", "agents", "orders-lookup").unwrap();
    assert_eq!(tool["spec"]["pin"]["sha256"], honest.as_str());
    assert_eq!(
        tool["spec"]["pin"]["definition"]["description"],
        "Look up an order by its id."
    );
    eventually("DefinitionPinned True/Matches", || {
        pinned_condition(&api) == Some(("True".into(), "Matches".into()))
    });
    // The pinned snapshot reached the sidecar: the call runs.
    eventually("the pinned tool is callable", || {
        rpc(
            &sidecar,
            &server,
            &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
            true,
        );
        call_tool(&sidecar, &server, "lookup_order", json!({"order": "C1"}))["result"].is_object()
    });

    // The rug pull: withheld by the sidecar, DefinitionChanged with a Warning Event.
    server.pull_the_rug();
    let (_, v) = rpc(
        &sidecar,
        &server,
        &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
        true,
    );
    assert_eq!(v["result"]["tools"], json!([]), "{v}");
    let v = call_tool(&sidecar, &server, "lookup_order", json!({"order": "C2"}));
    assert_eq!(
        v["error"]["data"]["error"], "tool_definition_changed",
        "{v}"
    );
    assert!(!server.executed().iter().any(|c| c["order"] == "C2"));
    eventually("DefinitionPinned False/DefinitionChanged", || {
        pinned_condition(&api) == Some(("False".into(), "DefinitionChanged".into()))
    });
    eventually("a Warning Event on the Tool", || {
        api.list("events.k8s.io/v1", "events").iter().any(|e| {
            e["reason"] == "DefinitionChanged"
                && e["type"] == "Warning"
                && e["regarding"]["kind"] == "Tool"
                && e["regarding"]["name"] == "orders-lookup"
                && e["note"].as_str().is_some_and(|n| n.contains(&honest))
        })
    });
    let (ok, out) = tollgate_tests::operator::kubectl_tollgate(
        dir.path(),
        &["-n", "agents", "tools", "diff", "orders-lookup"],
    );
    assert!(!ok, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with('+') && l.contains("~/.ssh/id_rsa")),
        "{out}"
    );
    drop(op);
}
