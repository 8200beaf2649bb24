//! Group-committing, hash-chaining JSONL writer on its own thread.
//!
//! Callers send a record and await the acknowledgement; the writer drains whatever is queued,
//! chains and writes the batch, fsyncs once, then acknowledges the whole batch. So the disk is
//! touched once per batch, not once per call, and no caller waits longer than one commit.

use super::AuditRecord;
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// `prev` of the first record of a new chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Why a record could not be made durable.
#[derive(Clone, Debug, thiserror::Error)]
pub enum AuditError {
    /// Write or fsync failed.
    #[error("audit write failed: {0}")]
    Io(String),
    /// The writer thread is gone.
    #[error("audit writer stopped")]
    Stopped,
}

struct Pending {
    record: AuditRecord,
    ack: oneshot::Sender<Result<u64, AuditError>>,
}

/// Handle to the audit writer.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::UnboundedSender<Pending>,
    records: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
}

impl AuditLog {
    /// Open (or continue) the chain in `path` and start the writer thread.
    pub fn open(
        path: &Path,
        stdout: bool,
        max_file_bytes: Option<u64>,
    ) -> Result<Self, AuditError> {
        let state = ChainState::open(path, max_file_bytes)
            .map_err(|e| AuditError::Io(format!("{}: {e}", path.display())))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let records = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let (r, e) = (records.clone(), errors.clone());
        std::thread::Builder::new()
            .name("tollgate-audit".into())
            .spawn(move || run(state, rx, stdout, r, e))
            .map_err(|e| AuditError::Io(e.to_string()))?;
        Ok(Self {
            tx,
            records,
            errors,
        })
    }

    /// Append a record and wait until it is durable. Returns its sequence number.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(Pending { record, ack })
            .map_err(|_| AuditError::Stopped)?;
        rx.await.map_err(|_| AuditError::Stopped)?
    }

    /// Records written so far.
    pub fn records_written(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// Failed writes so far.
    pub fn write_errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

struct ChainState {
    path: PathBuf,
    file: File,
    seq: u64,
    prev: String,
    size: u64,
    max_bytes: Option<u64>,
}

impl ChainState {
    fn open(path: &Path, max_bytes: Option<u64>) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let (seq, prev) = last_link(path)?;
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            seq,
            prev,
            size,
            max_bytes,
        })
    }

    /// Rotate to `<path>.<n>` when the file is over its size limit. The chain continues: the
    /// first record of the new file points at the last record of the old one.
    fn maybe_rotate(&mut self) -> std::io::Result<()> {
        let Some(max) = self.max_bytes else {
            return Ok(());
        };
        if self.size < max {
            return Ok(());
        }
        let mut n = 1;
        while rotated_name(&self.path, n).exists() {
            n += 1;
        }
        std::fs::rename(&self.path, rotated_name(&self.path, n))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// Name of the n-th rotated file: `audit.jsonl.1`, `audit.jsonl.2`, …
pub fn rotated_name(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// The chain head of an existing file: last complete line's seq and hash. A torn final line
/// (crash mid-write) is ignored, so the chain continues from the last complete record.
fn last_link(path: &Path) -> std::io::Result<(u64, String)> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, GENESIS.into())),
        Err(e) => return Err(e),
    };
    let mut last: Option<String> = None;
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        if buf.ends_with(b"\n") {
            last = Some(String::from_utf8_lossy(&buf[..buf.len() - 1]).into_owned());
        }
    }
    match last {
        None => Ok((0, GENESIS.into())),
        Some(line) => {
            let seq = serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .and_then(|v| v["seq"].as_u64())
                .unwrap_or(0);
            Ok((seq, line_hash(&line)))
        }
    }
}

/// Hex sha256 of one line (without its newline).
pub fn line_hash(line: &str) -> String {
    hex::encode(Sha256::digest(line.as_bytes()))
}

fn run(
    mut st: ChainState,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    stdout: bool,
    records: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(256);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let result = commit(&mut st, &mut batch, stdout);
        match &result {
            Ok(_) => {
                records.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                errors.fetch_add(batch.len() as u64, Ordering::Relaxed);
                tracing::error!(error = %e, path = %st.path.display(), "audit write failed; affected calls fail closed unless audit.failOpen");
                // Give a failing disk a moment rather than spinning on it.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        for (i, p) in batch.drain(..).enumerate() {
            let r = match &result {
                Ok(first_seq) => Ok(first_seq + i as u64),
                Err(e) => Err(e.clone()),
            };
            let _ = p.ack.send(r);
        }
    }
}

fn commit(st: &mut ChainState, batch: &mut [Pending], stdout: bool) -> Result<u64, AuditError> {
    st.maybe_rotate()
        .map_err(|e| AuditError::Io(e.to_string()))?;
    let (start_seq, start_prev) = (st.seq, st.prev.clone());
    let mut buf = Vec::with_capacity(batch.len() * 1024);
    let ts = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut seq = st.seq;
    let mut prev = st.prev.clone();
    for p in batch.iter_mut() {
        seq += 1;
        p.record.seq = seq;
        p.record.ts = ts.clone();
        p.record.prev = prev.clone();
        let line = serde_json::to_string(&p.record).map_err(|e| AuditError::Io(e.to_string()))?;
        prev = line_hash(&line);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
    }
    let res = st.file.write_all(&buf).and_then(|_| st.file.sync_data());
    if let Err(e) = res {
        // The file may now hold a partial batch; re-read the head so the chain stays valid.
        if let Ok((s, p)) = last_link(&st.path) {
            st.seq = s;
            st.prev = p;
        } else {
            st.seq = start_seq;
            st.prev = start_prev;
        }
        return Err(AuditError::Io(e.to_string()));
    }
    st.size += buf.len() as u64;
    st.seq = seq;
    st.prev = prev;
    if stdout {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&buf);
    }
    Ok(start_seq + 1)
}
