//! Prometheus metrics of the sidecar, on the admin port's `/metrics`.
//!
//! Label values are bounded: tenants and tools outside the current snapshot collapse to
//! `other`, so a hostile agent cannot grow the series count.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};

/// All sidecar metrics.
pub struct Metrics {
    registry: Registry,
    /// `tollgate_requests_total{tenant,agent,tool,decision}`.
    pub requests: IntCounterVec,
    /// `tollgate_request_duration_seconds{stage}`.
    pub duration: HistogramVec,
    /// `tollgate_policy_evaluation_seconds`.
    pub policy_eval: Histogram,
    /// `tollgate_policy_errors_total`.
    pub policy_errors: IntCounter,
    /// `tollgate_spend_usd_total{tenant,agent}`.
    pub spend: prometheus::CounterVec,
    /// `tollgate_budget_remaining_usd{scope,tenant}`.
    pub budget_remaining: GaugeVec,
    /// `tollgate_budget_cap_usd{scope,tenant}`.
    pub budget_cap: GaugeVec,
    /// `tollgate_tunnels_refused_total{via,reason}`: CONNECT/transparent tunnels refused
    /// before any request (bad ClientHello, SNI mismatch, unknown host, not TLS).
    pub tunnels_refused: IntCounterVec,
    /// `tollgate_rate_limited_total{tenant,scope}`.
    pub rate_limited: IntCounterVec,
    /// `tollgate_kill_switch_engaged{name}`.
    pub kill_switch: GaugeVec,
    /// `tollgate_approvals_total{result}`.
    pub approvals: IntCounterVec,
    /// `tollgate_approvals_pending`.
    pub approvals_pending: IntGauge,
    /// `tollgate_config_version`.
    pub config_version: IntGauge,
    /// `tollgate_config_age_seconds`.
    pub config_age: Gauge,
    /// `tollgate_config_stale`.
    pub config_stale: IntGauge,
    /// `tollgate_config_reload_errors_total`.
    pub reload_errors: IntCounter,
    /// `tollgate_audit_records_total`.
    pub audit_records: IntCounter,
    /// `tollgate_audit_errors_total`.
    pub audit_errors: IntCounter,
    /// `tollgate_audit_checkpoints_published_total`: checkpoints the operator stored.
    pub audit_checkpoints_published: IntCounter,
    /// `tollgate_audit_checkpoint_failures_total{reason}`: checkpoint publications to the
    /// operator that failed (`unreachable`, `refused`, `dropped`).
    pub audit_checkpoint_failures: IntCounterVec,
    /// `tollgate_redis_unavailable`.
    pub redis_unavailable: IntGauge,
    /// `tollgate_fail_open_total{reason}`: every call let through by a fail-open setting.
    pub fail_open: IntCounterVec,
    /// `tollgate_budget_overrun_usd_total{tenant}`: actual cost above the reserved estimate.
    pub budget_overrun: prometheus::CounterVec,
    /// `tollgate_upstream_errors_total{kind}`.
    pub upstream_errors: IntCounterVec,
    /// Budget reservations and idempotency claims ended by `Drop` (client gone, panic).
    pub guards_dropped: IntCounterVec,
    /// `tollgate_runs_forgotten_total{table}`: least recently used runs dropped from the local
    /// run tables to keep them bounded (their per-run spend or call count starts again).
    pub runs_forgotten: IntCounterVec,
    /// Approval requests evicted from the in-memory store, by reason.
    pub approvals_evicted: IntCounterVec,
    /// `tollgate_connections_closed_total{reason}`: agent connections the sidecar cut
    /// (`header_timeout`: no request within `server.headerReadTimeout` of accept; `idle`: no
    /// request in flight for `server.idleTimeout`).
    pub connections_closed: IntCounterVec,
    /// `tollgate_limits_unavailable_total{on_unavailable}`: limits-store operations that
    /// failed (no Redis primary reachable, a reservation not replicated) and how
    /// `limits.onUnavailable` handled them (`deny` or `local`).
    pub limits_unavailable: IntCounterVec,
    /// `tollgate_tool_definition_mismatch_total{agent,tool}`: `tools/list` answers that
    /// advertised a pinned tool with another definition (the tool was withheld). `tool` is a
    /// catalog tool name, so the series are bounded by the catalog.
    pub tool_definition_mismatch: IntCounterVec,
    /// `tollgate_calls_aborted_total{reason,stage}`: calls stopped while in flight
    /// (`reason="killed"`: a kill switch engaged; `stage`: `gates`, `approval`, `upstream`,
    /// `response` or `stream`, where the call was).
    pub calls_aborted: IntCounterVec,
    /// `tollgate_run_cost_usd{agent,tenant,outcome}`: what each ended run cost, by its
    /// reported outcome (see [`crate::outcome`]).
    pub run_cost: HistogramVec,
    /// `tollgate_run_outcomes_total{agent,tenant,outcome}`: runs ended, by reported outcome.
    pub run_outcomes: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric registers once");
    c
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Self {
        let r = Registry::new();
        let lat_buckets = vec![
            0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        Self {
            requests: reg(&r, IntCounterVec::new(Opts::new("tollgate_requests_total", "Tool calls by tenant, agent, tool and decision."), &["tenant", "agent", "tool", "decision"]).unwrap()),
            duration: reg(
                &r,
                HistogramVec::new(HistogramOpts::new("tollgate_request_duration_seconds", "Call latency by stage: total, policy, upstream, overhead (total minus upstream).").buckets(lat_buckets.clone()), &["stage"]).unwrap(),
            ),
            policy_eval: reg(
                &r,
                Histogram::with_opts(HistogramOpts::new("tollgate_policy_evaluation_seconds", "Rego evaluation time per call.").buckets(vec![0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.01, 0.05])).unwrap(),
            ),
            policy_errors: reg(&r, IntCounter::new("tollgate_policy_errors_total", "Policy evaluations that failed (each denied).").unwrap()),
            spend: reg(&r, prometheus::CounterVec::new(Opts::new("tollgate_spend_usd_total", "Metered spend in USD."), &["tenant", "agent"]).unwrap()),
            budget_remaining: reg(&r, GaugeVec::new(Opts::new("tollgate_budget_remaining_usd", "Remaining budget per cap."), &["scope", "tenant"]).unwrap()),
            budget_cap: reg(&r, GaugeVec::new(Opts::new("tollgate_budget_cap_usd", "Configured budget cap."), &["scope", "tenant"]).unwrap()),
            tunnels_refused: reg(&r, IntCounterVec::new(Opts::new("tollgate_tunnels_refused_total", "Tunnels refused before any request inside them."), &["via", "reason"]).unwrap()),
            rate_limited: reg(&r, IntCounterVec::new(Opts::new("tollgate_rate_limited_total", "Calls refused by a rate limit."), &["tenant", "scope"]).unwrap()),
            kill_switch: reg(&r, GaugeVec::new(Opts::new("tollgate_kill_switch_engaged", "1 while a kill switch is engaged."), &["name"]).unwrap()),
            approvals: reg(&r, IntCounterVec::new(Opts::new("tollgate_approvals_total", "Approval gate outcomes."), &["result"]).unwrap()),
            approvals_pending: reg(&r, IntGauge::new("tollgate_approvals_pending", "Approval requests waiting for a decision.").unwrap()),
            config_version: reg(&r, IntGauge::new("tollgate_config_version", "Version of the active snapshot.").unwrap()),
            config_age: reg(&r, Gauge::new("tollgate_config_age_seconds", "Seconds since the active snapshot was confirmed current.").unwrap()),
            config_stale: reg(&r, IntGauge::new("tollgate_config_stale", "1 when the snapshot is older than maxStaleness.").unwrap()),
            reload_errors: reg(&r, IntCounter::new("tollgate_config_reload_errors_total", "Config updates rejected (the old config stayed).").unwrap()),
            audit_records: reg(&r, IntCounter::new("tollgate_audit_records_total", "Audit records made durable.").unwrap()),
            audit_errors: reg(&r, IntCounter::new("tollgate_audit_errors_total", "Audit records that could not be written.").unwrap()),
            audit_checkpoints_published: reg(&r, IntCounter::new("tollgate_audit_checkpoints_published_total", "Signed audit checkpoints the operator stored.").unwrap()),
            audit_checkpoint_failures: reg(&r, IntCounterVec::new(Opts::new("tollgate_audit_checkpoint_failures_total", "Audit checkpoint publications to the operator that failed: unreachable (retried), refused (the operator rejected it), dropped (queue full)."), &["reason"]).unwrap()),
            redis_unavailable: reg(&r, IntGauge::new("tollgate_redis_unavailable", "1 while the Redis limits backend is unreachable.").unwrap()),
            fail_open: reg(&r, IntCounterVec::new(Opts::new("tollgate_fail_open_total", "Calls let through by an explicit fail-open setting."), &["reason"]).unwrap()),
            limits_unavailable: reg(&r, IntCounterVec::new(Opts::new("tollgate_limits_unavailable_total", "Limits-store operations that failed, by how limits.onUnavailable handled them."), &["on_unavailable"]).unwrap()),
            calls_aborted: reg(&r, IntCounterVec::new(Opts::new("tollgate_calls_aborted_total", "Calls stopped while in flight, by reason and by the stage they were in."), &["reason", "stage"]).unwrap()),
            budget_overrun: reg(&r, prometheus::CounterVec::new(Opts::new("tollgate_budget_overrun_usd_total", "Actual cost above the reserved estimate."), &["tenant"]).unwrap()),
            runs_forgotten: reg(&r, IntCounterVec::new(Opts::new("tollgate_runs_forgotten_total", "Least recently used runs dropped from the local run tables (budget counters, call counts) to keep memory bounded."), &["table"]).unwrap()),
            guards_dropped: reg(&r, IntCounterVec::new(Opts::new("tollgate_guards_dropped_total", "Budget reservations and idempotency claims ended by Drop (client gone, panic): charged, released."), &["guard"]).unwrap()),
            approvals_evicted: reg(&r, IntCounterVec::new(Opts::new("tollgate_approvals_evicted_total", "Approval requests evicted from memory: expired, decided, over the per-agent cap."), &["reason"]).unwrap()),
            upstream_errors: reg(&r, IntCounterVec::new(Opts::new("tollgate_upstream_errors_total", "Upstream failures by kind."), &["kind"]).unwrap()),
            connections_closed: reg(&r, IntCounterVec::new(Opts::new("tollgate_connections_closed_total", "Agent connections closed by the sidecar: no request in time after accept, or idle."), &["reason"]).unwrap()),
            tool_definition_mismatch: reg(&r, IntCounterVec::new(Opts::new("tollgate_tool_definition_mismatch_total", "tools/list answers that advertised a pinned MCP tool with a definition other than the pinned one (the tool was withheld)."), &["agent", "tool"]).unwrap()),
            run_cost: reg(&r, HistogramVec::new(HistogramOpts::new("tollgate_run_cost_usd", "What each ended run cost in USD (retries and refused calls included), by its reported outcome.").buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0]), &["agent", "tenant", "outcome"]).unwrap()),
            run_outcomes: reg(&r, IntCounterVec::new(Opts::new("tollgate_run_outcomes_total", "Runs ended by a reported outcome (resolved, escalated, abandoned, failed)."), &["agent", "tenant", "outcome"]).unwrap()),
            registry: r,
        }
    }

    /// Render the text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The registry, for components that register their own collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}
