//! Tollgate control plane: CRDs ([`crd`]) and the checks a real API server runs on them
//! ([`crd_check`]), the pure build from CRDs to per-agent proxy
//! snapshots ([`build`]), the snapshot server sidecars long-poll ([`hub`], [`server`]), the
//! watch loop that keeps them current and writes status ([`run`]), the admission webhooks
//! ([`webhook`]), and an in-process test API server ([`testapi`]).
#![forbid(unsafe_code)]

pub mod build;
pub mod crd;
pub mod crd_check;
pub mod hub;
pub mod run;
pub mod server;
pub mod testapi;
pub mod webhook;
