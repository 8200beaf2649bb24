//! The load benchmark runs end to end (`load-bench --smoke`: real nginx, real wrk, real
//! Tollgate processes, the bare hyper proxy) and writes a complete report. It checks structure, never speed.

use tollgate_tests::harness::bin;

#[test]
fn load_bench_smoke_run_reports_every_target() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = std::process::Command::new(bin("load-bench"))
        .args(["--smoke", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let results = v["results"].as_array().unwrap();
    let names: Vec<&str> = results
        .iter()
        .map(|r| r["target"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 7, "{names:?}");
    assert_eq!(names[0], "direct");
    assert_eq!(names[1], "nginx");
    assert_eq!(names[2], "bare hyper");
    assert!(names.contains(&"tollgate pass-through"), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("tollgate full")));
    for r in results {
        assert!(r["max_rps"].as_f64().unwrap() > 0.0, "{r}");
        let fr = &r["fixed_rate"][0];
        assert!(fr["p50_us"].as_f64().unwrap() > 0.0, "{r}");
        assert!(fr["p99_us"].as_f64().unwrap() >= fr["p50_us"].as_f64().unwrap());
        assert_eq!(fr["errors"], 0, "{r}");
        if r["target"] != "direct" {
            assert!(r["peak_rss_kib"].as_u64().unwrap() > 0, "{r}");
            assert!(r["cpu_us_per_request"].as_f64().is_some(), "{r}");
            assert!(r["throughput_vs_nginx"].as_f64().is_some());
        }
    }
    assert!(text.contains("vs nginx"), "prints the table: {text}");
    // The ratios against the bare hyper proxy are printed next to the budget, and the CPU
    // ratio of pass-through is computed (its value is not asserted: timing is not stable).
    assert!(text.contains("budget (issue 16)"), "{text}");
    let budget = v["budget"].as_array().unwrap();
    let pass = budget
        .iter()
        .find(|b| b["what"] == "pass-through CPU/request vs bare hyper")
        .unwrap();
    assert!(pass["measured"].as_f64().unwrap() > 0.0, "{pass}");
    assert_eq!(pass["limit"], 2.0);
}
