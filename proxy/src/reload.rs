//! Hot reload of the standalone config file: watch, validate, then swap. A bad edit is logged
//! and counted and the old snapshot stays; in-flight calls keep the snapshot they started with.

use crate::snapshot::Snapshot;
use crate::state::ProxyState;
use notify::{RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Load and validate a config file into a snapshot.
pub(crate) fn load_snapshot(
    path: &Path,
    version: u64,
) -> Result<Snapshot, crate::config::ConfigError> {
    let raw = crate::config::load_file(path)?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Snapshot::build(raw, version, &base)
}

/// Watch `path` (through its directory, so editors that replace the file are seen) and
/// reload on change. Also polls the file's mtime every second as a fallback.
pub(crate) fn watch(
    path: PathBuf,
    state: Arc<ProxyState>,
    version: Arc<AtomicU64>,
) -> notify::Result<notify::RecommendedWatcher> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let file_name = path.file_name().map(|f| f.to_owned());
    let t2 = tx.clone();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            // Reading the file (our own reload does) raises access events; reacting to them
            // would rebuild the snapshot in a loop.
            use notify::event::{EventKind, ModifyKind};
            let relevant = matches!(
                ev.kind,
                EventKind::Create(_)
                    | EventKind::Remove(_)
                    | EventKind::Modify(
                        ModifyKind::Data(_) | ModifyKind::Name(_) | ModifyKind::Any
                    )
                    | EventKind::Any
            );
            if relevant
                && ev
                    .paths
                    .iter()
                    .any(|p| p.file_name() == file_name.as_deref())
            {
                let _ = tx.send(());
            }
        }
    })?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let p2 = path.clone();
    tokio::spawn(async move {
        let mut last = mtime(&p2);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let m = mtime(&p2);
            if m != last {
                last = m;
                if t2.send(()).is_err() {
                    return;
                }
            }
        }
    });
    tokio::spawn(async move {
        let mut last_hash = state.snapshot.load().as_ref().map(|s| s.hash.clone());
        while rx.recv().await.is_some() {
            // Debounce: editors write in several steps.
            tokio::time::sleep(Duration::from_millis(150)).await;
            while rx.try_recv().is_ok() {}
            let next = version.load(Ordering::SeqCst) + 1;
            match load_snapshot(&path, next) {
                Ok(snap) => {
                    if last_hash.as_deref() == Some(snap.hash.as_str()) {
                        continue;
                    }
                    version.store(next, Ordering::SeqCst);
                    last_hash = Some(snap.hash.clone());
                    tracing::info!(version = next, hash = %snap.hash, path = %path.display(), "config reloaded");
                    state.install(Arc::new(snap));
                }
                Err(e) => {
                    state.metrics.reload_errors.inc();
                    tracing::error!(error = %e, path = %path.display(), "config reload rejected; keeping the previous config");
                }
            }
        }
    });
    Ok(watcher)
}

fn mtime(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}
