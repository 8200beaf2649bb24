//! `propagation-bench`: the operator plus N simulated sidecars (one process, N long-polls) on
//! the in-process test API server. Flips a kill switch and reports p50/p99/max time until each
//! sidecar holds the new snapshot.

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
}

fn main() {
    let args = Args::parse();
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
