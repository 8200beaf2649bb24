//! The local backend: governor GCRA limiters and in-memory budget counters, exact within one
//! sidecar (every reservation takes one lock across all its caps).

use super::{Cap, Exceeded, RateCheck, Reservation, Usage};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most budget counters and run call counts held at once. Every call without an
/// `X-Tollgate-Run` starts a run, and each run has its counter, so these tables grow with
/// traffic; past this size the expired entries are dropped and then, if that is not enough,
/// the least recently used *run* entries with nothing reserved (never a tenant's or agent's
/// day or month counter), down to nine tenths. Sweeps are amortised: the next one runs only
/// after another tenth of the bound has been added, so no call pays a scan of the table.
pub const MAX_ENTRIES: usize = 100_000;

/// The size down to which a sweep forgets entries.
const KEEP: usize = MAX_ENTRIES / 10 * 9;

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

/// The budget counters, keyed by cap key, and the size that triggers the next sweep.
#[derive(Default)]
struct Counters {
    map: HashMap<String, Counter>,
    next_sweep: usize,
}

impl Counters {
    /// Make room when the table has reached its next sweep size; returns how many run
    /// counters were forgotten.
    fn make_room(&mut self, now: Instant) -> u64 {
        if self.map.len() < self.next_sweep.max(MAX_ENTRIES) {
            return 0;
        }
        self.map.retain(|_, c| c.until.is_none_or(|u| u > now));
        let mut forgotten = 0;
        if self.map.len() > KEEP {
            let idle = self
                .map
                .iter()
                .filter(|(k, c)| k.starts_with("run:") && c.held.is_empty());
            let mut runs: Vec<(Instant, &String)> =
                idle.map(|(k, c)| (c.until.unwrap_or(now), k)).collect();
            let n = (self.map.len() - KEEP).min(runs.len());
            if n > 0 {
                runs.select_nth_unstable(n - 1);
                let drop: Vec<String> = runs[..n].iter().map(|(_, k)| (*k).clone()).collect();
                for k in drop {
                    self.map.remove(&k);
                }
                forgotten = n as u64;
            }
        }
        self.next_sweep = self.map.len() + MAX_ENTRIES / 10;
        forgotten
    }
}

/// In-process limits.
#[derive(Default)]
pub struct LocalStore {
    limiters: Mutex<Limiters>,
    counters: Mutex<Counters>,
    forgotten: AtomicU64,
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
        let mut guard = self.counters.lock().expect("counter lock");
        let counters = &mut guard.map;
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
        let mut guard = self.counters.lock().expect("counter lock");
        let forgotten = guard.make_room(now);
        if forgotten > 0 {
            self.forgotten.fetch_add(forgotten, Ordering::Relaxed);
        }
        let counters = &mut guard.map;
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

    /// Run counters forgotten to keep the table bounded since the last call (for the metric).
    pub fn take_forgotten(&self) -> u64 {
        self.forgotten.swap(0, Ordering::Relaxed)
    }

    /// Settle: drop the holds and add the actual amounts.
    pub fn settle(&self, r: &Reservation, actual: &[i64]) {
        let mut guard = self.counters.lock().expect("counter lock");
        let counters = &mut guard.map;
        for ((cap, _), &a) in r.entries.iter().zip(actual) {
            let k = counters.entry(cap.key.clone()).or_default();
            k.held.remove(&r.id);
            k.spent += a;
        }
    }
}

/// A table keyed by run id, bounded like the budget counters: runs idle for a week are
/// forgotten, and past [`MAX_ENTRIES`] the least recently seen, in amortised sweeps. Used for
/// the calls per run ([`RunCalls`]) and the run ledger of reported outcomes
/// ([`crate::outcome::Ledger`]).
pub(crate) struct RunTable<V> {
    map: HashMap<String, (V, Instant)>,
    next_sweep: usize,
    forgotten: u64,
}

impl<V> Default for RunTable<V> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            next_sweep: 0,
            forgotten: 0,
        }
    }
}

impl<V: Default> RunTable<V> {
    const IDLE: Duration = Duration::from_secs(7 * 86_400);

    /// The entry of `run`, if the table holds it.
    pub(crate) fn get(&self, run: &str) -> Option<&V> {
        self.map.get(run).map(|(v, _)| v)
    }

    /// The entry of `run`, created (making room first) if absent, and marked seen now.
    pub(crate) fn touch(&mut self, run: &str, now: Instant) -> &mut V {
        if self.map.len() >= self.next_sweep.max(MAX_ENTRIES) && !self.map.contains_key(run) {
            self.map
                .retain(|_, (_, seen)| now.duration_since(*seen) < Self::IDLE);
            if self.map.len() > KEEP {
                let mut seen: Vec<(Instant, &String)> =
                    self.map.iter().map(|(k, (_, s))| (*s, k)).collect();
                let excess = self.map.len() - KEEP;
                seen.select_nth_unstable(excess - 1);
                let drop: Vec<String> = seen[..excess].iter().map(|(_, k)| (*k).clone()).collect();
                for k in drop {
                    self.map.remove(&k);
                }
                self.forgotten += excess as u64;
            }
            self.next_sweep = self.map.len() + MAX_ENTRIES / 10;
        }
        let e = self
            .map
            .entry(run.to_owned())
            .or_insert((V::default(), now));
        e.1 = now;
        &mut e.0
    }

    /// Runs forgotten since the last call (for `tollgate_runs_forgotten_total`).
    pub(crate) fn take_forgotten(&mut self) -> u64 {
        std::mem::take(&mut self.forgotten)
    }

    /// Entries held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// Calls per run, for `input.run.calls`, in a bounded [`RunTable`].
#[derive(Default)]
pub struct RunCalls {
    runs: Mutex<RunTable<u64>>,
}

impl RunCalls {
    /// Calls counted in `run`.
    pub fn count(&self, run: &str) -> u64 {
        let m = self.runs.lock().expect("run calls lock");
        m.get(run).copied().unwrap_or(0)
    }

    /// Count `n` more calls in `run`.
    pub fn add(&self, run: &str, n: u64) {
        let mut m = self.runs.lock().expect("run calls lock");
        *m.touch(run, Instant::now()) += n;
    }

    /// Runs forgotten since the last call (for the metric).
    pub fn take_forgotten(&self) -> u64 {
        self.runs.lock().expect("run calls lock").take_forgotten()
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
    fn run_counters_stay_bounded_and_day_counters_are_never_forgotten() {
        let s = LocalStore::default();
        let day = cap("tenant:acme:2026-12-01", i64::MAX);
        let calls = MAX_ENTRIES + MAX_ENTRIES / 4;
        for i in 0..calls {
            let run = Cap {
                scope: "run",
                ttl: Duration::from_secs(7 * 86_400),
                ..cap(&format!("run:a:{i}"), i64::MAX)
            };
            let caps = [run, day.clone()];
            let id = format!("r{i}");
            s.reserve(&id, &caps, &[1, 1], Duration::from_secs(60))
                .unwrap();
            let r = Reservation {
                id,
                entries: caps.iter().cloned().zip([1, 1]).collect(),
                held: Held::Local,
            };
            s.settle(&r, &[1, 1]);
        }
        let len = s.counters.lock().unwrap().map.len();
        assert!(len <= MAX_ENTRIES, "{len} counters");
        let forgotten = s.take_forgotten();
        assert!(forgotten as usize >= calls - MAX_ENTRIES, "{forgotten}");
        // Amortised: a handful of sweeps, not one per call past the bound.
        assert!(forgotten as usize <= calls - KEEP, "{forgotten}");
        // The most recent run is kept; the day counter holds every call's spend.
        let last = cap(&format!("run:a:{}", calls - 1), i64::MAX);
        assert_eq!(s.usage(&[last])[0].spent, 1);
        assert_eq!(s.usage(&[day])[0].spent, calls as i64);
    }

    #[test]
    fn run_call_counts_stay_bounded() {
        let r = RunCalls::default();
        let runs = MAX_ENTRIES + MAX_ENTRIES / 4;
        for i in 0..runs {
            r.add(&format!("run_{i}"), 1);
        }
        r.add("run_0", 1);
        assert!(r.runs.lock().unwrap().len() <= MAX_ENTRIES);
        assert!(r.take_forgotten() as usize >= runs - MAX_ENTRIES);
        assert_eq!(r.count(&format!("run_{}", runs - 1)), 1);
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
