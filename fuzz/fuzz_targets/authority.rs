//! Host and authority parsing: never panics, and a parsed host is already normal.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate_proxy::target::{normalise_host, parse_authority, Scheme};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok((host, _port)) = parse_authority(s, Scheme::Https) {
        if !host.contains(':') {
            assert_eq!(normalise_host(&host).as_deref(), Ok(host.as_str()));
        }
    }
});
