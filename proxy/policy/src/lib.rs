//! Tollgate's policy layer, without networking (no hyper, no tokio): the compiled policy
//! bundle and its decision types ([`PolicyBundle`], [`PolicyDecision`], [`PolicyError`]),
//! evaluated on regorus's RVM, the `input` document they are evaluated on ([`input`], the
//! contract with the Rego library), and the offline `policy test` runner ([`policy_test`]). The
//! sidecar evaluates calls with it, the operator's admission webhook compile-checks
//! `AgentPolicy` sources with it, and `tollgate-proxy policy test` runs a library's tests.
#![forbid(unsafe_code)]

mod bundle;
pub mod input;
pub mod policy_test;

pub use bundle::*;
pub use input::{canonical_json, sha256_hex, PolicyInput, SECRET_HEADERS};
