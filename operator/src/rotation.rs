//! Certificates that rotate before they expire, without downtime.
//!
//! **Webhook serving certificate.** The Secret `tollgate-webhook-tls` holds the signing CA, the
//! serving certificate and, during a rotation, the next CA and the previous one
//! (`rotation.json`). The webhook configurations' `caBundle` must always hold every CA in
//! [`WebhookPki::bundle`]; [`webhook_step`] publishes it first, and only once the API server
//! holds a bundle with the next CA is that CA promoted and a serving certificate signed by it
//! — so the API server trusts every certificate a replica serves, before it is served.
//!
//! **Interception CA.** The Secret `tollgate-intercept-ca` holds the CA sidecars mint leaves
//! with. A next CA is first distributed as *trusted* (alongside the current one) to every
//! identity's namespace — the agents' trust store — and only when every namespace holds it and
//! `grace` has passed (the kubelet refreshes mounted ConfigMaps within about a minute) is it
//! promoted to signing; the snapshot API then delivers it to every sidecar with its next
//! answer, so sidecars sign with it without a restart. The previous CA stays trusted until it
//! expires.
//!
//! The leader decides and writes (with the Secret's `resourceVersion`, so two replicas never
//! both rotate); every replica reloads the serving certificate and CA material from the
//! Secrets on each tick.
//!
//! (One file, about 800 lines: both rotations share the schedule, the Secret layout and the
//! promote-after-distribute rule; its tests live in `rotation/tests.rs`.)

use crate::pki::{CaDistribution, CaMaterial};
use crate::webhook::certs::{issue_ca, issue_serving, Issued};
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The Secret of the webhook certificates.
pub const WEBHOOK_SECRET: &str = "tollgate-webhook-tls";
/// The Secret of the interception CA.
pub const INTERCEPT_SECRET: &str = "tollgate-intercept-ca";
const STATE_KEY: &str = "rotation.json";

/// Why a rotation tick failed (it is retried at the next one).
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// Reading or writing a Secret or webhook configuration failed.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Certificate generation failed.
    #[error(transparent)]
    Cert(#[from] crate::webhook::certs::CertError),
    /// The stored state does not parse.
    #[error("{0}: {1}")]
    State(&'static str, String),
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn pems(pem: &str) -> Vec<String> {
    pem.split_inclusive("-----END CERTIFICATE-----")
        .map(|c| c.trim().to_string())
        .filter(|c| c.contains("BEGIN CERTIFICATE"))
        .collect()
}

/// Do two PEM bundles hold the same certificates (in any order)?
pub fn same_bundle(a: &str, b: &str) -> bool {
    let (mut x, mut y) = (pems(a), pems(b));
    x.sort();
    y.sort();
    x == y
}

fn join(certs: impl IntoIterator<Item = String>) -> String {
    certs
        .into_iter()
        .map(|c| format!("{}\n", c.trim()))
        .collect()
}

/// How long certificates live.
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    /// The webhook CA.
    pub webhook_ca: Duration,
    /// The webhook serving certificate.
    pub serving: Duration,
    /// The interception CA.
    pub intercept_ca: Duration,
    /// How long a next CA is trusted (in every namespace; in the webhook `caBundle`) before
    /// it signs.
    pub grace: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        let day = 86_400;
        Self {
            webhook_ca: Duration::from_secs(3 * 365 * day),
            serving: Duration::from_secs(365 * day),
            intercept_ca: Duration::from_secs(3 * 365 * day),
            grace: Duration::from_secs(180),
        }
    }
}

fn lifetime(d: Duration) -> time::Duration {
    time::Duration::seconds(d.as_secs().max(1) as i64)
}

/// The webhook certificates.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookPki {
    /// The CA signing the serving certificate.
    pub ca: Issued,
    /// A CA being introduced (in the bundle, not yet signing).
    pub next_ca: Option<Issued>,
    /// The CA that signed before the last promotion (in the bundle until it expires).
    pub previous_ca: Option<Issued>,
    /// The serving certificate.
    pub serving: Issued,
}

impl WebhookPki {
    /// The CAs the webhook configurations' `caBundle` must hold.
    pub fn bundle(&self, now: i64) -> String {
        join(
            std::iter::once(&self.ca)
                .chain(self.next_ca.as_ref())
                .chain(self.previous_ca.as_ref().filter(|p| !p.expired(now)))
                .map(|c| c.cert.clone()),
        )
    }
}

/// The next thing the webhook rotation does.
#[derive(Debug, PartialEq, Eq)]
pub enum WebhookStep {
    /// Write [`WebhookPki::bundle`] into the webhook configurations.
    PublishBundle,
    /// Introduce a next CA (the current one is past two thirds of its life).
    AddNextCa,
    /// The API server trusts the next CA: make it the signing CA and serve a certificate
    /// signed by it.
    Promote,
    /// Issue a new serving certificate from the current CA.
    ReissueServing,
    /// Drop the expired previous CA.
    PrunePrevious,
    /// Nothing to do.
    Nothing,
}

/// Decide the next webhook rotation step (pure). `published` is the `caBundle` of every
/// webhook configuration as the API server holds it; a next CA is promoted once it has been
/// published and `grace` has passed since it was made (API servers cache webhook
/// configurations for a moment).
pub fn webhook_step(
    p: &WebhookPki,
    published: &[String],
    grace: Duration,
    now: i64,
) -> WebhookStep {
    let want = p.bundle(now);
    if published.iter().any(|b| !same_bundle(b, &want)) {
        return WebhookStep::PublishBundle;
    }
    if let Some(next) = &p.next_ca {
        return if now - next.not_before >= grace.as_secs() as i64 {
            WebhookStep::Promote
        } else {
            WebhookStep::Nothing
        };
    }
    if p.previous_ca.as_ref().is_some_and(|c| c.expired(now)) {
        return WebhookStep::PrunePrevious;
    }
    if p.ca.due(now) {
        return WebhookStep::AddNextCa;
    }
    if p.serving.due(now) {
        return WebhookStep::ReissueServing;
    }
    WebhookStep::Nothing
}

/// The interception CA.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InterceptPki {
    /// The CA sidecars sign leaves with.
    pub ca: Issued,
    /// A CA being introduced (trusted everywhere, not yet signing).
    pub next_ca: Option<Issued>,
    /// The CA that signed before the last promotion (trusted until it expires).
    pub previous_ca: Option<Issued>,
}

impl InterceptPki {
    /// What injected pods get: every trusted CA, and the signing one.
    pub fn material(&self, now: i64) -> CaMaterial {
        let trusted = join(
            std::iter::once(&self.ca)
                .chain(self.next_ca.as_ref())
                .chain(self.previous_ca.as_ref().filter(|p| !p.expired(now)))
                .map(|c| c.cert.clone()),
        );
        CaMaterial {
            bundle: crate::webhook::inject::trust_bundle(&trusted),
            trusted,
            cert: self.ca.cert.clone(),
            key: self.ca.key.clone(),
        }
    }
}

/// The next thing the interception CA rotation does.
#[derive(Debug, PartialEq, Eq)]
pub enum InterceptStep {
    /// Introduce a next CA, trusted alongside the current one.
    AddNextCa,
    /// Every namespace trusts the next CA and the grace passed: it signs from now on.
    Promote,
    /// Drop the expired previous CA.
    PrunePrevious,
    /// Nothing to do (or waiting for the next CA to reach every namespace).
    Nothing,
}

/// Decide the next interception CA step (pure). `everywhere`: every identity namespace's
/// copies hold the current material (which trusts the next CA).
pub fn intercept_step(
    p: &InterceptPki,
    everywhere: bool,
    grace: Duration,
    now: i64,
) -> InterceptStep {
    if let Some(next) = &p.next_ca {
        return if everywhere && now - next.not_before >= grace.as_secs() as i64 {
            InterceptStep::Promote
        } else {
            InterceptStep::Nothing
        };
    }
    if p.previous_ca.as_ref().is_some_and(|c| c.expired(now)) {
        return InterceptStep::PrunePrevious;
    }
    if p.ca.due(now) {
        return InterceptStep::AddNextCa;
    }
    InterceptStep::Nothing
}

/// The webhook serving certificate, swapped in place when it rotates.
#[derive(Debug)]
pub struct ServingCert {
    current: RwLock<(String, Arc<rustls::sign::CertifiedKey>)>,
}

fn certified(pair: &Issued) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(pair.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(pair.key.as_bytes())
        .map_err(|e| e.to_string())?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(certs, key, &provider)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

impl ServingCert {
    /// Serve `pair`.
    pub fn new(pair: &Issued) -> Result<Self, String> {
        Ok(Self {
            current: RwLock::new((pair.cert.clone(), certified(pair)?)),
        })
    }

    /// Serve `pair` from the next handshake on; true when it changed.
    pub fn set(&self, pair: &Issued) -> Result<bool, String> {
        if self.current.read().expect("serving cert").0 == pair.cert {
            return Ok(false);
        }
        let ck = certified(pair)?;
        *self.current.write().expect("serving cert") = (pair.cert.clone(), ck);
        Ok(true)
    }

    /// A rustls server config resolving to the current certificate.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, String> {
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(self.clone());
        Ok(Arc::new(cfg))
    }
}

impl rustls::server::ResolvesServerCert for ServingCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().expect("serving cert").1.clone())
    }
}

/// A Secret's data with its `resourceVersion`.
async fn read_secret(
    api: &Api<Secret>,
    name: &str,
) -> Result<Option<(BTreeMap<String, String>, Option<String>)>, RotationError> {
    let got = api
        .get_opt(name)
        .await
        .map_err(|source| RotationError::Api {
            what: format!("read Secret {name}"),
            source,
        })?;
    Ok(got.map(|s| {
        let rv = s.metadata.resource_version.clone();
        (crate::pki::secret_data(s), rv)
    }))
}

/// Write a Secret: create it (`rv` None) or replace it conditionally on `rv`. `Ok(false)` on
/// a conflict (another replica wrote first; the next tick reads its version).
async fn write_secret(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    data: BTreeMap<String, String>,
    rv: Option<String>,
) -> Result<bool, RotationError> {
    let s = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            resource_version: rv.clone(),
            ..Default::default()
        },
        string_data: Some(data),
        ..Default::default()
    };
    let r = match rv {
        None => api.create(&PostParams::default(), &s).await,
        Some(_) => api.replace(name, &PostParams::default(), &s).await,
    };
    match r {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(source) => Err(RotationError::Api {
            what: format!("write Secret {name}"),
            source,
        }),
    }
}

fn webhook_data(p: &WebhookPki) -> BTreeMap<String, String> {
    [
        ("ca.crt".to_string(), p.bundle(now())),
        ("tls.crt".to_string(), p.serving.cert.clone()),
        ("tls.key".to_string(), p.serving.key.clone()),
        (
            STATE_KEY.to_string(),
            serde_json::to_string(p).expect("serialises"),
        ),
    ]
    .into()
}

fn intercept_data(p: &InterceptPki) -> BTreeMap<String, String> {
    [
        ("tls.crt".to_string(), p.ca.cert.clone()),
        ("tls.key".to_string(), p.ca.key.clone()),
        ("ca.crt".to_string(), p.material(now()).trusted),
        (
            STATE_KEY.to_string(),
            serde_json::to_string(p).expect("serialises"),
        ),
    ]
    .into()
}

/// Stored data from before rotation existed: the CA key is unknown (webhook) or the validity
/// is (interception CA). The webhook CA is treated as due, so the first tick introduces a
/// CA the operator can sign with; the interception CA's schedule starts now.
fn legacy_webhook(d: &BTreeMap<String, String>, l: &Lifetimes) -> WebhookPki {
    let t = now();
    let old = |cert: &str, key: &str| Issued {
        cert: cert.into(),
        key: key.into(),
        not_before: t - l.webhook_ca.as_secs() as i64,
        not_after: t + 30 * 86_400,
    };
    let get = |k: &str| d.get(k).cloned().unwrap_or_default();
    WebhookPki {
        ca: old(&get("ca.crt"), ""),
        next_ca: None,
        previous_ca: None,
        serving: old(&get("tls.crt"), &get("tls.key")),
    }
}

fn legacy_intercept(d: &BTreeMap<String, String>, l: &Lifetimes) -> InterceptPki {
    let t = now();
    InterceptPki {
        ca: Issued {
            cert: d.get("tls.crt").cloned().unwrap_or_default(),
            key: d.get("tls.key").cloned().unwrap_or_default(),
            not_before: t,
            not_after: t + l.intercept_ca.as_secs() as i64,
        },
        next_ca: None,
        previous_ca: None,
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    d: &BTreeMap<String, String>,
    what: &'static str,
) -> Result<Option<T>, RotationError> {
    d.get(STATE_KEY)
        .map(|s| serde_json::from_str(s).map_err(|e| RotationError::State(what, e.to_string())))
        .transpose()
}

/// The webhook certificates, created when the Secret does not exist yet.
pub async fn load_webhook(
    client: &Client,
    namespace: &str,
    service: &str,
    l: &Lifetimes,
) -> Result<WebhookPki, RotationError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for _ in 0..3 {
        match read_secret(&api, WEBHOOK_SECRET).await? {
            Some((d, _)) => {
                return Ok(parse(&d, WEBHOOK_SECRET)?.unwrap_or_else(|| legacy_webhook(&d, l)))
            }
            None => {
                let ca = issue_ca("tollgate-webhook-ca", lifetime(l.webhook_ca))?;
                let serving = issue_serving(&ca, service, namespace, &[], lifetime(l.serving))?;
                let p = WebhookPki {
                    ca,
                    next_ca: None,
                    previous_ca: None,
                    serving,
                };
                if write_secret(&api, namespace, WEBHOOK_SECRET, webhook_data(&p), None).await? {
                    return Ok(p);
                }
            }
        }
    }
    Err(RotationError::State(WEBHOOK_SECRET, "kept changing".into()))
}

/// The interception CA, created when the Secret does not exist yet.
pub async fn load_intercept(
    client: &Client,
    namespace: &str,
    l: &Lifetimes,
) -> Result<InterceptPki, RotationError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for _ in 0..3 {
        match read_secret(&api, INTERCEPT_SECRET).await? {
            Some((d, _)) => {
                return Ok(parse(&d, INTERCEPT_SECRET)?.unwrap_or_else(|| legacy_intercept(&d, l)))
            }
            None => {
                let p = InterceptPki {
                    ca: issue_ca("Tollgate interception CA", lifetime(l.intercept_ca))?,
                    next_ca: None,
                    previous_ca: None,
                };
                if write_secret(&api, namespace, INTERCEPT_SECRET, intercept_data(&p), None).await?
                {
                    return Ok(p);
                }
            }
        }
    }
    Err(RotationError::State(
        INTERCEPT_SECRET,
        "kept changing".into(),
    ))
}

/// What the rotation loop drives.
pub struct Rotation {
    /// API client.
    pub client: Client,
    /// The operator's namespace (the Secrets).
    pub namespace: String,
    /// The webhook Service (serving certificate names).
    pub service: String,
    /// The webhook configurations' name.
    pub webhook_config_name: String,
    /// Lifetimes.
    pub lifetimes: Lifetimes,
    /// The serving certificate of this replica's webhook listener, if it runs one.
    pub serving: Option<Arc<ServingCert>>,
    /// The interception CA copies.
    pub ca: Arc<CaDistribution>,
    /// The controller context (leadership, hub, triggers, metrics).
    pub ctx: Arc<crate::controller::Context>,
}

const WEBHOOK_KINDS: [(&str, &str); 2] = [
    (
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
    ),
    (
        "validatingwebhookconfigurations",
        "ValidatingWebhookConfiguration",
    ),
];

fn webhook_api(client: &Client, plural: &str, kind: &str) -> Api<kube::api::DynamicObject> {
    let ar = kube::api::ApiResource {
        group: "admissionregistration.k8s.io".into(),
        version: "v1".into(),
        api_version: "admissionregistration.k8s.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    Api::all_with(client.clone(), &ar)
}

impl Rotation {
    /// The `caBundle`s the API server holds (PEM), one per webhook of each configuration.
    async fn published(&self) -> Result<Vec<String>, RotationError> {
        use base64::Engine;
        let mut out = Vec::new();
        for (plural, kind) in WEBHOOK_KINDS {
            let api = webhook_api(&self.client, plural, kind);
            let got = api
                .get_opt(&self.webhook_config_name)
                .await
                .map_err(|source| RotationError::Api {
                    what: format!("read {kind} {}", self.webhook_config_name),
                    source,
                })?;
            let Some(obj) = got else { continue };
            for h in obj.data["webhooks"].as_array().into_iter().flatten() {
                let b64 = h["clientConfig"]["caBundle"].as_str().unwrap_or("");
                let pem = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .unwrap_or_default();
                out.push(pem);
            }
        }
        Ok(out)
    }

    /// Write `bundle` into every webhook of both configurations.
    async fn publish(&self, bundle: &str) -> Result<(), RotationError> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(bundle.as_bytes());
        for (plural, kind) in WEBHOOK_KINDS {
            let api = webhook_api(&self.client, plural, kind);
            let err = |source| RotationError::Api {
                what: format!("update the caBundle of {kind} {}", self.webhook_config_name),
                source,
            };
            let Some(mut obj) = api.get_opt(&self.webhook_config_name).await.map_err(err)? else {
                tracing::warn!(kind, name = %self.webhook_config_name, "webhook configuration not found; caBundle not set");
                continue;
            };
            if let Some(hooks) = obj.data.get_mut("webhooks").and_then(|w| w.as_array_mut()) {
                for h in hooks {
                    h["clientConfig"]["caBundle"] = serde_json::json!(b64);
                }
            }
            api.replace(&self.webhook_config_name, &PostParams::default(), &obj)
                .await
                .map_err(err)?;
        }
        Ok(())
    }

    /// One webhook rotation pass: the leader runs steps until nothing is left (or another
    /// replica wrote first); every replica serves the stored certificate.
    pub async fn webhook_tick(&self) -> Result<(), RotationError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let m = &self.ctx.metrics;
        for _ in 0..6 {
            let Some((d, rv)) = read_secret(&api, WEBHOOK_SECRET).await? else {
                load_webhook(
                    &self.client,
                    &self.namespace,
                    &self.service,
                    &self.lifetimes,
                )
                .await?;
                continue;
            };
            let p: WebhookPki =
                parse(&d, WEBHOOK_SECRET)?.unwrap_or_else(|| legacy_webhook(&d, &self.lifetimes));
            if let Some(s) = &self.serving {
                if s.set(&p.serving)
                    .map_err(|e| RotationError::State(WEBHOOK_SECRET, e))?
                {
                    tracing::info!(
                        not_after = p.serving.not_after,
                        "serving the rotated webhook certificate"
                    );
                }
            }
            m.cert_not_after
                .with_label_values(&["webhook-serving"])
                .set(p.serving.not_after);
            m.cert_not_after
                .with_label_values(&["webhook-ca"])
                .set(p.ca.not_after);
            if !self.ctx.leader() {
                return Ok(());
            }
            let t = now();
            let step = webhook_step(&p, &self.published().await?, self.lifetimes.grace, t);
            let mut next = p.clone();
            match step {
                WebhookStep::Nothing => return Ok(()),
                WebhookStep::PublishBundle => {
                    self.publish(&p.bundle(t)).await?;
                    tracing::info!("webhook caBundle updated");
                    continue;
                }
                WebhookStep::AddNextCa => {
                    next.next_ca = Some(issue_ca(
                        "tollgate-webhook-ca",
                        lifetime(self.lifetimes.webhook_ca),
                    )?);
                }
                WebhookStep::Promote => {
                    let ca = next.next_ca.take().expect("promote has a next CA");
                    next.serving = issue_serving(
                        &ca,
                        &self.service,
                        &self.namespace,
                        &[],
                        lifetime(self.lifetimes.serving),
                    )?;
                    // A CA without a key (stored before rotation existed) is not kept.
                    next.previous_ca =
                        Some(std::mem::replace(&mut next.ca, ca)).filter(|c| !c.cert.is_empty());
                    m.cert_rotations.with_label_values(&["webhook-ca"]).inc();
                }
                WebhookStep::ReissueServing => {
                    next.serving = issue_serving(
                        &next.ca,
                        &self.service,
                        &self.namespace,
                        &[],
                        lifetime(self.lifetimes.serving),
                    )?;
                    m.cert_rotations
                        .with_label_values(&["webhook-serving"])
                        .inc();
                }
                WebhookStep::PrunePrevious => next.previous_ca = None,
            }
            tracing::info!(?step, "webhook certificate rotation");
            if !write_secret(
                &api,
                &self.namespace,
                WEBHOOK_SECRET,
                webhook_data(&next),
                rv,
            )
            .await?
            {
                return Ok(());
            }
        }
        Ok(())
    }

    /// One interception CA pass: every replica distributes (and delivers to sidecars) the
    /// stored material; the leader introduces, promotes and prunes CAs.
    pub async fn intercept_tick(&self) -> Result<(), RotationError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        for _ in 0..4 {
            let Some((d, rv)) = read_secret(&api, INTERCEPT_SECRET).await? else {
                load_intercept(&self.client, &self.namespace, &self.lifetimes).await?;
                continue;
            };
            let p: InterceptPki = parse(&d, INTERCEPT_SECRET)?
                .unwrap_or_else(|| legacy_intercept(&d, &self.lifetimes));
            let t = now();
            self.install(&p, t);
            if !self.ctx.leader() {
                return Ok(());
            }
            let namespaces: std::collections::BTreeSet<String> = self
                .ctx
                .stores
                .identities
                .state()
                .iter()
                .filter_map(|i| kube::ResourceExt::namespace(&**i))
                .collect();
            let done: std::collections::BTreeSet<String> =
                self.ca.up_to_date().into_iter().collect();
            let everywhere = namespaces.is_subset(&done);
            let step = intercept_step(&p, everywhere, self.lifetimes.grace, t);
            let mut next = p.clone();
            match step {
                InterceptStep::Nothing => return Ok(()),
                InterceptStep::AddNextCa => {
                    next.next_ca = Some(issue_ca(
                        "Tollgate interception CA",
                        lifetime(self.lifetimes.intercept_ca),
                    )?);
                }
                InterceptStep::Promote => {
                    let ca = next.next_ca.take().expect("promote has a next CA");
                    next.previous_ca = Some(std::mem::replace(&mut next.ca, ca));
                    self.ctx
                        .metrics
                        .cert_rotations
                        .with_label_values(&["intercept-ca"])
                        .inc();
                }
                InterceptStep::PrunePrevious => next.previous_ca = None,
            }
            tracing::info!(?step, "interception CA rotation");
            if !write_secret(
                &api,
                &self.namespace,
                INTERCEPT_SECRET,
                intercept_data(&next),
                rv,
            )
            .await?
            {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Distribute `p`: namespace copies at the identities' next reconcile (started now), and
    /// the signing CA to sidecars with their next snapshot answer.
    fn install(&self, p: &InterceptPki, now: i64) {
        let material = p.material(now);
        if *self.ca.material() == material {
            return;
        }
        use sha2::Digest;
        let epoch = hex::encode(sha2::Sha256::digest(material.cert.as_bytes()));
        self.ca.set_material(material);
        self.ctx.hub.set_epoch(&epoch);
        self.ctx
            .metrics
            .cert_not_after
            .with_label_values(&["intercept-ca"])
            .set(p.ca.not_after);
        tracing::info!("interception CA material changed; distributing");
        self.ctx.server.triggers.reconcile_all();
    }

    /// Run the passes every `interval` until the process ends.
    pub async fn run(self, interval: Duration) {
        loop {
            if self.serving.is_some() {
                if let Err(e) = self.webhook_tick().await {
                    tracing::warn!(error = %e, "webhook certificate rotation failed; retrying");
                }
            }
            if let Err(e) = self.intercept_tick().await {
                tracing::warn!(error = %e, "interception CA rotation failed; retrying");
            }
            tokio::time::sleep(interval).await;
        }
    }
}

#[cfg(test)]
mod tests;
