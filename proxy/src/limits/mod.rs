//! Rate limits and budget reservations, local or on Redis.
//!
//! Rate limits are GCRA per tenant, per agent and per (tenant, tool). Budgets are reserved
//! before forwarding, atomically against every cap that applies (run, agent per day, tenant
//! per day and per month, and financial exposure caps), and settled to the actual cost after
//! the response — refunded if lower, charged if higher (the overrun is counted) — or released
//! if the upstream failed. Money is integer micro-dollars throughout, so concurrent
//! reservations add up exactly.
//!
//! The local backend serves one sidecar; `limits.backend: redis` shares the same semantics
//! cluster-wide through Lua scripts (see [`redis_store`]). When Redis is unreachable,
//! `limits.onUnavailable` decides: `deny` (503, default) or `local` (fall back, counted in
//! `tollgate_fail_open_total{reason="limits_redis"}`); Redis is retried on every call, so
//! recovery is automatic.
//!
//! (About 550 lines: the [`Limits`] façade over both backends and the functions that turn a
//! snapshot into the caps and rate checks of one call; the backends are in their own files.)

pub mod guard;
pub mod local;
pub mod redis_store;

pub use guard::{BudgetGuard, IdemGuard};

use crate::config::{LimitsBackend, LimitsConfig, OnUnavailable, RateLimitConfig, RateLimitScope};
use crate::metrics::Metrics;
use crate::refusal::Refusal;
use crate::snapshot::Snapshot;
use std::sync::Arc;
use std::time::Duration;

/// The cap of a counter that never refuses (far above any spend, far below overflow).
pub const UNCAPPED: i64 = i64::MAX / 4;

/// USD → micro-dollars.
pub fn to_micros(usd: f64) -> i64 {
    (usd * 1e6).round() as i64
}

/// Micro-dollars → USD.
pub fn to_usd(micros: i64) -> f64 {
    micros as f64 / 1e6
}

/// One rate limit that applies to a call.
#[derive(Clone, Debug, PartialEq)]
pub struct RateCheck {
    /// Human-readable name, e.g. `tenant acme: 10/minute`.
    pub name: String,
    /// Metric label: `tenant`, `agent` or `tool`.
    pub scope: &'static str,
    /// Store key.
    pub key: String,
    /// Time between calls at the sustained rate.
    pub interval: Duration,
    /// Calls allowed at once.
    pub burst: u32,
}

/// What a cap counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapKind {
    /// Spend (USD).
    Spend,
    /// Financial exposure (`perUnitUsd` of a request field).
    Exposure,
}

/// One budget cap that applies to a call.
#[derive(Clone, Debug, PartialEq)]
pub struct Cap {
    /// Human-readable name, e.g. `tenant acme per day`.
    pub name: String,
    /// Metric scope label (`run`, `agent_day`, `tenant_day`, `tenant_month`, `exposure_day`,
    /// `exposure_month`).
    pub scope: &'static str,
    /// Store key (includes the period, so counters roll over by themselves).
    pub key: String,
    /// Cap in micro-dollars.
    pub cap: i64,
    /// Spend or exposure.
    pub kind: CapKind,
    /// How long the counter is kept.
    pub ttl: Duration,
}

/// Current state of one counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Settled spend.
    pub spent: i64,
    /// Outstanding reservations.
    pub reserved: i64,
}

/// A cap that a reservation would exceed.
#[derive(Clone, Debug, PartialEq)]
pub struct Exceeded {
    /// Which cap.
    pub cap: Cap,
    /// Its usage before this call.
    pub usage: Usage,
    /// What this call asked for.
    pub amount: i64,
}

/// A store failed (Redis down or erroring).
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// Which store holds a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// The local store.
    Local,
    /// Redis.
    Redis,
}

/// Budget held for one call until it settles.
#[derive(Clone, Debug)]
pub struct Reservation {
    /// Unique id.
    pub id: String,
    /// `(cap, amount reserved)`.
    pub entries: Vec<(Cap, i64)>,
    /// Where it is held.
    pub held: Held,
}

/// The limits facade shared by every snapshot of a sidecar (counters survive reloads).
pub struct Limits {
    /// Idempotency records (in Redis with the redis backend).
    pub idempotency: crate::idempotency::Idempotency,
    local: local::LocalStore,
    redis: Option<redis_store::RedisStore>,
    on_unavailable: OnUnavailable,
    reservation_ttl: Duration,
    metrics: Arc<Metrics>,
    run_calls: local::RunCalls,
    /// Circuit breaker: after a Redis failure, calls skip Redis until this time (ms since
    /// the epoch) instead of each paying a connection timeout; then Redis is tried again.
    redis_down_until: std::sync::atomic::AtomicU64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The error of a call that skipped Redis because it failed moments ago.
const CIRCUIT_OPEN: &str = "redis: unavailable (retrying shortly)";

/// How long Redis is skipped after a failure.
const REDIS_RETRY_AFTER: Duration = Duration::from_millis(500);

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("redis", &self.redis.is_some())
            .finish()
    }
}

impl Limits {
    /// Build from `limits:` config. Redis is connected lazily (a Redis that is down at start
    /// is handled like one that goes down later).
    pub fn new(cfg: &LimitsConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        let redis = match cfg.backend {
            LimitsBackend::Local => None,
            LimitsBackend::Redis => Some(redis_store::RedisStore::new(cfg)?),
        };
        let idempotency = crate::idempotency::Idempotency::new(
            redis.as_ref().map(redis_store::RedisStore::conn),
            cfg.idempotency_ttl
                .map(|d| d.get())
                .unwrap_or(Duration::from_secs(24 * 3600)),
        );
        Ok(Self {
            idempotency,
            local: local::LocalStore::default(),
            redis,
            on_unavailable: cfg.on_unavailable,
            reservation_ttl: cfg
                .reservation_ttl
                .map(|d| d.get())
                .unwrap_or(Duration::from_secs(300)),
            metrics,
            run_calls: local::RunCalls::default(),
            redis_down_until: 0.into(),
        })
    }

    /// Redis, unless it failed moments ago.
    fn redis(&self) -> Result<Option<&redis_store::RedisStore>, StoreError> {
        match &self.redis {
            None => Ok(None),
            Some(r) => {
                let until = self
                    .redis_down_until
                    .load(std::sync::atomic::Ordering::Relaxed);
                if now_ms() < until {
                    Err(StoreError(CIRCUIT_OPEN.into()))
                } else {
                    Ok(Some(r))
                }
            }
        }
    }

    fn trip(&self) {
        self.redis_down_until.store(
            now_ms() + REDIS_RETRY_AFTER.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn redis_failed(&self, op: &str, e: &StoreError) -> Result<(), Refusal> {
        self.metrics.redis_unavailable.set(1);
        // Only a real failure (re)opens the circuit: a call skipped while it is open must not
        // extend it, or steady traffic would keep Redis skipped forever.
        if e.0 != CIRCUIT_OPEN {
            self.trip();
        }
        let action = match self.on_unavailable {
            OnUnavailable::Deny => "deny",
            OnUnavailable::Local => "local",
        };
        self.metrics
            .limits_unavailable
            .with_label_values(&[action])
            .inc();
        match self.on_unavailable {
            OnUnavailable::Deny => {
                tracing::error!(error = %e, op, "limits backend (redis) unavailable; refusing (limits.onUnavailable: deny)");
                Err(Refusal::Unavailable {
                    code: "limits_unavailable",
                    reason: format!("the rate-limit and budget store is unavailable ({e})"),
                })
            }
            OnUnavailable::Local => {
                tracing::warn!(error = %e, op, "limits backend (redis) unavailable; using local limits (limits.onUnavailable: local)");
                self.metrics
                    .fail_open
                    .with_label_values(&["limits_redis"])
                    .inc();
                Ok(())
            }
        }
    }

    /// Take one call from every rate limit; the first exhausted one refuses with 429.
    pub async fn check_rates(&self, checks: &[RateCheck]) -> Result<(), Refusal> {
        for c in checks {
            let attempt = match self.redis() {
                Ok(None) => None,
                Ok(Some(r)) => Some(r.gcra(c).await),
                Err(e) => Some(Err(e)),
            };
            let wait = match attempt {
                None => self.local.gcra(c),
                Some(Ok(w)) => {
                    self.metrics.redis_unavailable.set(0);
                    w
                }
                Some(Err(e)) => {
                    self.redis_failed("rate limit", &e)?;
                    self.local.gcra(c)
                }
            };
            if let Some(wait) = wait {
                return Err(Refusal::RateLimited {
                    limit: c.name.clone(),
                    retry_after_s: wait.as_secs_f64().ceil().max(1.0) as u64,
                });
            }
        }
        Ok(())
    }

    /// Current usage of each cap (for the policy input and metrics). A store failure reads
    /// as zero usage here; the reservation that follows is what enforces.
    pub async fn usage(&self, caps: &[Cap]) -> Vec<Usage> {
        if caps.is_empty() {
            return Vec::new();
        }
        if let Ok(Some(r)) = self.redis() {
            match r.usage(caps).await {
                Ok(u) => return u,
                // Only a read for the policy input: the reservation that follows decides.
                Err(e) => tracing::debug!(error = %e, "budget usage read failed"),
            }
        }
        self.local.usage(caps)
    }

    /// Reserve `amounts[i]` against `caps[i]`, all or nothing.
    pub async fn reserve(
        &self,
        caps: &[Cap],
        amounts: &[i64],
    ) -> Result<Result<Reservation, Exceeded>, Refusal> {
        let id = format!("res_{:016x}", rand::random::<u64>());
        let store = match self.redis() {
            Ok(s) => s,
            Err(e) => {
                self.redis_failed("reserve", &e)?;
                None
            }
        };
        if let Some(r) = store {
            match r.reserve(&id, caps, amounts, self.reservation_ttl).await {
                Ok(res) => {
                    self.metrics.redis_unavailable.set(0);
                    return Ok(res.map(|()| Reservation {
                        id,
                        entries: caps.iter().cloned().zip(amounts.iter().copied()).collect(),
                        held: Held::Redis,
                    }));
                }
                Err(e) => self.redis_failed("reserve", &e)?,
            }
        }
        let reserved = self.local.reserve(&id, caps, amounts, self.reservation_ttl);
        let forgotten = self.local.take_forgotten();
        if forgotten > 0 {
            self.metrics
                .runs_forgotten
                .with_label_values(&["budget"])
                .inc_by(forgotten);
        }
        Ok(reserved.map(|()| Reservation {
            id,
            entries: caps.iter().cloned().zip(amounts.iter().copied()).collect(),
            held: Held::Local,
        }))
    }

    /// Settle a local reservation without a runtime (a guard dropped outside one).
    fn settle_local(&self, r: &Reservation, actual: &[i64]) {
        if r.held == Held::Local {
            self.local.settle(r, actual);
        }
    }

    /// Calls so far in a run (`input.run.calls`), read before this call counts.
    pub fn run_calls(&self, run_key: &str) -> u64 {
        self.run_calls.count(run_key)
    }

    /// Count one admitted call in a run.
    pub fn count_run_call(&self, run_key: &str, n: u64) {
        self.run_calls.add(run_key, n);
        let forgotten = self.run_calls.take_forgotten();
        if forgotten > 0 {
            self.metrics
                .runs_forgotten
                .with_label_values(&["calls"])
                .inc_by(forgotten);
        }
    }

    /// Settle a reservation to the actual amounts (per entry); zero releases.
    pub async fn settle(&self, r: &Reservation, actual: &[i64]) {
        if r.held == Held::Redis {
            if let Some(store) = &self.redis {
                match store.settle(r, actual).await {
                    Ok(()) => return,
                    Err(e) => {
                        // The reservation expires on its own; the spend is lost from the shared
                        // counter, so say so loudly.
                        tracing::error!(error = %e, reservation = %r.id, "settling a budget reservation on redis failed; it will expire");
                        self.metrics.redis_unavailable.set(1);
                        return;
                    }
                }
            }
        }
        self.local.settle(r, actual);
    }
}

/// The rate limits that apply to a call.
pub fn rate_checks(snap: &Snapshot, tenant: &str, tool: &str) -> Vec<RateCheck> {
    let agent = format!("{}/{}", snap.agent.namespace, snap.agent.name);
    let mut out = Vec::new();
    let mut add = |rl: &RateLimitConfig, owner: &str| {
        let (count, period, unit) = match (rl.per_second, rl.per_minute, rl.per_hour) {
            (Some(n), _, _) => (n, 1, "second"),
            (_, Some(n), _) => (n, 60, "minute"),
            (_, _, Some(n)) => (n, 3600, "hour"),
            _ => return,
        };
        if count == 0 {
            return;
        }
        let (scope, key, who) = match rl.scope {
            RateLimitScope::Tenant => (
                "tenant",
                format!("tenant:{tenant}"),
                format!("tenant {tenant}"),
            ),
            RateLimitScope::Agent => ("agent", format!("agent:{agent}"), format!("agent {agent}")),
            RateLimitScope::Tool => {
                if rl.tool.as_deref().is_some_and(|t| t != tool) {
                    return;
                }
                (
                    "tool",
                    format!("tool:{tenant}:{tool}"),
                    format!("tool {tool} in tenant {tenant}"),
                )
            }
        };
        let interval = Duration::from_secs(period) / count;
        let burst = rl.burst.unwrap_or(count).max(1);
        out.push(RateCheck {
            name: format!("{who}: {count}/{unit} (burst {burst}, from {owner})"),
            scope,
            key: format!("rl:{owner}:{key}:{}:{burst}", interval.as_nanos()),
            interval,
            burst,
        });
    };
    if let Some(t) = snap.tenants.get(tenant) {
        for rl in &t.rate_limits {
            add(rl, &format!("tenants.{tenant}"));
        }
    }
    for rl in &snap.agent.rate_limits {
        add(rl, "agent");
    }
    out
}

/// The budget caps that apply to a call, with today's and this month's keys (UTC).
pub fn caps(snap: &Snapshot, tenant: &str, run: &str, now: time::OffsetDateTime) -> Vec<Cap> {
    let day = format!(
        "{:04}-{:02}-{:02}",
        now.year(),
        now.month() as u8,
        now.day()
    );
    let month = format!("{:04}-{:02}", now.year(), now.month() as u8);
    let agent = format!("{}/{}", snap.agent.namespace, snap.agent.name);
    const DAY: Duration = Duration::from_secs(2 * 86_400);
    const MONTH: Duration = Duration::from_secs(32 * 86_400);
    let b = &snap.agent.budget;
    // The run counter always exists, so `input.run.spent_usd` is real; without `perRunUsd`
    // it never refuses.
    let mut out = vec![Cap {
        name: format!("run {run}"),
        scope: "run",
        key: format!("run:{agent}:{run}"),
        cap: b.per_run_usd.map(to_micros).unwrap_or(UNCAPPED),
        kind: CapKind::Spend,
        ttl: Duration::from_secs(7 * 86_400),
    }];
    let mut push = |name: String, scope, key: String, cap: Option<f64>, kind, ttl| {
        if let Some(c) = cap {
            out.push(Cap {
                name,
                scope,
                key,
                cap: to_micros(c),
                kind,
                ttl,
            });
        }
    };
    push(
        format!("agent {agent} per day"),
        "agent_day",
        format!("agent:{agent}:{day}"),
        b.day_usd,
        CapKind::Spend,
        DAY,
    );
    if let Some(t) = snap.tenants.get(tenant) {
        push(
            format!("tenant {tenant} per day"),
            "tenant_day",
            format!("tenant:{tenant}:{day}"),
            t.budgets.day_usd,
            CapKind::Spend,
            DAY,
        );
        push(
            format!("tenant {tenant} per month"),
            "tenant_month",
            format!("tenant:{tenant}:{month}"),
            t.budgets.month_usd,
            CapKind::Spend,
            MONTH,
        );
        push(
            format!("tenant {tenant} exposure per day"),
            "exposure_day",
            format!("exposure:{tenant}:{day}"),
            t.exposure.day_usd,
            CapKind::Exposure,
            DAY,
        );
        push(
            format!("tenant {tenant} exposure per month"),
            "exposure_month",
            format!("exposure:{tenant}:{month}"),
            t.exposure.month_usd,
            CapKind::Exposure,
            MONTH,
        );
    }
    out
}

/// The 402 refusal for an exceeded cap.
pub fn over_budget(e: &Exceeded) -> Refusal {
    let what = match e.cap.kind {
        CapKind::Spend => "cost",
        CapKind::Exposure => "exposure",
    };
    let remaining = (e.cap.cap - e.usage.spent - e.usage.reserved).max(0);
    Refusal::OverBudget {
        reason: format!(
            "budget {} would be exceeded: this call's {what} ${:.6} > remaining ${:.6} (cap ${:.6}, spent ${:.6}, reserved ${:.6})",
            e.cap.name,
            to_usd(e.amount),
            to_usd(remaining),
            to_usd(e.cap.cap),
            to_usd(e.usage.spent),
            to_usd(e.usage.reserved)
        ),
        details: serde_json::json!({
            "cap_name": e.cap.name,
            "scope": e.cap.scope,
            "cap_usd": to_usd(e.cap.cap),
            "spent_usd": to_usd(e.usage.spent),
            "reserved_usd": to_usd(e.usage.reserved),
            "remaining_usd": to_usd(remaining),
            "requested_usd": to_usd(e.amount),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micros_round_trip_exactly() {
        assert_eq!(to_micros(0.1) * 3, to_micros(0.3));
        assert_eq!(to_usd(to_micros(12.345678)), 12.345678);
    }
}
