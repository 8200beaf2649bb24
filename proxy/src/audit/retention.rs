//! Retention of rotated audit files: the ship hook (run for every rotated file, on its own
//! thread so a slow archive never holds up the chain) and pruning by age. A pruned file drops
//! out of the next checkpoint's file set, which is what lets `audit verify --checkpoints`
//! accept its absence while still requiring every file the latest checkpoint lists.

use super::checkpoint::FileEntry;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Shipping and pruning of rotated files.
#[derive(Clone, Debug, Default)]
pub struct Retention {
    /// Delete rotated files last written longer ago than this.
    pub max_age: Option<Duration>,
    /// Run with a rotated file's path appended; exit 0 means shipped (and prunable).
    pub ship_command: Vec<String>,
}

/// The rotated files of a chain still on disk, oldest first, with their ship state.
pub(super) struct RotatedFiles {
    /// Path and what a checkpoint says about it.
    pub files: Vec<(PathBuf, FileEntry)>,
    retention: Retention,
    /// Ship hook state per file: `None` while it runs, `Some(ok)` when it finished.
    shipped: Arc<Mutex<HashMap<PathBuf, Option<bool>>>>,
}

impl RotatedFiles {
    pub(super) fn new(files: Vec<(PathBuf, FileEntry)>, retention: Retention) -> Self {
        Self {
            files,
            retention,
            shipped: Arc::default(),
        }
    }

    /// Shipping or pruning is configured.
    pub(super) fn active(&self) -> bool {
        self.retention.max_age.is_some() || !self.retention.ship_command.is_empty()
    }

    /// A file just rotated: keep it and ship it.
    pub(super) fn push(&mut self, path: PathBuf, entry: FileEntry) {
        self.files.push((path.clone(), entry));
        self.ship(path);
    }

    /// Start the ship hook for `file` (on its own thread: a slow archive never holds up
    /// the chain).
    fn ship(&self, file: PathBuf) {
        let Some((prog, args)) = self.retention.ship_command.split_first() else {
            return;
        };
        let (prog, args) = (prog.clone(), args.to_vec());
        let shipped = self.shipped.clone();
        if let Ok(mut m) = shipped.lock() {
            m.insert(file.clone(), None);
        }
        let this = file.clone();
        let spawned = std::thread::Builder::new()
            .name("tollgate-audit-ship".into())
            .spawn(move || {
                let ok = match std::process::Command::new(&prog)
                    .args(&args)
                    .arg(&file)
                    .stdin(std::process::Stdio::null())
                    .status()
                {
                    Ok(s) if s.success() => true,
                    Ok(s) => {
                        tracing::warn!(file = %file.display(), status = %s, "audit ship hook failed; retried at the next checkpoint");
                        false
                    }
                    Err(e) => {
                        tracing::warn!(file = %file.display(), error = %e, "audit ship hook could not run; retried at the next checkpoint");
                        false
                    }
                };
                if ok {
                    tracing::info!(file = %file.display(), "audit file shipped");
                }
                if let Ok(mut m) = shipped.lock() {
                    m.insert(file, Some(ok));
                }
            });
        if spawned.is_err() {
            if let Ok(mut m) = self.shipped.lock() {
                m.insert(this, Some(false));
            }
        }
    }

    /// (Re)start the ship hook for every rotated file not shipped yet and not being shipped.
    pub(super) fn ship_pending(&self) {
        if self.retention.ship_command.is_empty() {
            return;
        }
        let pending: Vec<PathBuf> = {
            let Ok(m) = self.shipped.lock() else { return };
            self.files
                .iter()
                .map(|(p, _)| p)
                .filter(|p| matches!(m.get(*p), None | Some(Some(false))))
                .cloned()
                .collect()
        };
        for p in pending {
            self.ship(p);
        }
    }

    /// Delete rotated files older than the retention age (shipped ones only, when a ship
    /// hook is configured). The next checkpoint no longer lists them.
    pub(super) fn prune(&mut self) {
        let Some(max_age) = self.retention.max_age else {
            return;
        };
        let need_ship = !self.retention.ship_command.is_empty();
        let shipped = self.shipped.lock().map(|m| m.clone()).unwrap_or_default();
        let now = SystemTime::now();
        self.files.retain(|(p, e)| {
            let old = std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > max_age);
            if !old || (need_ship && shipped.get(p) != Some(&Some(true))) {
                return true;
            }
            match std::fs::remove_file(p) {
                Ok(()) => {
                    tracing::info!(file = %p.display(), first_seq = e.first_seq, last_seq = e.last_seq, "audit file pruned (retention.maxAge)");
                    false
                }
                Err(err) => {
                    tracing::warn!(file = %p.display(), error = %err, "cannot prune audit file");
                    true
                }
            }
        });
    }
}
