//! Process-wide state of a running sidecar: the swappable snapshot, its freshness, and the
//! long-lived components every call uses (audit log, upstream pool, metrics).

use crate::approval::ApprovalStore;
use crate::audit::AuditLog;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use crate::upstream::Upstreams;
use arc_swap::ArcSwapOption;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Freshness of the active snapshot. In standalone mode the file is the source of truth and
/// never goes stale; under an operator, heartbeats keep it fresh.
pub struct Freshness {
    /// Whether staleness applies (operator mode).
    pub tracked: bool,
    last_confirmed_ms: AtomicU64,
}

impl Freshness {
    /// New, confirmed now.
    pub fn new(tracked: bool) -> Self {
        Self {
            tracked,
            last_confirmed_ms: AtomicU64::new(now_ms()),
        }
    }
    /// Record a heartbeat or a new snapshot.
    pub fn confirm(&self) {
        self.last_confirmed_ms.store(now_ms(), Ordering::Relaxed);
    }
    /// Time since the last confirmation.
    pub fn age(&self) -> Duration {
        Duration::from_millis(
            now_ms().saturating_sub(self.last_confirmed_ms.load(Ordering::Relaxed)),
        )
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Shared state.
pub struct ProxyState {
    /// Active snapshot; `None` until the first valid one arrives.
    pub snapshot: ArcSwapOption<Snapshot>,
    /// Freshness.
    pub freshness: Freshness,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Audit writer.
    pub audit: AuditLog,
    /// Upstream clients.
    pub upstreams: Upstreams,
    /// Approval requests and consumed single-use grants.
    pub approvals: ApprovalStore,
    /// Rate limits and budget counters (outlive snapshots).
    pub limits: Arc<crate::limits::Limits>,
    /// The operator link, in operator mode.
    pub control: std::sync::OnceLock<crate::control::ControlArgs>,
    /// Calls in flight by kill-switch scope: a newly engaged switch stops them.
    pub inflight: Arc<crate::killswitch::inflight::InFlight>,
    /// Spend today (UTC day, USD per tenant), reported to the operator.
    pub spend_today: std::sync::Mutex<(String, std::collections::BTreeMap<String, f64>)>,
    /// MCP tool definitions seen advertised, compared with pins (see [`crate::pins`]).
    pub tool_definitions: crate::pins::Observations,
    /// Tasks writing records after their call's response went out; shutdown waits for them
    /// before it closes the audit writer.
    pub(crate) records_pending: tokio_util::task::TaskTracker,
    /// Runs seen, for their reported outcomes (see [`crate::outcome`]).
    pub(crate) runs: crate::outcome::Ledger,
    /// Audit records already counted into the metric.
    audit_seen: AtomicU64,
    audit_err_seen: AtomicU64,
}

impl ProxyState {
    /// Assemble state.
    pub fn new(
        snapshot: Option<Arc<Snapshot>>,
        tracked: bool,
        metrics: Arc<Metrics>,
        audit: AuditLog,
        upstreams: Upstreams,
        limits: Arc<crate::limits::Limits>,
    ) -> Self {
        let approvals = ApprovalStore::counted(metrics.approvals_evicted.clone());
        let s = Self {
            snapshot: ArcSwapOption::new(None),
            freshness: Freshness::new(tracked),
            metrics,
            audit,
            upstreams,
            approvals,
            limits,
            control: std::sync::OnceLock::new(),
            inflight: Arc::default(),
            spend_today: std::sync::Mutex::default(),
            tool_definitions: Default::default(),
            runs: Default::default(),
            records_pending: Default::default(),
            audit_seen: AtomicU64::new(0),
            audit_err_seen: AtomicU64::new(0),
        };
        if let Some(snap) = snapshot {
            s.install(snap);
        }
        s
    }

    /// Write a call's audit record, folding it into its run's tally first (for the run's
    /// outcome record; see [`crate::outcome`]). Every call record goes through here.
    pub(crate) async fn record(
        &self,
        rec: crate::audit::AuditRecord,
    ) -> Result<u64, crate::audit::AuditError> {
        self.note(&rec);
        self.audit.append(rec).await
    }

    /// Fold a call's record into its run's tally (without writing it).
    pub(crate) fn note(&self, rec: &crate::audit::AuditRecord) {
        let forgotten = self.runs.note(rec);
        if forgotten > 0 {
            self.metrics
                .runs_forgotten
                .with_label_values(&["outcomes"])
                .inc_by(forgotten);
        }
    }

    /// Atomically install a validated snapshot. Switches it newly engages stop the calls in
    /// their scope that are already in flight and void the approval requests they cover
    /// (except in shadow mode, which only records what a switch would have done). The
    /// snapshot is stored before the in-flight scan: see [`crate::killswitch::inflight`].
    pub fn install(&self, snap: Arc<Snapshot>) {
        let m = &self.metrics;
        m.config_version.set(snap.version as i64);
        m.kill_switch.reset();
        for k in &snap.kill_switches {
            m.kill_switch.with_label_values(&[k.name.as_str()]).set(1.0);
        }
        // Every pinned tool's mismatch series exists from the start (at 0), so a rate and an
        // alert see the first mismatch.
        for t in snap.tools.iter().filter(|t| t.pin.is_some()) {
            m.tool_definition_mismatch
                .with_label_values(&[snap.agent.name.as_str(), t.name()]);
        }
        let old = self.snapshot.swap(Some(snap.clone()));
        let was = old.as_deref().map_or(&[][..], |o| &o.kill_switches[..]);
        let newly = crate::killswitch::inflight::newly_engaged(was, &snap.kill_switches);
        if !newly.is_empty() && snap.agent.mode != crate::config::Mode::Shadow {
            let fired = self.inflight.kill(&newly);
            let voided = self.approvals.void(&snap, &newly);
            if fired > 0 || !voided.is_empty() {
                tracing::warn!(
                    switches = %newly.iter().map(|k| k.name.as_str()).collect::<Vec<_>>().join(","),
                    calls = fired,
                    approvals_voided = voided.len(),
                    "kill switch engaged: in-flight calls in its scope stopped"
                );
            }
            if let (Some(ctl), false) = (self.control.get(), voided.is_empty()) {
                crate::control::report_voided(ctl, &voided, &self.upstreams);
            }
            if !voided.is_empty() {
                m.approvals
                    .with_label_values(&["voided"])
                    .inc_by(voided.len() as u64);
            }
        }
        self.approvals.snapshot_changed();
        self.freshness.confirm();
    }

    /// `maxStaleness` of the active snapshot.
    pub fn max_staleness(snap: &Snapshot) -> Duration {
        snap.agent.max_staleness
    }

    /// Refresh gauges that are computed at scrape time.
    pub fn refresh_gauges(&self) {
        let m = &self.metrics;
        let age = self.freshness.age();
        m.config_age.set(age.as_secs_f64());
        let stale = match &*self.snapshot.load() {
            Some(s) => self.freshness.tracked && age > Self::max_staleness(s),
            None => true,
        };
        m.config_stale.set(i64::from(stale));
        m.approvals_pending.set(self.approvals.pending() as i64);
        let written = self.audit.records_written();
        let prev = self.audit_seen.swap(written, Ordering::Relaxed);
        m.audit_records.inc_by(written.saturating_sub(prev));
        let errs = self.audit.write_errors();
        let prev = self.audit_err_seen.swap(errs, Ordering::Relaxed);
        m.audit_errors.inc_by(errs.saturating_sub(prev));
    }
}
