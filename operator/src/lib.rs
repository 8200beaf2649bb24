#![forbid(unsafe_code)]
pub mod webhook;
