//! Strict JSON, form and MCP parsing of request bodies: never panics, and an accepted body
//! re-serialises (as the rebuilt upstream request does) to bytes that parse to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate_proxy::canonical::{parse_form, parse_json, serialize_form};

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = parse_json(data) {
        let _ = tollgate_proxy::input::mcp_call(&v);
        let again = serde_json::to_vec(&v).unwrap();
        assert_eq!(parse_json(&again).ok(), Some(v));
    }
    if let Ok(m) = parse_form(data) {
        if let Ok(again) = serialize_form(&m) {
            assert_eq!(parse_form(again.as_bytes()).ok(), Some(m));
        }
    }
});
