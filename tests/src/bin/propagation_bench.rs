//! `propagation-bench`: the operator plus N simulated sidecars (one process, N long-polls) on
//! the in-process test API server. Flips a kill switch and reports p50/p99/max time until each
//! sidecar holds the new snapshot.
//!
//! With `--streams N` it measures the in-flight kill instead (issue 17): N real
//! `tollgate-proxy` sidecars under the operator, each with one LLM stream in flight to a slow
//! SSE upstream on loopback; the `KillSwitch` is applied to the API server and the bench
//! reports the time from the apply to each client seeing its stream's `event: error`, and to
//! the last one.

use clap::Parser;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tollgate_operator::testapi::TestApiServer;

#[derive(Parser)]
struct Args {
    /// Simulated sidecars.
    #[arg(long, default_value_t = 1000)]
    sidecars: usize,
    /// Kill-switch flips to measure.
    #[arg(long, default_value_t = 5)]
    flips: usize,
    /// Measure the in-flight kill with this many real sidecars, one stream each.
    #[arg(long)]
    streams: Option<usize>,
    /// Rounds of the in-flight measurement (streams opened, killed, switch released).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn main() {
    let args = Args::parse();
    if let Some(n) = args.streams {
        inflight::run(n, args.rounds);
        return;
    }
    let api = TestApiServer::start();
    api.add_token(
        "tok",
        "system:serviceaccount:agents:billing-agent",
        &["tollgate"],
    );
    api.put("agentidentities", json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentIdentity", "metadata": {"name": "billing", "namespace": "agents"}, "spec": {"serviceAccount": "billing-agent", "tenants": ["acme"]}}));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kubeconfig"), api.kubeconfig()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let exe = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("tollgate-operator");
    let mut op = Command::new(exe)
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--no-leader-elect",
        ])
        .env("KUBECONFIG", dir.path().join("kubeconfig"))
        .env("TOLLGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tollgate-operator next to this binary");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let get = move |hash: String| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET /v1/snapshot?agent=agents/billing&hash={hash}&timeoutSeconds=60 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let body = text.split_once("\r\n\r\n")?.1.to_string();
        serde_json::from_str::<serde_json::Value>(&body).ok()
    };
    let t0 = Instant::now();
    let mut hash = String::new();
    while hash.is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "operator never served a snapshot"
        );
        if let Some(v) = rt.block_on(get(String::new())) {
            hash = v["hash"].as_str().unwrap_or("").to_string();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut all = Vec::new();
    for flip in 0..args.flips {
        let h = hash.clone();
        let waiters: Vec<_> = (0..args.sidecars)
            .map(|_| {
                let h = h.clone();
                rt.spawn(async move {
                    let v = get(h).await;
                    (
                        Instant::now(),
                        v.and_then(|v| v["hash"].as_str().map(str::to_owned)),
                    )
                })
            })
            .collect();
        // Let every long-poll reach the operator and park.
        std::thread::sleep(Duration::from_millis(1500));
        let flipped = Instant::now();
        api.put("killswitches", json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "KillSwitch", "metadata": {"name": "stop"}, "spec": {"scope": {"agent": "billing"}, "engaged": flip % 2 == 0, "reason": format!("flip {flip}")}}));
        let mut lags = Vec::new();
        for w in waiters {
            let (at, new_hash) = rt.block_on(w).unwrap();
            if let Some(nh) = new_hash {
                if nh != h {
                    hash = nh;
                    lags.push(at.saturating_duration_since(flipped).as_secs_f64() * 1e3);
                }
            }
        }
        lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let q = |p: f64| {
            lags.get(((lags.len() as f64 - 1.0) * p) as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        println!(
            "flip {flip}: {}/{} sidecars updated; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            lags.len(),
            args.sidecars,
            q(0.5),
            q(0.99),
            q(1.0)
        );
        all.extend(lags);
    }
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let q = |p: f64| {
        all.get(((all.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "all flips: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} updates",
        q(0.5),
        q(0.99),
        q(1.0),
        all.len()
    );
    let _ = op.kill();
    let _ = op.wait();
}

/// The in-flight kill measurement (`--streams N`).
mod inflight {
    use serde_json::json;
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};
    use tollgate_operator::testapi::TestApiServer;
    use tollgate_tests::slow_upstream::{Client, SlowUpstream};

    const GV: &str = "tollgate.dev/v1alpha1";

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// A binary next to this one (debug or release alike).
    fn sibling(name: &str) -> PathBuf {
        std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .join(name)
    }

    struct Proc(Child);
    impl Drop for Proc {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn ready(addr: SocketAddr, what: &str) {
        let t0 = Instant::now();
        loop {
            if let Ok(r) = tollgate_tests::harness::get(addr, "/readyz") {
                if r.status == 200 {
                    return;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "{what} not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn sidecar(dir: &Path, i: usize, op_port: u16) -> (Proc, SocketAddr) {
        let d = dir.join(format!("sidecar-{i}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("token"), "tok").unwrap();
        let (pp, ap) = (free_port(), free_port());
        let config = format!("listen: {{proxy: \"127.0.0.1:{pp}\", admin: \"127.0.0.1:{ap}\"}}\nagent: {{name: local, tenants: []}}\naudit: {{path: audit.jsonl}}\n");
        std::fs::write(d.join("tollgate.yaml"), config).unwrap();
        let child = Command::new(sibling("tollgate-proxy"))
            .args(["run", "--config"])
            .arg(d.join("tollgate.yaml"))
            .current_dir(&d)
            .env("TOLLGATE_OPERATOR", format!("http://127.0.0.1:{op_port}"))
            .env("TOLLGATE_AGENT", "agents/billing")
            .env("TOLLGATE_TOKEN_FILE", d.join("token"))
            .env("TOLLGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tollgate-proxy next to this binary");
        let child = Proc(child);
        ready(format!("127.0.0.1:{ap}").parse().unwrap(), "sidecar");
        (child, format!("127.0.0.1:{pp}").parse().unwrap())
    }

    fn kill_switch(api: &TestApiServer, engaged: bool, round: usize) {
        api.put("killswitches", json!({"apiVersion": GV, "kind": "KillSwitch", "metadata": {"name": "stop-chat"}, "spec": {"scope": {"tool": "llm-chat"}, "engaged": engaged, "reason": format!("round {round}")}}));
    }

    pub fn run(n: usize, rounds: usize) {
        let up = SlowUpstream::start();
        let api = TestApiServer::start();
        api.add_token(
            "tok",
            "system:serviceaccount:agents:billing-agent",
            &["tollgate"],
        );
        api.put(
            "tenants",
            json!({"apiVersion": GV, "kind": "Tenant", "metadata": {"name": "acme"}, "spec": {}}),
        );
        api.put("tools", json!({"apiVersion": GV, "kind": "Tool", "metadata": {"name": "llm-chat", "namespace": "agents"},
            "spec": {"match": {"host": up.addr.to_string(), "methods": ["POST"], "path": "/v1/chat/completions"},
                     "llm": {"provider": "openai"}, "timeouts": {"total": "600s", "idle": "60s"},
                     "cost": {"llm": {"prices": {"gpt-4o": {"promptPerMtok": 2.5, "completionPerMtok": 10}}}}}}));
        api.put("agentidentities", json!({"apiVersion": GV, "kind": "AgentIdentity", "metadata": {"name": "billing", "namespace": "agents"},
            "spec": {"serviceAccount": "billing-agent", "tenants": ["acme"], "tools": ["llm-chat"]}}));
        kill_switch(&api, false, 0);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("kubeconfig"), api.kubeconfig()).unwrap();
        let op_port = free_port();
        let _op = Proc(
            Command::new(sibling("tollgate-operator"))
                .args([
                    "run",
                    "--listen",
                    &format!("127.0.0.1:{op_port}"),
                    "--no-leader-elect",
                ])
                .env("KUBECONFIG", dir.path().join("kubeconfig"))
                .env("TOLLGATE_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("tollgate-operator next to this binary"),
        );
        ready(format!("127.0.0.1:{op_port}").parse().unwrap(), "operator");
        let sidecars: Vec<_> = (0..n).map(|i| sidecar(dir.path(), i, op_port)).collect();
        let url = format!("http://{}/v1/chat/completions", up.addr);
        let body = json!({"model": "gpt-4o", "stream": true, "max_tokens": 100, "messages": [{"role": "user", "content": "go on"}]});
        let headers = [("X-Tollgate-Tenant", "acme")];
        let mut all = Vec::new();
        for round in 0..rounds {
            // One stream per sidecar, each delivering before the switch is applied (a
            // sidecar still starting, or still holding the previous round's switch, refuses
            // its stream: retry until it streams).
            let t0 = Instant::now();
            let clients: Vec<Client> = sidecars
                .iter()
                .map(|(_, proxy)| loop {
                    let c = Client::post(*proxy, &url, &headers, &body);
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while !c.text().contains("more words")
                        && !c.done.load(std::sync::atomic::Ordering::SeqCst)
                        && Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if c.text().contains("more words") {
                        break c;
                    }
                    assert!(
                        t0.elapsed() < Duration::from_secs(120),
                        "a sidecar never streamed: {}",
                        c.text()
                    );
                    std::thread::sleep(Duration::from_millis(200));
                })
                .collect();
            let applied = Instant::now();
            kill_switch(&api, true, round);
            let mut lags = Vec::new();
            let mut pending: Vec<&Client> = clients.iter().collect();
            while !pending.is_empty() {
                assert!(
                    applied.elapsed() < Duration::from_secs(60),
                    "{} streams were never cut",
                    pending.len()
                );
                pending.retain(|c| {
                    if c.text().contains("event: error") {
                        lags.push(applied.elapsed().as_secs_f64() * 1e3);
                        false
                    } else {
                        true
                    }
                });
                std::thread::sleep(Duration::from_millis(1));
            }
            lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let q = |p: f64| lags[((lags.len() as f64 - 1.0) * p) as usize];
            println!(
                "round {round}: {n} streams cut; apply → cut p50 {:.1} ms, p99 {:.1} ms, last {:.1} ms",
                q(0.5),
                q(0.99),
                q(1.0)
            );
            all.extend(lags);
            kill_switch(&api, false, round);
        }
        all.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let q = |p: f64| all[((all.len() as f64 - 1.0) * p) as usize];
        println!(
            "all rounds: apply → stream cut p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} streams ({n} sidecars)",
            q(0.5),
            q(0.99),
            q(1.0),
            all.len()
        );
    }
}
