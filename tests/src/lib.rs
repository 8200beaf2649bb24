//! Shared helpers for the end-to-end tests: spawn the real binaries, real upstream servers on
//! loopback, and raw HTTP clients for crafted requests.

pub mod harness;
pub mod operator;
pub mod slow_upstream;
