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
    let text = tollgate_proxy::demo::DEMO_CONFIG
        .replace("{payments}", "127.0.0.1:1")
        .replace("{support}", "127.0.0.1:2");
    let cfg = tollgate_proxy::config::parse_str(&text).unwrap();
    std::env::set_var("TOLLGATE_DEMO_STRIPE_KEY", "k");
    std::env::set_var("TOLLGATE_DEMO_ADMIN_TOKEN", "0123456789abcdef0123");
    tollgate_proxy::snapshot::Snapshot::build(cfg, 1, std::path::Path::new(".")).unwrap();
}
