//! `tollgate-operator run`: the snapshot API, the kube-runtime controllers
//! ([`crate::controller`]) that keep every identity's snapshot current in the hub (which wakes
//! the sidecars' long-polls) and write status, leader election (a `coordination.k8s.io`
//! Lease: only the leader writes), the admission webhooks, and the certificates
//! ([`crate::pki`]). Every replica serves snapshots from its own caches.

use crate::controller::{self, Stores, Triggers};
use crate::crd::{AgentIdentity, AgentPolicy, ApprovalRequest, KillSwitch, Tenant, Tool};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::pki::CaDistribution;
use crate::server::{Authenticator, ServerState};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::PostParams;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Arguments of `tollgate-operator run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Snapshot API, health and metrics listener.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// This replica's name in the leader Lease.
    #[arg(long, env = "POD_NAME", default_value = "tollgate-operator")]
    pub identity: String,
    /// Namespace of the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tollgate-system")]
    pub lease_namespace: String,
    /// Do not elect a leader: this replica writes status (single-replica setups, tests).
    #[arg(long)]
    pub no_leader_elect: bool,
    /// Admission webhooks (TLS) listener; off when absent.
    #[arg(long)]
    pub webhook_listen: Option<String>,
    /// Sidecar injection settings (YAML/JSON `InjectConfig`), required with `--webhook-listen`.
    #[arg(long)]
    pub inject_config: Option<std::path::PathBuf>,
    /// Service fronting the webhooks (for the serving certificate's names).
    #[arg(long, default_value = "tollgate-operator")]
    pub webhook_service: String,
    /// Name of the Mutating- and ValidatingWebhookConfiguration whose `caBundle` the operator
    /// keeps current.
    #[arg(long, default_value = "tollgate")]
    pub webhook_config_name: String,
    /// Certificate lifetimes and the rotation schedule.
    #[command(flatten)]
    pub certs: CertArgs,
}

/// Certificate lifetimes (seconds). Each certificate is renewed at two thirds of its life.
#[derive(clap::Args, Debug, Clone)]
pub struct CertArgs {
    /// Lifetime of the webhook CA.
    #[arg(long, default_value_t = 3 * 365 * 86_400)]
    pub webhook_ca_lifetime_seconds: u64,
    /// Lifetime of the webhook serving certificate.
    #[arg(long, default_value_t = 365 * 86_400)]
    pub webhook_cert_lifetime_seconds: u64,
    /// Lifetime of the interception CA.
    #[arg(long, default_value_t = 3 * 365 * 86_400)]
    pub intercept_ca_lifetime_seconds: u64,
    /// How long a new interception CA is trusted in every namespace before it signs (the
    /// kubelet refreshes mounted ConfigMaps within about a minute).
    #[arg(long, default_value_t = 180)]
    pub intercept_ca_grace_seconds: u64,
    /// How often the certificates are checked.
    #[arg(long, default_value_t = 60)]
    pub cert_check_interval_seconds: u64,
}

impl Default for CertArgs {
    fn default() -> Self {
        let d = crate::rotation::Lifetimes::default();
        Self {
            webhook_ca_lifetime_seconds: d.webhook_ca.as_secs(),
            webhook_cert_lifetime_seconds: d.serving.as_secs(),
            intercept_ca_lifetime_seconds: d.intercept_ca.as_secs(),
            intercept_ca_grace_seconds: d.grace.as_secs(),
            cert_check_interval_seconds: 60,
        }
    }
}

impl CertArgs {
    fn lifetimes(&self) -> crate::rotation::Lifetimes {
        crate::rotation::Lifetimes {
            webhook_ca: Duration::from_secs(self.webhook_ca_lifetime_seconds),
            serving: Duration::from_secs(self.webhook_cert_lifetime_seconds),
            intercept_ca: Duration::from_secs(self.intercept_ca_lifetime_seconds),
            grace: Duration::from_secs(self.intercept_ca_grace_seconds),
        }
    }
}

/// Entry point.
pub fn main(args: RunArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate-operator: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The oldest Kubernetes minor version Tollgate supports (`k8s-openapi` is built for it, the
/// chart's `kubeVersion` says it): native sidecar containers (`restartPolicy: Always` init
/// containers with probes) are on by default from 1.29 and GA in 1.33.
pub const MIN_KUBERNETES_MINOR: u32 = 33;

/// Refuse to run against an API server older than the oldest supported version.
async fn check_version(client: &Client) -> Result<(), String> {
    let info = client
        .apiserver_version()
        .await
        .map_err(|e| format!("cannot read the API server version: {e}"))?;
    let minor: u32 = info
        .minor
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap_or(0);
    if info.major != "1" || minor < MIN_KUBERNETES_MINOR {
        return Err(format!(
            "Kubernetes {} is not supported: Tollgate needs 1.{MIN_KUBERNETES_MINOR} or newer",
            info.git_version
        ));
    }
    Ok(())
}

async fn check_crds(client: &Client) -> Result<(), String> {
    async fn one<K>(client: &Client) -> Result<(), String>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    {
        let api: Api<K> = Api::all(client.clone());
        match api.list(&kube::api::ListParams::default().limit(1)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Err(format!(
                "the {} CRD is not installed; run `kubectl apply -f crds/` (or install the Helm chart) first",
                K::kind(&())
            )),
            Err(e) => Err(format!("cannot list {}: {e}", K::kind(&()))),
        }
    }
    one::<AgentIdentity>(client).await?;
    one::<Tool>(client).await?;
    one::<AgentPolicy>(client).await?;
    one::<Tenant>(client).await?;
    one::<KillSwitch>(client).await?;
    one::<ApprovalRequest>(client).await
}

/// Run the operator until killed.
/// Run the operator until killed.
pub async fn run(args: RunArgs) -> Result<(), String> {
    let client = Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes client configuration: {e}"))?;
    check_version(&client).await?;
    check_crds(&client).await?;
    let metrics = Arc::new(Metrics::default());
    let hub = Arc::new(Hub::with_metrics(metrics.clone()));
    let triggers = Arc::new(Triggers::default());
    let st = Arc::new(ServerState {
        hub: hub.clone(),
        auth: Authenticator::new(client.clone()),
        client: client.clone(),
        metrics: metrics.clone(),
        ready: false.into(),
        leader: args.no_leader_elect.into(),
        usage: Default::default(),
        triggers: triggers.clone(),
        rejected: Default::default(),
        intercept_ca: Default::default(),
    });
    metrics.leader.set(i64::from(args.no_leader_elect));
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    tracing::info!(addr = %args.listen, "snapshot API listening");
    tokio::spawn(crate::server::serve(listener, st.clone()));
    let lifetimes = args.certs.lifetimes();
    let intercept = crate::rotation::load_intercept(&client, &args.lease_namespace, &lifetimes)
        .await
        .map_err(|e| e.to_string())?;
    let inject_names = match &args.inject_config {
        Some(p) => std::fs::read_to_string(p)
            .ok()
            .and_then(|t| yaml_serde::from_str::<crate::webhook::inject::InjectConfig>(&t).ok())
            .map(|c| (c.ca_secret, c.ca_config_map)),
        None => None,
    }
    .unwrap_or_else(|| ("tollgate-intercept-ca".into(), "tollgate-ca".into()));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let distribution = Arc::new(CaDistribution::new(
        intercept.material(now),
        inject_names.0,
        inject_names.1,
    ));
    let _ = st.intercept_ca.set(distribution.clone());
    {
        use sha2::Digest;
        hub.set_epoch(&hex::encode(sha2::Sha256::digest(
            distribution.material().cert.as_bytes(),
        )));
    }
    let ctx = controller::start(
        client.clone(),
        st.clone(),
        Some(distribution.clone()),
        kube::runtime::events::Reporter {
            controller: "tollgate-operator".into(),
            instance: Some(args.identity.clone()),
        },
    );
    let serving = match &args.webhook_listen {
        Some(addr) => Some(start_webhooks(&client, &args, addr, ctx.stores.clone()).await?),
        None => None,
    };
    tokio::spawn(
        crate::rotation::Rotation {
            client: client.clone(),
            namespace: args.lease_namespace.clone(),
            service: args.webhook_service.clone(),
            webhook_config_name: args.webhook_config_name.clone(),
            lifetimes,
            serving,
            ca: distribution,
            ctx: ctx.clone(),
        }
        .run(Duration::from_secs(
            args.certs.cert_check_interval_seconds.max(1),
        )),
    );
    ctx.stores
        .wait_until_ready()
        .await
        .map_err(|e| format!("watch caches did not sync: {e}"))?;
    ctx.synced.store(true, Ordering::SeqCst);
    st.ready.store(true, Ordering::SeqCst);
    triggers.reconcile_all();
    tracing::info!("caches synced; serving snapshots");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut leading = None;
    if !args.no_leader_elect {
        leading = Some(tokio::spawn(lead(
            client.clone(),
            args.clone(),
            ctx.clone(),
            shutdown.clone(),
        )));
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    if let Some(l) = leading {
        let _ = tokio::time::timeout(Duration::from_secs(5), l).await;
    }
    Ok(())
}

/// Serve the admission webhooks with the self-managed serving certificate (the rotation puts
/// its CA into the webhook configurations' `caBundle` and swaps the certificate in place).
async fn start_webhooks(
    client: &Client,
    args: &RunArgs,
    addr: &str,
    stores: Stores,
) -> Result<Arc<crate::rotation::ServingCert>, String> {
    use crate::webhook::{inject::IdentityFacts, inject::InjectConfig, server};
    let path = args
        .inject_config
        .as_ref()
        .ok_or("--webhook-listen needs --inject-config")?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let inject: InjectConfig =
        yaml_serde::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    // One serving certificate for every replica, kept in a Secret, so the caBundle matches
    // whichever replica the API server reaches; the rotation keeps it (and the caBundle)
    // current.
    let pki = crate::rotation::load_webhook(
        client,
        &args.lease_namespace,
        &args.webhook_service,
        &args.certs.lifetimes(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let serving = Arc::new(crate::rotation::ServingCert::new(&pki.serving)?);
    let tls = serving.server_config()?;
    let facts: server::FactsLookup = Arc::new(move |ns: &str, agent: &str| {
        use kube::runtime::reflector::ObjectRef;
        let id = stores.identities.get(&ObjectRef::new(agent).within(ns))?;
        let secrets = id
            .spec
            .tools
            .iter()
            .filter_map(|t| stores.tools.get(&ObjectRef::new(t).within(ns)))
            .filter_map(|t| t.spec.credentials.as_ref().map(|c| c.secret_name.clone()))
            .collect();
        Some(IdentityFacts { secrets })
    });
    let hooks = server::Webhooks {
        inject: Arc::new(inject),
        facts,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    tokio::spawn(server::serve(listener, tls, hooks));
    tracing::info!(%addr, "admission webhooks listening");
    Ok(serving)
}

const LEASE_NAME: &str = "tollgate-operator";
const LEASE_SECONDS: i32 = 15;

/// Hold the leader Lease while alive; `st.leader` says whether this replica writes status.
/// On gaining the Lease the new leader reconciles everything at once (not at the next watch
/// event), `acquireTime` is set only when the holder changes, and on `shutdown` a held Lease
/// is released so the next replica takes over without waiting out the lease.
async fn lead(
    client: Client,
    args: RunArgs,
    ctx: Arc<controller::Context>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let st = ctx.server.clone();
    let api: Api<Lease> = Api::namespaced(client, &args.lease_namespace);
    loop {
        let now = chrono_now();
        let mine = |rv: Option<String>, transitions: i32, acquired: Option<MicroTime>| Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(LEASE_NAME.into()),
                namespace: Some(args.lease_namespace.clone()),
                resource_version: rv,
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(args.identity.clone()),
                lease_duration_seconds: Some(LEASE_SECONDS),
                renew_time: Some(MicroTime(now)),
                acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        };
        let leader = match api.get_opt(LEASE_NAME).await {
            Ok(None) => api
                .create(&PostParams::default(), &mine(None, 0, None))
                .await
                .is_ok(),
            Ok(Some(l)) => {
                let spec = l.spec.clone().unwrap_or_default();
                let holder = spec.holder_identity.clone().unwrap_or_default();
                let expired = holder.is_empty()
                    || spec.renew_time.as_ref().is_none_or(|t| {
                        t.0 + jiff_secs(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS)) < now
                    });
                if holder == args.identity || expired {
                    let renewing = holder == args.identity;
                    let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!renewing);
                    let acquired = if renewing {
                        spec.acquire_time.clone()
                    } else {
                        None
                    };
                    api.replace(
                        LEASE_NAME,
                        &PostParams::default(),
                        &mine(l.metadata.resource_version.clone(), transitions, acquired),
                    )
                    .await
                    .is_ok()
                } else {
                    false
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease read failed");
                false
            }
        };
        if st.leader.swap(leader, Ordering::SeqCst) != leader {
            tracing::info!(leader, identity = %args.identity, "leadership changed");
            ctx.metrics.leader.set(i64::from(leader));
            if leader {
                // Reconcile everything now: objects created during the failover have had
                // no status, ServiceAccount or CA copies yet.
                if let Some(ca) = &ctx.ca {
                    ca.forget();
                }
                st.triggers.reconcile_all();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.cancelled() => {
                if st.leader.swap(false, Ordering::SeqCst) {
                    ctx.metrics.leader.set(0);
                    release_lease(&api, &args.identity).await;
                }
                return;
            }
        }
    }
}

/// Give the Lease up (empty holder), if this replica still holds it.
async fn release_lease(api: &Api<Lease>, identity: &str) {
    let Ok(Some(mut l)) = api.get_opt(LEASE_NAME).await else {
        return;
    };
    let Some(spec) = l.spec.as_mut() else { return };
    if spec.holder_identity.as_deref() != Some(identity) {
        return;
    }
    spec.holder_identity = None;
    spec.acquire_time = None;
    spec.renew_time = None;
    spec.lease_duration_seconds = Some(1);
    match api.replace(LEASE_NAME, &PostParams::default(), &l).await {
        Ok(_) => tracing::info!(%identity, "leader Lease released"),
        Err(e) => tracing::warn!(error = %e, "could not release the leader Lease"),
    }
}

/// SIGTERM (a rollout) or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn chrono_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

fn jiff_secs(s: i32) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::from_secs(i64::from(s))
}
