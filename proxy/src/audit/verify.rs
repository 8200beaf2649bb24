//! `audit verify`: walk one or more audit files (a rotated set in order) and check the hash
//! chain — every line's `prev` is the sha256 of the line before it and `seq` rises by one.
//!
//! What is detected: an edited record (its successor's `prev` no longer matches), a deleted
//! record (`seq` gap and `prev` mismatch), reordered records (`seq` out of order), an unparsable
//! line, a file of a rotated set missing or out of order. A torn final line (a crash in the
//! middle of a write) is reported as a warning and the chain verifies up to the last complete
//! record. Limits: cutting records off the *end* of the newest file, or rewriting the whole
//! chain with every link recomputed, leaves a valid chain; [`verify_against`] catches both by
//! checking the files against signed checkpoints published outside the writer
//! ([`super::checkpoint`]).

use super::checkpoint::{Checkpoint, FileEntry, Trusted};
use super::writer::{line_hash, GENESIS};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// The first break found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Break {
    /// File.
    pub file: PathBuf,
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub kind: BreakKind,
}

/// Kinds of chain breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BreakKind {
    /// The line is not a JSON record.
    Unparsable(String),
    /// `prev` does not match the hash of the previous line: the previous line was edited, or
    /// a line between them was deleted.
    PrevMismatch {
        /// Sequence number of this record.
        seq: u64,
    },
    /// `seq` does not follow on.
    SeqGap {
        /// Expected.
        expected: u64,
        /// Found.
        found: u64,
    },
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        match &self.kind {
            BreakKind::Unparsable(e) => write!(f, "not an audit record ({e})"),
            BreakKind::PrevMismatch { seq } => write!(f, "record seq {seq} does not chain to the line before it: the previous record was edited or a record was deleted"),
            BreakKind::SeqGap { expected, found } if found < expected => write!(f, "seq {found} where {expected} was expected: records were reordered or replayed"),
            BreakKind::SeqGap { expected, found } => write!(f, "seq {found} where {expected} was expected: {} record(s) deleted", found - expected),
        }
    }
}

/// Result of a verification.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Records that chain correctly.
    pub records: u64,
    /// First break, if any.
    pub broken: Option<Break>,
    /// A torn final line (crash mid-write), if any: file and line.
    pub torn_tail: Option<(PathBuf, usize)>,
    /// Head of the chain: last seq and its hash.
    pub head: Option<(u64, String)>,
    /// The chain was verified from this seq on (earlier rotated files were not given).
    pub started_at: Option<u64>,
}

impl Report {
    /// True when no link is broken.
    pub fn ok(&self) -> bool {
        self.broken.is_none()
    }
}

/// Order a rotated set: `audit.jsonl.1`, `.2`, …, then `audit.jsonl`. Other paths keep the
/// order given.
pub fn order_files(files: &[PathBuf]) -> Vec<PathBuf> {
    let mut v: Vec<(u32, PathBuf)> = files
        .iter()
        .map(|p| {
            let n = p
                .extension()
                .and_then(|e| e.to_str())
                .and_then(|e| e.parse::<u32>().ok())
                .unwrap_or(u32::MAX);
            (n, p.clone())
        })
        .collect();
    v.sort_by_key(|(n, _)| *n);
    v.into_iter().map(|(_, p)| p).collect()
}

/// Verify files as one chain, in the order given (see [`order_files`]).
pub fn verify(files: &[PathBuf]) -> std::io::Result<Report> {
    Ok(walk(files, &BTreeSet::new(), &|p, _| starts_mid_chain(p))?.report)
}

/// What a walk over the files found besides the chain report.
struct Walk {
    report: Report,
    /// Per given file: seq and `prev` of its first record.
    firsts: Vec<Option<(u64, String)>>,
    /// Hash of each record whose seq was asked for: file index, line, hash.
    found: BTreeMap<u64, (usize, usize, String)>,
}

/// Walk the chain. `wanted`: seqs whose line hash to keep; `mid_start_ok(file, seq)`: the
/// first file may begin at `seq` > 1.
fn walk(
    files: &[PathBuf],
    wanted: &BTreeSet<u64>,
    mid_start_ok: &dyn Fn(&Path, u64) -> bool,
) -> std::io::Result<Walk> {
    let mut out = Walk {
        report: Report::default(),
        firsts: vec![None; files.len()],
        found: BTreeMap::new(),
    };
    let report = &mut out.report;
    let mut prev = GENESIS.to_string();
    let mut expected_seq: Option<u64> = None;
    for (fi, file) in files.iter().enumerate() {
        let reader = BufReader::new(std::fs::File::open(file)?);
        let mut lines = reader.split(b'\n').peekable();
        let mut n = 0;
        while let Some(line) = lines.next() {
            let line = line?;
            n += 1;
            let last_of_all = lines.peek().is_none() && fi + 1 == files.len();
            let text = match String::from_utf8(line) {
                Ok(t) => t,
                Err(_) => {
                    report.broken = Some(Break {
                        file: file.clone(),
                        line: n,
                        kind: BreakKind::Unparsable("not UTF-8".into()),
                    });
                    return Ok(out);
                }
            };
            if text.is_empty() && lines.peek().is_none() {
                break;
            }
            let v: serde_json::Value = match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => {
                    if last_of_all && !file_ends_with_newline(file) {
                        report.torn_tail = Some((file.clone(), n));
                        break;
                    }
                    report.broken = Some(Break {
                        file: file.clone(),
                        line: n,
                        kind: BreakKind::Unparsable(e.to_string()),
                    });
                    return Ok(out);
                }
            };
            let seq = v["seq"].as_u64().unwrap_or(0);
            if n == 1 {
                out.firsts[fi] = Some((seq, v["prev"].as_str().unwrap_or("").to_string()));
            }
            if let Some(exp) = expected_seq {
                if seq != exp {
                    report.broken = Some(Break {
                        file: file.clone(),
                        line: n,
                        kind: BreakKind::SeqGap {
                            expected: exp,
                            found: seq,
                        },
                    });
                    return Ok(out);
                }
            }
            let mid_start = expected_seq.is_none() && fi == 0 && seq > 1 && mid_start_ok(file, seq);
            if mid_start {
                report.started_at = Some(seq);
            } else if expected_seq.is_none() && seq != 1 {
                report.broken = Some(Break {
                    file: file.clone(),
                    line: n,
                    kind: BreakKind::SeqGap {
                        expected: 1,
                        found: seq,
                    },
                });
                return Ok(out);
            }
            if v["prev"].as_str() != Some(prev.as_str()) && !mid_start {
                report.broken = Some(Break {
                    file: file.clone(),
                    line: n,
                    kind: BreakKind::PrevMismatch { seq },
                });
                return Ok(out);
            }
            prev = line_hash(&text);
            if wanted.contains(&seq) {
                out.found.insert(seq, (fi, n, prev.clone()));
            }
            expected_seq = Some(seq + 1);
            report.records += 1;
            report.head = Some((seq, prev.clone()));
        }
    }
    Ok(out)
}

/// A file may begin mid-chain only if it is a later member of a rotated set: `audit.jsonl.N`
/// with N > 1, or the live `audit.jsonl` when `audit.jsonl.1` exists beside it.
fn starts_mid_chain(p: &Path) -> bool {
    match p
        .extension()
        .and_then(|e| e.to_str())
        .and_then(|e| e.parse::<u32>().ok())
    {
        Some(n) => n > 1,
        None => super::writer::rotated_name(p, 1).exists(),
    }
}

fn file_ends_with_newline(p: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(p) else {
        return false;
    };
    if f.seek(SeekFrom::End(-1)).is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    f.read_exact(&mut b).is_ok() && b[0] == b'\n'
}

/// The files extend every checkpoint.
#[derive(Clone, Debug)]
pub struct Anchored {
    /// The chain walk.
    pub report: Report,
    /// Checkpoints checked.
    pub checkpoints: usize,
    /// The latest checkpoint (highest seq, the last of equals).
    pub latest: Checkpoint,
    /// Files older checkpoints listed that were not given and the latest no longer lists
    /// (pruned, or shipped elsewhere): name and seq range.
    pub pruned: Vec<(String, u64, u64)>,
    /// Id of the key that signed the checkpoints, and whether the verifier pinned it.
    pub key_id: String,
    /// The key was given with `--public-key`.
    pub pinned: bool,
}

/// Why the files do not faithfully extend the checkpoints. The message starts with the kind
/// (`TRUNCATED`, `REWRITTEN`, `REPLACED`, `MISSING`, `BROKEN`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotExtended(pub String);

/// Facts about one given file, for matching it to checkpointed files: what a checkpoint's
/// [`FileEntry`] says about a rotated file, as found.
struct GivenFile {
    first_seq: Option<u64>,
    /// As a checkpoint would describe it if it were closed (`bytes` set).
    found: FileEntry,
    /// sha256 of the whole file, only when a checkpoint of an earlier version asks for it.
    sha256: Option<String>,
}

/// Read on its own, not from the walk, which stops at the first break.
fn given_file(path: &Path, with_sha256: bool) -> std::io::Result<GivenFile> {
    let stats = super::writer::scan(path)?;
    let sha256 = if with_sha256 {
        Some(hex::encode(Sha256::digest(std::fs::read(path)?)))
    } else {
        None
    };
    Ok(GivenFile {
        first_seq: stats.first_seq,
        found: FileEntry {
            name: String::new(),
            first_seq: stats.first_seq.unwrap_or(0),
            last_seq: stats.last_seq,
            lines: stats.lines,
            last_hash: stats.last_hash,
            bytes: Some(stats.bytes),
            sha256: sha256.clone(),
        },
        sha256,
    })
}

/// Verify `files` (ordered) as one chain that faithfully extends every trusted checkpoint:
/// every file the latest checkpoint lists is given (MISSING), every rotated file is the one
/// checkpointed (REPLACED), the chain is intact (BROKEN), every checkpointed head and file
/// end is still there (TRUNCATED) with the hash that was signed (REWRITTEN). Files only older
/// checkpoints list may be absent (pruned by retention).
pub fn verify_against(
    files: &[PathBuf],
    trusted: &Trusted,
) -> std::io::Result<Result<Anchored, NotExtended>> {
    let cps = &trusted.checkpoints;
    // Every (seq, hash) a checkpoint vouches for, with the checkpoint that said it.
    let mut anchors: Vec<(u64, &str, &Checkpoint)> = Vec::new();
    for cp in cps {
        anchors.push((cp.seq, &cp.head, cp));
        for e in &cp.files {
            anchors.push((e.last_seq, &e.last_hash, cp));
        }
    }
    anchors.retain(|(seq, _, _)| *seq > 0);
    anchors.sort_by_key(|(seq, _, _)| *seq);
    let wanted: BTreeSet<u64> = anchors.iter().map(|(s, _, _)| *s).collect();
    let vouched: BTreeSet<u64> = cps
        .iter()
        .flat_map(|c| c.files.iter().map(|e| e.first_seq))
        .collect();
    let w = walk(files, &wanted, &|p, seq| {
        vouched.contains(&seq) || starts_mid_chain(p)
    })?;
    let with_sha256 = cps
        .iter()
        .flat_map(|c| &c.files)
        .any(|e| e.sha256.is_some());
    let mut given = Vec::with_capacity(files.len());
    for f in files {
        given.push(given_file(f, with_sha256)?);
    }
    let latest = cps
        .iter()
        .enumerate()
        .max_by_key(|(i, c)| (c.seq, *i))
        .map(|(_, c)| c.clone())
        .expect("trusted checkpoints are never empty");
    let fail = |m: String| Ok(Err(NotExtended(m)));

    // A rotated file is immutable: the one given that starts at its first seq must be byte
    // for byte the one checkpointed — the same line count, size and last-line hash, which
    // with the chain pin every byte (see `super::checkpoint`). (Names are only informative:
    // the live file is renamed when it rotates.)
    let mut replaced: Option<String> = None;
    'files: for (fi, g) in given.iter().enumerate() {
        for cp in cps {
            for e in cp.files.iter().filter(|e| e.closed()) {
                if g.first_seq != Some(e.first_seq) || e.same_closed_file(&g.found) {
                    continue;
                }
                let f = &g.found;
                let whole = |h: &Option<String>| {
                    h.as_deref()
                        .map(|h| format!(", file sha256 {h}"))
                        .unwrap_or_default()
                };
                replaced = Some(format!(
                    "REPLACED: {} is not the file checkpointed as {} at {} (seq {}..{}, {} lines, {} bytes, last record sha256 {}{}); found seq {}..{}, {} lines, {} bytes, last record sha256 {}{}: the file was replaced or its records rewritten",
                    files[fi].display(),
                    e.name,
                    cp.ts,
                    e.first_seq,
                    e.last_seq,
                    e.lines,
                    e.bytes.unwrap_or(0),
                    e.last_hash,
                    whole(&e.sha256),
                    f.first_seq,
                    f.last_seq,
                    f.lines,
                    f.bytes.unwrap_or(0),
                    f.last_hash,
                    whole(&g.sha256),
                ));
                break 'files;
            }
        }
    }
    if let Some(m) = replaced {
        let also = w
            .report
            .broken
            .as_ref()
            .map(|b| format!("; the chain also breaks at {b}"))
            .unwrap_or_default();
        return fail(format!("{m}{also}"));
    }
    // Every file the latest checkpoint lists must be given; files only older checkpoints
    // list were pruned after them.
    for e in &latest.files {
        if !given.iter().any(|g| g.first_seq == Some(e.first_seq)) {
            return fail(format!(
                "MISSING: {} (seq {}..{}, {} lines) is listed by the latest checkpoint ({}, seq {}) but no given file starts at seq {}: it was deleted or not given",
                e.name, e.first_seq, e.last_seq, e.lines, latest.ts, latest.seq, e.first_seq
            ));
        }
    }
    if let Some(b) = &w.report.broken {
        return fail(format!(
            "BROKEN after {} good records: {b}",
            w.report.records
        ));
    }

    let mut pruned: Vec<(String, u64, u64)> = Vec::new();
    for cp in cps {
        for e in &cp.files {
            let present = given.iter().any(|g| g.first_seq == Some(e.first_seq));
            if !present && !pruned.iter().any(|(_, s, _)| *s == e.first_seq) {
                pruned.push((e.name.clone(), e.first_seq, e.last_seq));
            }
        }
    }

    let head = w.report.head.as_ref().map_or(0, |(s, _)| *s);
    let first = w.firsts.first().cloned().flatten();
    let first_seq = first.as_ref().map_or(head + 1, |(s, _)| *s);
    // The earliest record that differs from what was signed.
    for (seq, hash, cp) in &anchors {
        if *seq > head {
            continue;
        }
        if *seq < first_seq {
            // In a pruned file: only the link into the first given record can be checked.
            if *seq + 1 == first_seq {
                if let Some((_, prev)) = &first {
                    if prev != hash {
                        return fail(format!(
                            "REWRITTEN: the first given record (seq {first_seq} in {}) does not continue the chain the checkpoint of {} signed (seq {seq} sha256 {hash}): the chain was rewritten",
                            files[0].display(), cp.ts
                        ));
                    }
                }
            }
            continue;
        }
        if let Some((fi, line, found)) = w.found.get(seq) {
            if found != hash {
                return fail(format!(
                    "REWRITTEN: record seq {seq} ({}:{line}) is not the record the checkpoint of {} signed (sha256 {hash}, found {found}): the chain up to it was rewritten after it was checkpointed, every link recomputed",
                    files[*fi].display(),
                    cp.ts
                ));
            }
        }
    }
    if let Some((seq, hash, cp)) = anchors.iter().rev().find(|(s, _, _)| *s > head) {
        return fail(format!(
            "TRUNCATED: the checkpoint of {} vouches for seq {seq} (sha256 {hash}) but the given files end at seq {head}: {} record(s) were cut off the end",
            cp.ts,
            seq - head
        ));
    }
    Ok(Ok(Anchored {
        report: w.report,
        checkpoints: cps.len(),
        latest,
        pruned,
        key_id: trusted.key_id.clone(),
        pinned: trusted.pinned,
    }))
}
