//! The audit trail: one hash-chained JSONL record per call (refusals included), group-committed
//! with an fsync per batch. A call is forwarded only after its decision record is durable.

mod record;
mod writer;

pub use record::{AuditApproval, AuditCost, AuditLatency, AuditRecord, Phase};
pub use writer::{AuditError, AuditLog, GENESIS};
