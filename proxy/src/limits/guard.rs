//! Budget reservations and idempotency claims as values that always end.
//!
//! A [`BudgetGuard`] or an [`IdemGuard`] is settled, released or completed by the exit that
//! consumes it. When it is dropped instead — the agent disconnected and hyper dropped the
//! pipeline future, or a stage panicked — `Drop` ends it: a reservation whose call may have
//! reached the upstream ([`BudgetGuard::sent`]) is charged its estimate (the upstream may
//! have executed it, and the estimate is the bound that was reserved), one that never left
//! the pod is released; an idempotency claim is released. Either way it is counted in
//! `tollgate_guards_dropped_total{guard}`, so no exit can leak budget or hold a key forever.

use super::{CapKind, Limits, Reservation};
use std::sync::Arc;

/// Budget held for one call (or one JSON-RPC batch) until it ends.
pub struct BudgetGuard {
    limits: Arc<Limits>,
    reservation: Option<Reservation>,
    /// The estimate reserved against spend caps.
    spend: i64,
    /// The exposure reserved against exposure caps.
    exposure: i64,
    sent: bool,
}

impl std::fmt::Debug for BudgetGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BudgetGuard")
            .field("reservation", &self.reservation.as_ref().map(|r| &r.id))
            .field("sent", &self.sent)
            .finish()
    }
}

impl BudgetGuard {
    /// Guard `reservation`, which holds `spend` on spend caps and `exposure` on exposure caps.
    pub fn new(limits: Arc<Limits>, reservation: Reservation, spend: i64, exposure: i64) -> Self {
        Self {
            limits,
            reservation: Some(reservation),
            spend,
            exposure,
            sent: false,
        }
    }

    /// The reservation (until the guard ends).
    pub fn reservation(&self) -> Option<&Reservation> {
        self.reservation.as_ref()
    }

    /// The estimate this guard holds on spend caps.
    pub fn estimate(&self) -> i64 {
        self.spend
    }

    /// The call is about to leave the pod: from now on a drop charges the estimate.
    pub fn sent(&mut self) {
        self.sent = true;
    }

    /// Charge `spend` (and the reserved exposure).
    pub async fn settle(mut self, spend: i64) {
        if let Some(r) = self.reservation.take() {
            let actual = amounts(&r, Some(spend), self.exposure);
            self.limits.settle(&r, &actual).await;
        }
    }

    /// Release everything: nothing was spent.
    pub async fn release(mut self) {
        if let Some(r) = self.reservation.take() {
            let actual = amounts(&r, None, 0);
            self.limits.settle(&r, &actual).await;
        }
    }
}

/// Per-entry amounts to settle `r` at: `Some(spend)` charges spend caps `spend` and exposure
/// caps `exposure`; `None` releases.
fn amounts(r: &Reservation, spend: Option<i64>, exposure: i64) -> Vec<i64> {
    r.entries
        .iter()
        .map(|(c, _)| match (spend, c.kind) {
            (None, _) => 0,
            (Some(s), CapKind::Spend) => s,
            (Some(_), CapKind::Exposure) => exposure,
        })
        .collect()
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        let Some(r) = self.reservation.take() else {
            return;
        };
        let actual = if self.sent {
            amounts(&r, Some(self.spend), self.exposure)
        } else {
            amounts(&r, None, 0)
        };
        self.limits
            .metrics
            .guards_dropped
            .with_label_values(&[if self.sent {
                "budget_charged"
            } else {
                "budget_released"
            }])
            .inc();
        let limits = self.limits.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { limits.settle(&r, &actual).await });
            }
            // No runtime (a test, shutdown): the local store settles synchronously; a Redis
            // reservation expires on its own.
            Err(_) => limits.settle_local(&r, &actual),
        }
    }
}

/// An owned `Idempotency-Key` claim until the call's response is stored or given up.
pub struct IdemGuard {
    limits: Arc<Limits>,
    key: Option<String>,
}

impl std::fmt::Debug for IdemGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdemGuard").finish_non_exhaustive()
    }
}

impl IdemGuard {
    /// Guard the claim on `key`.
    pub fn new(limits: Arc<Limits>, key: String) -> Self {
        Self {
            limits,
            key: Some(key),
        }
    }

    /// Store the response for replays.
    pub async fn complete(mut self, hash: &str, stored: crate::idempotency::Stored) {
        if let Some(k) = self.key.take() {
            self.limits.idempotency.complete(&k, hash, stored).await;
        }
    }

    /// Give the claim up: a retry is forwarded.
    pub async fn release(mut self) {
        if let Some(k) = self.key.take() {
            self.limits.idempotency.release(&k).await;
        }
    }
}

impl Drop for IdemGuard {
    fn drop(&mut self) {
        let Some(k) = self.key.take() else {
            return;
        };
        self.limits
            .metrics
            .guards_dropped
            .with_label_values(&["idempotency_released"])
            .inc();
        let limits = self.limits.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { limits.idempotency.release(&k).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Cap, CapKind};
    use super::*;
    use std::time::Duration;

    fn limits() -> Arc<Limits> {
        let m = Arc::new(crate::metrics::Metrics::new());
        Arc::new(Limits::new(&Default::default(), m).unwrap())
    }

    fn cap() -> Vec<Cap> {
        vec![Cap {
            name: "t".into(),
            scope: "tenant_day",
            key: "guard-test".into(),
            cap: 100,
            kind: CapKind::Spend,
            ttl: Duration::from_secs(60),
        }]
    }

    async fn guard(l: &Arc<Limits>) -> BudgetGuard {
        let r = l.reserve(&cap(), &[60]).await.unwrap().unwrap();
        BudgetGuard::new(l.clone(), r, 60, 0)
    }

    async fn usage(l: &Limits) -> super::super::Usage {
        // Drop handlers settle on a spawned task.
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        l.usage(&cap()).await[0]
    }

    #[tokio::test]
    async fn a_dropped_unsent_reservation_is_released() {
        let l = limits();
        drop(guard(&l).await);
        let u = usage(&l).await;
        assert_eq!((u.spent, u.reserved), (0, 0));
    }

    #[tokio::test]
    async fn a_dropped_sent_reservation_is_charged_its_estimate() {
        let l = limits();
        let mut g = guard(&l).await;
        g.sent();
        drop(g);
        let u = usage(&l).await;
        assert_eq!((u.spent, u.reserved), (60, 0));
        assert_eq!(
            l.metrics
                .guards_dropped
                .with_label_values(&["budget_charged"])
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn a_panic_while_holding_a_reservation_charges_it() {
        let l = limits();
        let g = guard(&l).await;
        let task = tokio::spawn(async move {
            let mut g = g;
            g.sent();
            panic!("a stage panicked");
            #[allow(unreachable_code)]
            g.release().await
        });
        assert!(task.await.unwrap_err().is_panic());
        let u = usage(&l).await;
        assert_eq!((u.spent, u.reserved), (60, 0));
    }

    #[tokio::test]
    async fn settled_guards_charge_the_actual_cost_once() {
        let l = limits();
        guard(&l).await.settle(25).await;
        let u = usage(&l).await;
        assert_eq!((u.spent, u.reserved), (25, 0));
        assert_eq!(
            l.metrics
                .guards_dropped
                .with_label_values(&["budget_charged"])
                .get(),
            0
        );
    }
}
