//! The printed tables: latency and throughput, instructions, the ratios against the bare hyper
//! proxy next to the budget of issue 16, the curves, and the baseline comparison.

use serde_json::{json, Value};
use std::path::Path;

/// The latency/throughput table; adds the ratio fields to each result.
pub fn table(results: &mut [Value]) {
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
}

fn by_name<'a>(results: &'a [Value], prefix: &str) -> Option<&'a Value> {
    results
        .iter()
        .find(|r| r["target"].as_str().is_some_and(|t| t.starts_with(prefix)))
}

/// Instructions per request, and per request relative to the bare hyper proxy.
pub fn instructions_table(results: &[Value]) {
    if results
        .iter()
        .all(|r| r["instructions_per_request"].is_null())
    {
        return;
    }
    let bare = by_name(results, "bare hyper")
        .and_then(|b| b["instructions_per_request"].as_f64())
        .unwrap_or(0.0);
    println!(
        "\n{:<38} {:>14} {:>12}",
        "target", "instr/request", "vs bare"
    );
    for r in results {
        let Some(ir) = r["instructions_per_request"].as_f64() else {
            continue;
        };
        let ratio = if bare > 0.0 {
            format!("{:.2}x", ir / bare)
        } else {
            "-".into()
        };
        println!(
            "{:<38} {:>14.0} {:>12}",
            r["target"].as_str().unwrap_or(""),
            ir,
            ratio
        );
    }
}

/// The budget lines: each measured ratio or figure next to its limit.
pub fn budget(results: &[Value]) -> Value {
    let bare = by_name(results, "bare hyper");
    let pass = by_name(results, "tollgate pass-through");
    let full = by_name(results, "tollgate full");
    let ratio = |t: Option<&Value>, field: &str| -> Option<f64> {
        let b = bare?[field].as_f64()?;
        let x = t?[field].as_f64()?;
        (b > 0.0).then(|| x / b)
    };
    let added = |q: &str| -> Option<f64> {
        full?["added_over_direct"]
            .as_array()?
            .iter()
            .find(|a| a["rate"] == 1000)?[q]
            .as_f64()
    };
    let mib = |t: Option<&Value>, f: &str| t?[f].as_f64().map(|k| k / 1024.0);
    let lines = vec![
        (
            "pass-through CPU/request vs bare hyper",
            ratio(pass, "cpu_us_per_request"),
            2.0,
            "x",
        ),
        (
            "pass-through instructions/request vs bare hyper",
            ratio(pass, "instructions_per_request"),
            2.0,
            "x",
        ),
        (
            "full pipeline CPU/request vs bare hyper",
            ratio(full, "cpu_us_per_request"),
            5.0,
            "x",
        ),
        (
            "full pipeline instructions/request vs bare hyper",
            ratio(full, "instructions_per_request"),
            5.0,
            "x",
        ),
        (
            "full pipeline added p50 @1k/s (µs)",
            added("added_p50_us"),
            100.0,
            "",
        ),
        (
            "full pipeline added p99 @1k/s (µs)",
            added("added_p99_us"),
            300.0,
            "",
        ),
        (
            "full pipeline idle RSS (MiB)",
            mib(full, "idle_rss_kib"),
            15.0,
            "",
        ),
        (
            "full pipeline peak RSS under load (MiB)",
            mib(full, "peak_rss_kib"),
            50.0,
            "",
        ),
    ];
    println!(
        "\n{:<50} {:>10} {:>8} {:>8}",
        "budget (issue 16)", "measured", "limit", ""
    );
    let mut out = Vec::new();
    for (what, measured, limit, unit) in lines {
        let (m, verdict) = match measured {
            Some(m) => (
                format!("{m:.2}{unit}"),
                if m <= limit { "met" } else { "MISSED" },
            ),
            None => ("-".to_string(), "not measured"),
        };
        println!(
            "{what:<50} {m:>10} {:>8} {verdict:>8}",
            format!("<= {limit}{unit}")
        );
        out.push(json!({"what": what, "measured": measured, "limit": limit, "met": measured.map(|m| m <= limit)}));
    }
    println!("(shipped-policy evaluation <= 10 µs p50 is measured by `make bench`: policy/*)");
    Value::Array(out)
}

/// The curves: CPU and instructions per request as the catalog and the policy grow.
pub fn curves(curves: &[Value]) {
    println!(
        "\n{:<38} {:>10} {:>14} {:>10}",
        "curve", "cpu µs/r", "instr/request", "max rps"
    );
    for c in curves {
        let f = |k: &str, p: usize| {
            c[k].as_f64()
                .map(|v| format!("{v:.p$}"))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "{:<38} {:>10} {:>14} {:>10}",
            c["target"].as_str().unwrap_or(""),
            f("cpu_us_per_request", 1),
            f("instructions_per_request", 0),
            f("max_rps", 0)
        );
    }
}

fn measured(results: &[Value], curves: &[Value]) -> Vec<(String, f64)> {
    results
        .iter()
        .chain(curves)
        .filter_map(|r| {
            Some((
                r["target"].as_str()?.to_string(),
                r["instructions_per_request"].as_f64()?,
            ))
        })
        .collect()
}

/// Write the instruction counts as a baseline.
pub fn write_baseline(path: &Path, requests: u64, results: &[Value], curves: &[Value]) {
    let targets: serde_json::Map<String, Value> = measured(results, curves)
        .into_iter()
        .map(|(k, v)| (k, json!(v)))
        .collect();
    let v = json!({
        "about": "callgrind instructions per request, written by `load-bench --instructions-only --write-baseline`; compared by `make perf-check`",
        "requests": requests,
        "instructions_per_request": targets,
    });
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap() + "\n").unwrap();
}

/// Compare with a baseline; false when a target grew more than `fail_over` percent.
pub fn compare(
    path: &Path,
    results: &[Value],
    curves: &[Value],
    fail_over: f64,
) -> Result<bool, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let base: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let base = &base["instructions_per_request"];
    let now = measured(results, curves);
    if now.is_empty() {
        return Err("nothing measured: is valgrind installed? (--callgrind on)".into());
    }
    println!(
        "\n{:<38} {:>14} {:>14} {:>9}",
        "instructions/request", "baseline", "now", "change"
    );
    let mut ok = true;
    for (name, ir) in now {
        let Some(b) = base[&name].as_f64() else {
            println!("{name:<38} {:>14} {ir:>14.0} {:>9}", "-", "new");
            continue;
        };
        let change = (ir - b) / b * 100.0;
        let flag = if change > fail_over {
            ok = false;
            "  REGRESSED"
        } else {
            ""
        };
        println!("{name:<38} {b:>14.0} {ir:>14.0} {change:>8.1}%{flag}");
    }
    if !ok {
        println!("a target regressed by more than {fail_over}% (instructions per request)");
    }
    Ok(ok)
}
