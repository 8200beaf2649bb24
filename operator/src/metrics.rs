//! The operator's metrics, in one `prometheus` registry served on `/metrics`: reconcile
//! durations and errors per kind (and error label), connected sidecars, the snapshot version
//! served per agent, and the propagation lag — from the operator seeing a change to the last
//! sidecar that was waiting for the agent's snapshot coming back holding the new one.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every operator metric.
pub struct Metrics {
    registry: Registry,
    /// `tollgate_operator_reconciles_total{kind}`.
    pub reconciles: IntCounterVec,
    /// `tollgate_operator_reconcile_duration_seconds{kind}`.
    pub reconcile_duration: HistogramVec,
    /// `tollgate_operator_reconcile_errors_total{kind,error}`.
    pub reconcile_errors: IntCounterVec,
    /// `tollgate_operator_connected_sidecars`: snapshot long-polls held open.
    pub connected: IntGauge,
    /// `tollgate_operator_snapshot_version{agent}`.
    pub snapshot_version: IntGaugeVec,
    /// `tollgate_operator_propagation_lag_seconds`.
    pub propagation_lag: Histogram,
    /// `tollgate_operator_snapshot_refused_total`.
    pub refused: IntCounter,
    /// `tollgate_operator_snapshots_rejected_total`.
    pub snapshots_rejected: IntCounter,
    /// `tollgate_operator_token_reviews_reused_total`.
    pub token_reviews_reused: IntCounter,
    /// `tollgate_operator_audit_checkpoints_total{result}`: sidecar audit checkpoints stored
    /// (`stored`, `duplicate`) and refused (`invalid`, `unauthorized`, `key_mismatch`,
    /// `not_extending`, `api_error`).
    pub audit_checkpoints: IntCounterVec,
    /// `tollgate_approvals_pending`.
    pub approvals_pending: IntGauge,
    /// `tollgate_operator_leader`.
    pub leader: IntGauge,
    /// `tollgate_operator_cert_not_after_seconds{cert}`: expiry of the certificates in use.
    pub cert_not_after: IntGaugeVec,
    /// `tollgate_operator_cert_rotations_total{cert}`.
    pub cert_rotations: IntCounterVec,
}

fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Default for Metrics {
    fn default() -> Self {
        let r = Registry::new();
        let up = IntGauge::new("tollgate_operator_up", "1 while the operator runs.")
            .expect("valid metric");
        up.set(1);
        reg(&r, up);
        // Reconciles take from microseconds (cached, nothing changed) to seconds (a slow API
        // server); kill-switch propagation is budgeted in milliseconds.
        let fast = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        Self {
            reconciles: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("tollgate_operator_reconciles_total", "Reconciles run, by kind."),
                    &["kind"],
                )
                .expect("valid metric"),
            ),
            reconcile_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "tollgate_operator_reconcile_duration_seconds",
                        "Duration of one reconcile, by kind.",
                    )
                    .buckets(fast.clone()),
                    &["kind"],
                )
                .expect("valid metric"),
            ),
            reconcile_errors: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "tollgate_operator_reconcile_errors_total",
                        "Failed reconciles, by kind and error.",
                    ),
                    &["kind", "error"],
                )
                .expect("valid metric"),
            ),
            connected: reg(
                &r,
                IntGauge::new(
                    "tollgate_operator_connected_sidecars",
                    "Snapshot long-polls held open.",
                )
                .expect("valid metric"),
            ),
            snapshot_version: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "tollgate_operator_snapshot_version",
                        "Snapshot version served per agent.",
                    ),
                    &["agent"],
                )
                .expect("valid metric"),
            ),
            propagation_lag: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "tollgate_operator_propagation_lag_seconds",
                        "From the operator seeing a change to the last sidecar that was waiting for the agent's snapshot holding the new one.",
                    )
                    .buckets(fast),
                )
                .expect("valid metric"),
            ),
            refused: reg(
                &r,
                IntCounter::new(
                    "tollgate_operator_snapshot_refused_total",
                    "Snapshot requests refused.",
                )
                .expect("valid metric"),
            ),
            snapshots_rejected: reg(
                &r,
                IntCounter::new(
                    "tollgate_operator_snapshots_rejected_total",
                    "Snapshots sidecars reported they could not apply.",
                )
                .expect("valid metric"),
            ),
            token_reviews_reused: reg(
                &r,
                IntCounter::new(
                    "tollgate_operator_token_reviews_reused_total",
                    "Sidecar tokens accepted from an earlier TokenReview because the API server failed.",
                )
                .expect("valid metric"),
            ),
            audit_checkpoints: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "tollgate_operator_audit_checkpoints_total",
                        "Sidecar audit checkpoints by result: stored, duplicate, or refused (invalid, unauthorized, key_mismatch, not_extending, api_error).",
                    ),
                    &["result"],
                )
                .expect("valid metric"),
            ),
            approvals_pending: reg(
                &r,
                IntGauge::new(
                    "tollgate_approvals_pending",
                    "ApprovalRequests waiting for a decision.",
                )
                .expect("valid metric"),
            ),
            leader: reg(
                &r,
                IntGauge::new(
                    "tollgate_operator_leader",
                    "1 on the replica that writes status.",
                )
                .expect("valid metric"),
            ),
            cert_not_after: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "tollgate_operator_cert_not_after_seconds",
                        "Unix time the certificate in use expires, by certificate.",
                    ),
                    &["cert"],
                )
                .expect("valid metric"),
            ),
            cert_rotations: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "tollgate_operator_cert_rotations_total",
                        "Certificate rotations, by certificate.",
                    ),
                    &["cert"],
                )
                .expect("valid metric"),
            ),
            registry: r,
        }
    }
}

/// The reconciled kinds (metric `kind` label).
pub const KINDS: [&str; 6] = [
    "AgentIdentity",
    "Tool",
    "AgentPolicy",
    "Tenant",
    "KillSwitch",
    "ApprovalRequest",
];

impl Metrics {
    /// Every (kind, error) series exists from the start, at zero, so rates and alerts see a
    /// series before the first failure.
    pub fn init_series(&self, error_labels: &[&str]) {
        for kind in KINDS {
            self.reconciles.with_label_values(&[kind]);
            self.reconcile_duration.with_label_values(&[kind]);
            for e in error_labels {
                self.reconcile_errors.with_label_values(&[kind, e]);
            }
        }
    }

    /// Start timing a reconcile of `kind`; the duration is observed when the guard drops.
    pub fn reconcile(&self, kind: &str) -> prometheus::HistogramTimer {
        self.reconciles.with_label_values(&[kind]).inc();
        self.reconcile_duration
            .with_label_values(&[kind])
            .start_timer()
    }

    /// Count a failed reconcile.
    pub fn reconcile_failed(&self, kind: &str, error: &str) {
        self.reconcile_errors
            .with_label_values(&[kind, error])
            .inc();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}
