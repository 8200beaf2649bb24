//! Group-committing, hash-chaining JSONL writer on its own thread.
//!
//! Callers queue a record and await the acknowledgement; the writer takes whatever is queued,
//! chains and writes the batch, fsyncs once, then acknowledges the whole batch. So the disk is
//! touched once per batch, not once per call, and no caller waits longer than one commit.
//!
//! The hand-off costs one lock per record and one wake-up per batch in each direction: only
//! the record that finds the writer idle wakes it, and the writer wakes a batch's callers with
//! one notification. A batch of only `outcome` records (which gate nothing: the call's decision
//! record was durable before it was forwarded) is written without an fsync; the next batch
//! that needs one, or the writer going idle for [`LAZY_SYNC`], makes it durable.

use super::AuditRecord;
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::Notify;

/// How long written-but-unsynced outcome records may wait for an fsync when nothing else comes.
pub const LAZY_SYNC: Duration = Duration::from_millis(20);

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

/// One batch's acknowledgement: set once by the writer, awaited by every record in it.
#[derive(Default)]
struct BatchAck {
    /// Sequence number of the batch's first record, or why the batch failed.
    done: OnceLock<Result<u64, AuditError>>,
    notify: Notify,
}

/// What callers and the writer share.
struct Queue {
    records: Vec<AuditRecord>,
    /// The acknowledgement of the records now queued.
    batch: Arc<BatchAck>,
    /// The writer is waiting for records: the next append wakes it.
    writer_idle: bool,
    /// Every handle is gone: the writer drains and stops.
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// Closes the queue when the last handle goes.
struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        if let Ok(mut q) = self.0.queue.lock() {
            q.closed = true;
        }
        self.0.wake.notify_one();
    }
}

/// Handle to the audit writer.
#[derive(Clone)]
pub struct AuditLog {
    shared: Arc<Shared>,
    _closer: Arc<Closer>,
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
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                records: Vec::with_capacity(256),
                batch: Arc::default(),
                writer_idle: false,
                closed: false,
            }),
            wake: Condvar::new(),
        });
        let records = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let (r, e, sh) = (records.clone(), errors.clone(), shared.clone());
        std::thread::Builder::new()
            .name("tollgate-audit".into())
            .spawn(move || run(state, &sh, stdout, r, e))
            .map_err(|e| AuditError::Io(e.to_string()))?;
        Ok(Self {
            _closer: Arc::new(Closer(shared.clone())),
            shared,
            records,
            errors,
        })
    }

    /// Append a record and wait until it is written — durable (fsynced) unless it is an
    /// `outcome` record. Returns its sequence number.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let (batch, index) = {
            let mut q = self.shared.queue.lock().map_err(|_| AuditError::Stopped)?;
            if q.closed {
                return Err(AuditError::Stopped);
            }
            q.records.push(record);
            if q.writer_idle {
                q.writer_idle = false;
                self.shared.wake.notify_one();
            }
            (q.batch.clone(), q.records.len() as u64 - 1)
        };
        loop {
            let notified = batch.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a notification in between is not missed.
            notified.as_mut().enable();
            if let Some(done) = batch.done.get() {
                return done.clone().map(|first| first + index);
            }
            notified.await;
        }
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
    /// Written without an fsync since the last one.
    unsynced: bool,
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
            unsynced: false,
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
    shared: &Shared,
    stdout: bool,
    records: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) {
    let mut spare: Vec<AuditRecord> = Vec::with_capacity(256);
    loop {
        let (mut batch, ack) = {
            let Ok(mut q) = shared.queue.lock() else {
                return;
            };
            while q.records.is_empty() {
                if q.closed {
                    let _ = sync(&mut st);
                    return;
                }
                q.writer_idle = true;
                if st.unsynced {
                    // Idle with outcome records not yet synced: sync them soon.
                    let Ok((g, timeout)) = shared.wake.wait_timeout(q, LAZY_SYNC) else {
                        return;
                    };
                    q = g;
                    if timeout.timed_out() && q.records.is_empty() {
                        if let Err(e) = sync(&mut st) {
                            tracing::error!(error = %e, path = %st.path.display(), "audit fsync failed");
                        }
                    }
                } else {
                    let Ok(g) = shared.wake.wait(q) else {
                        return;
                    };
                    q = g;
                }
            }
            q.writer_idle = false;
            let batch = std::mem::replace(&mut q.records, std::mem::take(&mut spare));
            let ack = std::mem::take(&mut q.batch);
            (batch, ack)
        };
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
        let _ = ack.done.set(result);
        ack.notify.notify_waiters();
        batch.clear();
        spare = batch;
    }
}

/// One record as a JSON line (without the newline). The input, serialised once when the call
/// was decided, is spliced in as it is: `input` is the record's last field, so the line is
/// the record serialised with `"input":null` and that `null` replaced by the text.
fn write_line(buf: &mut Vec<u8>, r: &mut AuditRecord) -> serde_json::Result<()> {
    let input = std::mem::take(&mut r.input);
    let res = serde_json::to_writer(&mut *buf, &*r);
    if res.is_ok() {
        const TAIL: &[u8] = b"null}";
        debug_assert!(buf.ends_with(TAIL), "input is the last field of a record");
        buf.truncate(buf.len() - TAIL.len());
        buf.extend_from_slice(input.json().as_bytes());
        buf.push(b'}');
    }
    r.input = input;
    res
}

fn sync(st: &mut ChainState) -> std::io::Result<()> {
    if st.unsynced {
        st.file.sync_data()?;
        st.unsynced = false;
    }
    Ok(())
}

fn commit(st: &mut ChainState, batch: &mut [AuditRecord], stdout: bool) -> Result<u64, AuditError> {
    st.maybe_rotate()
        .map_err(|e| AuditError::Io(e.to_string()))?;
    let (start_seq, start_prev) = (st.seq, st.prev.clone());
    let mut buf = Vec::with_capacity(batch.len() * 1024);
    let ts = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut seq = st.seq;
    let mut prev = st.prev.clone();
    // Only a batch of outcome records alone may skip the fsync (module docs).
    let durable = batch.iter().any(|r| r.phase != Some(super::Phase::Outcome));
    for r in batch.iter_mut() {
        seq += 1;
        r.seq = seq;
        r.ts.clone_from(&ts);
        r.prev = prev;
        let start = buf.len();
        write_line(&mut buf, r).map_err(|e| AuditError::Io(e.to_string()))?;
        prev = hex::encode(Sha256::digest(&buf[start..]));
        buf.push(b'\n');
    }
    let res = st
        .file
        .write_all(&buf)
        .and_then(|_| if durable { st.file.sync_data() } else { Ok(()) });
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
    st.unsynced = !durable;
    if stdout {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&buf);
    }
    Ok(start_seq + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Phase;

    fn record(call: usize, phase: Phase) -> AuditRecord {
        AuditRecord {
            phase: Some(phase),
            call: format!("call_{call}"),
            decision: "allow".into(),
            ..Default::default()
        }
    }

    /// Many concurrent callers, batched: each gets its own sequence number, every number from
    /// 1 to N is handed out once, and the file is a valid chain of exactly those records.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_get_distinct_seqs_and_a_valid_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, false, None).unwrap();
        let mut tasks = Vec::new();
        for i in 0..400 {
            let log = log.clone();
            let phase = if i % 3 == 0 {
                Phase::Outcome
            } else {
                Phase::Decision
            };
            tasks.push(tokio::spawn(async move {
                (i, log.append(record(i, phase)).await.unwrap())
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        let mut only: Vec<u64> = seqs.iter().map(|(_, s)| *s).collect();
        only.sort_unstable();
        assert_eq!(only, (1..=400).collect::<Vec<u64>>());
        assert_eq!(log.records_written(), 400);
        let report = crate::audit::verify::verify(std::slice::from_ref(&path)).unwrap();
        assert!(report.ok(), "{report:?}");
        // The line with seq N is the record that was acknowledged with N.
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        for (i, seq) in seqs {
            assert_eq!(lines[seq as usize - 1]["call"], format!("call_{i}"));
        }
    }

    /// The spliced line is the record serialised as a whole.
    #[test]
    fn spliced_input_line_equals_the_serialised_record() {
        let mut r = record(7, Phase::Decision);
        r.input = crate::redact::RecordedInput::from(
            &serde_json::json!({"request": {"body": {"amount": 1.5, "text": "a\"b"}}, "version": 1}),
        );
        let mut buf = Vec::new();
        write_line(&mut buf, &mut r).unwrap();
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            serde_json::to_string(&r).unwrap()
        );
        let mut empty = record(8, Phase::Outcome);
        let mut buf = Vec::new();
        write_line(&mut buf, &mut empty).unwrap();
        assert!(buf.ends_with(b"\"input\":null}"));
        // A cut stream's outcome record (the optional field sits before the input).
        let mut cut = record(9, Phase::Outcome);
        cut.cut = Some("idle_timeout".into());
        cut.input = r.input.clone();
        let mut buf = Vec::new();
        write_line(&mut buf, &mut cut).unwrap();
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            serde_json::to_string(&cut).unwrap()
        );
    }

    /// An outcome-only batch is written (readable, chained) and acknowledged; the writer
    /// syncs it when idle, and a dropped log still leaves every record in the file.
    #[tokio::test]
    async fn outcome_records_are_written_and_the_chain_continues() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        {
            let log = AuditLog::open(&path, false, None).unwrap();
            assert_eq!(log.append(record(1, Phase::Outcome)).await.unwrap(), 1);
            assert_eq!(log.append(record(2, Phase::Decision)).await.unwrap(), 2);
            assert_eq!(log.append(record(3, Phase::Outcome)).await.unwrap(), 3);
        }
        let log = AuditLog::open(&path, false, None).unwrap();
        assert_eq!(log.append(record(4, Phase::Decision)).await.unwrap(), 4);
        let report = crate::audit::verify::verify(&[path]).unwrap();
        assert!(report.ok(), "{report:?}");
    }
}
