//! `load-bench`: direct vs nginx vs a bare hyper proxy vs Tollgate, side by side, on loopback.
//!
//! One run measures, for each target: fixed-rate latency (open loop, 32 connections, latency
//! taken from each request's intended send time so a stall is not hidden — no coordinated
//! omission) at every `--rates` value, maximum throughput with `wrk` (32 connections), idle and
//! peak RSS, CPU time per request from `/proc`, and — where valgrind is installed —
//! instructions per request under callgrind (repeatable where CPU time is not). Each timed
//! figure is the median of `--reps` runs. The process under test is pinned to CPU 0; this
//! process (load generator and upstream) to CPU 1. It then measures the curves (10 to 10,000
//! tools; 1, 8 and 64 policy modules), prints the ratios against the bare hyper proxy next to
//! the budget of issue 16, and writes JSON to `bench-results/`.
//!
//! `make load-bench` runs it in release mode; `--smoke` is a seconds-long run for tests;
//! `make perf-check` (`--instructions-only --baseline tests/perf-baseline.json`) is the
//! instruction-count regression check.

#[path = "load_bench/callgrind.rs"]
mod callgrind;
#[path = "load_bench/load.rs"]
mod load;
#[path = "load_bench/report.rs"]
mod report;
#[path = "load_bench/targets.rs"]
mod targets;

use clap::Parser;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use targets::{Env, Kind, Spec, TollgateConfig};

#[derive(Parser, Debug)]
#[command(
    name = "load-bench",
    about = "direct vs nginx vs bare hyper vs Tollgate on loopback"
)]
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
    /// A seconds-long run (for tests): 1 s, 1 rep, 200 req/s, no callgrind, no curves.
    #[arg(long)]
    smoke: bool,
    /// Instructions per request under callgrind: auto (when valgrind is installed), on, off.
    #[arg(long, default_value = "auto")]
    callgrind: String,
    /// Requests measured per target under callgrind.
    #[arg(long, default_value_t = 500)]
    callgrind_requests: u64,
    /// Only instruction counts (no latency, wrk or curves unless --curves): the regression check.
    #[arg(long)]
    instructions_only: bool,
    /// Measure the curves (on by default, off for --smoke and --instructions-only).
    #[arg(long)]
    curves: Option<bool>,
    /// Compare instruction counts with this baseline (written by --write-baseline).
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Exit 1 when a target's instructions per request grew more than this many percent over
    /// the baseline.
    #[arg(long, default_value_t = 20.0)]
    fail_over: f64,
    /// Write the measured instruction counts as a new baseline.
    #[arg(long)]
    write_baseline: Option<PathBuf>,
    /// JSON output (default bench-results/load-<unix time>.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// tollgate-proxy binary (default: next to this binary).
    #[arg(long)]
    proxy_bin: Option<PathBuf>,
    /// bare-proxy binary (default: next to this binary).
    #[arg(long)]
    bare_bin: Option<PathBuf>,
    /// Only these targets (names, comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
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

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The side-by-side targets, in report order.
fn main_specs() -> Vec<Spec> {
    let policies = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../policies")
        .canonicalize()
        .unwrap();
    // A generous evaluation deadline: under callgrind (50x slower) on a shared core, the default
    // 50 ms would deny; the deadline check itself costs the same whatever its value.
    let rego = format!(
        "policies: {{paths: [\"{}\"], timeout: 10s}}\n",
        policies.display()
    );
    let limits = "tenants:\n  acme:\n    rateLimits: [{scope: tenant, perSecond: 1000000}]\n    budgets: {dayUsd: 1000000}\n";
    let tollgate = |extra: String, audit_on_disk: bool| {
        Kind::Tollgate(TollgateConfig {
            extra,
            audit_on_disk,
            ..Default::default()
        })
    };
    vec![
        Spec::new("direct", Kind::Direct),
        Spec::new("nginx", Kind::Nginx),
        Spec::new("bare hyper", Kind::Bare),
        Spec::new("tollgate pass-through", tollgate(String::new(), false)),
        Spec::new("tollgate +rego", tollgate(rego.clone(), false)),
        Spec::new(
            "tollgate +rego+limits+budget",
            tollgate(format!("{rego}{limits}"), false),
        ),
        Spec::new(
            "tollgate full (+audit fsync on disk)",
            tollgate(format!("{rego}{limits}"), true),
        ),
    ]
}

/// The curves: pass-through with a growing catalog, and generated policy modules.
fn curve_specs() -> Vec<(String, u64, Spec)> {
    let mut out = Vec::new();
    for n in [10u64, 100, 1_000, 10_000] {
        let cfg = TollgateConfig {
            extra_tools: n as usize - 1,
            ..Default::default()
        };
        out.push((
            "tools".to_string(),
            n,
            Spec::new(&format!("tollgate, {n} tools"), Kind::Tollgate(cfg)),
        ));
    }
    for n in [1u64, 8, 64] {
        let cfg = TollgateConfig {
            modules: Some(n as usize),
            ..Default::default()
        };
        out.push((
            "policy_modules".to_string(),
            n,
            Spec::new(
                &format!("tollgate, {n} policy modules"),
                Kind::Tollgate(cfg),
            ),
        ));
    }
    out
}

/// Latency at fixed rates, wrk throughput, CPU per request and memory of one started target.
fn timed(t: &targets::Target, args: &Args, rates: &[u64]) -> Value {
    let idle_rss = t.pid.map(load::vm_rss_kib);
    // Warm up connections and caches.
    let _ = load::fixed_rate(t, 200, args.conns.min(8), 1);
    let mut per_rate = Vec::new();
    for &rate in rates {
        let (mut p50, mut p99, mut p999, mut errs) = (vec![], vec![], vec![], 0);
        for _ in 0..args.reps {
            let (h, _sent, e) = load::fixed_rate(t, rate, args.conns, args.duration);
            p50.push(h.value_at_quantile(0.5) as f64);
            p99.push(h.value_at_quantile(0.99) as f64);
            p999.push(h.value_at_quantile(0.999) as f64);
            errs += e;
        }
        per_rate.push(json!({"rate": rate, "p50_us": median(p50), "p99_us": median(p99), "p999_us": median(p999), "errors": errs}));
    }
    let (mut rps, mut cpu) = (vec![], vec![]);
    for _ in 0..args.reps {
        let before = t.pid.map(load::cpu_ticks).unwrap_or(0);
        let (r, n) = load::max_throughput(t, args.conns, args.duration);
        let after = t.pid.map(load::cpu_ticks).unwrap_or(0);
        rps.push(r);
        if n > 0 && t.pid.is_some() {
            cpu.push((after - before) as f64 * 10_000.0 / n as f64); // 100 ticks/s → µs
        }
    }
    json!({
        "target": t.name,
        "fixed_rate": per_rate,
        "max_rps": median(rps),
        "cpu_us_per_request": if cpu.is_empty() { Value::Null } else { json!(median(cpu)) },
        "idle_rss_kib": idle_rss,
        "peak_rss_kib": t.pid.map(load::vm_hwm_kib),
    })
}

fn instructions(spec: &Spec, env: &Env, n: u64) -> Value {
    if matches!(spec.kind, Kind::Direct) {
        return Value::Null;
    }
    eprintln!("callgrind: {} ({n} requests)", spec.name);
    match callgrind::instructions_per_request(spec, env, n) {
        Ok(ir) => json!(ir.round()),
        Err(e) => {
            eprintln!("callgrind: {}: {e}", spec.name);
            Value::Null
        }
    }
}

fn main() {
    let mut args = Args::parse();
    if args.smoke {
        args.duration = 1;
        args.reps = 1;
        args.rates = vec![200];
    }
    let use_callgrind = match args.callgrind.as_str() {
        "on" => true,
        "off" => false,
        _ => !args.smoke && callgrind::available(),
    };
    let curves = args
        .curves
        .unwrap_or(!args.smoke && !args.instructions_only);
    pin_self(1);
    let proxy_bin = args.proxy_bin.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .join("tollgate-proxy")
    });
    assert!(
        proxy_bin.exists(),
        "{} not found: build it first (cargo build --release --bins)",
        proxy_bin.display()
    );
    let bare_bin = args.bare_bin.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .join("bare-proxy")
    });
    let (upstream, _up_rt) = targets::start_upstream();
    let env = Env {
        upstream,
        bare_bin,
        proxy_bin,
    };
    let specs: Vec<Spec> = main_specs()
        .into_iter()
        .filter(|s| args.only.is_empty() || args.only.contains(&s.name))
        .collect();
    let mut results: Vec<Value> = Vec::new();
    for spec in &specs {
        let mut r = if args.instructions_only {
            json!({"target": spec.name})
        } else {
            let t = targets::start(spec, &env, None);
            timed(&t, &args, &args.rates.clone())
        };
        if use_callgrind {
            r["instructions_per_request"] = instructions(spec, &env, args.callgrind_requests);
        }
        results.push(r);
    }
    let mut curve_results = Vec::new();
    if curves {
        for (axis, n, spec) in curve_specs() {
            let mut r = json!({"axis": axis, "n": n, "target": spec.name});
            if !args.instructions_only {
                let t = targets::start(&spec, &env, None);
                let before = t.pid.map(load::cpu_ticks).unwrap_or(0);
                let (rps, total) = load::max_throughput(&t, args.conns, args.duration);
                let after = t.pid.map(load::cpu_ticks).unwrap_or(0);
                r["max_rps"] = json!(rps);
                r["cpu_us_per_request"] = if total > 0 {
                    json!((after - before) as f64 * 10_000.0 / total as f64)
                } else {
                    Value::Null
                };
                r["peak_rss_kib"] = json!(t.pid.map(load::vm_hwm_kib));
            }
            if use_callgrind {
                r["instructions_per_request"] = instructions(&spec, &env, args.callgrind_requests);
            }
            curve_results.push(r);
        }
    }
    if !args.instructions_only && args.only.is_empty() {
        report::table(&mut results);
    }
    report::instructions_table(&results);
    let budget = report::budget(&results);
    if !curve_results.is_empty() {
        report::curves(&curve_results);
    }
    let mut exit = 0;
    if let Some(b) = &args.baseline {
        match report::compare(b, &results, &curve_results, args.fail_over) {
            Ok(true) => {}
            Ok(false) => exit = 1,
            Err(e) => {
                eprintln!("baseline {}: {e}", b.display());
                exit = 2;
            }
        }
    }
    if let Some(p) = &args.write_baseline {
        report::write_baseline(p, args.callgrind_requests, &results, &curve_results);
        println!("baseline written: {}", p.display());
    }
    let report = json!({
        "args": {"duration_s": args.duration, "reps": args.reps, "rates": args.rates, "conns": args.conns, "callgrind_requests": if use_callgrind { json!(args.callgrind_requests) } else { Value::Null }},
        "results": results,
        "budget": budget,
        "curves": curve_results,
    });
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
    std::process::exit(exit);
}
