//! Load generation and process accounting: the open-loop fixed-rate generator, `wrk` for
//! maximum throughput, a closed-loop driver for a fixed number of requests (callgrind), and
//! CPU time and memory from `/proc`.

use super::targets::Target;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Open-loop fixed-rate run; latencies in µs from each request's intended send time.
pub fn fixed_rate(t: &Target, rate: u64, conns: usize, secs: u64) -> (Histogram<u64>, u64, u64) {
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
                    let req = req.body(Full::new(Bytes::from_static(BODY))).unwrap();
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
pub fn max_throughput(t: &Target, conns: usize, secs: u64) -> (f64, u64) {
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

pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

pub fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `VmRSS` now, in KiB.
pub fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Send `n` requests, closed loop, over `conns` keep-alive connections. Returns the number
/// that failed (a non-2xx status or a broken connection).
pub fn drive(t: &Target, n: u64, conns: usize) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let errors = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in 0..conns as u64 {
            let share = n / conns as u64 + u64::from(c < n % conns as u64);
            let errors = errors.clone();
            let (addr, path, headers) = (t.addr, t.url_path.clone(), t.headers.clone());
            tasks.push(tokio::spawn(async move {
                let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                    errors.fetch_add(share, Ordering::Relaxed);
                    return;
                };
                let _ = stream.set_nodelay(true);
                let Ok((mut tx, conn)) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                else {
                    errors.fetch_add(share, Ordering::Relaxed);
                    return;
                };
                tokio::spawn(conn);
                for sent in 0..share {
                    let mut req =
                        hyper::Request::post(path.as_str()).header("host", addr.to_string());
                    for (h, v) in &headers {
                        req = req.header(h, v);
                    }
                    let req = req.body(Full::new(Bytes::from_static(BODY))).unwrap();
                    match tx.send_request(req).await {
                        Ok(res) if res.status().is_success() => {
                            let _ = res.into_body().collect().await;
                        }
                        _ => {
                            errors.fetch_add(share - sent, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        errors.load(Ordering::Relaxed)
    })
}

/// The request body every generator sends.
pub const BODY: &[u8] = b"{\"text\":\"hello\"}";
