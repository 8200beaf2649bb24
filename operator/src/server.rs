//! The snapshot API sidecars long-poll, and the operator's health and metrics.
//!
//! `GET /v1/snapshot?agent=NS/NAME&version=N&hash=H[&timeoutSeconds=T]` answers at once when
//! the agent's snapshot differs from the one the sidecar holds (hash `H`), otherwise holds the
//! request until it changes or the timeout passes and then answers
//! `{"version": N, "unchanged": true}` — the heartbeat that tells the sidecar the operator is
//! alive. The caller authenticates with its projected ServiceAccount token
//! (audience `tollgate`), checked by `TokenReview` (asked again every 30 s; a reviewed token
//! keeps working through an API-server outage until it expires); it gets only the snapshot of
//! the identity bound to that ServiceAccount, anything else is 403.
//!
//! Sidecars report on the same authenticated channel: approval requests and their use, apply
//! results, spend, and signed audit checkpoints (`POST /v1/audit/checkpoints`, stored by
//! [`crate::audit_checkpoints`]).
//!
//! (One file, about 870 lines: the long-poll, the report endpoints and health share one
//! authenticated request reader; splitting it would scatter the wire contract.)

use crate::hub::Hub;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// Audience sidecar tokens are minted for.
pub const AUDIENCE: &str = "tollgate";

/// How long a TokenReview answer is trusted before it is asked again.
const REVIEW_FRESH: Duration = Duration::from_secs(30);

/// Bound on serving a reviewed token through an API-server outage when the token carries no
/// `exp` claim (projected ServiceAccount tokens always do).
const NO_EXP_BOUND: Duration = Duration::from_secs(600);

struct Reviewed {
    user: Option<String>,
    /// The pod the token is bound to (TokenReview's `authentication.kubernetes.io/pod-name`).
    pod: Option<String>,
    at: Instant,
    /// Until when a successful review may stand in for a new one (the token's `exp`).
    valid_until: Instant,
}

/// Checks bearer tokens: TokenReview against the API server, asked again every 30 s. A
/// token that was reviewed successfully keeps working through an API-server outage until it
/// expires (its `exp` claim), so an outage does not stop sidecars; a refused token is never
/// let through, and a token never reviewed gets 503 while the API server is down.
pub struct Authenticator {
    client: kube::Client,
    refresh: Duration,
    cache: Mutex<HashMap<String, Reviewed>>,
    /// Reviews answered from the cache because the API server failed.
    pub served_stale: std::sync::atomic::AtomicU64,
}

/// The `exp` claim of a JWT, read without verifying it (the TokenReview verified the token;
/// this only bounds how long that verdict is reused).
fn token_expiry(token: &str) -> Option<std::time::SystemTime> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = v["exp"].as_u64()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(exp))
}

impl Authenticator {
    /// Use this client for TokenReviews.
    pub fn new(client: kube::Client) -> Self {
        Self::with_refresh(client, REVIEW_FRESH)
    }

    /// Ask the API server again after `refresh` (tests use zero).
    pub fn with_refresh(client: kube::Client, refresh: Duration) -> Self {
        Self {
            client,
            refresh,
            cache: Mutex::default(),
            served_stale: Default::default(),
        }
    }

    /// The authenticated username, or `None`.
    pub async fn review(&self, token: &str) -> Result<Option<String>, String> {
        Ok(self.review_bound(token).await?.map(|(user, _)| user))
    }

    /// The authenticated username and, for a pod-bound token, the pod's name; `None` when
    /// the token is refused.
    pub async fn review_bound(
        &self,
        token: &str,
    ) -> Result<Option<(String, Option<String>)>, String> {
        use sha2::Digest;
        let k = hex::encode(sha2::Sha256::digest(token.as_bytes()));
        let now = Instant::now();
        if let Some(r) = self.cache.lock().expect("auth cache").get(&k) {
            if r.at.elapsed() < self.refresh && now < r.valid_until {
                return Ok(r.user.clone().map(|u| (u, r.pod.clone())));
            }
        }
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![AUDIENCE.into()]),
            },
            ..Default::default()
        };
        let out = match api.create(&PostParams::default(), &review).await {
            Ok(out) => out,
            Err(e) => {
                // API server unreachable: a token it already accepted stands until it expires.
                let cache = self.cache.lock().expect("auth cache");
                if let Some(r) = cache
                    .get(&k)
                    .filter(|r| r.user.is_some() && now < r.valid_until)
                {
                    self.served_stale
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(error = %e, "TokenReview failed; using the earlier review of this token until it expires");
                    return Ok(r.user.clone().map(|u| (u, r.pod.clone())));
                }
                return Err(format!("TokenReview failed: {e}"));
            }
        };
        let status = out.status.unwrap_or_default();
        let (user, pod) = match status.user.filter(|_| status.authenticated == Some(true)) {
            Some(u) => (
                u.username,
                u.extra
                    .and_then(|mut x| x.remove("authentication.kubernetes.io/pod-name"))
                    .and_then(|v| v.into_iter().next()),
            ),
            None => (None, None),
        };
        let valid_until = match (&user, token_expiry(token)) {
            (None, _) => now + REVIEW_FRESH,
            (Some(_), Some(exp)) => {
                now + exp
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or(Duration::ZERO)
            }
            (Some(_), None) => now + NO_EXP_BOUND,
        };
        let mut cache = self.cache.lock().expect("auth cache");
        if cache.len() > 10_000 {
            cache.retain(|_, r| r.valid_until > now);
            if cache.len() > 10_000 {
                cache.clear();
            }
        }
        cache.insert(
            k,
            Reviewed {
                user: user.clone(),
                pod: pod.clone(),
                at: now,
                valid_until,
            },
        );
        Ok(user.map(|u| (u, pod)))
    }
}

/// Spend reports: (agent, sidecar instance) → (UTC day, USD per tenant).
pub type UsageReports =
    HashMap<(String, String), (String, std::collections::BTreeMap<String, f64>)>;

/// Snapshots sidecars rejected: (agent, sidecar instance) → (snapshot hash, error).
pub type Rejections = HashMap<(String, String), (String, String)>;

/// A tool definition a sidecar reported seeing advertised (`POST /v1/tools/observed`).
#[derive(Clone, Debug, PartialEq)]
pub struct ReportedDefinition {
    /// Hex sha256 of the canonical definition.
    pub sha256: String,
    /// The canonical definition, when the sidecar kept it (bounded there).
    pub definition: Option<serde_json::Value>,
    /// The reporting identity, `namespace/name`.
    pub agent: String,
    /// When the sidecar saw it (RFC 3339, as reported).
    pub observed_at: String,
}

/// Tool definitions sidecars reported: (namespace, Tool name) → (agent, sidecar instance) →
/// what that sidecar last saw.
pub type ObservedTools = HashMap<(String, String), HashMap<(String, String), ReportedDefinition>>;

/// Shared by the server handlers.
pub struct ServerState {
    /// Snapshots.
    pub hub: Arc<Hub>,
    /// Token checks.
    pub auth: Authenticator,
    /// API client (creates ApprovalRequests).
    pub client: kube::Client,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Ready once the caches synced.
    pub ready: std::sync::atomic::AtomicBool,
    /// Leader (writes status).
    pub leader: std::sync::atomic::AtomicBool,
    /// Spend reports: (agent, sidecar instance) → (UTC day, USD per tenant).
    pub usage: Mutex<UsageReports>,
    /// Reconciles that sidecar reports ask for (status shows new spend, a rejection).
    pub triggers: Arc<crate::controller::Triggers>,
    /// Snapshots sidecars rejected: (agent, sidecar instance) → (snapshot hash, the
    /// sidecar's error). The identity is `Ready=False` while a rejected hash is the one served.
    pub rejected: Mutex<Rejections>,
    /// Tool definitions sidecars reported seeing advertised (their `Tool`s' `DefinitionPinned`
    /// condition and `observedDefinition`).
    pub tool_definitions: Mutex<ObservedTools>,
    /// The interception CA whose signing certificate and key go with every snapshot answer
    /// (so a rotation reaches running sidecars; the hub's epoch changes with it).
    pub intercept_ca: std::sync::OnceLock<Arc<crate::pki::CaDistribution>>,
}

impl ServerState {
    /// Spend today per agent and per tenant, summed over the sidecars that reported `day`.
    pub fn spend_today(&self, day: &str) -> (HashMap<String, f64>, HashMap<String, f64>) {
        let (mut agents, mut tenants) = (HashMap::new(), HashMap::new());
        for ((agent, _), (d, by_tenant)) in self.usage.lock().expect("usage lock").iter() {
            if d != day {
                continue;
            }
            for (t, usd) in by_tenant {
                *agents.entry(agent.clone()).or_insert(0.0) += usd;
                *tenants.entry(t.clone()).or_insert(0.0) += usd;
            }
        }
        (agents, tenants)
    }
}

pub(crate) fn json(status: u16, v: serde_json::Value) -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("static"));
    r
}

fn query(q: &str) -> HashMap<String, String> {
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

/// Handle one request.
pub async fn handle(
    st: Arc<ServerState>,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Full<Bytes>> {
    use std::sync::atomic::Ordering::Relaxed;
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/healthz" => return json(200, serde_json::json!({"ok": true})),
        "/readyz" => {
            let ready = st.ready.load(Relaxed);
            return json(
                if ready { 200 } else { 503 },
                serde_json::json!({"ready": ready}),
            );
        }
        "/metrics" => {
            let m = &st.metrics;
            let reused = st.auth.served_stale.load(Relaxed);
            m.token_reviews_reused
                .inc_by(reused.saturating_sub(m.token_reviews_reused.get()));
            let mut r = hyper::Response::new(Full::new(Bytes::from(m.render())));
            r.headers_mut().insert(
                "content-type",
                "text/plain; version=0.0.4".parse().expect("static"),
            );
            return r;
        }
        "/v1/snapshot" => {}
        "/v1/approvals" if req.method() == http::Method::POST => return approval(st, req).await,
        "/v1/approvals/consume" if req.method() == http::Method::POST => {
            return consume(st, req).await
        }
        "/v1/approvals/void" if req.method() == http::Method::POST => return void(st, req).await,
        "/v1/snapshot/report" if req.method() == http::Method::POST => {
            return snapshot_report(st, req).await
        }
        "/v1/usage" if req.method() == http::Method::POST => return usage(st, req).await,
        "/v1/tools/observed" if req.method() == http::Method::POST => {
            return tools_observed(st, req).await
        }
        "/v1/audit/checkpoints" if req.method() == http::Method::POST => {
            return crate::audit_checkpoints::handle(st, req).await
        }
        _ => return json(404, serde_json::json!({"error": "not_found"})),
    }
    let q = query(req.uri().query().unwrap_or(""));
    let Some(agent) = q.get("agent").cloned() else {
        return json(
            400,
            serde_json::json!({"error": "bad_request", "reason": "agent=NAMESPACE/NAME is required"}),
        );
    };
    let version: u64 = q.get("version").and_then(|v| v.parse().ok()).unwrap_or(0);
    let hash = q.get("hash").cloned().unwrap_or_default();
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(30)
        .clamp(1, 60);
    if let Err(r) = authorize(&st, req.headers(), &agent).await {
        return r;
    }
    st.metrics.connected.inc();
    let newer = st
        .hub
        .wait_changed(&agent, &hash, Duration::from_secs(timeout))
        .await;
    st.metrics.connected.dec();
    match newer {
        Some(s) => {
            let credentials = credentials(&st.client, &s).await;
            let mut body = serde_json::json!({"version": s.version, "hash": s.hash, "config": *s.config, "credentials": credentials});
            if let Some(ca) = st.intercept_ca.get() {
                let m = ca.material();
                body["interceptCa"] = serde_json::json!({"cert": m.cert, "key": m.key});
            }
            json(200, body)
        }
        None => json(
            200,
            serde_json::json!({"version": version, "hash": hash, "unchanged": true}),
        ),
    }
}

/// The tool credentials a snapshot references (`<secret>/<key>` under
/// [`crate::build::SECRET_MOUNT`]), read from the identity's namespace and delivered with the
/// snapshot over the authenticated channel, so a Tool added to a running identity works in
/// pods created before it (their Secret mounts are fixed at injection). A Secret that cannot
/// be read is left out: the sidecar then falls back to the mounted file, and rejects the
/// snapshot (reported, `Ready=False`) if that is missing too.
async fn credentials(
    client: &kube::Client,
    s: &crate::hub::Served,
) -> serde_json::Map<String, serde_json::Value> {
    use k8s_openapi::api::core::v1::Secret;
    let mut out = serde_json::Map::new();
    let prefix = format!("{}/", crate::build::SECRET_MOUNT);
    let api: kube::Api<Secret> = kube::Api::namespaced(client.clone(), &s.namespace);
    let mut secrets: HashMap<String, Option<Secret>> = HashMap::new();
    for t in s.config["tools"].as_array().into_iter().flatten() {
        let Some(path) = t["credentials"]["valueFrom"]["file"].as_str() else {
            continue;
        };
        let Some((name, key)) = path.strip_prefix(&prefix).and_then(|r| r.split_once('/')) else {
            continue;
        };
        if !secrets.contains_key(name) {
            let got = match api.get_opt(name).await {
                Ok(got) => got,
                Err(e) => {
                    tracing::warn!(namespace = %s.namespace, secret = name, error = %e, "cannot read a tool's credential Secret");
                    None
                }
            };
            secrets.insert(name.to_string(), got);
        }
        let value = secrets[name]
            .as_ref()
            .and_then(|sec| sec.data.as_ref())
            .and_then(|d| d.get(key))
            .and_then(|v| String::from_utf8(v.0.clone()).ok());
        if let Some(v) = value {
            out.insert(format!("{name}/{key}"), serde_json::Value::String(v));
        }
    }
    out
}

/// Authenticate the bearer token (TokenReview) and check that it is the ServiceAccount the
/// `agent`'s identity is bound to: the one gate of every sidecar-facing endpoint. A refusal is
/// a JSON error, counted in `tollgate_operator_snapshot_refused_total` and logged.
async fn authorize(
    st: &ServerState,
    headers: &http::HeaderMap,
    agent: &str,
) -> Result<crate::hub::Served, hyper::Response<Full<Bytes>>> {
    authorize_bound(st, headers, agent).await.map(|(s, _)| s)
}

/// [`authorize`], also answering the pod the token is bound to (when it is).
pub(crate) async fn authorize_bound(
    st: &ServerState,
    headers: &http::HeaderMap,
    agent: &str,
) -> Result<(crate::hub::Served, Option<String>), hyper::Response<Full<Bytes>>> {
    let refuse = |reason: String| {
        st.metrics.refused.inc();
        tracing::warn!(%agent, %reason, "sidecar request refused");
        json(
            403,
            serde_json::json!({"error": "forbidden", "reason": reason}),
        )
    };
    let Some(token) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return Err(refuse("no bearer token".into()));
    };
    let (user, pod) = match st.auth.review_bound(token).await {
        Ok(Some(u)) => u,
        Ok(None) => {
            return Err(refuse(
                "the token is not valid for audience tollgate".into(),
            ))
        }
        Err(e) => {
            return Err(json(
                503,
                serde_json::json!({"error": "unavailable", "reason": e}),
            ))
        }
    };
    match st.hub.get(agent) {
        Some(s)
            if user
                == format!(
                    "system:serviceaccount:{}:{}",
                    s.namespace, s.service_account
                ) =>
        {
            Ok((s, pod))
        }
        _ => Err(refuse(format!("{user} may not act for {agent}"))),
    }
}

/// The JSON body of a sidecar's report (`POST /v1/approvals`, `/v1/approvals/consume`,
/// `/v1/snapshot/report`, `/v1/usage`), once its token is the ServiceAccount of the identity
/// named in `agent`: a 400 when the body is not JSON, [`authorize`]'s refusal otherwise.
async fn sidecar_report(
    st: &ServerState,
    req: hyper::Request<Incoming>,
) -> Result<(serde_json::Value, crate::hub::Served), hyper::Response<Full<Bytes>>> {
    let (parts, body) = req.into_parts();
    let body = body_bytes(body).await;
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return Err(json(
            400,
            serde_json::json!({"error": "bad_request", "reason": "body is not JSON"}),
        ));
    };
    let agent = v["agent"].as_str().unwrap_or("");
    let served = authorize(st, &parts.headers, agent).await?;
    Ok((v, served))
}

/// `POST /v1/approvals`: a sidecar asks for an `ApprovalRequest` for a held call, in its own
/// identity's namespace, named by the call's approval id (so the grant matches it).
async fn approval(
    st: Arc<ServerState>,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let (v, served) = match sidecar_report(&st, req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let agent = v["agent"].as_str().unwrap_or("");
    let id = v["id"].as_str().unwrap_or("");
    let valid = !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return json(
            400,
            serde_json::json!({"error": "bad_request", "reason": "id must be a DNS label"}),
        );
    }
    let name = agent.rsplit('/').next().unwrap_or(agent);
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let obj = crate::crd::ApprovalRequest {
        metadata: kube::api::ObjectMeta {
            name: Some(id.to_string()),
            namespace: Some(served.namespace.clone()),
            labels: Some([("tollgate.dev/agent".to_string(), name.to_string())].into()),
            ..Default::default()
        },
        spec: crate::crd::ApprovalRequestSpec {
            key: s("key"),
            agent: name.to_string(),
            service_account: served.service_account.clone(),
            tenant: s("tenant"),
            run: s("run"),
            tool: s("tool"),
            summary: s("summary"),
            reasons: v["reasons"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            input_preview: Some(v["inputPreview"].clone()),
            expires_at: s("expiresAt"),
        },
        status: None,
    };
    let api: kube::Api<crate::crd::ApprovalRequest> =
        kube::Api::namespaced(st.client.clone(), &served.namespace);
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => json(201, serde_json::json!({"created": id})),
        Err(kube::Error::Api(e)) if e.code == 409 => json(200, serde_json::json!({"exists": id})),
        Err(e) => json(
            502,
            serde_json::json!({"error": "api_error", "reason": e.to_string()}),
        ),
    }
}

/// Why a single-use approval cannot be consumed.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// No such request for this agent.
    #[error("no approval request {0} for this agent")]
    NotFound(String),
    /// Not approved (pending or denied).
    #[error("approval {0} is not approved")]
    NotApproved(String),
    /// Someone used it first.
    #[error("approval {id} was single-use and was already used by {by} at {at}")]
    AlreadyUsed {
        /// Request name.
        id: String,
        /// `consumedBy`.
        by: String,
        /// `consumedAt`.
        at: String,
    },
    /// The API server did not answer or kept conflicting.
    #[error("cannot record the approval's use: {0}")]
    Api(String),
}

impl ConsumeError {
    fn status(&self) -> u16 {
        match self {
            Self::NotFound(_) => 404,
            Self::NotApproved(_) | Self::AlreadyUsed { .. } => 409,
            Self::Api(_) => 503,
        }
    }
}

/// Record the first use of a single-use approval in its `ApprovalRequest` status. The write is
/// a `replace_status` carrying the `resourceVersion` read, so the API server arbitrates: of two
/// sidecars (or two operator replicas) racing, one write wins and the other gets a conflict,
/// re-reads, and sees the approval used.
pub async fn consume_approval(
    client: &kube::Client,
    namespace: &str,
    agent: &str,
    id: &str,
    by: &str,
) -> Result<(), ConsumeError> {
    let api: kube::Api<crate::crd::ApprovalRequest> =
        kube::Api::namespaced(client.clone(), namespace);
    for _ in 0..5 {
        let mut obj = api
            .get_opt(id)
            .await
            .map_err(|e| ConsumeError::Api(e.to_string()))?
            .filter(|a| a.spec.agent == agent)
            .ok_or_else(|| ConsumeError::NotFound(id.into()))?;
        let mut status = obj.status.clone().unwrap_or_default();
        if let Some(at) = &status.consumed_at {
            return Err(ConsumeError::AlreadyUsed {
                id: id.into(),
                by: status.consumed_by.clone().unwrap_or_default(),
                at: at.clone(),
            });
        }
        if status.phase.as_deref() != Some("Approved") {
            return Err(ConsumeError::NotApproved(id.into()));
        }
        status.consumed_at = Some(
            time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        );
        status.consumed_by = Some(by.chars().take(128).collect());
        obj.status = Some(status);
        match api.replace_status(id, &PostParams::default(), &obj).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(ConsumeError::Api(e.to_string())),
        }
    }
    Err(ConsumeError::Api(
        "the ApprovalRequest kept changing".into(),
    ))
}

/// `POST /v1/approvals/consume`: a sidecar is about to forward a call on a single-use
/// approval and asks to record the use; only a `200` lets the call through.
async fn consume(
    st: Arc<ServerState>,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let (v, served) = match sidecar_report(&st, req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let agent = v["agent"].as_str().unwrap_or("");
    let id = v["id"].as_str().unwrap_or("");
    let name = agent.rsplit('/').next().unwrap_or(agent);
    let by = format!("{agent} ({})", v["instance"].as_str().unwrap_or("?"));
    match consume_approval(&st.client, &served.namespace, name, id, &by).await {
        Ok(()) => {
            tracing::info!(%agent, approval = id, "single-use approval consumed");
            json(200, serde_json::json!({"consumed": id}))
        }
        Err(e) => {
            tracing::warn!(%agent, approval = id, error = %e, "approval use refused");
            json(
                e.status(),
                serde_json::json!({"error": "approval_not_consumable", "reason": e.to_string()}),
            )
        }
    }
}

/// `POST /v1/approvals/void`: a kill switch engaged in a sidecar voided these pending
/// requests of its identity; each still `Pending` is marked `Voided` (a final phase: it can no
/// longer be approved, and no grant for it is delivered). The write carries the
/// `resourceVersion` read, so a decision that lands first wins and is left alone.
async fn void(st: Arc<ServerState>, req: hyper::Request<Incoming>) -> hyper::Response<Full<Bytes>> {
    let (v, served) = match sidecar_report(&st, req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let agent = v["agent"].as_str().unwrap_or("");
    let name = agent.rsplit('/').next().unwrap_or(agent);
    let api: kube::Api<crate::crd::ApprovalRequest> =
        kube::Api::namespaced(st.client.clone(), &served.namespace);
    let mut voided = Vec::new();
    for item in v["voided"].as_array().into_iter().flatten().take(100) {
        let id = item["id"].as_str().unwrap_or("");
        let Ok(Some(mut obj)) = api.get_opt(id).await else {
            continue;
        };
        let mut status = obj.status.clone().unwrap_or_default();
        let pending = status.phase.as_deref().is_none_or(|p| p == "Pending");
        if obj.spec.agent != name || !pending {
            continue;
        }
        status.phase = Some("Voided".into());
        status.reason = item["reason"]
            .as_str()
            .map(|r| r.chars().take(256).collect());
        status.decided_at = Some(
            time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        );
        obj.status = Some(status);
        match api.replace_status(id, &PostParams::default(), &obj).await {
            Ok(_) => voided.push(id.to_string()),
            Err(e) => {
                tracing::warn!(%agent, approval = id, error = %e, "cannot void the approval request")
            }
        }
    }
    tracing::info!(%agent, voided = ?voided, "approval requests voided by a kill switch");
    json(200, serde_json::json!({"voided": voided}))
}

/// `POST /v1/snapshot/report`: a sidecar could not apply the snapshot with `hash` (`error`
/// set), or applied one after a rejection (`error` null).
async fn snapshot_report(
    st: Arc<ServerState>,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let v = match sidecar_report(&st, req).await {
        Ok((v, _)) => v,
        Err(r) => return r,
    };
    let agent = v["agent"].as_str().unwrap_or("").to_string();
    let instance: String = v["instance"]
        .as_str()
        .unwrap_or("")
        .chars()
        .take(64)
        .collect();
    let hash = v["hash"].as_str().unwrap_or("").to_string();
    let mut map = st.rejected.lock().expect("rejected lock");
    match v["error"].as_str() {
        Some(error) => {
            let error: String = error.chars().take(1000).collect();
            st.metrics.snapshots_rejected.inc();
            tracing::warn!(%agent, %instance, %hash, %error, "a sidecar rejected its snapshot");
            if map.len() > 100_000 {
                map.clear();
            }
            map.insert((agent.clone(), instance), (hash, error));
        }
        None => {
            tracing::info!(%agent, %instance, "a sidecar applied its snapshot after a rejection");
            map.remove(&(agent.clone(), instance));
        }
    }
    drop(map);
    st.triggers.reconcile_agent(&agent);
    json(200, serde_json::json!({"ok": true}))
}

/// `POST /v1/usage`: a sidecar's spend today, by tenant, for its own identity.
async fn usage(
    st: Arc<ServerState>,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let v = match sidecar_report(&st, req).await {
        Ok((v, _)) => v,
        Err(r) => return r,
    };
    let agent = v["agent"].as_str().unwrap_or("").to_string();
    let by_tenant: std::collections::BTreeMap<String, f64> = v["spendUsd"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, x)| {
                    x.as_f64()
                        .filter(|f| f.is_finite() && *f >= 0.0)
                        .map(|f| (k.clone(), f))
                })
                .collect()
        })
        .unwrap_or_default();
    let key = (
        agent,
        v["instance"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(64)
            .collect(),
    );
    let day = v["day"].as_str().unwrap_or("").chars().take(10).collect();
    let mut usage = st.usage.lock().expect("usage lock");
    if usage.len() > 100_000 {
        usage.clear();
    }
    let agent = key.0.clone();
    usage.insert(key, (day, by_tenant));
    drop(usage);
    st.triggers.reconcile_agent(&agent);
    json(200, serde_json::json!({"ok": true}))
}

/// Most tools one report may carry, and the most characters kept of a reported field.
const MAX_REPORTED_TOOLS: usize = 256;
const MAX_REPORTED_DEFINITION: usize = 16 * 1024;

/// `POST /v1/tools/observed`: the MCP tool definitions a sidecar saw its servers advertise,
/// `{"agent", "instance", "tools": {"<Tool name>": {"sha256", "definition", "observedAt"}}}`.
/// Only Tools of the identity (its `spec.tools`, in its namespace) are taken; each reconciles
/// that Tool's status.
async fn tools_observed(
    st: Arc<ServerState>,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let (v, served) = match sidecar_report(&st, req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let agent = v["agent"].as_str().unwrap_or("").to_string();
    let instance: String = v["instance"]
        .as_str()
        .unwrap_or("")
        .chars()
        .take(64)
        .collect();
    let Some(tools) = v["tools"].as_object() else {
        return json(
            400,
            serde_json::json!({"error": "bad_request", "reason": "tools must be an object"}),
        );
    };
    // The identity's Tools, as its served snapshot names them.
    let own: std::collections::HashSet<&str> = served.config["tools"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t["name"].as_str()).collect())
        .unwrap_or_default();
    let mut taken = Vec::new();
    let mut map = st.tool_definitions.lock().expect("tool definitions lock");
    if map.len() > 100_000 {
        map.clear();
    }
    for (name, t) in tools.iter().take(MAX_REPORTED_TOOLS) {
        let sha256 = t["sha256"].as_str().unwrap_or("");
        let valid = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !valid || !own.contains(name.as_str()) {
            continue;
        }
        let definition = t
            .get("definition")
            .filter(|d| d.is_object() && d.to_string().len() <= MAX_REPORTED_DEFINITION)
            .cloned();
        let reported = ReportedDefinition {
            sha256: sha256.to_ascii_lowercase(),
            definition,
            agent: agent.clone(),
            observed_at: t["observedAt"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(40)
                .collect(),
        };
        map.entry((served.namespace.clone(), name.clone()))
            .or_default()
            .insert((agent.clone(), instance.clone()), reported);
        taken.push(name.clone());
    }
    drop(map);
    for name in &taken {
        st.triggers.reconcile_tool(&served.namespace, name);
    }
    json(200, serde_json::json!({"ok": true, "tools": taken}))
}

/// Serve until the listener fails.
pub async fn serve(listener: TcpListener, st: Arc<ServerState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let st = st.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(st, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Read a request body (for tests and small POSTs).
pub async fn body_bytes(b: Incoming) -> Bytes {
    b.collect().await.map(|c| c.to_bytes()).unwrap_or_default()
}
