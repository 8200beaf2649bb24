//! Cost per outcome: an orchestrator reports how a run ended for the business — `resolved`,
//! `escalated`, `abandoned` or `failed`, with an optional label such as `ticket_closed` — and
//! the run's record joins it to what the run cost, retries and refused calls included.
//!
//! Two ways to report, both taking the run id as the authority to end the run (the same
//! unforgeable id the run's calls carry; see [`crate::identify`]):
//! - `X-Tollgate-Run-Outcome: resolved; label=ticket_closed` on the run's last call: the run
//!   ends when that call does, whatever its decision (the header is never forwarded);
//! - `POST /runs/{run}/outcome` on the admin listener with `{"outcome": "...", "label": "..."}`,
//!   answered with the run's totals.
//!
//! The sidecar keeps a [`Tally`] per run in its [`Ledger`] from every audit record it writes,
//! bounded like the other run tables. Ending a run writes one durable `run` record in the
//! audit chain (cost, calls, refusals, retries, approvals waited on and for how long, start and
//! duration), observes `tollgate_run_cost_usd{agent,tenant,outcome}` and counts
//! `tollgate_run_outcomes_total{agent,tenant,outcome}`; the outcome vocabulary is closed, so
//! those labels stay bounded, and the free-form label is on record only. A run that has ended
//! takes no more calls (`run_ended`): cost after the outcome would belong to no outcome.
//! `audit runs --by-outcome` computes the same figures offline from the audit files.

use crate::audit::{AuditCost, AuditRecord, Phase};
use crate::limits::local::RunTable;
use crate::refusal::Refusal;
use crate::snapshot::{is_token, Snapshot};
use http::HeaderMap;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

/// The header that reports a run's outcome on its last call.
pub const OUTCOME_HEADER: &str = "x-tollgate-run-outcome";

/// Distinct inputs remembered per run to count retries.
const MAX_INPUTS: usize = 1024;

/// How long ending a run waits for its calls in flight to be recorded (an answer the agent
/// has read is recorded a moment later, when its body ends).
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(5);

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How a run ended, for the business. A closed set: it is a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    /// The task was done.
    Resolved,
    /// Handed to a human.
    Escalated,
    /// Given up without a result.
    Abandoned,
    /// Ended in an error.
    Failed,
}

impl RunOutcome {
    /// Every outcome, in the order reports print them.
    pub const ALL: [RunOutcome; 4] = [
        RunOutcome::Resolved,
        RunOutcome::Escalated,
        RunOutcome::Abandoned,
        RunOutcome::Failed,
    ];

    /// The wire and label form.
    pub fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Resolved => "resolved",
            RunOutcome::Escalated => "escalated",
            RunOutcome::Abandoned => "abandoned",
            RunOutcome::Failed => "failed",
        }
    }

    /// Parse the wire form.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

/// A reported outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The outcome.
    pub outcome: RunOutcome,
    /// An optional label (`ticket_closed`), on record only.
    pub label: Option<String>,
    /// `header` or `endpoint`.
    pub via: &'static str,
}

impl Report {
    /// A report from its parts, checked: a known outcome, a label of 1–64 token characters.
    pub fn new(outcome: &str, label: Option<&str>, via: &'static str) -> Result<Self, String> {
        let outcome = RunOutcome::parse(outcome.trim()).ok_or_else(|| {
            let shown: String = outcome
                .chars()
                .take(32)
                .filter(|c| !c.is_control())
                .collect();
            format!(
                "run outcome {shown:?} is not one of: {}",
                RunOutcome::ALL.map(RunOutcome::as_str).join(", ")
            )
        })?;
        let label =
            match label.map(str::trim) {
                None => None,
                Some(l) if is_token(l) && l.len() <= 64 => Some(l.to_string()),
                Some(_) => return Err(
                    "a run outcome label is 1-64 characters of letters, digits, '_', '-', '.', ':'"
                        .into(),
                ),
            };
        Ok(Self {
            outcome,
            label,
            via,
        })
    }

    /// The report a call carries in `X-Tollgate-Run-Outcome` (`resolved` or
    /// `resolved; label=ticket_closed`), if any; a malformed or repeated header is refused.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, Refusal> {
        let mut all = headers.get_all(OUTCOME_HEADER).iter();
        let Some(v) = all.next() else {
            return Ok(None);
        };
        if all.next().is_some() {
            return Err(Refusal::BadRequest(format!(
                "more than one {OUTCOME_HEADER} header"
            )));
        }
        let v = v
            .to_str()
            .map_err(|_| Refusal::BadRequest(format!("{OUTCOME_HEADER} is not visible ASCII")))?;
        let (outcome, params) = v.split_once(';').unwrap_or((v, ""));
        let mut label = None;
        for p in params.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            match p.split_once('=') {
                Some((k, l)) if k.trim() == "label" && label.is_none() => label = Some(l),
                _ => {
                    return Err(Refusal::BadRequest(format!(
                        "{OUTCOME_HEADER} takes an outcome and at most one `label=` parameter, e.g. `resolved; label=ticket_closed`"
                    )))
                }
            }
        }
        Self::new(outcome, label, "header")
            .map(Some)
            .map_err(|e| Refusal::BadRequest(format!("{OUTCOME_HEADER}: {e}")))
    }
}

/// A run's call counts, as tallied and as recorded.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunCounts {
    /// Calls (one per decided tool call), refused ones included.
    pub calls: u64,
    /// Calls refused (not forwarded).
    pub refused: u64,
    /// Forwarded calls that failed (upstream error, or an error status).
    pub failed: u64,
    /// Calls repeating an earlier call of the run (same tool, same input).
    pub retries: u64,
    /// Distinct approvals asked for.
    pub approvals: u64,
    /// Time from each approval being asked for to its approved call, summed (ms).
    pub approval_wait_ms: u64,
}

/// A run as this sidecar saw it, from the audit records it wrote.
#[derive(Debug, Default)]
pub struct Tally {
    /// Tenant of the run's latest call that named one.
    pub tenant: String,
    /// Its calls.
    pub counts: RunCounts,
    /// Cost.
    pub cost: AuditCost,
    /// Forwarded calls whose outcome record is still to come.
    pub pending: u64,
    started: Option<(Instant, String)>,
    inputs: HashSet<(String, String)>,
    waiting: HashMap<String, Instant>,
    ended: Option<RunOutcome>,
}

impl Tally {
    /// Fold one audit record of the run into the tally (the same rules as `audit runs`).
    fn note(&mut self, rec: &AuditRecord, now: Instant) {
        if self.started.is_none() {
            let at = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            self.started = Some((now, at));
        }
        if !rec.tenant.is_empty() {
            self.tenant.clone_from(&rec.tenant);
        }
        self.cost.usd += rec.cost.usd;
        self.cost.prompt_tokens += rec.cost.prompt_tokens;
        self.cost.completion_tokens += rec.cost.completion_tokens;
        let forwarded = rec.decision == "allow" || rec.decision == "shadow_deny";
        match rec.phase {
            Some(Phase::Decision) => {
                self.counts.calls += 1;
                if !forwarded {
                    self.counts.refused += 1;
                } else if rec.status == 0 {
                    self.pending += 1;
                }
                let key = (rec.tool.clone(), rec.input_hash.clone());
                if self.inputs.contains(&key) {
                    self.counts.retries += 1;
                } else if self.inputs.len() < MAX_INPUTS {
                    self.inputs.insert(key);
                }
                if let Some(a) = &rec.approval {
                    if rec.decision == "approval_required" {
                        if !self.waiting.contains_key(&a.id) {
                            self.counts.approvals += 1;
                            self.waiting.insert(a.id.clone(), now);
                        }
                    } else if forwarded {
                        if let Some(asked) = self.waiting.remove(&a.id) {
                            self.counts.approval_wait_ms +=
                                now.duration_since(asked).as_millis() as u64;
                        }
                    }
                }
            }
            Some(Phase::Outcome) => {
                self.pending = self.pending.saturating_sub(1);
                if rec.decision == "error" || rec.status >= 400 {
                    self.counts.failed += 1;
                }
            }
            _ => {}
        }
    }
}

/// What a `run` record says beyond the common fields: the outcome and the run's totals.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// `resolved`, `escalated`, `abandoned` or `failed`.
    pub outcome: String,
    /// The reporter's label, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// `header` or `endpoint`.
    pub reported_via: String,
    /// The run's calls.
    #[serde(flatten)]
    pub counts: RunCounts,
    /// Calls of the run still in flight when the record was written (after waiting up to
    /// [`SETTLE`] for them): their cost is not in this record; `audit runs` counts it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub in_flight: u64,
    /// When the run's first call was seen (RFC 3339).
    pub started: String,
    /// From the first call to the report, ms.
    pub duration_ms: u64,
}

/// Why a run could not be ended.
#[derive(Debug, thiserror::Error)]
pub enum EndError {
    /// No call of the run went through this sidecar (or it restarted since, or forgot the run).
    #[error("this sidecar has no call of run {0} on record (none went through it, it restarted since, or the run was idle past the run table's bound); `audit runs` reads its calls from the audit files")]
    Unknown(String),
    /// It ended already.
    #[error("run {0} already ended with outcome {1}")]
    Ended(String, &'static str),
    /// The run record could not be made durable; the run stays open.
    #[error("the run record could not be written ({0}); the run is still open")]
    Audit(String),
}

/// The runs this sidecar has seen, bounded (see [`RunTable`]).
#[derive(Default)]
pub struct Ledger {
    runs: Mutex<RunTable<Tally>>,
}

impl Ledger {
    /// Fold a record into its run's tally; returns runs forgotten to make room.
    pub fn note(&self, rec: &AuditRecord) -> u64 {
        if rec.run.is_empty() || rec.phase == Some(Phase::Run) {
            return 0;
        }
        let now = Instant::now();
        let mut t = self.runs.lock().expect("run ledger lock");
        t.touch(&rec.run, now).note(rec, now);
        t.take_forgotten()
    }

    /// Refuse a call on a run that has ended.
    pub fn check_open(&self, run: &str) -> Result<(), Refusal> {
        let t = self.runs.lock().expect("run ledger lock");
        match t.get(run).and_then(|r| r.ended) {
            Some(o) => Err(Refusal::RunEnded(format!(
                "run {run} ended with outcome {}; start a new run (omit X-Tollgate-Run) for more calls",
                o.as_str()
            ))),
            None => Ok(()),
        }
    }

    /// Mark `run` ended with `outcome`, so that no further call on it is admitted from now.
    /// A run this sidecar has not seen is ended only when `new_ok` (a report on the run's
    /// own first call); a run ended already is not ended again.
    fn claim(&self, run: &str, outcome: RunOutcome, new_ok: bool) -> Result<(), EndError> {
        let mut t = self.runs.lock().expect("run ledger lock");
        match t.get(run).map(|r| r.ended) {
            None if !new_ok => return Err(EndError::Unknown(run.to_string())),
            Some(Some(o)) => return Err(EndError::Ended(run.to_string(), o.as_str())),
            _ => {}
        }
        t.touch(run, Instant::now()).ended = Some(outcome);
        Ok(())
    }

    /// Claim the run for a report carried by one of its calls (`X-Tollgate-Run-Outcome`):
    /// the run ends when that call does; meanwhile further calls are refused.
    pub(crate) fn claim_for_call(&self, run: &str, report: &Report) -> Result<(), Refusal> {
        self.claim(run, report.outcome, true)
            .map_err(|e| Refusal::RunEnded(e.to_string()))
    }

    /// The `run` record fields of a claimed run, from its tally now.
    fn fields(&self, run: &str, report: &Report) -> (RunRecord, AuditCost, String) {
        let mut t = self.runs.lock().expect("run ledger lock");
        let tally = t.touch(run, Instant::now());
        let (since, started) = tally
            .started
            .clone()
            .unwrap_or((Instant::now(), String::new()));
        let rec = RunRecord {
            outcome: report.outcome.as_str().to_string(),
            label: report.label.clone(),
            reported_via: report.via.to_string(),
            counts: tally.counts.clone(),
            in_flight: tally.pending,
            started,
            duration_ms: since.elapsed().as_millis() as u64,
        };
        let mut cost = tally.cost.clone();
        cost.usd = (cost.usd * 1e6).round() / 1e6;
        (rec, cost, tally.tenant.clone())
    }

    /// Forwarded calls of `run` whose outcome record is still to come.
    fn pending(&self, run: &str) -> u64 {
        let t = self.runs.lock().expect("run ledger lock");
        t.get(run).map_or(0, |r| r.pending)
    }

    fn reopen(&self, run: &str) {
        let mut t = self.runs.lock().expect("run ledger lock");
        t.touch(run, Instant::now()).ended = None;
    }
}

/// The metric label of a tenant: one of the agent's, or `other`.
pub(crate) fn tenant_label<'a>(snap: &Snapshot, tenant: &'a str) -> &'a str {
    if snap.agent.tenants.iter().any(|t| t == tenant) {
        tenant
    } else {
        "other"
    }
}

/// End `run` with `report`: the durable `run` record, then the metrics. Returns the record.
pub(crate) async fn end_run(
    state: &crate::state::ProxyState,
    snap: &Snapshot,
    run: &str,
    report: &Report,
) -> Result<AuditRecord, EndError> {
    state.runs.claim(run, report.outcome, false)?;
    settle(state, run).await;
    let rec = record(state, snap, run, report);
    commit(state, snap, rec.clone()).await?;
    Ok(rec)
}

/// Wait, up to [`SETTLE`], until every forwarded call of a claimed run has its outcome
/// record (no new call of it is admitted meanwhile).
pub(crate) async fn settle(state: &crate::state::ProxyState, run: &str) {
    let deadline = Instant::now() + SETTLE;
    while state.runs.pending(run) > 0 && Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// The `run` record of a claimed run, from its tally now; [`commit`] writes it.
pub(crate) fn record(
    state: &crate::state::ProxyState,
    snap: &Snapshot,
    run: &str,
    report: &Report,
) -> AuditRecord {
    let (fields, cost, tenant) = state.runs.fields(run, report);
    AuditRecord {
        phase: Some(Phase::Run),
        run: run.to_string(),
        agent: snap.agent.name.clone(),
        namespace: snap.agent.namespace.clone(),
        tenant,
        decision: fields.outcome.clone(),
        reasons: vec![match &fields.label {
            Some(l) => format!(
                "run reported {} ({l}) via {}",
                fields.outcome, fields.reported_via
            ),
            None => format!(
                "run reported {} via {}",
                fields.outcome, fields.reported_via
            ),
        }],
        policy_bundle: snap.policy.hash().to_string(),
        snapshot_version: snap.version,
        mode: snap.agent.mode.as_str().to_string(),
        cost,
        run_outcome: Some(fields),
        ..Default::default()
    }
}

/// Write a prepared `run` record durably, then observe the run's cost and count its outcome;
/// if it cannot be written the run is open again.
pub(crate) async fn commit(
    state: &crate::state::ProxyState,
    snap: &Snapshot,
    rec: AuditRecord,
) -> Result<(), EndError> {
    let run = rec.run.clone();
    let outcome = rec.decision.clone();
    let (usd, tenant) = (rec.cost.usd, rec.tenant.clone());
    if let Err(e) = state.audit.append(rec).await {
        state.runs.reopen(&run);
        return Err(EndError::Audit(e.to_string()));
    }
    let labels = [
        snap.agent.name.as_str(),
        tenant_label(snap, &tenant),
        outcome.as_str(),
    ];
    state
        .metrics
        .run_cost
        .with_label_values(&labels)
        .observe(usd);
    state.metrics.run_outcomes.with_label_values(&labels).inc();
    tracing::info!(run = %run, outcome = %outcome, cost_usd = usd, "run ended");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in v {
            h.append(OUTCOME_HEADER, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_header_takes_a_known_outcome_and_one_label() {
        assert_eq!(Report::from_headers(&headers(&[])).unwrap(), None);
        let r = Report::from_headers(&headers(&["resolved; label=ticket_closed"]))
            .unwrap()
            .unwrap();
        assert_eq!(r.outcome, RunOutcome::Resolved);
        assert_eq!(r.label.as_deref(), Some("ticket_closed"));
        assert_eq!(r.via, "header");
        let r = Report::from_headers(&headers(&["abandoned"]))
            .unwrap()
            .unwrap();
        assert_eq!((r.outcome, r.label), (RunOutcome::Abandoned, None));
        for bad in [
            &["won"][..],
            &["resolved; label=a b"],
            &["resolved; label=x; label=y"],
            &["resolved; owner=me"],
            &["resolved", "failed"],
            &[""],
        ] {
            let e = Report::from_headers(&headers(bad)).unwrap_err();
            assert_eq!(e.code(), "bad_request", "{bad:?}");
        }
    }

    fn rec(phase: Phase, decision: &str, input: &str, usd: f64) -> AuditRecord {
        AuditRecord {
            phase: Some(phase),
            run: "run_1".into(),
            tenant: "acme".into(),
            tool: "refund".into(),
            input_hash: input.into(),
            decision: decision.into(),
            cost: AuditCost {
                usd,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_tally_counts_refusals_retries_failures_and_cost() {
        let l = Ledger::default();
        l.note(&rec(Phase::Decision, "over_budget", "a", 0.0));
        l.note(&rec(Phase::Decision, "allow", "a", 0.0));
        l.note(&rec(Phase::Outcome, "allow", "a", 0.5));
        l.note(&rec(Phase::Decision, "allow", "b", 0.0));
        let mut failed = rec(Phase::Outcome, "allow", "b", 0.25);
        failed.status = 502;
        l.note(&failed);
        let report = Report::new("failed", Some("refund_not_issued"), "endpoint").unwrap();
        l.claim("run_1", report.outcome, false).unwrap();
        let (r, cost, tenant) = l.fields("run_1", &report);
        assert_eq!(
            (
                r.counts.calls,
                r.counts.refused,
                r.counts.retries,
                r.counts.failed
            ),
            (3, 1, 1, 1)
        );
        assert_eq!(cost.usd, 0.75);
        assert_eq!(tenant, "acme");
        assert_eq!(r.label.as_deref(), Some("refund_not_issued"));
        // Once ended: no second outcome, and no more calls.
        assert!(matches!(
            l.claim("run_1", report.outcome, false),
            Err(EndError::Ended(..))
        ));
        assert_eq!(l.check_open("run_1").unwrap_err().code(), "run_ended");
        assert_eq!(
            l.claim_for_call("run_1", &report).unwrap_err().code(),
            "run_ended"
        );
        assert!(matches!(
            l.claim("run_2", report.outcome, false),
            Err(EndError::Unknown(_))
        ));
        // A report on a run's own first call ends a run not seen before.
        l.claim_for_call("run_3", &report).unwrap();
        assert!(l.check_open("run_3").is_err());
        // A failed record write reopens it.
        l.reopen("run_1");
        assert!(l.check_open("run_1").is_ok());
    }

    #[test]
    fn approval_waits_are_summed_once_per_approval() {
        let l = Ledger::default();
        let mut asked = rec(Phase::Decision, "approval_required", "a", 0.0);
        asked.approval = Some(crate::audit::AuditApproval {
            id: "ap_1".into(),
            approver: String::new(),
        });
        l.note(&asked);
        l.note(&asked);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut granted = asked.clone();
        granted.decision = "allow".into();
        l.note(&granted);
        let (r, _, _) = l.fields("run_1", &Report::new("resolved", None, "header").unwrap());
        assert_eq!(r.counts.approvals, 1);
        assert_eq!(
            (r.counts.calls, r.counts.refused, r.counts.retries),
            (3, 2, 2)
        );
        assert!(
            r.counts.approval_wait_ms >= 20,
            "{}",
            r.counts.approval_wait_ms
        );
    }
}
