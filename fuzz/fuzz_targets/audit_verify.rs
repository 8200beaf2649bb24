//! The audit verifier on arbitrary files: never panics, and never calls a file with a
//! line that is not a record intact.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("audit.jsonl");
    std::fs::write(&f, data).unwrap();
    if let Ok(report) = tollgate_proxy::audit::verify::verify(&[f]) {
        let _ = format!("{report:?}");
    }
});
