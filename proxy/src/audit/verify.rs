//! `audit verify`: walk one or more audit files (a rotated set in order) and check the hash
//! chain — every line's `prev` is the sha256 of the line before it and `seq` rises by one.
//!
//! What is detected: an edited record (its successor's `prev` no longer matches), a deleted
//! record (`seq` gap and `prev` mismatch), reordered records (`seq` out of order), an unparsable
//! line, a file of a rotated set missing or out of order. A torn final line (a crash in the
//! middle of a write) is reported as a warning and the chain verifies up to the last complete
//! record. Limits: cutting records off the *end* of the newest file leaves a valid shorter
//! chain; anchor the head externally (ship the latest `seq`/hash to the log pipeline) to catch
//! that.

use super::writer::{line_hash, GENESIS};
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
    let mut report = Report::default();
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
                    return Ok(report);
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
                    return Ok(report);
                }
            };
            let seq = v["seq"].as_u64().unwrap_or(0);
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
                    return Ok(report);
                }
            }
            let mid_start = expected_seq.is_none() && fi == 0 && seq > 1 && starts_mid_chain(file);
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
                return Ok(report);
            }
            if v["prev"].as_str() != Some(prev.as_str()) && !mid_start {
                report.broken = Some(Break {
                    file: file.clone(),
                    line: n,
                    kind: BreakKind::PrevMismatch { seq },
                });
                return Ok(report);
            }
            prev = line_hash(&text);
            expected_seq = Some(seq + 1);
            report.records += 1;
            report.head = Some((seq, prev.clone()));
        }
    }
    Ok(report)
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
