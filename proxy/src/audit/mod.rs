//! The audit trail: one hash-chained JSONL record per call (refusals included), group-committed
//! with an fsync per batch. A call is forwarded only after its decision record is durable.
//! [`checkpoint`] anchors the chain outside its writer with signed checkpoints.
//! Offline: [`verify`] checks the chain (and, given checkpoints, that it extends them), [`runs`] summarises runs, [`replay`] re-decides calls
//! under other policies.

pub mod checkpoint;
mod record;
pub mod replay;
mod retention;
pub mod runs;
pub mod verify;
mod writer;

pub use record::{
    AuditApproval, AuditCost, AuditLatency, AuditRecord, Phase, RunCounts, RunOutcome, RunRecord,
};
pub use retention::Retention;
pub use writer::{
    line_hash, rotated_name, rotated_siblings, AuditError, AuditLog, CheckpointSink, WriterOptions,
    GENESIS,
};

/// Read records from files (in order); a torn final line is skipped.
pub fn read_records(files: &[std::path::PathBuf]) -> std::io::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for f in files {
        for line in std::fs::read_to_string(f)?.lines() {
            if let Ok(v) = serde_json::from_str(line) {
                out.push(v);
            }
        }
    }
    Ok(out)
}
