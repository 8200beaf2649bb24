//! Command implementations behind `tollgate-proxy`'s subcommands. Each returns the process
//! exit code: 0 ok, 1 check or test failed, 2 usage error, 64 invalid config.

use crate::runtime::{start_from_file, StartError};
use std::path::Path;

/// Exit code for an invalid config.
pub const EXIT_CONFIG: u8 = 64;

/// `run --config FILE`.
pub async fn run(config: &Path) -> u8 {
    let running = match start_from_file(config, None, None).await {
        Ok(r) => r,
        Err(StartError::Config(e)) => {
            eprintln!("invalid config {}: {e}", config.display());
            return EXIT_CONFIG;
        }
        Err(e) => {
            eprintln!("cannot start: {e}");
            return 1;
        }
    };
    wait_for_signal().await;
    tracing::info!("shutting down: draining in-flight calls");
    running.stop().await;
    0
}

/// Local settings given on the command line in operator mode (the injected sidecar's args).
#[derive(Debug, Default)]
pub struct LocalOverrides {
    /// `listen.proxy`.
    pub listen_proxy: Option<String>,
    /// `listen.admin`.
    pub listen_admin: Option<String>,
    /// `listen.transparent`.
    pub listen_transparent: Option<String>,
    /// `audit.path`.
    pub audit_path: Option<String>,
    /// Directory with `tls.crt` and `tls.key` of the interception CA.
    pub intercept_ca_dir: Option<std::path::PathBuf>,
}

/// `run --operator URL --agent NS/NAME --token-file F [--config LOCAL]`.
pub async fn run_operator(
    config: Option<&Path>,
    args: crate::control::ControlArgs,
    local: LocalOverrides,
) -> u8 {
    let (base, dir) = match config {
        Some(p) => match crate::config::load_file(p) {
            Ok(c) => (
                c,
                p.parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| ".".into()),
            ),
            Err(e) => {
                eprintln!("invalid config {}: {e}", p.display());
                return EXIT_CONFIG;
            }
        },
        None => {
            let name = args.agent.rsplit('/').next().unwrap_or(&args.agent);
            let minimal = serde_json::json!({"agent": {"name": name, "tenants": []}});
            (
                serde_json::from_value(minimal).expect("minimal config"),
                ".".into(),
            )
        }
    };
    let mut base = base;
    if let Some(a) = local.listen_proxy {
        base.listen.proxy = a;
    }
    if let Some(a) = local.listen_admin {
        base.listen.admin = a;
    }
    if local.listen_transparent.is_some() {
        base.listen.transparent = local.listen_transparent;
    }
    if let Some(p) = local.audit_path {
        base.audit.path = p;
    }
    if let Some(d) = local.intercept_ca_dir {
        base.tls.intercept = Some(crate::config::InterceptConfig {
            ca_cert: d.join("tls.crt").display().to_string(),
            ca_key: d.join("tls.key").display().to_string(),
        });
    }
    let running = match crate::runtime::start_operator(base, &dir, args).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start: {e}");
            return 1;
        }
    };
    wait_for_signal().await;
    tracing::info!("shutting down: draining in-flight calls");
    running.stop().await;
    0
}

/// Wait for SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// `check --config FILE`.
pub fn check(config: &Path) -> u8 {
    match crate::reload::load_snapshot(config, 1) {
        Ok(s) => {
            println!(
                "{}: ok — agent {}, {} tools, {} tenants, policy bundle {}",
                config.display(),
                s.agent.name,
                s.tools.len(),
                s.agent.tenants.len(),
                &s.policy.hash()[..12]
            );
            0
        }
        Err(e) => {
            eprintln!("{}: {e}", config.display());
            EXIT_CONFIG
        }
    }
}

/// `demo`.
pub async fn demo() -> u8 {
    match crate::demo::run().await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            1
        }
    }
}

/// `approvals list|approve|deny` against a sidecar's admin port.
pub async fn approvals(
    admin: &str,
    token: &str,
    action: &str,
    id: Option<&str>,
    reason: Option<&str>,
) -> u8 {
    let (method, path, body) = match (action, id) {
        ("list", _) => ("GET", "/approvals".to_string(), String::new()),
        ("approve" | "deny", Some(id)) => (
            "POST",
            format!("/approvals/{id}/{action}"),
            serde_json::json!({"reason": reason}).to_string(),
        ),
        _ => {
            eprintln!("usage: tollgate-proxy approvals list|approve ID|deny ID --admin URL");
            return 2;
        }
    };
    match admin_request(admin, token, method, &path, body).await {
        Ok((status, json)) if (200..300).contains(&status) => {
            if action == "list" {
                let items = json["approvals"].as_array().cloned().unwrap_or_default();
                if items.is_empty() {
                    println!("no approval requests");
                }
                for a in items {
                    println!(
                        "{}  {:<8}  {}  tenant={}  run={}  {}\n    reasons: {}{}",
                        a["id"].as_str().unwrap_or(""),
                        a["state"].as_str().unwrap_or(""),
                        a["summary"]["tool"].as_str().unwrap_or(""),
                        a["summary"]["tenant"].as_str().unwrap_or(""),
                        a["summary"]["run"].as_str().unwrap_or(""),
                        a["summary"]["target"].as_str().unwrap_or(""),
                        a["summary"]["reasons"]
                            .as_array()
                            .map(|r| r
                                .iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join("; "))
                            .unwrap_or_default(),
                        a["approver"]
                            .as_str()
                            .map(|x| format!("\n    decided by {x}"))
                            .unwrap_or_default(),
                    );
                }
            } else {
                println!(
                    "{} {} by {}",
                    json["id"].as_str().unwrap_or(""),
                    json["state"].as_str().unwrap_or(""),
                    json["approver"].as_str().unwrap_or("")
                );
            }
            0
        }
        Ok((status, json)) => {
            eprintln!(
                "{status}: {}",
                json["reason"].as_str().unwrap_or(&json.to_string())
            );
            1
        }
        Err(e) => {
            eprintln!("cannot reach the admin API at {admin}: {e}");
            1
        }
    }
}

/// One request to the admin API (plain HTTP on the pod's loopback).
pub async fn admin_request(
    admin: &str,
    token: &str,
    method: &str,
    path: &str,
    body: String,
) -> anyhow::Result<(u16, serde_json::Value)> {
    use http_body_util::BodyExt;
    let authority = admin.trim_start_matches("http://").trim_end_matches('/');
    let stream = tokio::net::TcpStream::connect(authority).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", authority)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
    let res = sender.send_request(req).await?;
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await?.to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    ))
}

/// `audit verify FILE...`.
pub fn audit_verify(files: &[std::path::PathBuf], allow_torn_tail: bool) -> u8 {
    let files = crate::audit::verify::order_files(files);
    match crate::audit::verify::verify(&files) {
        Err(e) => {
            eprintln!("cannot read audit files: {e}");
            1
        }
        Ok(r) => {
            if let Some((f, line)) = &r.torn_tail {
                if !allow_torn_tail {
                    println!("TRUNCATED: {}:{line}: the final line is incomplete (truncated, or a crash mid-write); the {} records before it chain correctly (use --allow-torn-tail after a crash)", f.display(), r.records);
                    return 1;
                }
                eprintln!("warning: {}:{line}: incomplete final line (a crash mid-write); verified up to the last complete record", f.display());
            }
            match &r.broken {
                Some(b) => {
                    println!("BROKEN after {} good records: {b}", r.records);
                    1
                }
                None => {
                    let head = r
                        .head
                        .as_ref()
                        .map(|(s, h)| format!("; head seq {s} sha256 {h}"))
                        .unwrap_or_default();
                    let from = r
                        .started_at
                        .map(|s| format!(" (from seq {s}; earlier files not given)"))
                        .unwrap_or_default();
                    println!("ok: {} records chain correctly{from}{head}", r.records);
                    0
                }
            }
        }
    }
}

/// `audit verify FILE... --checkpoints SOURCE [--public-key K]`.
pub fn audit_verify_checkpoints(
    files: &[std::path::PathBuf],
    allow_torn_tail: bool,
    source: &str,
    public_key: Option<&str>,
) -> u8 {
    use crate::audit::{checkpoint, verify};
    let pinned = match public_key.map(checkpoint::read_public_key).transpose() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let trusted = match checkpoint::load(source, pinned.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            println!("{e}");
            return 1;
        }
    };
    let files = verify::order_files(files);
    let anchored = match verify::verify_against(&files, &trusted) {
        Err(e) => {
            eprintln!("cannot read audit files: {e}");
            return 1;
        }
        Ok(Err(e)) => {
            println!("{e}");
            return 1;
        }
        Ok(Ok(a)) => a,
    };
    let r = &anchored.report;
    if let Some((f, line)) = &r.torn_tail {
        if !allow_torn_tail {
            println!("TRUNCATED: {}:{line}: the final line is incomplete (truncated, or a crash mid-write); the {} records before it chain correctly (use --allow-torn-tail after a crash)", f.display(), r.records);
            return 1;
        }
        eprintln!("warning: {}:{line}: incomplete final line (a crash mid-write); verified up to the last complete record", f.display());
    }
    if !anchored.pinned {
        eprintln!("warning: checkpoint signatures were checked against the key the checkpoints name (key {}); pass --public-key with the registered key to pin it", anchored.key_id);
    }
    let head = r.head.as_ref().map_or(0, |(s, _)| *s);
    let from = r
        .started_at
        .map(|s| format!(" (from seq {s})"))
        .unwrap_or_default();
    let unanchored = head.saturating_sub(anchored.latest.seq);
    println!(
        "ok: {} records chain correctly{from} and extend all {} checkpoints signed by key {}{}; latest {} at seq {}{}",
        r.records,
        anchored.checkpoints,
        anchored.key_id,
        if anchored.pinned { " (pinned)" } else { "" },
        anchored.latest.ts,
        anchored.latest.seq,
        if unanchored > 0 {
            format!("; {unanchored} newer record(s) not yet checkpointed")
        } else {
            String::new()
        }
    );
    for (name, a, b) in &anchored.pruned {
        println!("  not given: {name} (seq {a}..{b}), no longer listed by the latest checkpoint (pruned or shipped)");
    }
    0
}

/// `audit key --key-file F`: print the checkpoint key's public half and id.
pub fn audit_key(key_file: &Path) -> u8 {
    match crate::audit::checkpoint::CheckpointKey::load_or_create(key_file) {
        Ok(k) => {
            println!("key id:     {}", k.id());
            println!("public key: {}", k.public_key());
            println!(
                "exported:   {}",
                crate::audit::checkpoint::public_key_path(key_file).display()
            );
            0
        }
        Err(e) => {
            eprintln!("{}: {e}", key_file.display());
            1
        }
    }
}

/// `audit runs FILE... [--json] [--since 24h|RFC3339] [--by-outcome]`.
pub fn audit_runs(
    files: &[std::path::PathBuf],
    json: bool,
    since: Option<&str>,
    by_outcome: bool,
) -> u8 {
    let since = match since.map(parse_since).transpose() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let files = crate::audit::verify::order_files(files);
    let records = match crate::audit::read_records(&files) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot read audit files: {e}");
            return 1;
        }
    };
    let mut runs = crate::audit::runs::summarise(&records);
    if by_outcome {
        let agents = crate::audit::runs::by_outcome(&runs, since);
        if json {
            for a in &agents {
                println!("{}", serde_json::to_string(a).unwrap_or_default());
            }
        } else {
            print!("{}", crate::audit::runs::render_outcomes(&agents));
        }
        return 0;
    }
    if let Some(since) = since {
        runs.retain(|r| {
            time::OffsetDateTime::parse(&r.ended, &time::format_description::well_known::Rfc3339)
                .is_ok_and(|t| t >= since)
        });
    }
    if json {
        for r in &runs {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        }
    } else {
        print!("{}", crate::audit::runs::render_text(&runs));
    }
    0
}

/// `--since`: a duration back from now (`24h`, `7d`) or an RFC 3339 time.
fn parse_since(s: &str) -> Result<time::OffsetDateTime, String> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    let d: crate::config::ConfigDuration = s
        .parse()
        .map_err(|e| format!("--since takes a duration (24h, 7d) or an RFC 3339 time: {e}"))?;
    Ok(time::OffsetDateTime::now_utc() - d.get())
}

/// `replay --audit FILE... --policies DIR [--data FILE] [--fail-on-change]`.
pub fn replay(
    files: &[std::path::PathBuf],
    policies: &Path,
    data: Option<&Path>,
    fail_on_change: bool,
    json: bool,
) -> u8 {
    let data = match data {
        None => serde_json::json!({}),
        Some(p) => match std::fs::read_to_string(p)
            .map_err(|e| e.to_string())
            .and_then(|t| yaml_serde::from_str::<serde_json::Value>(&t).map_err(|e| e.to_string()))
        {
            Ok(v) => v,
            Err(e) => {
                eprintln!("--data {}: {e}", p.display());
                return EXIT_CONFIG;
            }
        },
    };
    let bundle = match crate::audit::replay::load_bundle(policies, data) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{}: {e}", policies.display());
            return EXIT_CONFIG;
        }
    };
    let files = crate::audit::verify::order_files(files);
    let records = match crate::audit::read_records(&files) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot read audit files: {e}");
            return 1;
        }
    };
    let rep = crate::audit::replay::replay(&records, &bundle);
    if json {
        println!("{}", serde_json::to_string_pretty(&rep).unwrap_or_default());
    } else {
        for c in &rep.changes {
            println!(
                "seq {} run {} {}: {} -> {}  {}",
                c.seq,
                c.run,
                c.tool,
                c.old,
                c.new,
                c.reasons.join("; ")
            );
        }
        println!("{} decision records: {} replayed, {} changed, {} refused before policy (not replayable)", rep.records, rep.replayed, rep.changes.len(), rep.not_replayable);
    }
    u8::from(fail_on_change && !rep.changes.is_empty())
}

/// `policy test DIR`.
pub fn policy_test(dir: &Path) -> u8 {
    match crate::policy_test::run(dir) {
        Ok(report) => {
            print!("{report}");
            u8::from(report.failed() > 0)
        }
        Err(e) => {
            eprintln!("{}: {e:#}", dir.display());
            1
        }
    }
}

/// `ca init --out DIR`: create the interception CA and say how to trust it.
pub fn ca_init(out: &Path, days: i64, force: bool) -> u8 {
    match crate::intercept::tls::init(out, days, force) {
        Ok(files) => {
            let ca = files.cert.display();
            println!("interception CA written:\n  certificate {ca}\n  private key {} (mode 0600; only the sidecar reads it)", files.key.display());
            println!(
                "\nsidecar config:\n  tls:\n    intercept: {{caCert: {ca}, caKey: {}}}",
                files.key.display()
            );
            println!("\nmake the agent's runtime trust it (the CA alone, or appended to the system bundle):");
            println!(
                "  SSL_CERT_FILE={ca}          # OpenSSL, Go, Ruby, Rust (rustls-native-certs)"
            );
            println!("  REQUESTS_CA_BUNDLE={ca}     # Python requests");
            println!("  NODE_EXTRA_CA_CERTS={ca}    # Node.js (added to the defaults)");
            println!("  CURL_CA_BUNDLE={ca}         # curl");
            0
        }
        Err(e) => {
            eprintln!("ca init: {e}");
            1
        }
    }
}

/// `iptables [--apply]`: print or install the transparent-mode redirect rules.
pub fn iptables(rules: &crate::intercept::transparent::RedirectRules, apply: bool) -> u8 {
    if !apply {
        print!("{}", rules.script());
        return 0;
    }
    match rules.apply() {
        Ok(()) => {
            eprintln!(
                "transparent redirect installed: tcp ports {:?} -> :{} (uid {} exempt)",
                rules.ports, rules.to_port, rules.proxy_uid
            );
            0
        }
        Err(e) => {
            eprintln!("iptables --apply failed: {e}");
            1
        }
    }
}

/// `tools diff --config FILE --tool NAME [--url URL]` (see [`crate::pins::command`]).
pub async fn tools_diff(config: &Path, tool: &str, url: Option<&str>) -> u8 {
    crate::pins::command::diff(config, tool, url).await
}

/// `tools pin --config FILE --tool NAME --sha256 H [--url URL]` (see [`crate::pins::command`]).
pub async fn tools_pin(config: &Path, tool: &str, sha256: &str, url: Option<&str>) -> u8 {
    crate::pins::command::pin(config, tool, sha256, url).await
}
