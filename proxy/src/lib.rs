//! Tollgate sidecar data plane.
//!
//! Every agent tool call passes one pipeline (see [`pipeline`]): intercept → identify → match
//! the tool → read and validate input → kill switch → rate limit → budget → Rego policy →
//! approval → forward → meter and record. Config arrives as a raw [`config::Config`] (file or
//! operator snapshot) and is lowered once into a validated [`snapshot::Snapshot`].
#![forbid(unsafe_code)]

pub mod config;
