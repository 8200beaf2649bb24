//! Generated artifacts must match the Rust types: regenerate with `make generate`.

#[test]
fn config_schema_is_up_to_date() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.schema.json");
    let checked_in: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(
        checked_in,
        tollgate_proxy::config::json_schema(),
        "proxy/config.schema.json is stale: run `make generate`"
    );
}

#[test]
fn shipped_example_configs_validate() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let cfg = tollgate_proxy::config::load_file(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let base = path.parent().unwrap();
            // Credentials come from env in examples; provide them.
            std::env::set_var("STRIPE_KEY", "sk_test_example");
            tollgate_proxy::snapshot::Snapshot::build(cfg, 1, base)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
}

#[test]
fn the_demo_config_is_valid() {
    let text = tollgate_proxy::cli::demo::DEMO_CONFIG
        .replace("{payments}", "127.0.0.1:1")
        .replace("{support}", "127.0.0.1:2");
    let cfg = tollgate_proxy::config::parse_str(&text).unwrap();
    std::env::set_var("TOLLGATE_DEMO_STRIPE_KEY", "k");
    std::env::set_var("TOLLGATE_DEMO_ADMIN_TOKEN", "0123456789abcdef0123");
    tollgate_proxy::snapshot::Snapshot::build(cfg, 1, std::path::Path::new(".")).unwrap();
}

/// What a config lowers to: every resolved setting and default of the snapshot, secrets left
/// out (credential header names only, approver names only).
fn lowering(s: &tollgate_proxy::snapshot::Snapshot) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    writeln!(o, "agent: {:#?}", s.agent).unwrap();
    for t in &s.tools {
        writeln!(
            o,
            "tool {}: connect={:?} header={:?} total={:?} credential_header={:?} schema={} mcp={}",
            t.name(),
            t.connect_timeout,
            t.header_timeout,
            t.total_timeout,
            t.credential.as_ref().map(|c| c.header.as_str()),
            t.schema.is_some(),
            t.mcp
        )
        .unwrap();
        writeln!(o, "  match: {:#?}", t.config.matcher).unwrap();
        writeln!(o, "  request: {:#?}", t.config.request).unwrap();
        writeln!(o, "  cost: {:#?}", t.config.cost).unwrap();
        writeln!(o, "  risk: {:#?}", t.config.risk).unwrap();
    }
    writeln!(o, "max_body: {}", s.max_body).unwrap();
    writeln!(o, "tenants: {:#?}", s.tenants).unwrap();
    writeln!(o, "approvals: {:#?}", s.approvals).unwrap();
    let approvers: Vec<&str> = s.admin_tokens.iter().map(|(_, n)| n.as_str()).collect();
    writeln!(o, "approvers: {approvers:?}").unwrap();
    writeln!(o, "audit: {:#?}", s.audit).unwrap();
    writeln!(o, "limits: {:#?}", s.limits).unwrap();
    writeln!(o, "server: {:#?}", s.server).unwrap();
    writeln!(o, "kill_switches: {:#?}", s.kill_switches).unwrap();
    o
}

/// Compare with `proxy/tests/golden/<name>.txt`; `TOLLGATE_BLESS=1` rewrites it.
fn golden(name: &str, got: &str) {
    let path = format!("{}/tests/golden/{name}.txt", env!("CARGO_MANIFEST_DIR"));
    if std::env::var_os("TOLLGATE_BLESS").is_some() {
        std::fs::create_dir_all(std::path::Path::new(&path).parent().unwrap()).unwrap();
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e} (create it with TOLLGATE_BLESS=1)"));
    if want != got {
        let diff: Vec<String> = want
            .lines()
            .zip(got.lines())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .take(10)
            .map(|(i, (a, b))| format!("line {}:\n  golden: {a}\n  now:    {b}", i + 1))
            .collect();
        panic!(
            "{name}: the lowering changed ({} vs {} lines); if intended, rerun with TOLLGATE_BLESS=1 and review the diff\n{}",
            want.lines().count(),
            got.lines().count(),
            diff.join("\n")
        );
    }
}

#[test]
fn example_configs_lower_to_their_golden_snapshots() {
    std::env::set_var("STRIPE_KEY", "sk_test_example");
    std::env::set_var("TOLLGATE_DEMO_STRIPE_KEY", "k");
    std::env::set_var("TOLLGATE_DEMO_ADMIN_TOKEN", "0123456789abcdef0123");
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let path = std::path::Path::new(examples).join("standalone.yaml");
    let cfg = tollgate_proxy::config::load_file(&path).unwrap();
    let snap = tollgate_proxy::snapshot::Snapshot::build(cfg, 1, path.parent().unwrap()).unwrap();
    golden("standalone", &lowering(&snap));
    let demo = tollgate_proxy::cli::demo::DEMO_CONFIG
        .replace("{payments}", "127.0.0.1:1")
        .replace("{support}", "127.0.0.1:2");
    let cfg = tollgate_proxy::config::parse_str(&demo).unwrap();
    let snap =
        tollgate_proxy::snapshot::Snapshot::build(cfg, 1, std::path::Path::new(".")).unwrap();
    golden("demo", &lowering(&snap));
    // An empty tool list lowers to every default.
    let cfg =
        tollgate_proxy::config::parse_str("agent: {name: a, tenants: [t]}\ntools: []\n").unwrap();
    let snap =
        tollgate_proxy::snapshot::Snapshot::build(cfg, 1, std::path::Path::new(".")).unwrap();
    golden("defaults", &lowering(&snap));
}
