//! Tollgate sidecar data plane.
//!
//! Every agent tool call passes one pipeline (see [`pipeline`]): intercept → identify → match
//! the tool → read and validate input → kill switch → rate limit → budget → Rego policy →
//! approval → forward → meter and record. Config arrives as a raw [`config::Config`] (file or
//! operator snapshot) and is lowered once into a validated [`snapshot::Snapshot`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod approval;
pub mod audit;
pub mod canonical;
pub mod cli;
pub mod codec;
pub mod config;
pub mod control;
pub mod demo;
pub mod idempotency;
pub mod identify;
pub mod input;
pub mod intercept;
pub mod killswitch;
pub mod limits;
pub mod mcp;
pub mod meter;
pub mod metrics;
pub mod pipeline;
pub mod policy_input;
pub mod redact;
pub mod refusal;
pub mod reload;
pub mod route;
pub mod runtime;
pub mod snapshot;
pub mod stages;
pub mod state;
pub mod target;
pub mod telemetry;
pub mod upstream;

/// The policy engine wrapper and decision types (the `tollgate-policy` crate).
pub use tollgate_policy as policy;
/// `policy test`: the offline runner (in the `tollgate-policy` crate).
pub use tollgate_policy::policy_test;
