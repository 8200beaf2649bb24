//! Strict JSON, form and MCP parsing of request bodies: never panics, and an accepted JSON
//! body re-serialises to JSON that parses to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = tollgate_proxy::input::parse_json(data) {
        let _ = tollgate_proxy::input::mcp_call(&v);
        let again = serde_json::to_vec(&v).unwrap();
        assert_eq!(tollgate_proxy::input::parse_json(&again).ok(), Some(v));
    }
    let _ = tollgate_proxy::input::parse_form(data);
});
