//! `load-bench`: direct vs nginx vs Tollgate, side by side, on loopback.
//!
//! One run measures, for each target: fixed-rate latency (open loop, 32 connections, latency
//! taken from each request's intended send time so a stall is not hidden — no coordinated
//! omission) at every `--rates` value, maximum throughput with `wrk` (32 connections), peak RSS
//! (VmHWM) and CPU time per request from `/proc`. Each figure is the median of `--reps` runs.
//! The proxy under test (nginx or Tollgate) is pinned to CPU 0; this process (load generator
//! and upstream) to CPU 1. Prints a table with ratios against direct and nginx, and writes
//! JSON to `bench-results/`.
//!
//! `make load-bench` runs it in release mode; `--smoke` is a seconds-long run for tests.

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(name = "load-bench", about = "direct vs nginx vs Tollgate on loopback")]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Repetitions (medians are reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Fixed rates, requests per second.
    #[arg(long, value_delimiter = ',', default_values_t = [1000u64, 5000])]
    rates: Vec<u64>,
    /// Connections.
    #[arg(long, default_value_t = 32)]
    conns: usize,
    /// A seconds-long run (for tests): 1 s, 1 rep, 200 req/s.
    #[arg(long)]
    smoke: bool,
    /// JSON output (default bench-results/load-<unix time>.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// tollgate-proxy binary (default: next to this binary).
    #[arg(long)]
    proxy_bin: Option<PathBuf>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Pin this whole process (every thread) to one CPU.
fn pin_self(cpu: usize) {
    let _ = Command::new("taskset")
        .args([
            "-a",
            "-p",
            "-c",
            &cpu.to_string(),
            &std::process::id().to_string(),
        ])
        .stdout(Stdio::null())
        .status();
}

/// A minimal fast upstream on its own runtime.
fn start_upstream() -> (SocketAddr, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let l = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = l.local_addr().unwrap();
    rt.spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"{\"ok\":true}"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, rt)
}

struct Target {
    name: String,
    url_path: String,
    addr: SocketAddr,
    headers: Vec<(String, String)>,
    pid: Option<u32>,
    _child: Option<ChildGuard>,
    _dir: Option<tempfile::TempDir>,
}

struct ChildGuard(Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(addr: SocketAddr) {
    let t0 = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{addr} never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_nginx(up: SocketAddr) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = format!(
        "worker_processes 1;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  upstream up {{ server {up}; keepalive 64; }}\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
        d = dir.path().display()
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let child = Command::new("taskset")
        .args(["-c", "0", "nginx", "-p"])
        .arg(dir.path())
        .arg("-c")
        .arg(dir.path().join("nginx.conf"))
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (Debian nginx-light) is installed by .ci/install-tools.sh");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_port(addr);
    // The worker is the master's child.
    let master = child.id();
    let worker = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(master);
    Target {
        name: "nginx".into(),
        url_path: "/v1/notes".into(),
        addr,
        headers: vec![],
        pid: Some(worker),
        _child: Some(ChildGuard(child)),
        _dir: Some(dir),
    }
}

fn start_tollgate(
    bin: &Path,
    name: &str,
    up: SocketAddr,
    extra: &str,
    audit_on_disk: bool,
) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let (pp, ap) = (free_port(), free_port());
    let audit = if audit_on_disk {
        dir.path().join("audit.jsonl")
    } else {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        base.join(format!("tollgate-bench-{}-{pp}.jsonl", std::process::id()))
    };
    let config = format!(
        "listen: {{proxy: \"127.0.0.1:{pp}\", admin: \"127.0.0.1:{ap}\"}}\nagent: {{name: bench, tenants: [acme]}}\nupstreams: {{up: \"http://{up}\"}}\ntools:\n  - name: notes\n    match: {{host: \"{up}\", methods: [POST], path: /v1/notes}}\n    cost: {{perCallUsd: 0.000001}}\naudit: {{path: \"{}\"}}\n{extra}",
        audit.display()
    );
    std::fs::write(dir.path().join("tollgate.yaml"), config).unwrap();
    let child = Command::new("taskset")
        .args(["-c", "0"])
        .arg(bin)
        .args(["run", "--config"])
        .arg(dir.path().join("tollgate.yaml"))
        .env("TOLLGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{pp}").parse().unwrap();
    wait_port(addr);
    Target {
        name: name.into(),
        url_path: "/u/up/v1/notes".into(),
        addr,
        headers: vec![
            ("x-tollgate-tenant".into(), "acme".into()),
            ("content-type".into(), "application/json".into()),
        ],
        pid: Some(child.id()),
        _child: Some(ChildGuard(child)),
        _dir: Some(dir),
    }
}

/// Open-loop fixed-rate run; latencies in µs from each request's intended send time.
fn fixed_rate(t: &Target, rate: u64, conns: usize, secs: u64) -> (Histogram<u64>, u64, u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let hist = Arc::new(std::sync::Mutex::new(
            Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
        ));
        let errors = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
        let start = tokio::time::Instant::now() + Duration::from_millis(50);
        let end = start + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for c in 0..conns {
            let (hist, errors, sent) = (hist.clone(), errors.clone(), sent.clone());
            let (addr, path, headers) = (t.addr, t.url_path.clone(), t.headers.clone());
            tasks.push(tokio::spawn(async move {
                let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let _ = stream.set_nodelay(true);
                let Ok((mut tx, conn)) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                tokio::spawn(conn);
                let mut k = 0u32;
                loop {
                    let intended = start + interval.mul_f64(k as f64 + c as f64 / conns as f64);
                    if intended >= end {
                        break;
                    }
                    tokio::time::sleep_until(intended).await;
                    let mut req =
                        hyper::Request::post(path.as_str()).header("host", addr.to_string());
                    for (h, v) in &headers {
                        req = req.header(h, v);
                    }
                    let req = req
                        .body(Full::new(Bytes::from_static(b"{\"text\":\"hello\"}")))
                        .unwrap();
                    sent.fetch_add(1, Ordering::Relaxed);
                    match tx.send_request(req).await {
                        Ok(res) if res.status().is_success() => {
                            let _ = res.into_body().collect().await;
                            let us = intended.elapsed().as_micros().max(1) as u64;
                            let _ = hist.lock().unwrap().record(us);
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                    k += 1;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let h = hist.lock().unwrap().clone();
        (
            h,
            sent.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed),
        )
    })
}

/// `wrk` max throughput (requests/s) and the request count.
fn max_throughput(t: &Target, conns: usize, secs: u64) -> (f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("post.lua");
    let mut lua = String::from("wrk.method = \"POST\"\nwrk.body = '{\"text\":\"hello\"}'\n");
    for (h, v) in &t.headers {
        lua.push_str(&format!("wrk.headers[\"{h}\"] = \"{v}\"\n"));
    }
    std::fs::write(&script, lua).unwrap();
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{conns}"), &format!("-d{secs}s"), "-s"])
        .arg(&script)
        .arg(format!("http://{}{}", t.addr, t.url_path))
        .output()
        .expect("wrk is installed by .ci/install-tools.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let total = text
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in ")
                .map(|x| x.0.trim().to_string())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (rps, total)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let mut args = Args::parse();
    if args.smoke {
        args.duration = 1;
        args.reps = 1;
        args.rates = vec![200];
    }
    pin_self(1);
    let bin = args.proxy_bin.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .join("tollgate-proxy")
    });
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --release --bins)",
        bin.display()
    );
    let (up, _up_rt) = start_upstream();
    let policies = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../policies")
        .canonicalize()
        .unwrap();
    let rego = format!("policies: {{paths: [\"{}\"]}}\n", policies.display());
    let limits = "tenants:\n  acme:\n    rateLimits: [{scope: tenant, perSecond: 1000000}]\n    budgets: {dayUsd: 1000000}\n";
    let mut targets = vec![Target {
        name: "direct".into(),
        url_path: "/v1/notes".into(),
        addr: up,
        headers: vec![],
        pid: None,
        _child: None,
        _dir: None,
    }];
    targets.push(start_nginx(up));
    targets.push(start_tollgate(&bin, "tollgate pass-through", up, "", false));
    targets.push(start_tollgate(&bin, "tollgate +rego", up, &rego, false));
    targets.push(start_tollgate(
        &bin,
        "tollgate +rego+limits+budget",
        up,
        &format!("{rego}{limits}"),
        false,
    ));
    targets.push(start_tollgate(
        &bin,
        "tollgate full (+audit fsync on disk)",
        up,
        &format!("{rego}{limits}"),
        true,
    ));
    let mut results = Vec::new();
    for t in &targets {
        // Warm up connections and caches.
        let _ = fixed_rate(t, 200, args.conns.min(8), 1);
        let mut per_rate = Vec::new();
        for &rate in &args.rates {
            let (mut p50, mut p99, mut p999, mut errs) = (vec![], vec![], vec![], 0);
            for _ in 0..args.reps {
                let (h, _sent, e) = fixed_rate(t, rate, args.conns, args.duration);
                p50.push(h.value_at_quantile(0.5) as f64);
                p99.push(h.value_at_quantile(0.99) as f64);
                p999.push(h.value_at_quantile(0.999) as f64);
                errs += e;
            }
            per_rate.push(json!({"rate": rate, "p50_us": median(p50), "p99_us": median(p99), "p999_us": median(p999), "errors": errs}));
        }
        let (mut rps, mut cpu) = (vec![], vec![]);
        for _ in 0..args.reps {
            let before = t.pid.map(cpu_ticks).unwrap_or(0);
            let (r, n) = max_throughput(t, args.conns, args.duration);
            let after = t.pid.map(cpu_ticks).unwrap_or(0);
            rps.push(r);
            if n > 0 && t.pid.is_some() {
                cpu.push((after - before) as f64 * 10_000.0 / n as f64); // 100 ticks/s → µs
            }
        }
        results.push(json!({
            "target": t.name,
            "fixed_rate": per_rate,
            "max_rps": median(rps),
            "cpu_us_per_request": if cpu.is_empty() { serde_json::Value::Null } else { json!(median(cpu)) },
            "peak_rss_kib": t.pid.map(vm_hwm_kib),
        }));
    }
    // Ratios and the table.
    let direct = results[0].clone();
    let nginx = results[1].clone();
    println!(
        "\n{:<38} {:>7} {:>9} {:>9} {:>9} {:>11} {:>10} {:>9} {:>9} {:>8}",
        "target",
        "rate",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "+p50 vs dir",
        "max rps",
        "vs nginx",
        "cpu µs/r",
        "RSS MiB"
    );
    for r in results.iter_mut() {
        let mut added = Vec::new();
        for (i, fr) in r["fixed_rate"].as_array().unwrap().iter().enumerate() {
            let d = &direct["fixed_rate"][i];
            let add50 = fr["p50_us"].as_f64().unwrap() - d["p50_us"].as_f64().unwrap();
            let add99 = fr["p99_us"].as_f64().unwrap() - d["p99_us"].as_f64().unwrap();
            added.push(json!({"rate": fr["rate"], "added_p50_us": add50, "added_p99_us": add99}));
            println!(
                "{:<38} {:>7} {:>9} {:>9} {:>9} {:>11.0} {:>10} {:>9} {:>9} {:>8}",
                if i == 0 {
                    r["target"].as_str().unwrap()
                } else {
                    ""
                },
                fr["rate"],
                fr["p50_us"],
                fr["p99_us"],
                fr["p999_us"],
                add50,
                if i == 0 {
                    format!("{:.0}", r["max_rps"].as_f64().unwrap())
                } else {
                    String::new()
                },
                if i == 0 {
                    format!(
                        "{:.2}",
                        r["max_rps"].as_f64().unwrap()
                            / nginx["max_rps"].as_f64().unwrap().max(1.0)
                    )
                } else {
                    String::new()
                },
                if i == 0 {
                    r["cpu_us_per_request"]
                        .as_f64()
                        .map(|c| format!("{c:.1}"))
                        .unwrap_or("-".into())
                } else {
                    String::new()
                },
                if i == 0 {
                    r["peak_rss_kib"]
                        .as_u64()
                        .map(|k| format!("{:.1}", k as f64 / 1024.0))
                        .unwrap_or("-".into())
                } else {
                    String::new()
                },
            );
        }
        r["added_over_direct"] = json!(added);
        r["throughput_vs_nginx"] =
            json!(r["max_rps"].as_f64().unwrap() / nginx["max_rps"].as_f64().unwrap().max(1.0));
        r["throughput_vs_direct"] =
            json!(r["max_rps"].as_f64().unwrap() / direct["max_rps"].as_f64().unwrap().max(1.0));
    }
    let report = json!({"args": {"duration_s": args.duration, "reps": args.reps, "rates": args.rates, "conns": args.conns}, "results": results});
    let path = args.json.clone().unwrap_or_else(|| {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        PathBuf::from(format!("bench-results/load-{ts}.json"))
    });
    if let Some(p) = path.parent() {
        let _ = std::fs::create_dir_all(p);
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("\nJSON: {}", path.display());
}
