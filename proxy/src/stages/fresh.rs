//! Configuration freshness: under an operator, a snapshot older than `maxStaleness` without a
//! heartbeat refuses calls (503 `config_stale`) unless the identity opted into `failOpen`.

use crate::refusal::Refusal;
use std::time::Duration;

/// What the freshness gate decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Freshness {
    /// Fresh, or staleness is not tracked.
    Fresh,
    /// Stale, but `failOpen` lets the call through (counted by the caller).
    StaleFailOpen,
}

/// Check a snapshot `age` against `max` (only when `tracked`).
pub(crate) fn check(
    tracked: bool,
    age: Duration,
    max: Duration,
    fail_open: bool,
) -> Result<Freshness, Refusal> {
    if !tracked || age <= max {
        return Ok(Freshness::Fresh);
    }
    if fail_open {
        return Ok(Freshness::StaleFailOpen);
    }
    Err(Refusal::Unavailable {
        code: "config_stale",
        reason: format!(
            "configuration is {}s old without an operator heartbeat (maxStaleness {}s)",
            age.as_secs(),
            max.as_secs()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_configuration_fails_closed_unless_fail_open() {
        let (age, max) = (Duration::from_secs(90), Duration::from_secs(60));
        assert!(check(true, age, max, false).is_err());
        assert_eq!(check(true, age, max, true), Ok(Freshness::StaleFailOpen));
        assert_eq!(check(false, age, max, false), Ok(Freshness::Fresh));
    }
}
