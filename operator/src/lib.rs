//! Tollgate control plane: CRDs ([`crd`]) and the checks a real API server runs on them
//! ([`crd_check`]), the pure build from CRDs to per-agent proxy snapshots ([`build`]), the
//! snapshot server sidecars long-poll ([`hub`], [`server`]), the kube-runtime controllers that
//! keep them current and write status ([`controller`]), run by [`run`], with their metrics
//! ([`metrics`]) and certificates ([`pki`]), and the admission webhooks ([`webhook`]); sidecars' audit checkpoints are kept by
//! [`audit_checkpoints`]. An
//! in-process test API server ([`testapi`]) is behind the `test-api` feature.
#![forbid(unsafe_code)]

pub mod audit_checkpoints;
pub mod build;
pub mod controller;
pub mod crd;
pub mod crd_check;
pub mod hub;
pub mod metrics;
pub mod pki;
pub mod rotation;
pub mod run;
pub mod server;
#[cfg(feature = "test-api")]
pub mod testapi;
pub mod webhook;
