//! The local backend: governor GCRA limiters and in-memory budget counters, exact within one
//! sidecar (every reservation takes one lock across all its caps).

use super::{Cap, Exceeded, RateCheck, Reservation, Usage};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Counter {
    spent: i64,
    /// Reservation id → (amount, expiry).
    held: HashMap<String, (i64, Instant)>,
    /// When the counter itself may be dropped.
    until: Option<Instant>,
}

impl Counter {
    fn reserved(&mut self, now: Instant) -> i64 {
        // Reservations of a call that never settled (a crash cannot happen locally, but a
        // dropped future can) expire.
        self.held.retain(|_, (_, exp)| *exp > now);
        self.held.values().map(|(a, _)| a).sum()
    }
}

/// One governor limiter per (interval, burst), keyed by the limit's key.
type Limiters = HashMap<(Duration, u32), Arc<DefaultKeyedRateLimiter<String>>>;

/// In-process limits.
#[derive(Default)]
pub struct LocalStore {
    limiters: Mutex<Limiters>,
    counters: Mutex<HashMap<String, Counter>>,
}

impl LocalStore {
    /// Take one call; `Some(wait)` if the limit is exhausted.
    pub fn gcra(&self, c: &RateCheck) -> Option<Duration> {
        let limiter = {
            let mut l = self.limiters.lock().expect("limiter lock");
            l.entry((c.interval, c.burst))
                .or_insert_with(|| {
                    let burst = NonZeroU32::new(c.burst).unwrap_or(NonZeroU32::MIN);
                    let quota = Quota::with_period(c.interval.max(Duration::from_nanos(1)))
                        .expect("non-zero period")
                        .allow_burst(burst);
                    Arc::new(RateLimiter::keyed(quota))
                })
                .clone()
        };
        match limiter.check_key(&c.key) {
            Ok(()) => None,
            Err(not_until) => Some(not_until.wait_time_from(DefaultClock::default().now())),
        }
    }

    /// Usage of each cap.
    pub fn usage(&self, caps: &[Cap]) -> Vec<Usage> {
        let now = Instant::now();
        let mut counters = self.counters.lock().expect("counter lock");
        caps.iter()
            .map(|c| match counters.get_mut(&c.key) {
                Some(k) => Usage {
                    spent: k.spent,
                    reserved: k.reserved(now),
                },
                None => Usage::default(),
            })
            .collect()
    }

    /// Reserve all or nothing.
    pub fn reserve(
        &self,
        id: &str,
        caps: &[Cap],
        amounts: &[i64],
        ttl: Duration,
    ) -> Result<(), Exceeded> {
        let now = Instant::now();
        let mut counters = self.counters.lock().expect("counter lock");
        if counters.len() > 10_000 {
            counters.retain(|_, c| c.until.is_none_or(|u| u > now));
        }
        for (cap, &amount) in caps.iter().zip(amounts) {
            let k = counters.entry(cap.key.clone()).or_default();
            let usage = Usage {
                spent: k.spent,
                reserved: k.reserved(now),
            };
            if usage.spent + usage.reserved + amount > cap.cap {
                return Err(Exceeded {
                    cap: cap.clone(),
                    usage,
                    amount,
                });
            }
        }
        for (cap, &amount) in caps.iter().zip(amounts) {
            let k = counters.entry(cap.key.clone()).or_default();
            k.held.insert(id.to_owned(), (amount, now + ttl));
            k.until = Some(now + cap.ttl);
        }
        Ok(())
    }

    /// Settle: drop the holds and add the actual amounts.
    pub fn settle(&self, r: &Reservation, actual: &[i64]) {
        let mut counters = self.counters.lock().expect("counter lock");
        for ((cap, _), &a) in r.entries.iter().zip(actual) {
            let k = counters.entry(cap.key.clone()).or_default();
            k.held.remove(&r.id);
            k.spent += a;
        }
    }
}

/// Calls per run, for `input.run.calls`. Bounded: runs idle for a week are forgotten, and
/// past [`RunCalls::MAX_RUNS`] the oldest are dropped first.
#[derive(Default)]
pub struct RunCalls {
    runs: Mutex<HashMap<String, (u64, Instant)>>,
}

impl RunCalls {
    /// Most runs remembered at once.
    pub const MAX_RUNS: usize = 100_000;
    const IDLE: Duration = Duration::from_secs(7 * 86_400);

    /// Calls counted in `run`.
    pub fn count(&self, run: &str) -> u64 {
        let m = self.runs.lock().expect("run calls lock");
        m.get(run).map(|(n, _)| *n).unwrap_or(0)
    }

    /// Count `n` more calls in `run`.
    pub fn add(&self, run: &str, n: u64) {
        let now = Instant::now();
        let mut m = self.runs.lock().expect("run calls lock");
        if m.len() >= Self::MAX_RUNS && !m.contains_key(run) {
            m.retain(|_, (_, seen)| now.duration_since(*seen) < Self::IDLE);
            if m.len() >= Self::MAX_RUNS {
                if let Some(oldest) = m
                    .iter()
                    .min_by_key(|(_, (_, s))| *s)
                    .map(|(k, _)| k.clone())
                {
                    m.remove(&oldest);
                }
            }
        }
        let e = m.entry(run.to_owned()).or_insert((0, now));
        e.0 += n;
        e.1 = now;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CapKind, Held};
    use super::*;

    fn cap(key: &str, cap: i64) -> Cap {
        Cap {
            name: key.into(),
            scope: "tenant_day",
            key: key.into(),
            cap,
            kind: CapKind::Spend,
            ttl: Duration::from_secs(60),
        }
    }

    #[test]
    fn reservations_are_all_or_nothing_and_settle_to_actual() {
        let s = LocalStore::default();
        let caps = [cap("a", 100), cap("b", 50)];
        s.reserve("r1", &caps, &[40, 40], Duration::from_secs(60))
            .unwrap();
        // b would exceed: nothing is held for r2, not even on a.
        let e = s
            .reserve("r2", &caps, &[20, 20], Duration::from_secs(60))
            .unwrap_err();
        assert_eq!(e.cap.key, "b");
        assert_eq!(
            e.usage,
            Usage {
                spent: 0,
                reserved: 40
            }
        );
        assert_eq!(
            s.usage(&caps),
            vec![
                Usage {
                    spent: 0,
                    reserved: 40
                };
                2
            ]
        );
        let r1 = Reservation {
            id: "r1".into(),
            entries: caps.iter().cloned().zip([40, 40]).collect(),
            held: Held::Local,
        };
        s.settle(&r1, &[10, 10]);
        assert_eq!(
            s.usage(&caps),
            vec![
                Usage {
                    spent: 10,
                    reserved: 0
                };
                2
            ]
        );
        s.reserve("r3", &caps, &[20, 20], Duration::from_secs(60))
            .unwrap();
    }

    #[test]
    fn unsettled_reservations_expire() {
        let s = LocalStore::default();
        let caps = [cap("a", 10)];
        s.reserve("r1", &caps, &[10], Duration::from_millis(1))
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        s.reserve("r2", &caps, &[10], Duration::from_secs(60))
            .unwrap();
    }

    #[test]
    fn gcra_allows_the_burst_then_asks_to_wait() {
        let s = LocalStore::default();
        let c = RateCheck {
            name: "t".into(),
            scope: "tenant",
            key: "k".into(),
            interval: Duration::from_secs(60),
            burst: 3,
        };
        for _ in 0..3 {
            assert_eq!(s.gcra(&c), None);
        }
        let wait = s.gcra(&c).expect("fourth call is limited");
        assert!(
            wait > Duration::from_secs(1) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        let other = RateCheck {
            key: "k2".into(),
            ..c
        };
        assert_eq!(s.gcra(&other), None, "keys are independent");
    }
}
