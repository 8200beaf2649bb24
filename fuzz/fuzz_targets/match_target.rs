//! The tool matcher on arbitrary method/path pairs: never panics, and a match is always a
//! tool whose host the target names.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tollgate_proxy::snapshot::Snapshot;
use tollgate_proxy::target::{normalise_path, Scheme, Target, Via};

fn snap() -> &'static Snapshot {
    static S: OnceLock<Snapshot> = OnceLock::new();
    S.get_or_init(|| {
        let cfg = "agent: {name: f, tenants: [t]}\ntools:\n  - {name: a, match: {host: api.example.com, methods: [GET], path: \"/v1/charges/{id}\"}}\n  - {name: b, match: {host: \"*.example.com\", path: \"/files/{*rest}\"}}\n  - {name: c, match: {host: api.example.com, methods: [POST], path: /v1/refunds}}\n";
        Snapshot::build(tollgate_proxy::config::parse_str(cfg).unwrap(), 1, std::path::Path::new("/")).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (method, rest) = s.split_once(' ').unwrap_or(("GET", s));
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else { return };
    let Ok(path) = normalise_path(rest) else { return };
    for host in ["api.example.com", "x.example.com", "evil.com"] {
        let t = Target { scheme: Scheme::Https, host: host.into(), port: 443, method: method.clone(), path: path.clone(), query: None, via: Via::Connect };
        if let tollgate_proxy::route::RouteMatch::Tool(i) = snap().catalog.match_target(&t) {
            assert!(host.ends_with("example.com"), "{host} matched tool {i}");
        }
    }
});
