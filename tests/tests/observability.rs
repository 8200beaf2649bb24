//! Observability assets (issue 7) against the real tools: the alert rules pass
//! `promtool check rules` and their unit tests (`promtool test rules`), every dashboard query
//! names only metrics the code exports, and a real Prometheus scraping a running proxy and
//! operator answers every dashboard query with data.

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_operator::testapi::TestApiServer;
use tollgate_tests::harness::{
    bin, call, eventually, free_port, get, Behaviour, TestProxy, Upstream,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files() -> PathBuf {
    root().join("charts/tollgate/files")
}

fn promtool() -> Command {
    assert!(
        Command::new("promtool").arg("--version").output().is_ok(),
        "promtool is not installed: run .ci/install-tools.sh"
    );
    Command::new("promtool")
}

#[test]
fn alert_rules_check_and_pass_their_unit_tests() {
    let out = promtool()
        .args(["check", "rules"])
        .arg(files().join("alerts.rules.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("9 rules found"), "{text}");
    let out = promtool()
        .current_dir(files())
        .args(["test", "rules", "alerts.test.yaml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every alert has a unit test and a runbook entry.
    let rules = std::fs::read_to_string(files().join("alerts.rules.yaml")).unwrap();
    let tests = std::fs::read_to_string(files().join("alerts.test.yaml")).unwrap();
    let runbook = std::fs::read_to_string(root().join("docs/runbook.md")).unwrap();
    for line in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {line}")),
            "{line} has no promtool test"
        );
    }
    for anchor in rules
        .lines()
        .filter_map(|l| l.split_once("runbook.md#").map(|x| x.1.trim()))
    {
        let heading = format!("## {}", anchor.replace('-', " "));
        assert!(
            runbook.to_lowercase().contains(&heading),
            "docs/runbook.md lacks {heading}"
        );
    }
}

fn dashboard_queries() -> Vec<(String, String)> {
    let d: Value = serde_json::from_str(
        &std::fs::read_to_string(files().join("dashboards/tollgate.json")).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            out.push((
                p["title"].as_str().unwrap().to_string(),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

fn metric_names(expr: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"\b(tollgate_[a-z_]+)").unwrap();
    re.captures_iter(expr)
        .map(|c| {
            let n = c[1].to_string();
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = n.strip_suffix(suffix) {
                    if base.ends_with("_seconds") || base.ends_with("_usd") {
                        return base.to_string();
                    }
                }
            }
            n
        })
        .collect()
}

#[test]
fn dashboard_queries_name_only_exported_metrics() {
    let exported = std::fs::read_to_string(root().join("proxy/src/metrics.rs")).unwrap()
        + &std::fs::read_to_string(root().join("operator/src/metrics.rs")).unwrap();
    let rules = std::fs::read_to_string(files().join("alerts.rules.yaml")).unwrap();
    let mut all = BTreeSet::new();
    for (_, e) in dashboard_queries() {
        all.extend(metric_names(&e));
    }
    all.extend(metric_names(&rules));
    assert!(all.len() >= 15, "{all:?}");
    for m in &all {
        assert!(
            exported.contains(&format!("\"{m}\"")),
            "{m} is queried but no code exports it"
        );
    }
}

struct Prometheus {
    child: Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(
    proxy_admin: std::net::SocketAddr,
    operator: std::net::SocketAddr,
) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: tollgate-sidecar\n    static_configs: [{{targets: ['{proxy_admin}'], labels: {{namespace: test, pod: agent-0}}}}]\n  - job_name: tollgate-operator\n    static_configs: [{{targets: ['{operator}']}}]\n"
    );
    std::fs::write(dir.path().join("prometheus.yml"), cfg).unwrap();
    let port = free_port();
    assert!(
        Path::new("/usr/bin/prometheus").exists()
            || Command::new("prometheus").arg("--version").output().is_ok(),
        "prometheus is not installed: run .ci/install-tools.sh"
    );
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    eventually("prometheus ready", || {
        get(addr, "/-/ready")
            .map(|r| r.status == 200)
            .unwrap_or(false)
    });
    Prometheus {
        child,
        addr,
        _dir: dir,
    }
}

fn query(p: &Prometheus, expr: &str) -> Value {
    let q: String = form_urlencoded::byte_serialize(expr.as_bytes()).collect();
    let r = get(p.addr, &format!("/api/v1/query?query={q}")).unwrap();
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

#[test]
fn a_real_prometheus_answers_every_dashboard_query() {
    // Operator with one identity, so its metrics exist.
    let api = TestApiServer::start();
    api.put("agentidentities", json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentIdentity", "metadata": {"name": "a", "namespace": "n"}, "spec": {"serviceAccount": "a", "tenants": ["acme"]}}));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kubeconfig"), api.kubeconfig()).unwrap();
    let op_port = free_port();
    let mut op = Command::new(bin("tollgate-operator"))
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{op_port}"),
            "--no-leader-elect",
        ])
        .env("KUBECONFIG", dir.path().join("kubeconfig"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let op_addr: std::net::SocketAddr = format!("127.0.0.1:{op_port}").parse().unwrap();
    eventually("operator ready", || {
        get(op_addr, "/readyz")
            .map(|r| r.status == 200)
            .unwrap_or(false)
    });

    // A proxy exercising every metric family: decisions, limits, budgets, approvals, kill
    // switches, upstream errors and the Redis fail-open path (Redis on a dead port).
    let up = Upstream::start();
    let dead = Upstream::start();
    dead.set(Behaviour::Reset);
    let a = up.addr;
    let config = format!(
        r#"
agent: {{name: billing, tenants: [acme]}}
tools:
  - name: notes
    match: {{host: "{a}", methods: [POST], path: /v1/notes}}
    cost: {{perCallUsd: 0.01}}
  - name: refunds
    match: {{host: "{a}", methods: [POST], path: /v1/refunds}}
  - name: macros
    match: {{host: "{a}", methods: [POST], path: /v1/macros}}
  - name: broken
    match: {{host: "{}", methods: [POST], path: /v1/x}}
  - name: kb.pinned
    match: {{host: "{a}", path: /mcp, mcpTool: lookup}}
    pin: {{sha256: "{zero}"}}
tenants:
  acme:
    rateLimits: [{{scope: tool, tool: notes, perSecond: 20}}]
    budgets: {{dayUsd: 1000}}
limits: {{backend: redis, url: "redis://127.0.0.1:{}", onUnavailable: local}}
killSwitches:
  - {{name: stop-macros, scope: {{tool: macros}}, reason: "INC-1"}}
policies:
  modules:
    - name: p.rego
      rego: |
        package tollgate
        import rego.v1
        deny contains "no" if input.request.body.deny
        require_approval contains "big" if input.request.body.amount > 100
audit: {{path: audit.jsonl}}
server: {{headerReadTimeout: 200ms}}
"#,
        dead.addr,
        free_port(),
        zero = "0".repeat(64),
    );
    let proxy = TestProxy::start(&config, &[]);
    let prom = start_prometheus(proxy.admin, op_addr);
    let stop = Arc::new(AtomicBool::new(false));
    let driver = {
        let (stop, p, a, d) = (stop.clone(), proxy.proxy, a, dead.addr);
        std::thread::spawn(move || {
            let h = [
                ("X-Tollgate-Tenant", "acme"),
                ("Content-Type", "application/json"),
            ];
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..25 {
                    call(p, "POST", &format!("http://{a}/v1/notes"), &h, Some("{}"));
                }
                call(
                    p,
                    "POST",
                    &format!("http://{a}/v1/notes"),
                    &h,
                    Some(r#"{"deny":true}"#),
                );
                call(
                    p,
                    "POST",
                    &format!("http://{a}/v1/refunds"),
                    &h,
                    Some(r#"{"amount":500}"#),
                );
                call(p, "POST", &format!("http://{a}/v1/macros"), &h, Some("{}"));
                // A one-call run that reports its outcome (cost per outcome).
                let mut ended = h.to_vec();
                ended.push(("X-Tollgate-Run-Outcome", "resolved"));
                call(
                    p,
                    "POST",
                    &format!("http://{a}/v1/notes"),
                    &ended,
                    Some("{}"),
                );
                call(p, "POST", &format!("http://{d}/v1/x"), &h, Some("{}"));
                // A CONNECT to a host no tool serves (tunnel refused), and a connection that
                // never sends a byte (closed at the header read timeout).
                if let Ok(mut c) = std::net::TcpStream::connect(p) {
                    use std::io::{Read, Write};
                    let _ = c.write_all(
                        b"CONNECT nowhere.invalid:443 HTTP/1.1\r\nHost: nowhere.invalid:443\r\n\r\n",
                    );
                    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                    let _ = c.read(&mut [0u8; 512]);
                }
                let silent = std::net::TcpStream::connect(p);
                std::thread::sleep(Duration::from_millis(300));
                drop(silent);
            }
        })
    };
    let queries = dashboard_queries();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut missing: Vec<String>;
    loop {
        missing = Vec::new();
        for (title, expr) in &queries {
            let v = query(&prom, expr);
            assert_eq!(
                v["status"], "success",
                "{title}: {expr} does not evaluate: {v}"
            );
            if v["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
                missing.push(format!("{title}: {expr}"));
            }
        }
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Relaxed);
    driver.join().unwrap();
    // Both /metrics outputs pass promtool's exposition-format and naming lint.
    for (who, addr) in [("proxy", proxy.admin), ("operator", op_addr)] {
        let text = get(addr, "/metrics").unwrap().body_text();
        let mut child = promtool()
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{who} /metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = op.kill();
    let _ = op.wait();
    assert!(
        missing.is_empty(),
        "dashboard queries without data: {missing:#?}"
    );
}
