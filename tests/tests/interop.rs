//! Interop (issue 14): the real client libraries agents use, at the pinned versions that
//! `.ci/install-clients.sh` installs (official `openai`, `anthropic` and `mcp` Python SDKs,
//! `requests`, `httpx`, `aiohttp`, Node's fetch with undici's ProxyAgent), through Tollgate in
//! base-URL, forward-proxy and CONNECT-interception modes, against stand-in upstreams on
//! loopback that answer like the real APIs: gzip-compressed JSON and SSE, real streams, long
//! and stalled streams, and an MCP server built with the `mcp` SDK itself (current and
//! previous protocol revisions, gzip, notifications and a server-initiated request on the
//! stream).
//!
//! Each case asserts what the library observed (parsed answer, exception text, stream chunks)
//! against what Tollgate recorded (decision, exact token counts, cost, how a cut stream
//! ended). The README's supported-clients table is checked against [`CASES`].

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use tollgate_tests::harness::{bin, eventually, TestPki, TestProxy};

/// Every case the suite runs: (library, case in clients.py, mode, what it proves).
const CASES: &[(&str, &str, &str, &str)] = &[
    (
        "openai (Python)",
        "openai.chat",
        "base_url",
        "chat/completions, gzip JSON, exact usage",
    ),
    (
        "openai (Python)",
        "openai.chat_stream",
        "forward",
        "streamed chat, usage injected and metered",
    ),
    (
        "openai (Python)",
        "openai.responses_stream",
        "connect",
        "responses API stream, usage from response.completed",
    ),
    (
        "openai (Python)",
        "openai.refusal",
        "base_url",
        "refusal reason in the exception text",
    ),
    (
        "openai (Python)",
        "openai.stream_cut",
        "base_url",
        "stalled stream ends with an error the SDK raises",
    ),
    (
        "anthropic (Python)",
        "anthropic.messages",
        "connect",
        "messages, gzip JSON, exact usage",
    ),
    (
        "anthropic (Python)",
        "anthropic.stream",
        "forward",
        "streamed messages, nothing injected",
    ),
    (
        "anthropic (Python)",
        "anthropic.refusal",
        "base_url",
        "refusal reason in the exception text",
    ),
    (
        "anthropic (Python)",
        "anthropic.stream_cut",
        "base_url",
        "stream past timeouts.total ends with an error event",
    ),
    (
        "requests",
        "requests.gemini",
        "forward",
        "Gemini generateContent, gzip JSON",
    ),
    (
        "httpx",
        "httpx.gemini_stream",
        "connect",
        "Gemini streamGenerateContent SSE",
    ),
    (
        "httpx",
        "httpx.compressed_sse",
        "base_url",
        "OpenAI-compatible (vLLM) gzip-compressed SSE",
    ),
    (
        "aiohttp",
        "aiohttp.gemini",
        "base_url",
        "Gemini generateContent, gzip JSON",
    ),
    (
        "undici (Node fetch)",
        "undici.chat",
        "forward",
        "ProxyAgent, gzip JSON",
    ),
    (
        "mcp (Python)",
        "mcp.current",
        "forward",
        "2026-07-28 (server/discover), list filtered, call, refusal",
    ),
    (
        "mcp (Python)",
        "mcp.previous",
        "base_url",
        "2025-11-25 session, GET stream, roots/list from the server, DELETE",
    ),
];

/// (prompt, completion) USD per million tokens, as configured below.
fn price(model: &str) -> (f64, f64) {
    match model {
        "gpt-4o" | "stall-1" => (2.5, 10.0),
        "claude-sonnet" | "long-claude" => (3.0, 15.0),
        "gemini-flash" => (0.3, 2.5),
        "llama-3" => (0.1, 0.2),
        m => panic!("no price for {m}"),
    }
}

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("interop")
}

/// The clients' virtualenv and node prefix (see `.ci/install-clients.sh`).
fn clients_prefix() -> PathBuf {
    let p = PathBuf::from(
        std::env::var("TOLLGATE_CLIENTS").unwrap_or_else(|_| "/opt/tollgate-clients".into()),
    );
    assert!(
        p.join("venv/bin/python").exists(),
        "{} is missing: run .ci/install-clients.sh (CI runs it from .ci/install-tools.sh)",
        p.display()
    );
    p
}

fn python() -> PathBuf {
    clients_prefix().join("venv/bin/python")
}

/// A child process killed on drop.
struct Server(Child, Vec<u16>);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start a Python stand-in and read its `ready <ports>` line.
fn start_python(script: &str, args: &[&str], log: &Path) -> Server {
    let mut child = Command::new(python())
        .arg(interop_dir().join(script))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ports: Vec<u16> = line
        .strip_prefix("ready ")
        .unwrap_or_else(|| {
            panic!(
                "{script} did not start: {line}{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        })
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    Server(child, ports)
}

/// The key the interop proxy verifies runs with: the suite plays the orchestrator, so each
/// case runs under its own run id and its records can be found.
const RUN_KEY: &str = "interop-orchestrator-run-key";

/// The signed run id of a case.
fn run_of(case: &str) -> String {
    let nonce = case.replace('@', ".");
    let mac = tollgate_proxy::identify::sign(RUN_KEY.as_bytes(), &nonce);
    format!("run_{nonce}.{mac}")
}

struct Setup {
    proxy: TestProxy,
    _standin: Server,
    _mcp: Server,
    cfg: Value,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = TestPki::new();
    std::fs::write(d.join("up.crt"), &pki.leaf_pem).unwrap();
    std::fs::write(d.join("up.key"), &pki.leaf_key_pem).unwrap();
    std::fs::write(d.join("up-ca.pem"), &pki.ca_pem).unwrap();
    let out = Command::new(bin("tollgate-proxy"))
        .args(["ca", "init", "--out"])
        .arg(d.join("ca"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let standin = start_python(
        "standin.py",
        &[
            "--cert",
            d.join("up.crt").to_str().unwrap(),
            "--key",
            d.join("up.key").to_str().unwrap(),
        ],
        &d.join("standin.log"),
    );
    let mcp = start_python("mcp_server.py", &[], &d.join("mcp.log"));
    let (p, tls, m) = (standin.1[0], standin.1[1], mcp.1[0]);
    let mut tools = String::new();
    for (host, sfx) in [
        (format!("127.0.0.1:{p}"), ""),
        (format!("localhost:{tls}"), ".tls"),
    ] {
        tools += &format!(
            r#"
  - name: openai.chat{sfx}
    match: {{host: "{host}", methods: [POST], path: /v1/chat/completions}}
    llm: {{provider: openai}}
    credentials: {{header: Authorization, prefix: "Bearer ", valueFrom: {{env: OPENAI_KEY}}}}
    cost: {{llm: {{prices: {{gpt-4o: {{promptPerMtok: 2.5, completionPerMtok: 10}}, stall-1: {{promptPerMtok: 2.5, completionPerMtok: 10}}, gpt-forbidden: {{promptPerMtok: 1, completionPerMtok: 1}}}}, injectStreamUsage: true}}}}
    timeouts: {{total: 20s, idle: 1s}}
  - name: openai.responses{sfx}
    match: {{host: "{host}", methods: [POST], path: /v1/responses}}
    llm: {{provider: openai}}
    credentials: {{header: Authorization, prefix: "Bearer ", valueFrom: {{env: OPENAI_KEY}}}}
    cost: {{llm: {{prices: {{gpt-4o: {{promptPerMtok: 2.5, completionPerMtok: 10}}}}, injectStreamUsage: true}}}}
  - name: anthropic.messages{sfx}
    match: {{host: "{host}", methods: [POST], path: /v1/messages}}
    llm: {{provider: anthropic}}
    credentials: {{header: x-api-key, valueFrom: {{env: ANTHROPIC_KEY}}}}
    cost: {{llm: {{prices: {{claude-sonnet: {{promptPerMtok: 3, completionPerMtok: 15}}, long-claude: {{promptPerMtok: 3, completionPerMtok: 15}}, claude-forbidden: {{promptPerMtok: 1, completionPerMtok: 1}}}}}}}}
    timeouts: {{total: 2s, idle: 1s}}
  - name: gemini.generate{sfx}
    match: {{host: "{host}", methods: [POST], path: "/v1beta/models/{{model}}"}}
    llm: {{provider: gemini}}
    credentials: {{header: x-goog-api-key, valueFrom: {{env: GEMINI_KEY}}}}
    cost: {{llm: {{prices: {{gemini-flash: {{promptPerMtok: 0.3, completionPerMtok: 2.5}}}}}}}}
"#
        );
    }
    let config = format!(
        r#"
agent: {{name: interop, tenants: [acme], runs: {{keyFrom: {{env: RUN_KEY}}}}}}
upstreams:
  openai: http://127.0.0.1:{p}
  anthropic: http://127.0.0.1:{p}
  gemini: http://127.0.0.1:{p}
  vllm: http://localhost:{p}
  mcp: http://127.0.0.1:{m}
tools:
{tools}
  - name: vllm.chat
    match: {{host: "localhost:{p}", methods: [POST], path: /v1/chat/completions}}
    llm: {{provider: openai-compatible}}
    request: {{forwardHeaders: [x-standin-compress]}}
    credentials: {{header: Authorization, prefix: "Bearer ", valueFrom: {{env: OPENAI_KEY}}}}
    cost: {{llm: {{prices: {{llama-3: {{promptPerMtok: 0.1, completionPerMtok: 0.2}}}}}}}}
  - name: kb.search
    match: {{host: "127.0.0.1:{m}", mcpTool: search}}
  - name: kb.roots
    match: {{host: "127.0.0.1:{m}", mcpTool: whoami_roots}}
tenants:
  acme: {{budgets: {{dayUsd: 50}}}}
tls:
  extraCaFile: {up_ca}
  intercept: {{caCert: {ca}/ca.crt, caKey: {ca}/ca.key}}
server: {{connectPorts: [{tls}]}}
audit: {{path: audit.jsonl}}
policies:
  modules:
    - name: models.rego
      rego: |
        package tollgate
        import rego.v1
        deny contains sprintf("model %s is not allowed for this agent", [input.request.body.model]) if endswith(input.request.body.model, "-forbidden")
"#,
        up_ca = d.join("up-ca.pem").display(),
        ca = d.join("ca").display(),
    );
    let cfg = json!({
        "standin": p, "standin_tls": tls, "mcp": m,
        "ca": d.join("ca/ca.crt").display().to_string(),
    });
    let proxy = TestProxy::start_in(
        dir,
        &config,
        &[
            ("OPENAI_KEY", "sk-real-openai"),
            ("ANTHROPIC_KEY", "sk-ant-real"),
            ("GEMINI_KEY", "gm-real"),
            ("RUN_KEY", RUN_KEY),
        ],
    );
    let mut cfg = cfg;
    cfg["proxy"] = proxy.proxy.to_string().into();
    Setup {
        proxy,
        _standin: standin,
        _mcp: mcp,
        cfg,
    }
}

/// Run cases through clients.py; returns each case's result line.
fn run_cases(s: &Setup, cases: &[String]) -> Vec<Value> {
    let mut cfg = s.cfg.clone();
    cfg["cases"] = json!(cases);
    let runs: serde_json::Map<String, Value> = cases
        .iter()
        .map(|c| (c.clone(), run_of(c).into()))
        .collect();
    cfg["runs"] = Value::Object(runs);
    let out = Command::new(python())
        .arg(interop_dir().join("clients.py"))
        .arg(cfg.to_string())
        .env(
            "TOLLGATE_NODE_PATH",
            clients_prefix().join("node/node_modules"),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let results: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        results.len(),
        cases.len(),
        "clients.py: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    results
}

fn records(p: &TestProxy, run: &str) -> Vec<Value> {
    p.audit().into_iter().filter(|r| r["run"] == run).collect()
}

fn outcome(p: &TestProxy, run: &str) -> Value {
    eventually(&format!("an outcome record for {run}"), || {
        records(p, run).iter().any(|r| r["phase"] == "outcome")
    });
    records(p, run)
        .into_iter()
        .find(|r| r["phase"] == "outcome")
        .unwrap()
}

/// The recorded tokens and cost are the ones the library saw.
fn assert_metered(p: &TestProxy, run: &str, model: &str, o: &Value) {
    let rec = outcome(p, run);
    assert_eq!(rec["decision"], "allow", "{rec}");
    let (pt, ct) = (
        o["prompt_tokens"].as_u64().unwrap(),
        o["completion_tokens"].as_u64().unwrap(),
    );
    assert_eq!(
        (
            rec["cost"]["prompt_tokens"].as_u64(),
            rec["cost"]["completion_tokens"].as_u64()
        ),
        (Some(pt), Some(ct)),
        "{run}: Tollgate recorded the usage the client saw: {rec}"
    );
    let (pp, cp) = price(model);
    let usd = (pt as f64 * pp + ct as f64 * cp) / 1e6;
    let got = rec["cost"]["usd"].as_f64().unwrap();
    assert!((got - usd).abs() < 2e-6, "{run}: cost {got} != {usd}");
    assert!(rec.get("cut").is_none(), "{rec}");
}

fn check(s: &Setup, result: &Value) -> Result<(), String> {
    let case = result["case"].as_str().unwrap();
    let run = run_of(case);
    if result["ok"] != true {
        return Err(format!(
            "{case}: {}\n{}",
            result["error"],
            result["trace"].as_str().unwrap_or("")
        ));
    }
    let o = &result["observed"];
    let p = &s.proxy;
    let name = case.split('@').next().unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match name {
        "openai.chat" | "openai.chat_stream" | "openai.responses_stream" | "undici.chat" => {
            assert!(
                o["text"]
                    .as_str()
                    .unwrap_or("Tollgate")
                    .contains("Tollgate"),
                "{o}"
            );
            assert_metered(p, &run, "gpt-4o", o);
            if name != "openai.chat" && name != "undici.chat" {
                assert!(
                    o["chunks"].as_u64().unwrap() >= 8,
                    "streamed in pieces: {o}"
                );
            }
            if name == "undici.chat" {
                assert_eq!(
                    o["encoding"], "gzip",
                    "undici got the labelled gzip body: {o}"
                );
            }
        }
        "anthropic.messages" | "anthropic.stream" => {
            assert!(
                o["text"].as_str().unwrap().starts_with("Tollgate checked"),
                "{o}"
            );
            assert_metered(p, &run, "claude-sonnet", o);
        }
        "requests.gemini" | "aiohttp.gemini" | "httpx.gemini_stream" => {
            assert_metered(p, &run, "gemini-flash", o);
            if name != "httpx.gemini_stream" {
                assert_eq!(o["encoding"], "gzip", "{o}");
            }
        }
        "httpx.compressed_sse" => {
            assert_eq!(o["encoding"], "gzip", "{o}");
            assert_metered(p, &run, "llama-3", o);
        }
        "openai.refusal" | "anthropic.refusal" => {
            let text = o["text"].as_str().unwrap();
            assert_eq!(o["exception"], "PermissionDeniedError", "{o}");
            assert!(
                text.contains("-forbidden is not allowed for this agent")
                    && text.contains("policy_denied"),
                "the human reason reaches the exception text: {text}"
            );
            let recs = records(p, &run);
            assert!(recs.iter().any(|r| r["decision"] == "deny"), "{recs:?}");
        }
        "openai.stream_cut" | "anthropic.stream_cut" => {
            let (label, model, knob) = if name == "openai.stream_cut" {
                ("idle_timeout", "stall-1", "timeouts.idle")
            } else {
                ("total_timeout", "long-claude", "timeouts.total")
            };
            let text = o["text"].as_str().unwrap();
            assert!(text.contains(knob) && text.contains("incomplete"), "{text}");
            let delivered = o["delivered"].as_str().unwrap().chars().count() as u64;
            assert!(o["chunks"].as_u64().unwrap() >= 1, "{o}");
            let rec = outcome(p, &run);
            assert_eq!(rec["cut"], label, "recorded as cut: {rec}");
            // Charged on what was delivered (4 characters a token), not the estimate.
            let ct = rec["cost"]["completion_tokens"].as_u64().unwrap();
            assert_eq!(ct, delivered.div_ceil(4), "{rec}");
            let pt = rec["cost"]["prompt_tokens"].as_u64().unwrap();
            let (pp, cp) = price(model);
            let usd = (pt as f64 * pp + ct as f64 * cp) / 1e6;
            assert!(
                (rec["cost"]["usd"].as_f64().unwrap() - usd).abs() < 2e-6,
                "{rec}"
            );
        }
        "mcp.current" | "mcp.previous" => {
            let want = if name == "mcp.current" {
                "2026-07-28"
            } else {
                "2025-11-25"
            };
            assert_eq!(o["protocol_version"], want, "{o}");
            assert_eq!(
                o["protocol_version"], o["direct_protocol_version"],
                "same as direct: {o}"
            );
            assert_eq!(
                o["tools"],
                json!(["search", "whoami_roots"]),
                "filtered list: {o}"
            );
            assert_eq!(o["search"], "3 results for refunds");
            let refused = o["delete_all"].to_string();
            assert!(
                refused.contains("not one of this agent's tools"),
                "{refused}"
            );
            let recs = records(p, &run);
            assert!(
                recs.iter().all(|r| r["decision"] != "error"),
                "no session request was refused as malformed: {recs:#?}"
            );
            assert!(recs
                .iter()
                .any(|r| r["tool"] == "kb.search" && r["decision"] == "allow"));
            assert!(recs.iter().any(|r| r["decision"] == "deny"));
            if name == "mcp.previous" {
                assert_eq!(o["roots"], "file:///workspace/tollgate", "{o}");
                eventually("the session's DELETE was forwarded", || {
                    records(p, &run)
                        .iter()
                        .any(|r| r["method"] == "DELETE" && r["decision"] == "allow")
                });
            }
        }
        other => panic!("no check for {other}"),
    }));
    r.map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("{case}: {msg}")
    })
}

/// Every case, in one run of the stand-ins and the proxy (they start once).
#[test]
fn real_clients_work_through_every_mode() {
    let s = setup();
    let cases: Vec<String> = CASES
        .iter()
        .map(|(_, c, m, _)| format!("{c}@{m}"))
        .collect();
    let results = run_cases(&s, &cases);
    let failures: Vec<String> = results.iter().filter_map(|r| check(&s, r).err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}\nproxy log:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n"),
        s.proxy
            .log()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Credentials: the upstream saw only the injected keys (it rejects any other), and never
    // the SDKs' placeholders.
    let seen = std::process::Command::new("curl")
        .args([
            "-s",
            &format!("http://127.0.0.1:{}/_seen", s.cfg["standin"]),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&seen.stdout);
    assert!(
        text.contains("sk-real-openai") && !text.contains("placeholder"),
        "{text}"
    );
    // injectStreamUsage went only where the provider takes it: every streamed OpenAI chat
    // call carries include_usage (the SDK did not send it), no Anthropic or responses call
    // carries stream_options at all (those upstreams reject it).
    let seen: Vec<Value> = serde_json::from_str(&text).unwrap();
    for r in &seen {
        let path = r["path"].as_str().unwrap();
        let model = r["body"]["model"].as_str().unwrap_or("");
        let streamed_openai = path == "/v1/chat/completions"
            && r["body"]["stream"] == true
            && ["gpt-4o", "stall-1"].contains(&model);
        if streamed_openai {
            assert_eq!(r["body"]["stream_options"]["include_usage"], true, "{r}");
        }
        if path == "/v1/messages" || path == "/v1/responses" {
            assert!(r["body"].get("stream_options").is_none(), "{r}");
        }
    }
    assert!(seen
        .iter()
        .any(|r| r["path"] == "/v1/messages" && r["body"]["stream"] == true));
}

/// curl with `Expect: 100-continue` over HTTP/1.1 and HTTP/2 (prior knowledge, the proxy
/// listener's h2c) gets `100 Continue` before it sends its body, then the decided answer: a
/// client waiting for the 100 must not stall (curl waits a second, then sends anyway, so only
/// its verbose trace tells the two apart; no timing is asserted).
#[test]
fn expect_100_continue_is_answered_over_http1_and_http2() {
    let up = tollgate_tests::harness::Upstream::start();
    let config = format!(
        r#"
agent: {{name: interop, tenants: [acme]}}
upstreams: {{pay: "http://{a}"}}
tools:
  - name: pay.refund
    match: {{host: "{a}", methods: [POST], path: /v1/refunds}}
audit: {{path: audit.jsonl}}
"#,
        a = up.addr
    );
    let p = TestProxy::start(&config, &[]);
    // Compact JSON: the upstream gets the body re-serialised from what was decided.
    let body = format!(r#"{{"amount":10,"note":"{}"}}"#, "x".repeat(4096));
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let out = Command::new("curl")
            .args(["-sS", "-v", "--max-time", "20", version])
            .args([
                "-H",
                "X-Tollgate-Tenant: acme",
                "-H",
                "Expect: 100-continue",
            ])
            .args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &body,
            ])
            .arg(format!("http://{}/u/pay/v1/refunds", p.proxy))
            .output()
            .expect("curl is installed by .ci/install-tools.sh");
        let trace = String::from_utf8_lossy(&out.stderr);
        // Status lines as curl prints them: `< HTTP/1.1 100 Continue`, `< HTTP/2 100`.
        let statuses: Vec<&str> = trace
            .lines()
            .filter_map(|l| l.strip_prefix("< HTTP/"))
            .filter_map(|l| l.split_whitespace().nth(1))
            .collect();
        let interim = statuses.first() == Some(&"100");
        let answered = statuses.last() == Some(&"200");
        assert!(
            out.status.success() && interim && answered,
            "{version}: 100 Continue, then 200:\n{trace}\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("\"ok\":true"),
            "{version}: the upstream's answer"
        );
    }
    assert_eq!(up.count(), 2, "both bodies reached the upstream, whole");
    assert!(up.seen().iter().all(|s| s.body.len() == body.len()));
}

/// A WebSocket upgrade is refused with a reason and recorded as a denial, never forwarded as a
/// plain GET; each tool's `maxBodyBytes` bounds its own requests. Driven with curl, against
/// the recording upstream (which would accept the GET).
#[test]
fn websocket_upgrades_and_per_tool_body_limits() {
    let up = tollgate_tests::harness::Upstream::start();
    let config = format!(
        r#"
agent: {{name: interop, tenants: [acme]}}
upstreams: {{api: "http://{a}"}}
tools:
  - name: api.events
    match: {{host: "{a}", methods: [GET], path: /v1/events}}
  - name: api.small
    match: {{host: "{a}", methods: [POST], path: /v1/small}}
    maxBodyBytes: 64
  - name: api.big
    match: {{host: "{a}", methods: [POST], path: /v1/big}}
audit: {{path: audit.jsonl}}
"#,
        a = up.addr
    );
    let p = TestProxy::start(&config, &[]);
    let curl = |path: &str, extra: &[&str]| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
            .args(["-H", "X-Tollgate-Tenant: acme"])
            .args(extra)
            .arg(format!("http://{}/u/api{path}", p.proxy))
            .output()
            .expect("curl is installed by .ci/install-tools.sh");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_string(), body.to_string())
    };
    let (code, body) = curl(
        "/v1/events",
        &[
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            "-H",
            "Sec-WebSocket-Version: 13",
            "-H",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        ],
    );
    assert_eq!(code, "403", "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "upgrade_not_allowed", "{v}");
    assert!(v["reason"].as_str().unwrap().contains("websocket"), "{v}");
    assert_eq!(up.count(), 0, "the upgrade never reached the upstream");
    eventually("the refused upgrade is recorded", || {
        p.audit()
            .iter()
            .any(|r| r["tool"] == "api.events" && r["decision"] == "deny")
    });
    // The same GET without the upgrade goes through.
    let (code, _) = curl("/v1/events", &[]);
    assert_eq!(code, "200");
    let json = ["-H", "Content-Type: application/json", "--data-binary"];
    let big = format!(r#"{{"note": "{}"}}"#, "x".repeat(200));
    let (code, body) = curl("/v1/small", &[json[0], json[1], json[2], &big]);
    assert_eq!(code, "413", "{body}");
    assert!(body.contains("64-byte limit"), "{body}");
    let (code, body) = curl("/v1/big", &[json[0], json[1], json[2], &big]);
    assert_eq!(
        code, "200",
        "the server default applies to other tools: {body}"
    );
    assert_eq!(up.count(), 2);
}

/// The README's supported-clients table lists exactly what this suite covers.
#[test]
fn readme_table_matches_the_suite() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let start = readme
        .find("<!-- interop-table:start -->")
        .expect("README has the supported-clients table markers");
    let end = readme.find("<!-- interop-table:end -->").unwrap();
    let table = readme[start..end]
        .lines()
        .skip(1)
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        table.trim(),
        readme_table().trim(),
        "README supported-clients table drifted from tests/tests/interop.rs; replace it with:\n{}",
        readme_table()
    );
}

fn mode_name(m: &str) -> &'static str {
    match m {
        "base_url" => "base URL",
        "forward" => "forward proxy",
        "connect" => "CONNECT interception",
        _ => panic!("{m}"),
    }
}

/// The table, generated from [`CASES`] and the pinned versions.
fn readme_table() -> String {
    let script = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/install-clients.sh"),
    )
    .unwrap();
    let version = |lib: &str| -> String {
        let pkg = lib.split(' ').next().unwrap();
        if pkg == "undici" {
            return script
                .lines()
                .find_map(|l| l.strip_prefix("undici="))
                .unwrap()
                .to_string();
        }
        script
            .split_whitespace()
            .find_map(|w| w.split_once(&format!("{pkg}==")).map(|(_, v)| v))
            .map(|v| v.trim_end_matches(')').to_string())
            .unwrap_or_else(|| panic!("{pkg} is not pinned in .ci/install-clients.sh"))
    };
    let mut out = String::from("| Client | Version | Mode | Covered |\n|---|---|---|---|\n");
    for (lib, _, mode, what) in CASES {
        out += &format!(
            "| {lib} | {} | {} | {what} |\n",
            version(lib),
            mode_name(mode)
        );
    }
    out
}
