//! Sidecars' audit checkpoints, kept where the pod cannot change them (issue 17).
//!
//! `POST /v1/audit/checkpoints` `{"agent": NS/NAME, "pod": P, "checkpoint": LINE}`: a sidecar
//! publishes one signed checkpoint line of its audit chain (periodically and at shutdown). It
//! authenticates like every sidecar call (TokenReview, the identity's ServiceAccount); when
//! the token is bound to a pod (projected tokens are: TokenReview reports
//! `authentication.kubernetes.io/pod-name`), the pod it claims must be that pod, so one pod
//! cannot write another pod's chain.
//!
//! The chain lives in an [`AuditCheckpoint`] `<identity>.<pod>` in the identity's namespace,
//! which only the operator may write. The first checkpoint registers the signing key in its
//! spec (immutable by a CEL rule): a later checkpoint under another key is refused (409
//! `key_mismatch`), so a compromised pod can neither replace a key nor start the chain over.
//! The status is append-only: a checkpoint must extend the last one stored
//! ([`tollgate_proxy::audit::checkpoint::extends`]; 409 `not_extending` otherwise), and the
//! write is conditional on the `resourceVersion` read, so two operator replicas cannot both
//! append. Only the latest lines are kept ([`MAX_STORED_CHECKPOINTS`],
//! [`MAX_STORED_CHECKPOINT_BYTES`]): the latest vouches for everything before it.

use crate::crd::{
    AuditCheckpoint, AuditCheckpointSpec, AuditCheckpointStatus, MAX_STORED_CHECKPOINTS,
    MAX_STORED_CHECKPOINT_BYTES,
};
use kube::api::PostParams;
use tollgate_proxy::audit::checkpoint::{extends, verify_line};

/// Longest checkpoint line accepted (a file list of a few hundred rotated files).
pub const MAX_LINE_BYTES: usize = 32 * 1024;

/// Why a checkpoint was not stored.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointStoreError {
    /// Not a well-formed, correctly signed checkpoint line, or a bad pod name.
    #[error("{0}")]
    Invalid(String),
    /// Signed by another key than the one registered for the chain.
    #[error("the chain of {chain} is registered to key {registered}; this checkpoint is signed by key {got}")]
    KeyMismatch {
        /// `AuditCheckpoint` name.
        chain: String,
        /// Registered key id.
        registered: String,
        /// The checkpoint's key id.
        got: String,
    },
    /// Does not extend the last checkpoint stored.
    #[error(
        "the checkpoint does not extend the last one stored for {chain} (seq {last_seq}): {why}"
    )]
    NotExtending {
        /// `AuditCheckpoint` name.
        chain: String,
        /// Seq of the last stored checkpoint.
        last_seq: u64,
        /// What differs.
        why: String,
    },
    /// The API server failed or kept conflicting.
    #[error("cannot store the checkpoint: {0}")]
    Api(String),
}

impl CheckpointStoreError {
    /// HTTP status of the answer.
    pub fn status(&self) -> u16 {
        match self {
            Self::Invalid(_) => 400,
            Self::KeyMismatch { .. } | Self::NotExtending { .. } => 409,
            Self::Api(_) => 503,
        }
    }

    /// Error code in the JSON answer and `result` label of
    /// `tollgate_operator_audit_checkpoints_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid",
            Self::KeyMismatch { .. } => "key_mismatch",
            Self::NotExtending { .. } => "not_extending",
            Self::Api(_) => "api_error",
        }
    }
}

/// What happened to an accepted checkpoint.
#[derive(Debug, PartialEq, Eq)]
pub enum Stored {
    /// Appended to the chain.
    Appended,
    /// The same line was stored already (a retried publication).
    Duplicate,
}

/// Name of the chain object of `pod` of identity `agent`.
pub fn chain_name(agent: &str, pod: &str) -> Result<String, CheckpointStoreError> {
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !s.starts_with(['-', '.'])
            && !s.ends_with(['-', '.'])
    };
    if !label(pod) {
        return Err(CheckpointStoreError::Invalid(format!(
            "pod {pod:?} is not a Kubernetes object name"
        )));
    }
    let name = format!("{agent}.{pod}");
    if name.len() > 253 {
        return Err(CheckpointStoreError::Invalid(format!(
            "{name} is longer than 253 characters"
        )));
    }
    Ok(name)
}

/// Append `line` (one signed checkpoint) to the chain of `pod` of identity `agent` in
/// `namespace`: register its key if the chain is new, refuse another key or a checkpoint
/// that does not extend the last one, keep the stored set bounded.
pub async fn store(
    client: &kube::Client,
    namespace: &str,
    agent: &str,
    pod: &str,
    line: &str,
) -> Result<Stored, CheckpointStoreError> {
    let line = line.trim();
    if line.len() > MAX_LINE_BYTES {
        return Err(CheckpointStoreError::Invalid(format!(
            "the checkpoint line is {} bytes, more than {MAX_LINE_BYTES}",
            line.len()
        )));
    }
    let (cp, public_key) =
        verify_line(line).map_err(|e| CheckpointStoreError::Invalid(e.to_string()))?;
    let name = chain_name(agent, pod)?;
    let api: kube::Api<AuditCheckpoint> = kube::Api::namespaced(client.clone(), namespace);
    let api_err = |e: kube::Error| CheckpointStoreError::Api(e.to_string());
    for _ in 0..5 {
        let mut obj = match api.get_opt(&name).await.map_err(api_err)? {
            Some(o) => o,
            None => {
                let new = AuditCheckpoint {
                    metadata: kube::api::ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(namespace.to_string()),
                        labels: Some(
                            [
                                ("tollgate.dev/agent".to_string(), agent.to_string()),
                                (
                                    "tollgate.dev/pod".to_string(),
                                    pod.chars().take(63).collect(),
                                ),
                            ]
                            .into(),
                        ),
                        ..Default::default()
                    },
                    spec: AuditCheckpointSpec {
                        agent: agent.to_string(),
                        pod: pod.to_string(),
                        public_key: public_key.clone(),
                        key_id: cp.key_id.clone(),
                    },
                    status: None,
                };
                match api.create(&PostParams::default(), &new).await {
                    Ok(o) => {
                        tracing::info!(%namespace, chain = %name, key_id = %cp.key_id, "audit checkpoint key registered");
                        o
                    }
                    // Created meanwhile (another replica, a retry): read it again.
                    Err(kube::Error::Api(e)) if e.code == 409 => continue,
                    Err(e) => return Err(api_err(e)),
                }
            }
        };
        if obj.spec.public_key != public_key || obj.spec.agent != agent || obj.spec.pod != pod {
            let e = CheckpointStoreError::KeyMismatch {
                chain: name.clone(),
                registered: obj.spec.key_id.clone(),
                got: cp.key_id,
            };
            mark(&api, &name, Some(&e)).await;
            return Err(e);
        }
        let mut status = obj.status.clone().unwrap_or_default();
        if let Some(last) = status.checkpoints.last() {
            if last == line {
                return Ok(Stored::Duplicate);
            }
            let (prev, _) = verify_line(last).map_err(|e| {
                CheckpointStoreError::Api(format!("the stored checkpoint does not verify: {e}"))
            })?;
            if let Err(why) = extends(&prev, &cp) {
                let e = CheckpointStoreError::NotExtending {
                    chain: name.clone(),
                    last_seq: prev.seq,
                    why,
                };
                mark(&api, &name, Some(&e)).await;
                return Err(e);
            }
        }
        append(&mut status, line, &cp);
        set_intact(&mut status, None);
        obj.status = Some(status);
        match api
            .replace_status(&name, &PostParams::default(), &obj)
            .await
        {
            Ok(_) => return Ok(Stored::Appended),
            // Another write came first: re-read and check against what it stored.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(api_err(e)),
        }
    }
    Err(CheckpointStoreError::Api(
        "the AuditCheckpoint kept changing".into(),
    ))
}

/// The `Intact` condition: `True` after an append, `False` with the refusal.
fn set_intact(status: &mut AuditCheckpointStatus, refused: Option<&CheckpointStoreError>) {
    let (value, reason, message) = match refused {
        None => (
            "True",
            "Extended",
            "the latest checkpoint extends the chain".to_string(),
        ),
        Some(e @ CheckpointStoreError::KeyMismatch { .. }) => {
            ("False", "KeyMismatch", e.to_string())
        }
        Some(e) => ("False", "NotExtending", e.to_string()),
    };
    if status
        .conditions
        .iter()
        .any(|c| c.type_ == "Intact" && c.status == value && c.message == message)
    {
        return;
    }
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    status.conditions.retain(|c| c.type_ != "Intact");
    status.conditions.push(crate::crd::Condition {
        type_: "Intact".into(),
        status: value.into(),
        reason: reason.into(),
        message: message.chars().take(1000).collect(),
        last_transition_time: now,
        observed_generation: 0,
    });
}

/// Record a refusal on the chain (best effort: the refusal stands and is counted either way).
/// The stored checkpoints are not touched; the next good checkpoint sets `Intact` again.
async fn mark(
    api: &kube::Api<AuditCheckpoint>,
    name: &str,
    refused: Option<&CheckpointStoreError>,
) {
    let Ok(mut obj) = api.get(name).await else {
        return;
    };
    let mut status = obj.status.clone().unwrap_or_default();
    set_intact(&mut status, refused);
    if obj.status.as_ref() == Some(&status) {
        return;
    }
    obj.status = Some(status);
    if let Err(e) = api.replace_status(name, &PostParams::default(), &obj).await {
        tracing::warn!(chain = name, error = %e, "cannot mark the audit checkpoint chain");
    }
}

/// Append one line and drop the oldest beyond the bounds.
fn append(
    status: &mut AuditCheckpointStatus,
    line: &str,
    cp: &tollgate_proxy::audit::checkpoint::Checkpoint,
) {
    status.checkpoints.push(line.to_string());
    status.accepted += 1;
    status.seq = cp.seq;
    status.head = cp.head.clone();
    status.last_checkpoint_time = cp.ts.clone();
    let bytes = |s: &AuditCheckpointStatus| s.checkpoints.iter().map(String::len).sum::<usize>();
    while status.checkpoints.len() > 1
        && (status.checkpoints.len() > MAX_STORED_CHECKPOINTS
            || bytes(status) > MAX_STORED_CHECKPOINT_BYTES)
    {
        status.checkpoints.remove(0);
        status.pruned += 1;
    }
}

/// `POST /v1/audit/checkpoints`: authenticate the sidecar, check the pod it claims against
/// the pod its token is bound to, and [`store`] the checkpoint.
pub async fn handle(
    st: std::sync::Arc<crate::server::ServerState>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use crate::server::json;
    let (parts, body) = req.into_parts();
    let body = crate::server::body_bytes(body).await;
    let count = |result: &str| {
        st.metrics
            .audit_checkpoints
            .with_label_values(&[result])
            .inc()
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        count("invalid");
        return json(
            400,
            serde_json::json!({"error": "bad_request", "reason": "body is not JSON"}),
        );
    };
    let agent = v["agent"].as_str().unwrap_or("");
    let (served, bound_pod) = match crate::server::authorize_bound(&st, &parts.headers, agent).await
    {
        Ok(x) => x,
        Err(r) => {
            count("unauthorized");
            return r;
        }
    };
    let pod = v["pod"].as_str().unwrap_or("");
    if let Some(bound) = bound_pod.filter(|b| b != pod) {
        count("unauthorized");
        tracing::warn!(%agent, claimed = %pod, %bound, "audit checkpoint for another pod refused");
        return json(
            403,
            serde_json::json!({"error": "forbidden", "reason": format!("the token is bound to pod {bound}, not {pod}")}),
        );
    }
    let name = agent.rsplit('/').next().unwrap_or(agent);
    let line = v["checkpoint"].as_str().unwrap_or("");
    match store(&st.client, &served.namespace, name, pod, line).await {
        Ok(stored) => {
            count(match stored {
                Stored::Appended => "stored",
                Stored::Duplicate => "duplicate",
            });
            json(
                200,
                serde_json::json!({"stored": stored == Stored::Appended}),
            )
        }
        Err(e) => {
            count(e.label());
            tracing::warn!(%agent, %pod, error = %e, "audit checkpoint refused");
            json(
                e.status(),
                serde_json::json!({"error": e.label(), "reason": e.to_string()}),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pod names must be object names; the chain is `<identity>.<pod>`.
    #[test]
    fn chain_names() {
        assert_eq!(
            chain_name("billing", "billing-7d9f").unwrap(),
            "billing.billing-7d9f"
        );
        for bad in ["", "Billing", "a/b", "-x", "x.", &"a".repeat(254)] {
            assert!(chain_name("billing", bad).is_err(), "{bad:?}");
        }
    }

    /// The stored set stays within both bounds, oldest dropped first, and counts what it drops.
    #[test]
    fn the_stored_set_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let key =
            tollgate_proxy::audit::checkpoint::CheckpointKey::load_or_create(&dir.path().join("k"))
                .unwrap();
        let mut status = AuditCheckpointStatus::default();
        for seq in 1..=(MAX_STORED_CHECKPOINTS as u64 + 10) {
            let cp = tollgate_proxy::audit::checkpoint::Checkpoint {
                v: 1,
                ts: format!("2026-01-01T00:00:{:02}Z", seq % 60),
                seq,
                head: "ab".repeat(32),
                files: vec![],
                key_id: key.id().into(),
            };
            append(&mut status, &key.sign_line(&cp), &cp);
        }
        assert_eq!(status.checkpoints.len(), MAX_STORED_CHECKPOINTS);
        assert_eq!(status.pruned, 10);
        assert_eq!(status.accepted, MAX_STORED_CHECKPOINTS as u64 + 10);
        assert_eq!(status.seq, MAX_STORED_CHECKPOINTS as u64 + 10);
        let (first, _) = verify_line(&status.checkpoints[0]).unwrap();
        assert_eq!(first.seq, 11, "the oldest went first");
        // A few huge lines are bounded by bytes.
        let mut big = AuditCheckpointStatus::default();
        let line = "x".repeat(MAX_LINE_BYTES);
        let cp = verify_line(&status.checkpoints[0]).unwrap().0;
        for _ in 0..20 {
            append(&mut big, &line, &cp);
        }
        assert!(
            big.checkpoints.iter().map(String::len).sum::<usize>() <= MAX_STORED_CHECKPOINT_BYTES
        );
    }
}
