//! Admission webhooks (AdmissionReview v1 over HTTPS): sidecar injection into agent pods,
//! stamping of approvers and kill-switch engagers from the API server's `userInfo`, and
//! validation of Rego and input schemas before they are stored. The operator manages its own
//! serving certificate ([`certs`]); no cert-manager is needed.
//!
//! The handlers are pure functions from an `AdmissionRequest` to an `AdmissionResponse`, so
//! they are tested exactly as the API server calls them.

pub mod admission;
pub mod certs;
pub mod inject;
pub mod server;
