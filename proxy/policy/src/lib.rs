//! Tollgate's policy layer, without networking (no hyper, no tokio): the compiled policy
//! bundle and its decision types ([`PolicyBundle`], [`PolicyDecision`], [`PolicyError`]),
//! evaluated on regorus's RVM, and the offline `policy test` runner ([`policy_test`]). The
//! sidecar evaluates calls with it, the operator's admission webhook compile-checks
//! `AgentPolicy` sources with it, and `tollgate-proxy policy test` runs a library's tests.
#![forbid(unsafe_code)]

mod bundle;
pub mod policy_test;

pub use bundle::*;
