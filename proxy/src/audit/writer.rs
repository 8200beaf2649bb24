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
//!
//! (One file, about 850 lines: the queue, the chain, rotation and checkpoints all run on the
//! writer thread and share its state; its tests are the bulk of the length.)

use super::checkpoint::{Checkpoint, CheckpointKey, FileEntry};
use super::retention::{Retention, RotatedFiles};
use super::AuditRecord;
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How long written-but-unsynced outcome records may wait for an fsync when nothing else comes.
pub(super) const LAZY_SYNC: Duration = Duration::from_millis(20);

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
    /// The writer thread, joined by [`AuditLog::close`].
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Where signed checkpoints of the chain go (see [`super::checkpoint`]).
pub struct CheckpointSink {
    /// Signing key.
    pub key: CheckpointKey,
    /// File the checkpoint lines are appended to.
    pub path: Option<PathBuf>,
    /// Also print them to stdout.
    pub stdout: bool,
    /// Time between periodic checkpoints.
    pub interval: Duration,
    /// Also hand each signed line to this channel (operator mode: the sidecar's uploader
    /// publishes them to the operator, see `crate::control::publish_checkpoints`). The sender
    /// is dropped when the writer stops, after the final checkpoint, which ends the uploader.
    pub publish: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

/// How a writer writes beyond the chain itself.
#[derive(Default)]
pub struct WriterOptions {
    /// Also write each record to stdout.
    pub stdout: bool,
    /// Rotate past this size.
    pub max_file_bytes: Option<u64>,
    /// Signed checkpoints (off when `None`).
    pub checkpoints: Option<CheckpointSink>,
    /// Shipping and pruning of rotated files.
    pub retention: Retention,
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

impl WriterOptions {
    /// The options `audit.*` asks for; relative paths are resolved against `base`. Loads (or
    /// creates) the checkpoint key and opens the checkpoint file, so a bad one stops the start.
    pub fn from_config(
        stdout: bool,
        max_file_bytes: Option<u64>,
        checkpoints: Option<&crate::config::AuditCheckpointConfig>,
        retention: &crate::config::AuditRetentionConfig,
        base: &Path,
    ) -> Result<Self, AuditError> {
        let resolve = |p: &str| crate::snapshot::resolve(base, p);
        let checkpoints = match checkpoints {
            None => None,
            Some(c) => {
                let key_path = resolve(c.key_file.as_deref().unwrap_or("audit-checkpoint.key"));
                let key = CheckpointKey::load_or_create(&key_path).map_err(|e| {
                    AuditError::Io(format!("checkpoint key {}: {e}", key_path.display()))
                })?;
                tracing::info!(
                    key_id = key.id(),
                    public_key = key.public_key(),
                    exported = %super::checkpoint::public_key_path(&key_path).display(),
                    "audit checkpoint signing key (register its public key with the verifier)"
                );
                let path = c.path.as_deref().map(resolve);
                if let Some(p) = &path {
                    if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                        std::fs::create_dir_all(dir)
                            .map_err(|e| AuditError::Io(format!("{}: {e}", dir.display())))?;
                    }
                    OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .map_err(|e| AuditError::Io(format!("{}: {e}", p.display())))?;
                }
                Some(CheckpointSink {
                    key,
                    path,
                    stdout: c.stdout,
                    interval: c
                        .interval
                        .map_or(DEFAULT_CHECKPOINT_INTERVAL, |d| d.get())
                        .max(Duration::from_millis(10)),
                    publish: None,
                })
            }
        };
        Ok(Self {
            stdout,
            max_file_bytes,
            checkpoints,
            retention: Retention {
                max_age: retention.max_age.map(|d| d.get()),
                ship_command: retention.ship_command.clone(),
            },
        })
    }
}

/// Time between periodic checkpoints when `audit.checkpoints.interval` is not set.
pub(super) const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

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
        Self::open_with(
            path,
            WriterOptions {
                stdout,
                max_file_bytes,
                ..Default::default()
            },
        )
    }

    /// Open (or continue) the chain in `path` with checkpoints and retention.
    pub fn open_with(path: &Path, options: WriterOptions) -> Result<Self, AuditError> {
        let stdout = options.stdout;
        let mut state = ChainState::open(path, options)
            .map_err(|e| AuditError::Io(format!("{}: {e}", path.display())))?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                records: Vec::with_capacity(256),
                batch: Arc::default(),
                writer_idle: false,
                closed: false,
            }),
            wake: Condvar::new(),
            thread: Mutex::new(None),
        });
        let records = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let (r, e, sh) = (records.clone(), errors.clone(), shared.clone());
        state.rotated.ship_pending();
        // The chain as found at start is anchored before anything is added to it.
        state.checkpoint(true);
        let handle = std::thread::Builder::new()
            .name("tollgate-audit".into())
            .spawn(move || run(state, &sh, stdout, r, e))
            .map_err(|e| AuditError::Io(e.to_string()))?;
        if let Ok(mut t) = shared.thread.lock() {
            *t = Some(handle);
        }
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

    /// Stop the writer: refuse further records, write what is queued, fsync, write the final
    /// checkpoint, and return once the writer thread has finished.
    pub async fn close(&self) {
        if let Ok(mut q) = self.shared.queue.lock() {
            q.closed = true;
        }
        self.shared.wake.notify_one();
        let handle = self.shared.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
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
    /// The live file: seq of its first record and complete lines. (No hash of its bytes is
    /// kept: the chain head already commits to every line, see [`super::checkpoint`].)
    live_first_seq: u64,
    live_lines: u64,
    /// Rotated files of this chain still on disk, oldest first.
    rotated: RotatedFiles,
    /// Number of the next rotated file: only rises, so pruning never reuses a name.
    next_rotation: u32,
    checkpoints: Option<CheckpointSink>,
    /// Head seq and file count of the last checkpoint, and when the next one is due.
    last_checkpoint: Option<(u64, usize)>,
    next_checkpoint: Instant,
}

impl ChainState {
    fn open(path: &Path, options: WriterOptions) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let live = scan(path)?;
        let mut rotated = Vec::new();
        let siblings = rotated_siblings(path)?;
        let next_rotation = siblings.last().map_or(1, |(n, _)| n + 1);
        for (_, p) in siblings {
            let stats = scan(&p)?;
            if stats.lines > 0 {
                rotated.push((p.clone(), stats.entry(&p, true)));
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            seq: live.last_seq,
            prev: live.last_hash.clone(),
            size,
            max_bytes: options.max_file_bytes,
            unsynced: false,
            live_first_seq: live.first_seq.unwrap_or(live.last_seq + 1),
            live_lines: live.lines,
            rotated: RotatedFiles::new(rotated, options.retention),
            next_rotation,
            next_checkpoint: Instant::now()
                + options
                    .checkpoints
                    .as_ref()
                    .map_or(DEFAULT_CHECKPOINT_INTERVAL, |c| c.interval),
            checkpoints: options.checkpoints,
            last_checkpoint: None,
        }
        .with_head_of_rotated(live.lines == 0))
    }

    /// A live file that is empty (just rotated) continues the chain of the newest rotated file.
    fn with_head_of_rotated(mut self, live_empty: bool) -> Self {
        if live_empty {
            if let Some((_, e)) = self.rotated.files.last() {
                self.seq = e.last_seq;
                self.prev = e.last_hash.clone();
                self.live_first_seq = e.last_seq + 1;
            }
        }
        self
    }

    /// Rotate to `<path>.<n>` when the file is over its size limit. The chain continues: the
    /// first record of the new file points at the last record of the old one. `n` is one past
    /// the highest rotated file seen, so pruning old files never reuses a number.
    fn maybe_rotate(&mut self) -> std::io::Result<()> {
        let Some(max) = self.max_bytes else {
            return Ok(());
        };
        if self.size < max {
            return Ok(());
        }
        let n = rotated_siblings(&self.path)?
            .last()
            .map_or(1, |(n, _)| n + 1)
            .max(self.next_rotation);
        self.next_rotation = n + 1;
        let to = rotated_name(&self.path, n);
        std::fs::rename(&self.path, &to)?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        if self.live_lines > 0 {
            let entry = FileEntry {
                name: file_name(&to),
                first_seq: self.live_first_seq,
                last_seq: self.seq,
                lines: self.live_lines,
                last_hash: self.prev.clone(),
                bytes: Some(self.size),
                sha256: None,
            };
            self.rotated.push(to, entry);
        }
        self.size = 0;
        self.live_lines = 0;
        self.live_first_seq = self.seq + 1;
        Ok(())
    }

    /// Time between housekeeping rounds: the checkpoint interval, or the default one when only
    /// retention is configured.
    fn housekeeping_interval(&self) -> Duration {
        self.checkpoints
            .as_ref()
            .map_or(DEFAULT_CHECKPOINT_INTERVAL, |c| c.interval)
    }

    /// When the next housekeeping round (checkpoint, ship retries, pruning) is due; none when
    /// neither checkpoints nor retention are configured.
    fn checkpoint_due(&self) -> Option<Instant> {
        (self.checkpoints.is_some() || self.rotated.active()).then_some(self.next_checkpoint)
    }

    /// Housekeeping when it is due: retry shipping, prune, checkpoint.
    fn tick(&mut self) {
        if self.checkpoint_due().is_some_and(|d| Instant::now() >= d) {
            self.next_checkpoint = Instant::now() + self.housekeeping_interval();
            self.rotated.ship_pending();
            self.rotated.prune();
            self.checkpoint(false);
        }
    }

    /// Sign and publish a checkpoint of the durable chain. A periodic one (`force` false) is
    /// skipped when nothing changed since the last.
    fn checkpoint(&mut self, force: bool) {
        let Some(sink) = &self.checkpoints else {
            return;
        };
        self.next_checkpoint = Instant::now() + sink.interval;
        let state = (self.seq, self.rotated.files.len());
        if !force && self.last_checkpoint == Some(state) {
            return;
        }
        if let Err(e) = sync(self) {
            tracing::error!(error = %e, "audit fsync before checkpoint failed; checkpoint skipped");
            return;
        }
        let Some(sink) = &self.checkpoints else {
            return;
        };
        let mut files: Vec<FileEntry> = self.rotated.files.iter().map(|(_, e)| e.clone()).collect();
        if self.live_lines > 0 {
            files.push(FileEntry {
                name: file_name(&self.path),
                first_seq: self.live_first_seq,
                last_seq: self.seq,
                lines: self.live_lines,
                last_hash: self.prev.clone(),
                bytes: None,
                sha256: None,
            });
        }
        let cp = Checkpoint {
            v: 1,
            ts: now_rfc3339(),
            seq: self.seq,
            head: self.prev.clone(),
            files,
            key_id: sink.key.id().into(),
        };
        let mut line = sink.key.sign_line(&cp);
        line.push('\n');
        if let Some(p) = &sink.path {
            let res = OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .and_then(|mut f| f.write_all(line.as_bytes()).and_then(|_| f.sync_data()));
            if let Err(e) = res {
                tracing::error!(error = %e, path = %p.display(), "audit checkpoint write failed");
                return;
            }
        }
        if sink.stdout {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(line.as_bytes()).and_then(|_| out.flush());
        }
        if let Some(tx) = &sink.publish {
            // The uploader only ends after the writer, so a send cannot fail while it runs.
            let _ = tx.send(line.trim_end().to_string());
        }
        self.last_checkpoint = Some(state);
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Rotated files beside `path` (`<path>.N`), ordered by N.
pub fn rotated_siblings(path: &Path) -> std::io::Result<Vec<(u32, PathBuf)>> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    let prefix = format!("{}.", file_name(path));
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix(&prefix)
            .and_then(|n| n.parse::<u32>().ok())
        {
            out.push((n, e.path()));
        }
    }
    out.sort_by_key(|(n, _)| *n);
    Ok(out)
}

/// What one pass over a file finds.
pub(crate) struct FileStats {
    pub first_seq: Option<u64>,
    pub last_seq: u64,
    pub lines: u64,
    pub last_hash: String,
    pub bytes: u64,
}

impl FileStats {
    fn entry(&self, p: &Path, closed: bool) -> FileEntry {
        FileEntry {
            name: file_name(p),
            first_seq: self.first_seq.unwrap_or(0),
            last_seq: self.last_seq,
            lines: self.lines,
            last_hash: self.last_hash.clone(),
            bytes: closed.then_some(self.bytes),
            sha256: None,
        }
    }
}

/// Read a file once: its complete lines (first and last seq, count, last line's hash) and its
/// size. A torn final line (crash mid-write) counts for the size only, so the chain continues
/// from the last complete record. A missing file is an empty one.
pub(crate) fn scan(path: &Path) -> std::io::Result<FileStats> {
    let mut stats = FileStats {
        first_seq: None,
        last_seq: 0,
        lines: 0,
        last_hash: GENESIS.into(),
        bytes: 0,
    };
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(stats),
        Err(e) => return Err(e),
    };
    stats.bytes = data.len() as u64;
    let seq_of = |line: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["seq"].as_u64())
            .unwrap_or(0)
    };
    let mut last: Option<&[u8]> = None;
    for line in data.split_inclusive(|b| *b == b'\n') {
        let Some(line) = line.strip_suffix(b"\n") else {
            break; // torn
        };
        if last.is_none() {
            stats.first_seq = Some(seq_of(line));
        }
        stats.lines += 1;
        last = Some(line);
    }
    if let Some(line) = last {
        stats.last_seq = seq_of(line);
        stats.last_hash = hex::encode(Sha256::digest(line));
    }
    Ok(stats)
}

/// Name of the n-th rotated file: `audit.jsonl.1`, `audit.jsonl.2`, …
pub fn rotated_name(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
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
                    // The final checkpoint: what a clean shutdown leaves is anchored whole.
                    st.checkpoint(true);
                    return;
                }
                q.writer_idle = true;
                // Idle with outcome records not yet synced: sync them soon. A due checkpoint
                // wakes the writer too.
                let now = Instant::now();
                let until_checkpoint = st
                    .checkpoint_due()
                    .map(|d| d.saturating_duration_since(now));
                let wait = match (st.unsynced, until_checkpoint) {
                    (true, Some(c)) => Some(c.min(LAZY_SYNC)),
                    (true, None) => Some(LAZY_SYNC),
                    (false, c) => c,
                };
                match wait {
                    Some(d) => {
                        let Ok((g, timeout)) = shared.wake.wait_timeout(q, d) else {
                            return;
                        };
                        q = g;
                        if timeout.timed_out() && q.records.is_empty() {
                            if let Err(e) = sync(&mut st) {
                                tracing::error!(error = %e, path = %st.path.display(), "audit fsync failed");
                            }
                            st.tick();
                        }
                    }
                    None => {
                        let Ok(g) = shared.wake.wait(q) else {
                            return;
                        };
                        q = g;
                    }
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
        // Under steady load the writer is never idle: checkpoints fall due here.
        st.tick();
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
    let ts = now_rfc3339();
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
        match scan(&st.path) {
            Ok(live) if live.lines > 0 => {
                st.seq = live.last_seq;
                st.prev = live.last_hash;
                st.live_lines = live.lines;
                st.size = live.bytes;
            }
            Ok(live) => {
                st.seq = start_seq;
                st.prev = start_prev;
                st.size = live.bytes;
            }
            Err(_) => {
                st.seq = start_seq;
                st.prev = start_prev;
            }
        }
        return Err(AuditError::Io(e.to_string()));
    }
    st.live_lines += batch.len() as u64;
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
