//! Operator run loop (filled below).
/// Arguments of `tollgate-operator run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {}
/// Entry point.
pub fn main(_a: RunArgs) -> std::process::ExitCode {
    std::process::ExitCode::FAILURE
}
