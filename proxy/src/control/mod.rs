//! Operator mode: `tollgate-proxy run --operator URL --agent NS/NAME --token-file F`.
//!
//! The sidecar long-polls the operator's snapshot API with its projected ServiceAccount
//! token, merges each snapshot (identity, tools, tenants, policies, kill switches, approval
//! grants) over its local settings (listeners, audit, limits, TLS), validates it like a file
//! config, and swaps it in atomically. Every answer, new snapshot or heartbeat, confirms
//! freshness; when the operator is unreachable the last good snapshot keeps serving until it
//! is older than `agent.maxStaleness`, after which calls fail closed with 503 `config_stale`
//! (unless `agent.failOpen`). A snapshot that does not validate is rejected whole: logged,
//! counted in `tollgate_config_reload_errors_total`, reported to the operator (the identity
//! goes `Ready=False`), and the last good one stays — but it is not fresh: heartbeats for a
//! rejected snapshot do not confirm it, so past `maxStaleness` calls fail closed.
//!
//! The sidecar also reports on that channel: approval requests and their use, apply results,
//! spend, and the audit writer's signed checkpoints ([`publish_checkpoints`]), which the
//! operator keeps append-only where the pod cannot change them.
//!
//! (One file, about 610 lines: everything the sidecar says to and hears from the operator —
//! polling and installing snapshots, and the reports of approvals, usage and checkpoints —
//! shares one client, one token and one error type; each function is short.)

pub(crate) mod pins;

use crate::config::Config;
use crate::snapshot::Snapshot;
use crate::state::ProxyState;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use crate::state::ControlArgs;

/// Merge an operator snapshot over the sidecar's local config.
pub fn merge(base: &Config, op: Config) -> Config {
    let mut c = base.clone();
    c.agent = op.agent;
    c.tools = op.tools;
    c.tenants = op.tenants;
    c.policies = op.policies;
    c.kill_switches = op.kill_switches;
    c.approvals.granted = op.approvals.granted;
    c.approvals.ttl = op.approvals.ttl;
    c.approvals.single_use = op.approvals.single_use;
    c.approvals.max_wait_s = op.approvals.max_wait_s;
    c
}

/// Poll the operator forever, installing snapshots into `state`.
pub async fn poll(state: Arc<ProxyState>, base: Config, base_dir: PathBuf, args: ControlArgs) {
    let mut version = 0u64;
    let mut hash = String::new();
    let mut backoff = Duration::from_millis(100);
    // The operator's current snapshot did not validate here.
    let mut rejected = false;
    let instance = format!("{:016x}", rand::random::<u64>());
    loop {
        // Heartbeats must come well within maxStaleness, or a quiet operator would look dead.
        let staleness = state
            .snapshot
            .load()
            .as_ref()
            .map(|s| ProxyState::max_staleness(s))
            .unwrap_or(Duration::from_secs(60));
        let timeout = args
            .poll_timeout
            .min(staleness / 3)
            .max(Duration::from_secs(1));
        match fetch(&state, &args, version, &hash, timeout).await {
            Ok(Answer::Unchanged) => {
                // A heartbeat confirms the snapshot the operator serves. If this sidecar
                // rejected it, what it runs is not what the operator means: not fresh.
                if !rejected {
                    state.freshness.confirm();
                }
                backoff = Duration::from_millis(100);
            }
            Ok(Answer::Snapshot(v, h, op, delivered)) => {
                backoff = Duration::from_millis(100);
                version = v;
                hash = h;
                match install(&state, &base, &base_dir, *op, &delivered, v) {
                    Ok(()) => {
                        if rejected {
                            report_apply(&state, &args, &instance, &hash, None).await;
                        }
                        rejected = false;
                        tracing::info!(version = v, agent = %args.agent, "operator snapshot installed")
                    }
                    Err(e) => {
                        rejected = true;
                        state.metrics.reload_errors.inc();
                        tracing::error!(version = v, error = %e, "operator snapshot rejected; keeping the last good one until maxStaleness, then failing closed");
                        report_apply(&state, &args, &instance, &hash, Some(&e)).await;
                        // Retry the same snapshot after a pause (its credentials or files may
                        // appear); asking with no hash makes the operator answer at once.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        hash.clear();
                    }
                }
            }
            Err(e) => {
                match (e.status, state.snapshot.load().is_some()) {
                    (Some(403), _) => {
                        tracing::error!(error = %e.message, url = %args.url, "the operator refused this sidecar's token; check the pod's ServiceAccount and the identity's serviceAccount")
                    }
                    (_, true) => {
                        tracing::warn!(error = %e.message, url = %args.url, "operator unreachable; serving the last good snapshot")
                    }
                    (_, false) => {
                        tracing::warn!(error = %e.message, url = %args.url, "operator unreachable and no snapshot yet; refusing calls with 503 config_unavailable")
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

enum Answer {
    Unchanged,
    Snapshot(u64, String, Box<Config>, Delivered),
}

/// Where the injector mounts tool credential Secrets; the operator delivers the same values
/// with the snapshot, keyed `<secret>/<key>`.
pub const SECRET_MOUNT: &str = "/var/run/tollgate/secrets";

/// Where [`Delivered`] carries the operator's current interception CA (certificate, key).
const INTERCEPT_CA_CERT: &str = ":intercept-ca/tls.crt";
const INTERCEPT_CA_KEY: &str = ":intercept-ca/tls.key";

/// Tool credentials delivered with a snapshot: `<secret>/<key>` → value.
type Delivered = std::collections::BTreeMap<String, String>;

fn install(
    state: &ProxyState,
    base: &Config,
    base_dir: &Path,
    op: Config,
    delivered: &Delivered,
    version: u64,
) -> Result<(), String> {
    let mut merged = merge(base, op);
    // Credentials the operator delivered are used as delivered; the rest are read from the
    // mounted Secret files (a path this pod lacks rejects the snapshot).
    let mut inline = Vec::new();
    for t in &mut merged.tools {
        let Some(c) = &t.credentials else { continue };
        let key = c
            .value_from
            .file
            .as_deref()
            .and_then(|f| f.strip_prefix(SECRET_MOUNT))
            .map(|k| k.trim_start_matches('/'));
        if let Some(value) = key.and_then(|k| delivered.get(k)) {
            inline.push((t.name.clone(), c.clone(), value.clone()));
            t.credentials = None;
        }
    }
    let mut snap = Snapshot::build(merged, version, base_dir).map_err(|e| e.to_string())?;
    // A sidecar that intercepts signs with the CA the operator delivered (it rotates without
    // a restart); the mounted files are only the start-up copy.
    if let (Some(_), Some(cert), Some(key)) = (
        &snap.intercept,
        delivered.get(INTERCEPT_CA_CERT),
        delivered.get(INTERCEPT_CA_KEY),
    ) {
        let ca = crate::ca::InterceptCa::from_pem(cert, key)
            .map_err(|e| format!("the delivered interception CA: {e}"))?;
        snap.intercept = Some(Arc::new(ca));
    }
    for (tool, c, value) in inline {
        let header = http::HeaderName::from_bytes(c.header.as_bytes())
            .map_err(|_| format!("tools[{tool}].credentials.header: not a valid header name"))?;
        let mut value =
            http::HeaderValue::from_str(&format!("{}{value}", c.prefix)).map_err(|_| {
                format!(
                    "tools[{tool}].credentials: the delivered secret is not a valid header value"
                )
            })?;
        value.set_sensitive(true);
        if let Some(t) = snap.tools.iter_mut().find(|t| t.config.name == tool) {
            t.credential = Some(crate::snapshot::Credential { header, value });
            t.config.credentials = Some(c);
        }
    }
    state.install(Arc::new(snap));
    Ok(())
}

/// Why a snapshot request failed; `status` is the operator's HTTP status, if it answered.
struct FetchError {
    status: Option<u16>,
    message: String,
}

impl From<String> for FetchError {
    fn from(message: String) -> Self {
        Self {
            status: None,
            message,
        }
    }
}

/// A `POST {operator}{path}` with the sidecar's projected token and a JSON body: the one way
/// the sidecar reports to the operator (apply results, approvals, uses, usage).
pub(crate) fn operator_post(
    args: &ControlArgs,
    path: &str,
    body: &serde_json::Value,
) -> Result<http::Request<Full<Bytes>>, String> {
    let token = std::fs::read_to_string(&args.token_file)
        .map_err(|e| format!("token file {}: {e}", args.token_file.display()))?;
    let url = format!("{}{path}", args.url.trim_end_matches('/'));
    http::Request::post(&url)
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", token.trim()),
        )
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())
}

/// Tell the operator this sidecar rejected the snapshot with `hash` (`error`; the identity
/// goes `Ready=False` with the reason) or, after a rejection, applied one (`None`). Best
/// effort: the staleness clock runs regardless.
async fn report_apply(
    state: &ProxyState,
    args: &ControlArgs,
    instance: &str,
    hash: &str,
    error: Option<&str>,
) {
    let body = serde_json::json!({"agent": args.agent, "instance": instance, "hash": hash, "error": error});
    let request = match operator_post(args, "/v1/snapshot/report", &body) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "snapshot apply report not sent to the operator");
            return;
        }
    };
    if let Err(e) = state
        .upstreams
        .send(request, Duration::from_secs(2), Duration::from_secs(5))
        .await
    {
        tracing::warn!(error = %e, "snapshot apply report not delivered to the operator");
    }
}

async fn fetch(
    state: &ProxyState,
    args: &ControlArgs,
    version: u64,
    hash: &str,
    timeout: Duration,
) -> Result<Answer, FetchError> {
    let token = std::fs::read_to_string(&args.token_file)
        .map_err(|e| format!("token file {}: {e}", args.token_file.display()))?;
    let url = format!(
        "{}/v1/snapshot?agent={}&version={version}&hash={hash}&timeoutSeconds={}",
        args.url.trim_end_matches('/'),
        args.agent,
        timeout.as_secs().max(1)
    );
    let req = http::Request::get(&url)
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", token.trim()),
        )
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let wait = timeout + Duration::from_secs(10);
    let res = state
        .upstreams
        .send(req, Duration::from_secs(2), wait)
        .await
        .map_err(|e| e.to_string())?;
    let status = res.status();
    let body = tokio::time::timeout(wait, res.into_body().collect())
        .await
        .map_err(|_| FetchError::from("snapshot body timed out".to_string()))?
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(FetchError {
            status: Some(status.as_u16()),
            message: format!(
                "operator answered {status}: {}",
                String::from_utf8_lossy(&body)
            ),
        });
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    if v["unchanged"] == true {
        return Ok(Answer::Unchanged);
    }
    let new_version = v["version"].as_u64().unwrap_or(0);
    let new_hash = v["hash"].as_str().unwrap_or("").to_string();
    let config: Config = serde_json::from_value(v["config"].clone())
        .map_err(|e| format!("snapshot does not parse: {e}"))?;
    let mut delivered: Delivered =
        serde_json::from_value(v["credentials"].clone()).unwrap_or_default();
    // The interception CA the operator signs with now (it rotates), under keys no Secret
    // name can take.
    for (field, key) in [("cert", INTERCEPT_CA_CERT), ("key", INTERCEPT_CA_KEY)] {
        if let Some(pem) = v["interceptCa"][field].as_str() {
            delivered.insert(key.to_string(), pem.to_string());
        }
    }
    Ok(Answer::Snapshot(
        new_version,
        new_hash,
        Box::new(config),
        delivered,
    ))
}

/// Ask the operator to create an `ApprovalRequest` for a held call (fire and forget: the agent
/// already has its 403 `approval_required` with the request name; a failure is logged).
pub fn report_approval(
    args: &ControlArgs,
    req: &crate::approval::ApprovalRequest,
    upstreams: &crate::upstream::Upstreams,
) {
    let (args, upstreams) = (args.clone(), upstreams.clone());
    let body = serde_json::json!({
        "id": req.id,
        "key": req.key,
        "agent": args.agent,
        "tenant": req.summary.tenant,
        "run": req.summary.run,
        "tool": req.summary.tool,
        "summary": format!("{} ({})", req.summary.target, req.summary.reasons.join("; ")),
        "reasons": req.summary.reasons,
        "inputPreview": req.summary.input_preview,
        "expiresAt": req.expires_at,
    });
    tokio::spawn(async move {
        let request = match operator_post(&args, "/v1/approvals", &body) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot report an approval request");
                return;
            }
        };
        match upstreams
            .send(request, Duration::from_secs(2), Duration::from_secs(10))
            .await
        {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => tracing::error!(status = %r.status(), "operator refused the approval request"),
            Err(e) => tracing::error!(error = %e, "approval request not delivered to the operator"),
        }
    });
}

/// Tell the operator that a kill switch voided these pending approval requests: it marks
/// each `ApprovalRequest` `Voided`, so it can no longer be approved (fire and forget: the
/// sidecar refuses grants for them either way, see [`crate::approval::ApprovalStore::void`]).
pub fn report_voided(
    args: &ControlArgs,
    voided: &[crate::approval::ApprovalRequest],
    upstreams: &crate::upstream::Upstreams,
) {
    let (args, upstreams) = (args.clone(), upstreams.clone());
    let items: Vec<_> = voided
        .iter()
        .map(|r| serde_json::json!({"id": r.id, "reason": r.reason}))
        .collect();
    let body = serde_json::json!({"agent": args.agent, "voided": items});
    tokio::spawn(async move {
        let request = match operator_post(&args, "/v1/approvals/void", &body) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot report voided approval requests");
                return;
            }
        };
        match upstreams
            .send(request, Duration::from_secs(2), Duration::from_secs(10))
            .await
        {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => {
                tracing::error!(status = %r.status(), "operator refused to void approval requests")
            }
            Err(e) => {
                tracing::error!(error = %e, "voided approval requests not reported to the operator")
            }
        }
    });
}

/// The use recorder of operator mode: `POST /v1/approvals/consume` for each use of a
/// single-use grant; the operator records it in the `ApprovalRequest` status with a
/// conditional write, so of all sidecars of the identity, and across restarts, one use wins.
pub fn use_recorder(
    args: &ControlArgs,
    upstreams: &crate::upstream::Upstreams,
    instance: String,
) -> crate::approval::UseRecorder {
    use crate::approval::UseRefused;
    let (args, upstreams) = (args.clone(), upstreams.clone());
    std::sync::Arc::new(move |id: String| {
        let (args, upstreams, instance) = (args.clone(), upstreams.clone(), instance.clone());
        Box::pin(async move {
            let body = serde_json::json!({"agent": args.agent, "id": id, "instance": instance});
            let request = operator_post(&args, "/v1/approvals/consume", &body)
                .map_err(UseRefused::Unavailable)?;
            let res = upstreams
                .send(request, Duration::from_secs(2), Duration::from_secs(10))
                .await
                .map_err(|e| UseRefused::Unavailable(format!("operator unreachable: {e}")))?;
            let status = res.status();
            let body = res
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let reason = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["reason"].as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("operator answered {status}"));
            match status.as_u16() {
                200..=299 => Ok(()),
                404 | 409 => Err(UseRefused::Refused(reason)),
                _ => Err(UseRefused::Unavailable(reason)),
            }
        }) as futures::future::BoxFuture<'static, _>
    })
}

/// Report this sidecar's spend today to the operator every `every` (it shows in the
/// `AgentIdentity` and `Tenant` status).
pub async fn report_usage(state: Arc<ProxyState>, args: ControlArgs, every: Duration) {
    let instance = format!("{:016x}", rand::random::<u64>());
    loop {
        tokio::time::sleep(every).await;
        let (day, by_tenant) = state.spend_today.lock().expect("spend lock").clone();
        if day.is_empty() {
            continue;
        }
        let body = serde_json::json!({"agent": args.agent, "instance": instance, "day": day, "spendUsd": by_tenant});
        let request = match operator_post(&args, "/v1/usage", &body) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "usage report not sent");
                continue;
            }
        };
        if let Err(e) = state
            .upstreams
            .send(request, Duration::from_secs(2), Duration::from_secs(5))
            .await
        {
            tracing::debug!(error = %e, "usage report not delivered");
        }
    }
}

/// The pod this sidecar runs in, which names its checkpoint chain at the operator:
/// `POD_NAME` (the injector sets it from the downward API), else `HOSTNAME` (a pod's
/// hostname is its name unless the spec overrides it). When the operator's TokenReview
/// reports the pod a token is bound to, the claim must match it.
pub fn pod_name() -> String {
    ["POD_NAME", "HOSTNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}

/// Checkpoints waiting for the operator; past this the oldest is dropped (counted): a later
/// checkpoint vouches for everything an earlier one did.
const CHECKPOINT_QUEUE: usize = 64;

/// Publish the audit writer's signed checkpoints to the operator (`POST
/// /v1/audit/checkpoints`), in order, retrying while it is unreachable. The operator stores
/// them append-only where the pod cannot change them; a checkpoint it refuses (one that does
/// not extend the chain it holds, another key) is counted and not retried. Ends when the
/// writer has stopped (after its final checkpoint) and the queue is sent, or — at shutdown —
/// after a few more attempts.
pub async fn publish_checkpoints(
    state: Arc<ProxyState>,
    args: ControlArgs,
    pod: String,
    mut lines: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let failures = &state.metrics.audit_checkpoint_failures;
    let mut queue: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let mut writer_done = false;
    let mut attempts_after_done = 0;
    let mut backoff = Duration::from_millis(200);
    loop {
        if queue.is_empty() {
            if writer_done {
                return;
            }
            match lines.recv().await {
                Some(l) => queue.push_back(l),
                None => return,
            }
        }
        while let Ok(l) = lines.try_recv() {
            queue.push_back(l);
        }
        while queue.len() > CHECKPOINT_QUEUE {
            queue.pop_front();
            failures.with_label_values(&["dropped"]).inc();
        }
        let Some(line) = queue.front().cloned() else {
            continue;
        };
        let body = serde_json::json!({"agent": args.agent, "pod": pod, "checkpoint": line});
        match post_checkpoint(&state, &args, &body).await {
            Ok(()) => {
                queue.pop_front();
                state.metrics.audit_checkpoints_published.inc();
                backoff = Duration::from_millis(200);
                continue;
            }
            Err(CheckpointRefused::Permanent(reason)) => {
                queue.pop_front();
                failures.with_label_values(&["refused"]).inc();
                tracing::error!(%reason, "the operator refused an audit checkpoint");
                continue;
            }
            Err(CheckpointRefused::Retry(reason)) => {
                failures.with_label_values(&["unreachable"]).inc();
                tracing::warn!(%reason, "audit checkpoint not delivered to the operator; retrying");
            }
        }
        if writer_done {
            attempts_after_done += 1;
            if attempts_after_done >= 3 {
                tracing::error!(
                    pending = queue.len(),
                    "shutting down with audit checkpoints the operator did not receive"
                );
                return;
            }
        }
        // Wait before retrying, taking new checkpoints (or the writer's end) meanwhile.
        let pause = tokio::time::sleep(backoff);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                _ = &mut pause => break,
                l = lines.recv(), if !writer_done => match l {
                    Some(l) => queue.push_back(l),
                    None => writer_done = true,
                },
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Why a checkpoint was not stored.
enum CheckpointRefused {
    /// The operator was unreachable, not ready or refused the token (retried).
    Retry(String),
    /// The operator rejected the checkpoint itself (not retried).
    Permanent(String),
}

async fn post_checkpoint(
    state: &ProxyState,
    args: &ControlArgs,
    body: &serde_json::Value,
) -> Result<(), CheckpointRefused> {
    let request =
        operator_post(args, "/v1/audit/checkpoints", body).map_err(CheckpointRefused::Retry)?;
    let res = state
        .upstreams
        .send(request, Duration::from_secs(2), Duration::from_secs(10))
        .await
        .map_err(|e| CheckpointRefused::Retry(format!("operator unreachable: {e}")))?;
    let status = res.status().as_u16();
    let body = res
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let reason = format!(
        "operator answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    match status {
        200..=299 => Ok(()),
        // 403: the identity may not be known to this replica yet; 429/5xx: transient.
        403 | 429 | 500..=599 => Err(CheckpointRefused::Retry(reason)),
        _ => Err(CheckpointRefused::Permanent(reason)),
    }
}
