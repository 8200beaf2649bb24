//! The approval gate: a call that policy sends for approval goes ahead only with a granted,
//! unexpired approval bound to the sha256 of this exact call (agent, tenant, tool, canonical
//! input). Otherwise an approval request is opened (or the pending one is reused) and the call
//! is refused with `approval_required` and the request id.
//!
//! Decisions arrive two ways: in Kubernetes, as `approvals.granted` in the operator snapshot;
//! standalone, through the admin API (`/approvals`, bearer token bound to an approver name).
//! Both are checked here, and single-use grants are consumed here, once.
//!
//! A kill switch that engages voids the pending requests it covers ([`ApprovalStore::void`]):
//! a voided request can no longer be decided through the admin API, and a grant the operator
//! delivers for it later is refused until the request would have expired.
//!
//! (One file, about 650 lines: the store's states, eviction, voiding and grant matching all
//! change one map under one lock; half of the file is its unit tests.)

use crate::config::ApprovalGrant;
use crate::refusal::Refusal;
use crate::snapshot::Snapshot;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;

/// The approval key of a call.
pub(crate) fn approval_key(
    agent: &str,
    tenant: &str,
    tool: &str,
    canonical_input: &[u8],
) -> String {
    let mut h = Sha256::new();
    for part in [agent.as_bytes(), tenant.as_bytes(), tool.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(canonical_input);
    hex::encode(h.finalize())
}

/// The approval request id for a key.
pub(crate) fn approval_id(key: &str) -> String {
    format!("apr-{}", &key[..12])
}

/// State of a locally held approval request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalState {
    /// Waiting for a human.
    Pending,
    /// Approved.
    Approved,
    /// Denied.
    Denied,
    /// Voided by a kill switch while pending: it can no longer be decided.
    Voided,
}

/// What a human sees about a held call.
#[derive(Clone, Debug, Serialize)]
pub struct ApprovalSummary {
    /// Agent.
    pub agent: String,
    /// Tenant.
    pub tenant: String,
    /// Run.
    pub run: String,
    /// Tool.
    pub tool: String,
    /// `METHOD url`.
    pub target: String,
    /// Policy reasons.
    pub reasons: Vec<String>,
    /// Redacted input preview.
    pub input_preview: serde_json::Value,
}

/// A locally held approval request.
#[derive(Clone, Debug, Serialize)]
pub struct ApprovalRequest {
    /// Id (`apr-…`).
    pub id: String,
    /// Approval key.
    pub key: String,
    /// State.
    pub state: ApprovalState,
    /// What it is for.
    pub summary: ApprovalSummary,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// RFC 3339 expiry.
    pub expires_at: String,
    /// Who decided.
    pub approver: Option<String>,
    /// When.
    pub decided_at: Option<String>,
    /// Reason given with the decision.
    pub reason: Option<String>,
    /// A single-use grant was used.
    pub used: bool,
    /// The kill switch that voided it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voided_by: Option<String>,
}

/// A grant that lets the call through.
#[derive(Clone, Debug)]
pub struct Granted {
    /// Approval id.
    pub id: String,
    /// Approver.
    pub approver: String,
    /// When.
    pub decided_at: String,
}

/// Why a decision through the admin API was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecideError {
    /// Unknown id.
    #[error("no approval request {0}")]
    NotFound(String),
    /// Already decided (decisions are final).
    #[error("approval request {0} was already decided")]
    AlreadyDecided(String),
    /// Expired.
    #[error("approval request {0} has expired")]
    Expired(String),
}

/// Approval requests held by this sidecar, and single-use grants it has consumed.
pub struct ApprovalStore {
    inner: Mutex<HashMap<String, ApprovalRequest>>,
    used_grants: Mutex<std::collections::HashSet<String>>,
    /// Voided request id → (its expiry, the switch): operator grants for them are refused.
    voided: Mutex<HashMap<String, (String, String)>>,
    changed: watch::Sender<u64>,
    evicted: Option<prometheus::IntCounterVec>,
    recorder: std::sync::OnceLock<UseRecorder>,
}

impl Default for ApprovalStore {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            used_grants: Mutex::default(),
            voided: Mutex::default(),
            changed: watch::channel(0).0,
            evicted: None,
            recorder: std::sync::OnceLock::new(),
        }
    }
}

impl ApprovalStore {
    /// A store that counts evictions in `tollgate_approvals_evicted_total{reason}`.
    pub fn counted(evicted: prometheus::IntCounterVec) -> Self {
        Self {
            evicted: Some(evicted),
            ..Self::default()
        }
    }

    /// Drop what no call can use any more: expired requests, and approvals already used
    /// when grants are single-use. Returns how many are still pending.
    fn evict(
        &self,
        map: &mut HashMap<String, ApprovalRequest>,
        now: &str,
        single_use: bool,
    ) -> usize {
        let (mut expired, mut decided) = (0u64, 0u64);
        map.retain(|_, r| {
            if r.expires_at.as_str() <= now {
                expired += 1;
                false
            } else if r.used && single_use {
                decided += 1;
                false
            } else {
                true
            }
        });
        if let Some(m) = &self.evicted {
            m.with_label_values(&["expired"]).inc_by(expired);
            m.with_label_values(&["decided"]).inc_by(decided);
        }
        map.values()
            .filter(|r| r.state == ApprovalState::Pending)
            .count()
    }
}

/// Why the operator did not record the use of a single-use grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UseRefused {
    /// Already used (by this or another sidecar), or no longer approved: final.
    Refused(String),
    /// The operator could not be asked or could not write: the grant stays usable.
    Unavailable(String),
}

/// Records the use of an operator-delivered single-use grant (by its id) where every sidecar
/// of the identity sees it; only `Ok` lets the call through. Set in operator mode
/// ([`crate::control::use_recorder`]).
pub(crate) type UseRecorder = std::sync::Arc<
    dyn Fn(String) -> futures::future::BoxFuture<'static, Result<(), UseRefused>> + Send + Sync,
>;

/// Facts about the call being gated.
pub struct GateCall<'a> {
    /// Approval key.
    pub key: &'a str,
    /// Policy reasons.
    pub reasons: Vec<String>,
    /// Summary for a new request.
    pub summary: ApprovalSummary,
    /// Now, RFC 3339 UTC.
    pub now: time::OffsetDateTime,
    /// `Prefer: wait=N`, already capped.
    pub wait: Option<Duration>,
}

fn rfc(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl ApprovalStore {
    /// Pending requests.
    pub fn pending(&self) -> usize {
        self.inner
            .lock()
            .expect("approvals lock")
            .values()
            .filter(|r| r.state == ApprovalState::Pending)
            .count()
    }

    /// All requests, newest first.
    pub fn list(&self) -> Vec<ApprovalRequest> {
        let mut v: Vec<_> = self
            .inner
            .lock()
            .expect("approvals lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| b.created_at.cmp(&a.created_at));
        v
    }

    /// Approve or deny a pending request.
    pub fn decide(
        &self,
        id: &str,
        approve: bool,
        approver: &str,
        reason: Option<String>,
    ) -> Result<ApprovalRequest, DecideError> {
        let now = time::OffsetDateTime::now_utc();
        let mut map = self.inner.lock().expect("approvals lock");
        let r = map
            .values_mut()
            .find(|r| r.id == id)
            .ok_or_else(|| DecideError::NotFound(id.into()))?;
        if r.state != ApprovalState::Pending {
            return Err(DecideError::AlreadyDecided(id.into()));
        }
        if r.expires_at <= rfc(now) {
            return Err(DecideError::Expired(id.into()));
        }
        r.state = if approve {
            ApprovalState::Approved
        } else {
            ApprovalState::Denied
        };
        r.approver = Some(approver.to_string());
        r.decided_at = Some(rfc(now));
        r.reason = reason;
        let out = r.clone();
        drop(map);
        self.changed.send_modify(|v| *v += 1);
        Ok(out)
    }

    /// Decide the gate for a call whose policy asked for approval. With `Prefer: wait=N` a
    /// pending call is held until it is decided or the wait runs out. The second element is the
    /// request this call opened, if it opened one (for notifications).
    ///
    /// `live` is the sidecar's current snapshot: in operator mode a grant arrives in a new
    /// snapshot, which wakes held calls (see [`ApprovalStore::snapshot_changed`]).
    pub async fn gate(
        &self,
        snap: &Snapshot,
        live: &arc_swap::ArcSwapOption<Snapshot>,
        call: GateCall<'_>,
        on_open: impl Fn(&ApprovalRequest),
    ) -> (Result<Granted, Refusal>, Option<ApprovalRequest>) {
        let deadline = call.wait.map(|w| tokio::time::Instant::now() + w);
        let mut rx = self.changed.subscribe();
        let mut opened = false;
        let mut announced = false;
        loop {
            let current = live.load_full();
            let snap = current.as_deref().unwrap_or(snap);
            let result = self.check(snap, &call, &mut opened);
            if opened && !announced {
                // Announce a new request at once, not after a held call's wait.
                announced = true;
                let req = self
                    .inner
                    .lock()
                    .expect("approvals lock")
                    .get(call.key)
                    .cloned();
                if let Some(req) = req {
                    on_open(&req);
                }
            }
            match result {
                Err(Refusal::ApprovalRequired { .. })
                    if deadline.is_some_and(|d| tokio::time::Instant::now() < d) =>
                {
                    let d = deadline.expect("checked");
                    let _ = tokio::time::timeout_at(d, rx.changed()).await;
                }
                other => {
                    let other = match other {
                        Ok(g) => self.record_use(snap, call.key, g).await,
                        refused => refused,
                    };
                    let new = if opened {
                        self.inner
                            .lock()
                            .expect("approvals lock")
                            .get(call.key)
                            .cloned()
                    } else {
                        None
                    };
                    return (other, new);
                }
            }
        }
    }

    /// Operator mode: record uses of single-use grants through `recorder`.
    pub fn set_use_recorder(&self, recorder: UseRecorder) {
        let _ = self.recorder.set(recorder);
    }

    /// A single-use grant delivered by the operator is used only once the operator has
    /// recorded the use cluster-wide (it arbitrates races between sidecars and survives
    /// restarts); the local `used_grants` set alone would let each sidecar, and each restart,
    /// use it again.
    async fn record_use(&self, snap: &Snapshot, key: &str, g: Granted) -> Result<Granted, Refusal> {
        let Some(record) = self.recorder.get() else {
            return Ok(g);
        };
        let from_operator = snap.approvals.single_use
            && snap
                .approvals
                .granted
                .iter()
                .any(|x| x.key == key && x.id == g.id);
        if !from_operator {
            return Ok(g);
        }
        match record(g.id.clone()).await {
            Ok(()) => Ok(g),
            Err(UseRefused::Refused(why)) => Err(Refusal::ApprovalRejected(why)),
            Err(UseRefused::Unavailable(why)) => {
                // Not used after all: a retry may use it once the operator answers.
                self.used_grants.lock().expect("grants lock").remove(&g.id);
                Err(Refusal::Unavailable {
                    code: "approval_unrecorded",
                    reason: format!(
                        "approval {} is single-use and its use could not be recorded: {why}",
                        g.id
                    ),
                })
            }
        }
    }

    /// Void every pending request one of `switches` covers (agent and namespace are the
    /// snapshot's; tenant and tool the request's). Returns the requests voided.
    pub fn void(
        &self,
        snap: &Snapshot,
        switches: &[&crate::config::KillSwitchConfig],
    ) -> Vec<ApprovalRequest> {
        let (ns, agent) = (&snap.agent.namespace, &snap.agent.name);
        let mut out = Vec::new();
        let mut map = self.inner.lock().expect("approvals lock");
        for r in map.values_mut() {
            if r.state != ApprovalState::Pending {
                continue;
            }
            let s = &r.summary;
            let Some(k) = switches
                .iter()
                .find(|k| crate::killswitch::applies(k, ns, agent, &s.tenant, &s.tool))
            else {
                continue;
            };
            r.state = ApprovalState::Voided;
            r.voided_by = Some(k.name.clone());
            r.decided_at = Some(rfc(time::OffsetDateTime::now_utc()));
            r.reason = Some(format!("kill switch {} engaged: {}", k.name, k.reason));
            out.push(r.clone());
        }
        drop(map);
        let mut voided = self.voided.lock().expect("voided lock");
        let now = rfc(time::OffsetDateTime::now_utc());
        voided.retain(|_, (exp, _)| exp.as_str() > now.as_str());
        for r in &out {
            let by = r.voided_by.clone().unwrap_or_default();
            voided.insert(r.id.clone(), (r.expires_at.clone(), by));
        }
        out
    }

    /// A new snapshot was installed (it may carry grants): wake held calls.
    pub fn snapshot_changed(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn check(
        &self,
        snap: &Snapshot,
        call: &GateCall<'_>,
        opened: &mut bool,
    ) -> Result<Granted, Refusal> {
        let now = rfc(call.now);
        // Operator-delivered decisions first.
        if let Some(g) = snap.approvals.granted.iter().find(|g| g.key == call.key) {
            check_grant(g, &now)?;
            if let Some((_, switch)) = self.voided.lock().expect("voided lock").get(&g.id) {
                return Err(Refusal::ApprovalRejected(format!(
                    "approval {} was voided by kill switch {switch} while pending; a decision made on it is not honoured",
                    g.id
                )));
            }
            if snap.approvals.single_use
                && !self
                    .used_grants
                    .lock()
                    .expect("grants lock")
                    .insert(g.id.clone())
            {
                return Err(Refusal::ApprovalRejected(format!(
                    "approval {} was single-use and has already been used",
                    g.id
                )));
            }
            return Ok(Granted {
                id: g.id.clone(),
                approver: g.approver.clone(),
                decided_at: g.decided_at.clone(),
            });
        }
        let mut map = self.inner.lock().expect("approvals lock");
        let ttl = snap.approvals.ttl;
        let fresh = || ApprovalRequest {
            id: approval_id(call.key),
            key: call.key.to_string(),
            state: ApprovalState::Pending,
            summary: call.summary.clone(),
            created_at: now.clone(),
            expires_at: rfc(call.now + ttl),
            approver: None,
            decided_at: None,
            reason: None,
            used: false,
            voided_by: None,
        };
        if !map.contains_key(call.key) {
            // Opening a request: first make room, and cap what one agent may keep pending, so
            // refused calls cannot grow memory without bound.
            let pending = self.evict(&mut map, &now, snap.approvals.single_use);
            if pending >= snap.approvals.max_pending {
                if let Some(m) = &self.evicted {
                    m.with_label_values(&["over_cap"]).inc();
                }
                return Err(Refusal::ApprovalRejected(format!(
                    "{pending} approval requests are already pending for this agent (approvals.maxPending {}); decide or let them expire first",
                    snap.approvals.max_pending
                )));
            }
        }
        let entry = map.entry(call.key.to_string()).or_insert_with(|| {
            *opened = true;
            fresh()
        });
        if entry.state == ApprovalState::Voided {
            // The switch that voided it has been lifted (or the gate would have refused the
            // call first): the retry asks again.
            *entry = fresh();
            *opened = true;
        }
        if entry.expires_at <= now {
            if entry.state == ApprovalState::Pending || entry.used {
                // An expired or spent request is replaced by a new one for the retry.
                *entry = fresh();
                *opened = true;
            } else {
                return Err(Refusal::ApprovalRejected(format!(
                    "approval {} expired at {}",
                    entry.id, entry.expires_at
                )));
            }
        }
        match entry.state {
            ApprovalState::Pending => Err(Refusal::ApprovalRequired {
                reasons: call.reasons.clone(),
                approval: entry.id.clone(),
                retry_after_s: 30,
            }),
            ApprovalState::Voided => Err(Refusal::ApprovalRejected(format!(
                "approval {} was voided by kill switch {}",
                entry.id,
                entry.voided_by.as_deref().unwrap_or("?")
            ))),
            ApprovalState::Denied => Err(Refusal::ApprovalRejected(format!(
                "approval {} was denied by {}{}",
                entry.id,
                entry.approver.as_deref().unwrap_or("?"),
                entry
                    .reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ))),
            ApprovalState::Approved => {
                if entry.used && snap.approvals.single_use {
                    return Err(Refusal::ApprovalRejected(format!(
                        "approval {} was single-use and has already been used",
                        entry.id
                    )));
                }
                entry.used = true;
                Ok(Granted {
                    id: entry.id.clone(),
                    approver: entry.approver.clone().unwrap_or_default(),
                    decided_at: entry.decided_at.clone().unwrap_or_default(),
                })
            }
        }
    }
}

fn check_grant(g: &ApprovalGrant, now: &str) -> Result<(), Refusal> {
    if g.decision != "approved" {
        let why = g
            .reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        return Err(Refusal::ApprovalRejected(format!(
            "approval {} was denied by {}{why}",
            g.id, g.approver
        )));
    }
    if let Some(exp) = &g.expires_at {
        // RFC 3339 UTC timestamps of one format compare correctly as strings.
        if exp.as_str() <= now {
            return Err(Refusal::ApprovalRejected(format!(
                "approval {} expired at {exp}",
                g.id
            )));
        }
    }
    Ok(())
}

/// Parse `Prefer: wait=N` (RFC 7240), capped at `max`.
pub(crate) fn prefer_wait(headers: &http::HeaderMap, max: Duration) -> Option<Duration> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.trim().strip_prefix("wait="))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .map(|n| Duration::from_secs(n).min(max))
        .next()
}

/// Post a Slack-compatible notification for a new request (best effort, in the background).
pub(crate) fn notify(url: &str, req: &ApprovalRequest, upstreams: &crate::upstream::Upstreams) {
    let text = format!(
        "Tollgate approval needed: {} for tenant {} wants {} ({}). Reasons: {}. Approve: `kubectl tollgate approve {}` or `tollgate-proxy approvals approve {}`",
        req.summary.agent,
        req.summary.tenant,
        req.summary.tool,
        req.summary.target,
        req.summary.reasons.join("; "),
        req.id,
        req.id
    );
    let body = serde_json::json!({"text": text, "approval": req});
    let Ok(request) = http::Request::post(url)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
    else {
        return;
    };
    let up = upstreams.clone();
    tokio::spawn(async move {
        if let Err(e) = up
            .send(request, Duration::from_secs(2), Duration::from_secs(5))
            .await
        {
            tracing::warn!(error = %e, "approval notification failed");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefer_wait_is_parsed_and_capped() {
        let mut h = http::HeaderMap::new();
        h.insert("prefer", "respond-async, wait=10".parse().unwrap());
        assert_eq!(
            prefer_wait(&h, Duration::from_secs(60)),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            prefer_wait(&h, Duration::from_secs(3)),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            prefer_wait(&http::HeaderMap::new(), Duration::from_secs(3)),
            None
        );
    }

    #[test]
    fn keys_separate_their_parts() {
        assert_ne!(
            approval_key("ab", "c", "t", b"{}"),
            approval_key("a", "bc", "t", b"{}")
        );
        assert_eq!(approval_id(&approval_key("a", "b", "c", b"{}")).len(), 16);
    }
}
