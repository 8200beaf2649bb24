//! Property checks over generated input (a deterministic, seeded fuzz run that CI can afford;
//! `fuzz/` holds the same targets for cargo-fuzz): the parsers an attacker feeds never panic,
//! and path normalisation keeps its invariants — idempotent, rooted, no dot segments, no
//! empty segments, and no way to climb above the root.

use rand::{Rng, SeedableRng};
use tollgate_proxy::canonical::{parse_form, parse_json};
use tollgate_proxy::input::mcp_call;
use tollgate_proxy::target::{
    check_query, normalise_host, normalise_path, parse_authority, Scheme,
};

const ALPHABET: &[&str] = &[
    "/",
    "//",
    ".",
    "..",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "\\",
    "%00",
    "%25",
    "%252e",
    ";",
    "?",
    "#",
    "a",
    "b",
    "v1",
    "notes",
    "refunds",
    "%c0%af",
    "%e2%80%ae",
    "~",
    "-",
    "_",
    "%41",
    "%7e",
    "%",
    "%g1",
    "@",
    ":",
    "[",
    "]",
    " ",
];

fn gen_path(rng: &mut impl Rng) -> String {
    let n = rng.random_range(0..12);
    (0..n)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
        .collect()
}

#[test]
fn path_normalisation_invariants_hold() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x70_11_6a_7e);
    let mut accepted = 0;
    for _ in 0..200_000 {
        let raw = format!("/{}", gen_path(&mut rng));
        let Ok(p) = normalise_path(&raw) else {
            continue;
        };
        accepted += 1;
        assert!(p.starts_with('/'), "{raw:?} -> {p:?}");
        assert!(!p.contains("//"), "{raw:?} -> {p:?}");
        for seg in p.split('/').skip(1) {
            assert!(
                seg != "." && seg != "..",
                "{raw:?} -> {p:?} keeps a dot segment"
            );
            let lower = seg.to_ascii_lowercase();
            assert!(
                !lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%00"),
                "{raw:?} -> {p:?}"
            );
        }
        assert_eq!(
            normalise_path(&p).as_deref(),
            Ok(p.as_str()),
            "not idempotent: {raw:?}"
        );
    }
    assert!(
        accepted > 1000,
        "the generator must exercise the accepting path too ({accepted})"
    );
}

#[test]
fn parsers_never_panic_on_arbitrary_bytes() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let seeds: &[&[u8]] = &[
        br#"{"a":1,"b":[1,2,{"c":"d"}]}"#,
        br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{}}}"#,
        b"a=1&b=2&c=%20x",
        b"[[[[[[[[[[]]]]]]]]]]",
    ];
    for i in 0..100_000 {
        let mut buf: Vec<u8> = seeds[i % seeds.len()].to_vec();
        for _ in 0..rng.random_range(0..6) {
            let at = rng.random_range(0..=buf.len());
            match rng.random_range(0..3) {
                0 => buf.insert(at, rng.random()),
                1 if at < buf.len() => {
                    buf.remove(at);
                }
                _ => buf.insert(at, b"{}[]\":,\\u0000e+-.9"[rng.random_range(0..18)]),
            }
        }
        if let Ok(v) = parse_json(&buf) {
            let _ = mcp_call(&v);
        }
        let _ = parse_form(&buf);
        let s = String::from_utf8_lossy(&buf);
        let _ = normalise_host(&s);
        let _ = parse_authority(&s, Scheme::Https);
        let _ = check_query(&s);
    }
}

#[test]
fn hosts_normalise_to_one_spelling() {
    for (a, b) in [
        ("API.Example.COM", "api.example.com"),
        ("api.example.com.", "api.example.com"),
    ] {
        assert_eq!(normalise_host(a).unwrap(), normalise_host(b).unwrap());
    }
    for bad in [
        "",
        "a..b",
        "exa mple.com",
        "evil.com\0.example.com",
        "user@host",
    ] {
        assert!(normalise_host(bad).is_err(), "{bad:?}");
    }
}
