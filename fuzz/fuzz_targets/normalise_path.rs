//! Path normalisation: never panics; accepted paths are rooted, idempotent, free of dot and
//! empty segments and of encoded separators.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(p) = tollgate_proxy::target::normalise_path(s) {
        assert!(p.starts_with('/'));
        assert!(!p.contains("//"));
        assert!(p.split('/').all(|seg| seg != "." && seg != ".."));
        assert_eq!(tollgate_proxy::target::normalise_path(&p).as_deref(), Ok(p.as_str()));
    }
});
