//! Config/snapshot deserialisation and validation on arbitrary YAML: never panics; a config
//! that validates re-serialises and validates again.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Ok(cfg) = tollgate_proxy::config::parse_str(s) else { return };
    if tollgate_proxy::snapshot::Snapshot::build(cfg.clone(), 1, std::path::Path::new("/")).is_ok() {
        let again = serde_json::to_string(&cfg).unwrap();
        let cfg2 = tollgate_proxy::config::parse_str(&again).unwrap();
        assert!(tollgate_proxy::snapshot::Snapshot::build(cfg2, 2, std::path::Path::new("/")).is_ok());
    }
});
