//! `soak`: mixed allowed and denied traffic through a real sidecar for `--minutes`, with a
//! config reload every few seconds, printing RSS and open file descriptors every 10 s so a
//! leak shows as a trend. A documented command (`make soak`), not a CI test.

use clap::Parser;
use std::time::{Duration, Instant};
use tollgate_tests::harness::{call, TestProxy, Upstream};

#[derive(Parser)]
struct Args {
    /// How long to run.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Seconds between config reloads.
    #[arg(long, default_value_t = 3)]
    reload_every: u64,
}

fn proc_stat(pid: u32) -> (u64, usize) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss, fds)
}

fn config(up: &Upstream, max: u32) -> String {
    let a = up.addr;
    format!(
        "agent: {{name: soak, tenants: [acme]}}\ntools:\n  - name: notes\n    match: {{host: \"{a}\", methods: [POST], path: /v1/notes}}\npolicies:\n  data: {{max: {max}}}\n  modules:\n    - name: p.rego\n      rego: |\n        package tollgate\n        import rego.v1\n        deny contains \"too long\" if count(input.request.body.text) > data.tollgate_config.max\naudit: {{path: audit.jsonl, maxFileBytes: 10000000}}\n"
    )
}

fn main() {
    let args = Args::parse();
    let up = Upstream::start();
    let p = TestProxy::start(&config(&up, 10), &[]);
    let pid = p.child.id();
    let end = Instant::now() + Duration::from_secs_f64(args.minutes * 60.0);
    let (mut last_reload, mut last_print) = (Instant::now(), Instant::now());
    let (mut ok, mut denied, mut other, mut reloads) = (0u64, 0u64, 0u64, 0u32);
    println!(
        "{:>6} {:>10} {:>10} {:>8} {:>8} {:>10} {:>6}",
        "secs", "allowed", "denied", "other", "reloads", "RSS KiB", "fds"
    );
    let t0 = Instant::now();
    while Instant::now() < end {
        for text in ["short", "this text is far too long"] {
            let r = call(
                p.proxy,
                "POST",
                &format!("http://{}/v1/notes", up.addr),
                &[
                    ("X-Tollgate-Tenant", "acme"),
                    ("Content-Type", "application/json"),
                ],
                Some(&format!("{{\"text\":\"{text}\"}}")),
            );
            match r.status {
                200 => ok += 1,
                403 => denied += 1,
                _ => other += 1,
            }
        }
        if last_reload.elapsed() >= Duration::from_secs(args.reload_every) {
            reloads += 1;
            p.rewrite_config(&config(&up, 10 + reloads % 2));
            last_reload = Instant::now();
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            let (rss, fds) = proc_stat(pid);
            println!(
                "{:>6} {ok:>10} {denied:>10} {other:>8} {reloads:>8} {rss:>10} {fds:>6}",
                t0.elapsed().as_secs()
            );
            last_print = Instant::now();
        }
    }
    let (rss, fds) = proc_stat(pid);
    println!("done: {ok} allowed, {denied} denied, {other} other, {reloads} reloads; final RSS {rss} KiB, {fds} fds");
}
