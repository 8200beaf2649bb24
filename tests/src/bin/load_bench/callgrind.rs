//! Instructions per request under callgrind: repeatable where CPU time is not (a shared,
//! noisy machine). The target starts under `valgrind --tool=callgrind` with instrumentation
//! off, is warmed up uninstrumented (connections, pools, lazy statics, the first Rego
//! evaluation), then instrumentation is switched on, a fixed number of requests is sent and
//! the counters are dumped. Instructions of every thread of the process count: the audit
//! writer's, tokio's, the kernel's not (callgrind sees user space only).

use super::load::drive;
use super::targets::{start, Env, Spec};
use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Whether valgrind is installed.
pub fn available() -> bool {
    Command::new("valgrind")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Instructions per request of `spec` over `requests` requests (after 200 warm-up requests).
pub fn instructions_per_request(spec: &Spec, env: &Env, requests: u64) -> Result<f64, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let out = dir.path().join("cg.out");
    let wrapper: Vec<OsString> = vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        "--instr-atstart=no".into(),
        format!("--callgrind-out-file={}", out.display()).into(),
    ];
    let t = start(spec, env, Some(&wrapper));
    let pid = t.pid.ok_or("no process to measure")?;
    let warm = drive(&t, 200, 4);
    if warm > 0 {
        return Err(format!("{}: {warm} warm-up requests failed", spec.name));
    }
    control(pid, &["-i", "on"])?;
    control(pid, &["-z"])?;
    let failed = drive(&t, requests, 4);
    if failed > 0 {
        return Err(format!("{}: {failed} measured requests failed", spec.name));
    }
    control(pid, &["--dump=measured"])?;
    let ir = read_dump(dir.path(), Duration::from_secs(60))?;
    drop(t);
    // `LOAD_BENCH_CALLGRIND_DIR=D`: keep each target's dumps in D for `callgrind_annotate`.
    if let Some(keep) = std::env::var_os("LOAD_BENCH_CALLGRIND_DIR") {
        let keep = Path::new(&keep);
        let _ = std::fs::create_dir_all(keep);
        let name: String = spec
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        for (i, e) in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .enumerate()
        {
            let _ = std::fs::copy(e.path(), keep.join(format!("{name}.{i}.out")));
        }
    }
    Ok(ir as f64 / requests as f64)
}

fn control(pid: u32, args: &[&str]) -> Result<(), String> {
    let out = Command::new("callgrind_control")
        .args(args)
        .arg(pid.to_string())
        .output()
        .map_err(|e| format!("callgrind_control: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "callgrind_control {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// The `totals:` (or `summary:`) line of the dump written by `--dump`.
fn read_dump(dir: &Path, limit: Duration) -> Result<u64, String> {
    let t0 = Instant::now();
    loop {
        for e in std::fs::read_dir(dir).map_err(|e| e.to_string())? {
            let p = e.map_err(|e| e.to_string())?.path();
            let Ok(text) = std::fs::read_to_string(&p) else {
                continue;
            };
            // The dump asked for by `--dump=measured` names its trigger.
            if !text.contains("measured") {
                continue;
            }
            let total = text
                .lines()
                .find_map(|l| l.strip_prefix("totals:"))
                .or_else(|| text.lines().find_map(|l| l.strip_prefix("summary:")))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok());
            if let Some(total) = total {
                return Ok(total);
            }
        }
        if t0.elapsed() > limit {
            return Err(format!("no callgrind dump in {}", dir.display()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
