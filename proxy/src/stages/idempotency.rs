//! Idempotency: a mutating call with an `Idempotency-Key` claims the key for (agent, tenant,
//! tool, key); a retry of a completed identical call gets the stored response, a reuse with a
//! different input is refused (422), and tools can require a key.

use crate::idempotency::{Claim, Idempotency, Stored};
use crate::refusal::Refusal;
use crate::snapshot::Tool;
use http::HeaderMap;

/// The `Idempotency-Key` a call carries, checked: `Ok(None)` when it has none and needs none.
pub(crate) fn header<'h>(
    headers: &'h HeaderMap,
    tool: &Tool,
    require_for_irreversible: bool,
) -> Result<Option<&'h str>, Refusal> {
    let mut values = headers.get_all("idempotency-key").iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(Refusal::BadRequest(
            "more than one Idempotency-Key header".into(),
        ));
    }
    match first {
        Some(v) => v
            .to_str()
            .ok()
            .filter(|v| !v.is_empty() && v.len() <= 255)
            .map(Some)
            .ok_or_else(|| {
                Refusal::BadRequest("Idempotency-Key must be 1-255 visible ASCII characters".into())
            }),
        None => {
            let required = tool.config.require_idempotency_key
                || (require_for_irreversible && !tool.config.risk.reversible);
            if required {
                Err(Refusal::IdempotencyKeyRequired)
            } else {
                Ok(None)
            }
        }
    }
}

/// Claim `key` for an input with `hash`: `Ok(None)` when this call now owns it, the stored
/// response when an identical call already completed.
pub(crate) async fn claim(
    store: &Idempotency,
    key: &str,
    hash: &str,
    tool: &Tool,
    header: &str,
) -> Result<Option<Stored>, Refusal> {
    let claim = store
        .claim(key, hash, tool.total_timeout)
        .await
        .map_err(|e| Refusal::Unavailable {
            code: "idempotency_unavailable",
            reason: e,
        })?;
    match claim {
        Claim::Conflict => Err(Refusal::IdempotencyConflict(format!(
            "Idempotency-Key {header:?} was already used for a different {} request",
            tool.name()
        ))),
        Claim::Owned => Ok(None),
        Claim::Replay(stored) => Ok(Some(stored)),
    }
}
