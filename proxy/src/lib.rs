//! Tollgate sidecar data plane.
//!
//! Every agent tool call passes one pipeline (see [`pipeline`]): intercept → identify → match
//! the tool → read and validate input → kill switch → rate limit → budget → Rego policy →
//! approval → forward → meter and record. Config arrives as a raw [`config::Config`] (file or
//! operator snapshot) and is lowered once into a validated [`snapshot::Snapshot`].
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

pub(crate) mod admin;
pub(crate) mod approval;
pub mod audit;
pub mod canonical;
pub mod cli;
pub(crate) mod codec;
pub mod config;
pub mod control;
pub mod demo;
pub(crate) mod idempotency;
pub mod identify;
pub mod input;
pub mod intercept;
pub(crate) mod killswitch;
pub mod limits;
pub(crate) mod mcp;
pub(crate) mod meter;
pub(crate) mod metrics;
pub mod outcome;
pub mod pins;
pub(crate) mod pipeline;
pub mod policy_input;
pub mod redact;
pub(crate) mod refusal;
pub(crate) mod reload;
pub mod route;
pub(crate) mod runtime;
pub mod snapshot;
pub(crate) mod stages;
pub(crate) mod state;
pub mod target;
pub mod telemetry;
pub(crate) mod upstream;

/// The policy engine wrapper and decision types (the `tollgate-policy` crate).
pub use tollgate_policy as policy;
/// `policy test`: the offline runner (in the `tollgate-policy` crate).
pub use tollgate_policy::policy_test;
