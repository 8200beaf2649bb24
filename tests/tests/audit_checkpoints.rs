//! Audit checkpoints end to end (issue 17, item 1): the real sidecar signs checkpoints of its
//! chain into a second sink, periodically and at SIGTERM; `audit verify --checkpoints` then
//! catches what the chain alone cannot — a cut-off tail, a chain rewritten with every link
//! recomputed, a replaced or deleted file — and refuses forged and unsigned checkpoints.
//! Rotated files are shipped by the hook and pruned by age without breaking verification of
//! what remains.

use std::path::{Path, PathBuf};
use std::process::Command;
use tollgate_proxy::audit::checkpoint::{Checkpoint, CheckpointKey, FileEntry};
use tollgate_tests::harness::{bin, call, eventually, TestProxy, Upstream};

fn config(up: &Upstream, audit: &str) -> String {
    format!(
        "agent: {{name: billing, tenants: [acme]}}\ntools:\n  - name: crm.note\n    match: {{host: \"{}\", methods: [POST], path: /v1/notes}}\naudit: {audit}\n",
        up.addr
    )
}

fn post(p: &TestProxy, up: &Upstream, n: usize) {
    let r = call(
        p.proxy,
        "POST",
        &format!("http://{}/v1/notes", up.addr),
        &[
            ("X-Tollgate-Tenant", "acme"),
            ("Content-Type", "application/json"),
        ],
        Some(&format!(r#"{{"n":{n},"text":"note number {n}"}}"#)),
    );
    assert_eq!(r.status, 200, "{}", r.body_text());
}

/// SIGTERM, as a rollout does; the sidecar must exit 0 after its final checkpoint.
fn stop(mut p: TestProxy) -> tempfile::TempDir {
    let pid = p.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = p.child.wait().unwrap();
    assert!(status.success(), "{status}: {}", p.log());
    let dir = tempfile::tempdir().unwrap();
    // Keep the directory alive past the TestProxy (its Drop kills an already exited child).
    std::mem::replace(&mut p.dir, dir)
}

fn verify(files: &[PathBuf], extra: &[&str]) -> (i32, String) {
    let out = Command::new(bin("tollgate-proxy"))
        .args(["audit", "verify"])
        .args(extra)
        .args(files)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn audit_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|f| {
            let n = f.file_name().unwrap().to_str().unwrap();
            n == "audit.jsonl"
                || n.strip_prefix("audit.jsonl.")
                    .is_some_and(|r| r.parse::<u32>().is_ok())
        })
        .collect();
    files.sort();
    files
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn sha(line: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(line.as_bytes()))
}

/// Rewrite records and recompute every link, as an attacker holding the volume would: the
/// result is a valid chain on its own. `prev` is the hash the first record must point at.
fn rechain(
    lines: &[String],
    prev: &str,
    edit: impl Fn(usize, &mut serde_json::Value),
) -> Vec<String> {
    let mut prev = prev.to_string();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
        edit(i, &mut v);
        v["prev"] = prev.clone().into();
        let text = serde_json::to_string(&v).unwrap();
        prev = sha(&text);
        out.push(text);
    }
    out
}

fn write(p: &Path, lines: &[String]) {
    std::fs::write(p, lines.join("\n") + "\n").unwrap();
}

#[test]
fn checkpoints_catch_truncation_rewrites_and_forgeries() {
    let up = Upstream::start();
    let p = TestProxy::start(
        &config(
            &up,
            "{path: audit.jsonl, checkpoints: {path: anchor/checkpoints.jsonl, interval: 200ms, keyFile: keys/audit.key}}",
        ),
        &[],
    );
    for i in 0..5 {
        post(&p, &up, i);
    }
    eventually("records", || p.audit().len() == 10);
    let dir = stop(p);
    let d = dir.path();
    let cps = d.join("anchor/checkpoints.jsonl");
    let pubkey = d.join("keys/audit.key.pub");
    assert!(
        pubkey.exists(),
        "the public key is exported for registration"
    );
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.join("keys/audit.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(
        key_mode & 0o077,
        0,
        "the signing key is private to the sidecar"
    );
    // The final checkpoint, written at SIGTERM, covers every record.
    let cp_lines = lines(&cps);
    let last: serde_json::Value = serde_json::from_str(cp_lines.last().unwrap()).unwrap();
    assert_eq!(last["tollgate_checkpoint"]["seq"], 10, "{last}");
    assert_eq!(last["tollgate_checkpoint"]["files"][0]["lines"], 10);
    let audit = d.join("audit.jsonl");
    let src = cps.to_str().unwrap().to_string();
    let pk = pubkey.to_str().unwrap().to_string();
    let anchored = ["--checkpoints", src.as_str(), "--public-key", pk.as_str()];
    let (code, out) = verify(std::slice::from_ref(&audit), &anchored);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ok: 10 records") && out.contains("(pinned)"),
        "{out}"
    );

    let original = lines(&audit);
    // Truncation at a record boundary: a valid shorter chain, caught only by the checkpoint.
    let cut = d.join("cut/audit.jsonl");
    std::fs::create_dir_all(cut.parent().unwrap()).unwrap();
    write(&cut, &original[..7]);
    assert_eq!(
        verify(std::slice::from_ref(&cut), &[]).0,
        0,
        "the chain alone cannot tell"
    );
    let (code, out) = verify(std::slice::from_ref(&cut), &anchored);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("TRUNCATED") && out.contains("3 record(s) were cut off"),
        "{out}"
    );

    // A whole chain rewritten consistently: one refusal turned into an allow, all links redone.
    let rewritten = rechain(&original, tollgate_proxy::audit::GENESIS, |i, v| {
        if i == 2 {
            v["status"] = 500.into();
        }
    });
    let rw = d.join("rw/audit.jsonl");
    std::fs::create_dir_all(rw.parent().unwrap()).unwrap();
    write(&rw, &rewritten);
    assert_eq!(
        verify(std::slice::from_ref(&rw), &[]).0,
        0,
        "self-consistent"
    );
    let (code, out) = verify(std::slice::from_ref(&rw), &anchored);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("REWRITTEN") && out.contains("rw/audit.jsonl"),
        "{out}"
    );

    // The attacker also signs a checkpoint of the rewritten chain with a key of their own.
    let forger = CheckpointKey::load_or_create(&d.join("forger.key")).unwrap();
    let head = sha(rewritten.last().unwrap());
    let forged = forger.sign_line(&Checkpoint {
        v: 1,
        ts: "2026-01-01T00:00:00Z".into(),
        seq: 10,
        head: head.clone(),
        files: vec![FileEntry {
            name: "audit.jsonl".into(),
            first_seq: 1,
            last_seq: 10,
            lines: 10,
            last_hash: head,
            bytes: None,
            sha256: None,
        }],
        key_id: forger.id().into(),
    });
    let forged_src = d.join("forged.jsonl");
    std::fs::write(&forged_src, format!("{forged}\n")).unwrap();
    let fs = forged_src.to_str().unwrap();
    let (code, out) = verify(
        std::slice::from_ref(&rw),
        &["--checkpoints", fs, "--public-key", &pk],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FORGED") && out.contains(forger.id()), "{out}");
    // Unpinned, the forged line next to the genuine ones is refused as a second key.
    let mixed = d.join("mixed.jsonl");
    std::fs::write(&mixed, format!("{}\n{forged}\n", cp_lines.join("\n"))).unwrap();
    let (code, out) = verify(
        std::slice::from_ref(&rw),
        &["--checkpoints", mixed.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FORGED"), "{out}");
    // A genuine checkpoint edited to match a truncated file no longer verifies.
    let edited = cp_lines
        .iter()
        .map(|l| l.replace("\"seq\":10", "\"seq\":7"))
        .collect::<Vec<_>>();
    let edited_src = d.join("edited.jsonl");
    write(&edited_src, &edited);
    let (code, out) = verify(
        std::slice::from_ref(&cut),
        &[
            "--checkpoints",
            edited_src.to_str().unwrap(),
            "--public-key",
            &pk,
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FORGED") && out.contains("does not verify"),
        "{out}"
    );
    // A checkpoint without its signature is not trusted.
    let mut unsigned: serde_json::Value = serde_json::from_str(cp_lines.last().unwrap()).unwrap();
    unsigned.as_object_mut().unwrap().remove("sig");
    let unsigned_src = d.join("unsigned.jsonl");
    std::fs::write(&unsigned_src, format!("{unsigned}\n")).unwrap();
    let (code, out) = verify(
        std::slice::from_ref(&audit),
        &["--checkpoints", unsigned_src.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("UNSIGNED"), "{out}");
    // `audit key` prints the same public key the sidecar exported.
    let out = Command::new(bin("tollgate-proxy"))
        .args(["audit", "key", "--key-file"])
        .arg(d.join("keys/audit.key"))
        .output()
        .unwrap();
    let public = std::fs::read_to_string(&pubkey).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(public.trim()));
}

#[test]
fn rotated_files_are_shipped_and_pruned_and_the_rest_still_verifies() {
    let up = Upstream::start();
    let cp =
        "checkpoints: {path: anchor/checkpoints.jsonl, interval: 100ms, keyFile: keys/audit.key}";
    // Phase 1: rotation, no retention.
    let p = TestProxy::start(
        &config(
            &up,
            &format!("{{path: audit.jsonl, maxFileBytes: 3000, {cp}}}"),
        ),
        &[],
    );
    for i in 0..12 {
        post(&p, &up, i);
    }
    eventually("records", || {
        audit_files(p.dir.path())
            .iter()
            .map(|f| lines(f).len())
            .sum::<usize>()
            == 24
    });
    let dir = stop(p);
    let d = dir.path();
    let files = audit_files(d);
    assert!(files.len() >= 3, "{files:?}");
    let src = d.join("anchor/checkpoints.jsonl");
    let pk = d.join("keys/audit.key.pub");
    let anchored = [
        "--checkpoints",
        src.to_str().unwrap(),
        "--public-key",
        pk.to_str().unwrap(),
    ];
    let (code, out) = verify(&files, &anchored);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 24 records"), "{out}");

    // A rotated file replaced by an edited one, consistent inside itself.
    let copy = || {
        let to = tempfile::tempdir().unwrap();
        for f in &files {
            std::fs::copy(f, to.path().join(f.file_name().unwrap())).unwrap();
        }
        to
    };
    let tampered = copy();
    let mid = tampered.path().join("audit.jsonl.2");
    let mid_lines = lines(&mid);
    let first: serde_json::Value = serde_json::from_str(&mid_lines[0]).unwrap();
    let edited = rechain(&mid_lines, first["prev"].as_str().unwrap(), |i, v| {
        if i == 0 {
            v["decision"] = "allow_edited".into();
        }
    });
    write(&mid, &edited);
    let (code, out) = verify(&audit_files(tampered.path()), &anchored);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("REPLACED") && out.contains("audit.jsonl.2"),
        "{out}"
    );
    // Checkpoints sign what the chain commits to (no second hash of the bytes), yet bytes
    // outside the records are caught too: a blank line after the last record of a rotated
    // file changes no record hash, but the file's signed size.
    assert!(
        !std::fs::read_to_string(&src).unwrap().contains("sha256"),
        "rotated files are signed by size, lines and last-line hash"
    );
    let padded = copy();
    let mid = padded.path().join("audit.jsonl.2");
    let mut bytes = std::fs::read(&mid).unwrap();
    bytes.push(b'\n');
    std::fs::write(&mid, bytes).unwrap();
    let (code, out) = verify(&audit_files(padded.path()), &anchored);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("REPLACED") && out.contains("audit.jsonl.2"),
        "{out}"
    );
    // A rotated file deleted from the middle of what the latest checkpoint lists.
    let gone = copy();
    std::fs::remove_file(gone.path().join("audit.jsonl.2")).unwrap();
    let (code, out) = verify(&audit_files(gone.path()), &anchored);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("MISSING") && out.contains("audit.jsonl.2"),
        "{out}"
    );

    // Phase 2: same directory, retention on: every rotated file is shipped, then pruned.
    let ship = d.join("ship");
    std::fs::create_dir_all(&ship).unwrap();
    let cfg = config(
        &up,
        &format!(
            "{{path: audit.jsonl, maxFileBytes: 1000000, {cp}, retention: {{maxAge: 1s, shipCommand: [sh, -c, 'cp \"$0\" {}/']}}}}",
            ship.display()
        ),
    );
    let p = TestProxy::start_in(dir, &cfg, &[]);
    let d = p.dir.path().to_path_buf();
    let rotated: Vec<PathBuf> = files
        .iter()
        .filter(|f| f.file_name().unwrap() != "audit.jsonl")
        .cloned()
        .collect();
    eventually("rotated files shipped and pruned", || {
        rotated
            .iter()
            .all(|f| !f.exists() && ship.join(f.file_name().unwrap()).exists())
    });
    // New records keep flowing into the live file.
    post(&p, &up, 100);
    eventually("records", || p.audit().len() >= 2);
    let dir = stop(p);
    assert_eq!(dir.path(), d);
    let left = audit_files(&d);
    assert_eq!(
        left,
        vec![d.join("audit.jsonl")],
        "only the live file is kept"
    );
    // What remains still verifies against every checkpoint, and says what was pruned.
    let (code, out) = verify(&left, &anchored);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("not given: audit.jsonl.1"), "{out}");
    // The shipped copies and the live file are the whole chain again.
    let mut whole: Vec<PathBuf> = rotated
        .iter()
        .map(|f| ship.join(f.file_name().unwrap()))
        .collect();
    whole.extend(left.clone());
    let (code, out) = verify(&whole, &anchored);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 26 records"), "{out}");
    assert!(!out.contains("not given"), "{out}");
    // Cutting the remaining live file is still caught after pruning.
    let live = lines(&left[0]);
    let cut = tempfile::tempdir().unwrap();
    let cut_file = cut.path().join("audit.jsonl");
    write(&cut_file, &live[..live.len() - 1]);
    let (code, out) = verify(std::slice::from_ref(&cut_file), &anchored);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("TRUNCATED"), "{out}");
}
