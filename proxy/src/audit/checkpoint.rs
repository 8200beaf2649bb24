//! Signed checkpoints: what anchors the audit chain outside its writer.
//!
//! The hash chain alone proves a file is internally consistent; whoever writes it (the
//! sidecar, or anyone with its volume) can still cut the tail off or rewrite the whole chain
//! and recompute every link. So the writer periodically, at start and at shutdown, signs a
//! [`Checkpoint`] — record count, head hash and the file set (each file's first and last seq,
//! line count, last line's hash, and for rotated files their size) — with a per-sidecar
//! Ed25519 key, and appends it to a second sink (a file on another volume, or stdout for the
//! log pipeline; in a cluster, the operator). `audit verify --checkpoints` (see
//! [`super::verify::verify_against`]) then proves the files are a faithful extension of every
//! checkpoint.
//!
//! A checkpoint signs only what the chain already commits to, so the writer hashes each line
//! once (its chain link) and keeps no second hash of the bytes. That loses nothing: a line's
//! hash covers its `prev`, so a file's last-line hash commits to every line of the file (and
//! of the files before it); a file is nothing but records, one per `\n`-terminated line (the
//! verifier refuses any other byte between records, and a rotated file's signed size and line
//! count leave no room after its last record). So a rotated file is pinned byte for byte by
//! its first seq, line count, size and last-line hash. Checkpoints written before this carry
//! a whole-file `sha256` for rotated files as well; it is still checked where present.
//!
//! One checkpoint is one JSON line: `{"tollgate_checkpoint": {…}, "public_key": B64,
//! "sig": B64}`. The signature covers [`SIGNING_CONTEXT`] followed by the checkpoint object
//! serialised by this crate (fields in declaration order), so a verifier re-serialises the
//! parsed object and checks it; unknown fields are refused, nothing unsigned is trusted.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};

/// Prefix of every signed message, so a checkpoint signature means nothing elsewhere.
pub const SIGNING_CONTEXT: &[u8] = b"tollgate-audit-checkpoint-v1\n";

/// The key a checkpoint line is recognised by.
pub const LINE_KEY: &str = "tollgate_checkpoint";

/// One audit file as a checkpoint saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// File name at checkpoint time (the live file is renamed `<name>.N` when it rotates;
    /// files are matched by `first_seq`, which does not change).
    pub name: String,
    /// Seq of its first record.
    pub first_seq: u64,
    /// Seq of its last record at checkpoint time.
    pub last_seq: u64,
    /// Complete lines at checkpoint time.
    pub lines: u64,
    /// sha256 of its last line at checkpoint time.
    pub last_hash: String,
    /// Rotated (closed) files only: size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Rotated files in checkpoints of earlier versions only: sha256 of the whole file (now
    /// implied by `last_hash`, `lines` and `bytes`, see the module docs). Checked where present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl FileEntry {
    /// A rotated file, which no longer changes.
    pub fn closed(&self) -> bool {
        self.bytes.is_some() || self.sha256.is_some()
    }

    /// `other` describes the same closed file: same records and size (and the same whole-file
    /// hash where both carry one, as checkpoints of earlier versions do).
    pub fn same_closed_file(&self, other: &FileEntry) -> bool {
        (other.last_seq, other.lines, &other.last_hash, other.bytes)
            == (self.last_seq, self.lines, &self.last_hash, self.bytes)
            && match (&self.sha256, &other.sha256) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// What a checkpoint asserts about the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Format version (1).
    pub v: u32,
    /// RFC 3339 UTC time it was taken.
    pub ts: String,
    /// Records in the chain (the head's seq; 0 for an empty chain).
    pub seq: u64,
    /// sha256 of the head line ([`super::GENESIS`] for an empty chain).
    pub head: String,
    /// The files holding the chain now, oldest first (pruned files are no longer listed).
    pub files: Vec<FileEntry>,
    /// Id of the signing key (first 16 hex digits of the sha256 of the public key).
    pub key_id: String,
}

/// A checkpoint line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedLine {
    tollgate_checkpoint: Checkpoint,
    #[serde(default)]
    public_key: Option<String>,
    #[serde(default)]
    sig: Option<String>,
}

/// The sidecar's checkpoint signing key.
pub struct CheckpointKey {
    pair: Ed25519KeyPair,
    public_b64: String,
    key_id: String,
}

impl fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CheckpointKey({})", self.key_id)
    }
}

/// Id of a public key: first 16 hex digits of its sha256.
pub fn key_id(public: &[u8]) -> String {
    hex::encode(Sha256::digest(public))[..16].to_string()
}

/// `<key>.pub`: where the public half is exported for registration.
pub fn public_key_path(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

impl CheckpointKey {
    /// Load the key from `path` (base64 PKCS#8), or generate it there (mode 0600) when the file
    /// does not exist. The public key is (re)written to `<path>.pub` either way.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        let pkcs8 = match std::fs::read_to_string(path) {
            Ok(text) => B64
                .decode(text.trim())
                .map_err(|e| bad(format!("{}: not base64: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let rng = ring::rand::SystemRandom::new();
                let doc = Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|_| bad("cannot generate an Ed25519 key".into()))?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)?;
                f.write_all(B64.encode(doc.as_ref()).as_bytes())?;
                f.write_all(b"\n")?;
                f.sync_all()?;
                doc.as_ref().to_vec()
            }
            Err(e) => return Err(e),
        };
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8).map_err(|e| {
            bad(format!(
                "{}: not an Ed25519 PKCS#8 key: {e}",
                path.display()
            ))
        })?;
        let public = pair.public_key().as_ref().to_vec();
        let key = Self {
            public_b64: B64.encode(&public),
            key_id: key_id(&public),
            pair,
        };
        std::fs::write(public_key_path(path), format!("{}\n", key.public_b64))?;
        Ok(key)
    }

    /// The public key, base64 (what an operator registers).
    pub fn public_key(&self) -> &str {
        &self.public_b64
    }

    /// Key id (see [`key_id`]).
    pub fn id(&self) -> &str {
        &self.key_id
    }

    /// The signed JSON line (without newline) for `cp`.
    pub fn sign_line(&self, cp: &Checkpoint) -> String {
        let body = serde_json::to_vec(cp).expect("a checkpoint serialises");
        let mut msg = SIGNING_CONTEXT.to_vec();
        msg.extend_from_slice(&body);
        let sig = self.pair.sign(&msg);
        serde_json::to_string(&SignedLine {
            tollgate_checkpoint: cp.clone(),
            public_key: Some(self.public_b64.clone()),
            sig: Some(B64.encode(sig.as_ref())),
        })
        .expect("a checkpoint line serialises")
    }
}

/// Why checkpoints were refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// The source could not be read.
    #[error("cannot read checkpoints from {source_name}: {message}")]
    Read {
        /// Source.
        source_name: String,
        /// Why.
        message: String,
    },
    /// The source holds no checkpoint.
    #[error("no checkpoints in {0}")]
    Empty(String),
    /// A checkpoint line is malformed.
    #[error("MALFORMED: {source_name}:{line}: not a checkpoint line ({message})")]
    Malformed {
        /// Source.
        source_name: String,
        /// 1-based line.
        line: usize,
        /// Why.
        message: String,
    },
    /// A checkpoint carries no signature or no public key.
    #[error(
        "UNSIGNED: {source_name}:{line}: the checkpoint carries no signature; it is not trusted"
    )]
    Unsigned {
        /// Source.
        source_name: String,
        /// 1-based line.
        line: usize,
    },
    /// A signature does not verify, or the checkpoint names another key.
    #[error("FORGED: {source_name}:{line}: {message}")]
    Forged {
        /// Source.
        source_name: String,
        /// 1-based line.
        line: usize,
        /// Why.
        message: String,
    },
}

/// Checkpoints read and verified from a source.
#[derive(Clone, Debug, Default)]
pub struct Trusted {
    /// In source order.
    pub checkpoints: Vec<Checkpoint>,
    /// Id of the key that signed them all.
    pub key_id: String,
    /// The key was given by the verifier (pinned), not taken from the checkpoints themselves.
    pub pinned: bool,
}

/// A public key given on the command line: base64 text, or a file holding it (`<key>.pub`).
pub fn read_public_key(arg: &str) -> Result<Vec<u8>, String> {
    let text = match std::fs::read_to_string(arg) {
        Ok(t) => t,
        Err(_) => arg.to_string(),
    };
    let key = B64
        .decode(text.trim())
        .map_err(|e| format!("--public-key: neither a readable file nor base64: {e}"))?;
    if key.len() != 32 {
        return Err(format!(
            "--public-key: an Ed25519 public key is 32 bytes, this is {}",
            key.len()
        ));
    }
    Ok(key)
}

/// Read the checkpoint lines of `text` (other lines — log lines, audit records — are skipped)
/// and verify every signature: against `pinned` when given, otherwise against the key the
/// first checkpoint names, which every other checkpoint must then name too.
pub fn read_trusted(
    source_name: &str,
    text: &str,
    pinned: Option<&[u8]>,
) -> Result<Trusted, CheckpointError> {
    let mut out = Trusted {
        pinned: pinned.is_some(),
        ..Default::default()
    };
    let mut trusted_key: Option<Vec<u8>> = pinned.map(<[u8]>::to_vec);
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        // A log pipeline may prefix or wrap lines; a checkpoint is the JSON object holding
        // the checkpoint key.
        let Some(start) = raw.find('{') else { continue };
        let candidate = &raw[start..];
        if !candidate.contains(LINE_KEY) {
            continue;
        }
        let Ok(value) = serde_json::from_str::<serde_json::Value>(candidate) else {
            continue;
        };
        if value.get(LINE_KEY).is_none() {
            continue;
        }
        let signed: SignedLine =
            serde_json::from_value(value).map_err(|e| CheckpointError::Malformed {
                source_name: source_name.into(),
                line,
                message: e.to_string(),
            })?;
        let (Some(sig), Some(public)) = (&signed.sig, &signed.public_key) else {
            return Err(CheckpointError::Unsigned {
                source_name: source_name.into(),
                line,
            });
        };
        let forged = |message: String| CheckpointError::Forged {
            source_name: source_name.into(),
            line,
            message,
        };
        let public = B64
            .decode(public)
            .map_err(|_| forged("its public key is not base64".into()))?;
        let sig = B64
            .decode(sig)
            .map_err(|_| forged("its signature is not base64".into()))?;
        let key = match &trusted_key {
            Some(k) => k.clone(),
            None => {
                trusted_key = Some(public.clone());
                public.clone()
            }
        };
        if public != key || signed.tollgate_checkpoint.key_id != key_id(&key) {
            return Err(forged(format!(
                "signed by key {} where key {} was expected{}",
                key_id(&public),
                key_id(&key),
                if pinned.is_some() {
                    " (the registered --public-key)"
                } else {
                    " (the key of the first checkpoint)"
                }
            )));
        }
        let mut msg = SIGNING_CONTEXT.to_vec();
        msg.extend_from_slice(
            &serde_json::to_vec(&signed.tollgate_checkpoint).expect("a checkpoint serialises"),
        );
        UnparsedPublicKey::new(&ED25519, &key)
            .verify(&msg, &sig)
            .map_err(|_| {
                forged(format!(
                    "the signature does not verify under key {}: the checkpoint was altered or forged",
                    key_id(&key)
                ))
            })?;
        out.checkpoints.push(signed.tollgate_checkpoint);
    }
    if out.checkpoints.is_empty() {
        return Err(CheckpointError::Empty(source_name.into()));
    }
    out.key_id = trusted_key.map(|k| key_id(&k)).unwrap_or_default();
    Ok(out)
}

/// Read checkpoints from a file, or stdin for `-`.
pub fn load(source: &str, pinned: Option<&[u8]>) -> Result<Trusted, CheckpointError> {
    let text = if source == "-" {
        use std::io::Read;
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map(|_| s)
            .map_err(|e| e.to_string())
    } else {
        std::fs::read_to_string(source).map_err(|e| e.to_string())
    }
    .map_err(|message| CheckpointError::Read {
        source_name: source.into(),
        message,
    })?;
    read_trusted(source, &text, pinned)
}

/// One signed checkpoint line checked on its own: the checkpoint and the base64 public key
/// that signed it (what a collector such as the operator registers on first use).
pub fn verify_line(line: &str) -> Result<(Checkpoint, String), CheckpointError> {
    let trusted = read_trusted("checkpoint", line, None)?;
    if trusted.checkpoints.len() != 1 || line.trim().lines().count() != 1 {
        return Err(CheckpointError::Malformed {
            source_name: "checkpoint".into(),
            line: 1,
            message: "exactly one checkpoint line is expected".into(),
        });
    }
    let signed: SignedLine =
        serde_json::from_str(line.trim()).map_err(|e| CheckpointError::Malformed {
            source_name: "checkpoint".into(),
            line: 1,
            message: e.to_string(),
        })?;
    let public = signed.public_key.unwrap_or_default();
    let cp = trusted
        .checkpoints
        .into_iter()
        .next()
        .expect("one checkpoint");
    Ok((cp, public))
}

/// Does `next` extend `prev` (both signed by the same key, `next` taken later)? A collector
/// that keeps a chain's checkpoints append-only refuses one that does not: the chain never
/// goes back (seq), a seq once signed keeps its head hash, a rotated file never changes, the
/// live file only grows, and files only disappear from the front (pruned by retention).
/// Checkpoints carry no records, so this cannot prove the records between two checkpoints;
/// `audit verify --checkpoints` does that against the files, with every stored checkpoint.
pub fn extends(prev: &Checkpoint, next: &Checkpoint) -> Result<(), String> {
    if next.key_id != prev.key_id {
        return Err(format!(
            "signed by key {} where the chain's key is {}",
            next.key_id, prev.key_id
        ));
    }
    if next.seq < prev.seq {
        return Err(format!(
            "the chain goes back from seq {} to seq {}: records were cut off",
            prev.seq, next.seq
        ));
    }
    if next.seq == prev.seq && next.head != prev.head {
        return Err(format!(
            "seq {} was signed with head {} and now with {}: the chain was rewritten",
            prev.seq, prev.head, next.head
        ));
    }
    let front = next.files.first().map_or(next.seq + 1, |f| f.first_seq);
    for e in &prev.files {
        let Some(n) = next.files.iter().find(|n| n.first_seq == e.first_seq) else {
            if e.last_seq < front {
                continue; // pruned from the front
            }
            return Err(format!(
                "{} (seq {}..{}) is no longer listed although newer records are: the file set was rewritten",
                e.name, e.first_seq, e.last_seq
            ));
        };
        if e.closed() {
            if !e.same_closed_file(n) {
                return Err(format!(
                    "the rotated file {} (seq {}..{}) changed after it was checkpointed",
                    e.name, e.first_seq, e.last_seq
                ));
            }
        } else if n.lines < e.lines
            || n.last_seq < e.last_seq
            || (n.last_seq == e.last_seq && n.last_hash != e.last_hash)
        {
            return Err(format!(
                "{} (from seq {}) was checkpointed with {} lines up to seq {} and now has {} lines up to seq {}: it was truncated or rewritten",
                e.name, e.first_seq, e.lines, e.last_seq, n.lines, n.last_seq
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(key: &CheckpointKey, seq: u64) -> Checkpoint {
        Checkpoint {
            v: 1,
            ts: "2026-01-01T00:00:00Z".into(),
            seq,
            head: "ab".repeat(32),
            files: vec![FileEntry {
                name: "audit.jsonl".into(),
                first_seq: 1,
                last_seq: seq,
                lines: seq,
                last_hash: "ab".repeat(32),
                bytes: None,
                sha256: None,
            }],
            key_id: key.id().into(),
        }
    }

    /// A signed line verifies; an edited one, one signed by another key, and one without a
    /// signature are refused, each with its own reason.
    #[test]
    fn signatures_are_checked_and_keys_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let key = CheckpointKey::load_or_create(&dir.path().join("k")).unwrap();
        let again = CheckpointKey::load_or_create(&dir.path().join("k")).unwrap();
        assert_eq!(key.public_key(), again.public_key(), "the key is kept");
        let line = key.sign_line(&checkpoint(&key, 3));
        let text = format!("some log line\n{line}\n");
        let t = read_trusted("s", &text, None).unwrap();
        assert_eq!(t.checkpoints.len(), 1);
        let pinned = read_public_key(key.public_key()).unwrap();
        assert!(read_trusted("s", &text, Some(&pinned)).unwrap().pinned);

        let edited = line.replace("\"seq\":3", "\"seq\":2");
        assert!(matches!(
            read_trusted("s", &edited, Some(&pinned)),
            Err(CheckpointError::Forged { .. })
        ));
        let other = CheckpointKey::load_or_create(&dir.path().join("other")).unwrap();
        let foreign = other.sign_line(&checkpoint(&other, 3));
        assert!(matches!(
            read_trusted("s", &foreign, Some(&pinned)),
            Err(CheckpointError::Forged { .. })
        ));
        // Unpinned, a second key among the checkpoints is refused too.
        assert!(matches!(
            read_trusted("s", &format!("{line}\n{foreign}"), None),
            Err(CheckpointError::Forged { line: 2, .. })
        ));
        let unsigned = serde_json::json!({LINE_KEY: checkpoint(&key, 3)}).to_string();
        assert!(matches!(
            read_trusted("s", &unsigned, None),
            Err(CheckpointError::Unsigned { .. })
        ));
        assert!(matches!(
            read_trusted("s", "nothing here\n", None),
            Err(CheckpointError::Empty(_))
        ));
    }

    /// A later checkpoint of a growing chain extends the earlier one; a shorter chain, a new
    /// head for a signed seq, a changed rotated file and another key do not.
    #[test]
    fn extension_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let key = CheckpointKey::load_or_create(&dir.path().join("k")).unwrap();
        let a = checkpoint(&key, 3);
        let mut b = checkpoint(&key, 5);
        b.head = "cd".repeat(32);
        b.files[0].last_hash = b.head.clone();
        assert_eq!(extends(&a, &b), Ok(()));
        assert_eq!(extends(&a, &a), Ok(()), "the same state again extends");
        assert!(extends(&b, &a).unwrap_err().contains("goes back"));
        let mut rewritten = a.clone();
        rewritten.head = "ee".repeat(32);
        assert!(extends(&a, &rewritten).unwrap_err().contains("rewritten"));
        let mut fewer = b.clone();
        fewer.files[0].lines = 2;
        assert!(extends(&a, &fewer).unwrap_err().contains("truncated"));
        // Rotated: the closed file never changes; pruned from the front is fine.
        let mut closed = a.clone();
        closed.files[0].bytes = Some(100);
        closed.files[0].sha256 = Some("11".repeat(32));
        let mut later = b.clone();
        later.files = vec![closed.files[0].clone(), b.files[0].clone()];
        later.files[1].first_seq = 4;
        assert_eq!(extends(&closed, &later), Ok(()));
        let mut changed = later.clone();
        changed.files[0].sha256 = Some("22".repeat(32));
        assert!(extends(&closed, &changed).unwrap_err().contains("changed"));
        // Checkpoints of this version sign a rotated file by size, lines and last-line hash
        // (no whole-file sha256); a change of any of them is caught, and a checkpoint of an
        // earlier version (with the sha256) is extended by one of this version.
        let mut current = later.clone();
        current.files[0].sha256 = None;
        assert!(current.files[0].closed());
        assert_eq!(extends(&closed, &current), Ok(()));
        assert_eq!(extends(&current, &current), Ok(()));
        for edit in [
            (|e: &mut FileEntry| e.bytes = Some(101)) as fn(&mut FileEntry),
            |e| e.lines += 1,
            |e| e.last_hash = "33".repeat(32),
        ] {
            let mut c = current.clone();
            edit(&mut c.files[0]);
            assert!(extends(&current, &c).unwrap_err().contains("changed"));
        }
        let mut pruned = later.clone();
        pruned.files.remove(0);
        assert_eq!(extends(&closed, &pruned), Ok(()));
        let other = CheckpointKey::load_or_create(&dir.path().join("o")).unwrap();
        assert!(extends(&a, &checkpoint(&other, 5))
            .unwrap_err()
            .contains("key"));
        // One line verifies on its own and yields its key.
        let (cp, public) = verify_line(&key.sign_line(&b)).unwrap();
        assert_eq!((cp, public.as_str()), (b, key.public_key()));
        assert!(verify_line("{}").is_err());
    }
}
