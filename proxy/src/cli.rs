//! Command implementations behind `tollgate-proxy`'s subcommands. Each returns the process
//! exit code: 0 ok, 1 check or test failed, 2 usage error, 64 invalid config.

use crate::runtime::{start_from_file, StartError};
use std::path::Path;

/// Exit code for an invalid config.
pub const EXIT_CONFIG: u8 = 64;

/// Install the tracing subscriber.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        b.json().flatten_event(true).try_init()
    } else {
        b.try_init()
    };
}

/// `run --config FILE`.
pub async fn run(config: &Path) -> u8 {
    let running = match start_from_file(config, None, None).await {
        Ok(r) => r,
        Err(StartError::Config(e)) => {
            eprintln!("invalid config {}: {e}", config.display());
            return EXIT_CONFIG;
        }
        Err(e) => {
            eprintln!("cannot start: {e}");
            return 1;
        }
    };
    wait_for_signal().await;
    tracing::info!("shutting down: draining in-flight calls");
    running.stop().await;
    0
}

/// Wait for SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// `check --config FILE`.
pub fn check(config: &Path) -> u8 {
    match crate::reload::load_snapshot(config, 1) {
        Ok(s) => {
            println!(
                "{}: ok — agent {}, {} tools, {} tenants, policy bundle {}",
                config.display(),
                s.agent.name,
                s.tools.len(),
                s.agent.tenants.len(),
                &s.policy.hash()[..12]
            );
            0
        }
        Err(e) => {
            eprintln!("{}: {e}", config.display());
            EXIT_CONFIG
        }
    }
}

/// `demo`.
pub async fn demo() -> u8 {
    match crate::demo::run().await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            1
        }
    }
}
