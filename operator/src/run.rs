//! `tollgate-operator run`: watch every Tollgate kind into reflector caches; on any change,
//! dereference, validate and build every identity's snapshot (see [`crate::build`]) and
//! publish the changed ones to the hub, which wakes the sidecars' long-polls; the leader
//! (a `coordination.k8s.io` Lease) writes status. Every replica serves snapshots from its own
//! caches.

use crate::build::{self, World};
use crate::crd::{
    AgentIdentity, AgentIdentityStatus, AgentPolicy, ApprovalRequest, CommonStatus, Condition,
    KillSwitch, KillSwitchStatus, Tenant, Tool,
};
use crate::hub::Hub;
use crate::server::{Authenticator, OperatorMetrics, ServerState};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

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

struct Stores {
    identities: Store<AgentIdentity>,
    tools: Store<Tool>,
    policies: Store<AgentPolicy>,
    tenants: Store<Tenant>,
    kill_switches: Store<KillSwitch>,
    approvals: Store<ApprovalRequest>,
}

impl Stores {
    fn world(&self) -> World {
        fn all<K: Clone + kube::Resource>(s: &Store<K>) -> Vec<K>
        where
            K::DynamicType: std::hash::Hash + Eq + Clone,
        {
            s.state().iter().map(|o| (**o).clone()).collect()
        }
        World {
            identities: all(&self.identities),
            tools: all(&self.tools),
            policies: all(&self.policies),
            tenants: all(&self.tenants),
            kill_switches: all(&self.kill_switches),
            approvals: all(&self.approvals),
        }
    }
}

fn watch_kind<K>(client: &Client, dirty: Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let api: Api<K> = Api::all(client.clone());
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => dirty.notify_one(),
                Err(e) => {
                    tracing::warn!(kind = %K::kind(&()), error = %e, "watch error (retrying)")
                }
            }
        }
    });
    reader
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
pub async fn run(args: RunArgs) -> Result<(), String> {
    let client = Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes client configuration: {e}"))?;
    check_version(&client).await?;
    check_crds(&client).await?;
    let hub = Arc::new(Hub::default());
    let metrics = Arc::new(OperatorMetrics::default());
    let dirty = Arc::new(Notify::new());
    let st = Arc::new(ServerState {
        hub: hub.clone(),
        auth: Authenticator::new(client.clone()),
        client: client.clone(),
        metrics: metrics.clone(),
        ready: false.into(),
        leader: args.no_leader_elect.into(),
        usage: Default::default(),
        dirty: dirty.clone(),
        rejected: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    tracing::info!(addr = %args.listen, "snapshot API listening");
    tokio::spawn(crate::server::serve(listener, st.clone()));
    let stores = Stores {
        identities: watch_kind(&client, dirty.clone()),
        tools: watch_kind(&client, dirty.clone()),
        policies: watch_kind(&client, dirty.clone()),
        tenants: watch_kind(&client, dirty.clone()),
        kill_switches: watch_kind(&client, dirty.clone()),
        approvals: watch_kind(&client, dirty.clone()),
    };
    for ready in [
        stores.identities.wait_until_ready().await,
        stores.tools.wait_until_ready().await,
        stores.policies.wait_until_ready().await,
        stores.tenants.wait_until_ready().await,
        stores.kill_switches.wait_until_ready().await,
        stores.approvals.wait_until_ready().await,
    ] {
        ready.map_err(|e| format!("watch caches did not sync: {e}"))?;
    }
    st.ready.store(true, Ordering::SeqCst);
    tracing::info!("caches synced; serving snapshots");
    let stores = Arc::new(stores);
    let ca = load_or_create_secret(
        &client,
        &args.lease_namespace,
        "tollgate-intercept-ca",
        || {
            let (cert, key) = tollgate_proxy::tls::new_ca("Tollgate interception CA", 3650)
                .map_err(|e| e.to_string())?;
            Ok([("tls.crt".to_string(), cert), ("tls.key".to_string(), key)].into())
        },
    )
    .await?;
    let inject_names = match &args.inject_config {
        Some(p) => std::fs::read_to_string(p)
            .ok()
            .and_then(|t| serde_yaml::from_str::<crate::webhook::inject::InjectConfig>(&t).ok())
            .map(|c| (c.ca_secret, c.ca_config_map)),
        None => None,
    }
    .unwrap_or_else(|| ("tollgate-intercept-ca".into(), "tollgate-ca".into()));
    let ca_cert = ca.get("tls.crt").cloned().unwrap_or_default();
    let distribution = CaDistribution {
        bundle: crate::webhook::inject::trust_bundle(&ca_cert),
        cert: ca_cert,
        key: ca.get("tls.key").cloned().unwrap_or_default(),
        secret: inject_names.0,
        config_map: inject_names.1,
    };
    if let Some(addr) = &args.webhook_listen {
        start_webhooks(&client, &args, addr, stores.clone()).await?;
    }
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut leading = None;
    if !args.no_leader_elect {
        leading = Some(tokio::spawn(lead(
            client.clone(),
            args.clone(),
            st.clone(),
            shutdown.clone(),
        )));
    }
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
        if let Some(l) = leading {
            let _ = tokio::time::timeout(Duration::from_secs(5), l).await;
        }
        std::process::exit(0);
    });
    let mut published: HashSet<String> = HashSet::new();
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: "tollgate-operator".into(),
            instance: Some(args.identity.clone()),
        },
    );
    let mut seen = Transitions::default();
    loop {
        let t0 = Instant::now();
        let world = stores.world();
        let now = time::OffsetDateTime::now_utc();
        let day = format!(
            "{:04}-{:02}-{:02}",
            now.year(),
            now.month() as u8,
            now.day()
        );
        let (agent_spend, tenant_spend) = st.spend_today(&day);
        let mut statuses = recompute(&world, &hub, &mut published);
        statuses.spend(&world, &agent_spend, &tenant_spend);
        statuses.rejected(&hub, &st.rejected.lock().expect("rejected lock"));
        metrics.reconciles.fetch_add(1, Ordering::Relaxed);
        metrics
            .last_reconcile_us
            .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        metrics.approvals_pending.store(
            world
                .approvals
                .iter()
                .filter(|a| {
                    a.status
                        .as_ref()
                        .and_then(|s| s.phase.as_deref())
                        .unwrap_or("Pending")
                        == "Pending"
                })
                .count() as i64,
            Ordering::Relaxed,
        );
        if st.leader.load(Ordering::SeqCst) {
            ensure_service_accounts(&client, &world).await;
            distribution.ensure(&client, &world).await;
            seen.publish(&recorder, &world, &statuses).await;
            let errors = write_statuses(&client, &world, statuses).await;
            metrics
                .reconcile_errors
                .fetch_add(errors, Ordering::Relaxed);
        }
        dirty.notified().await;
    }
}

/// Serve the admission webhooks with a self-managed certificate, and put its CA into the
/// webhook configurations' `caBundle`.
async fn start_webhooks(
    client: &Client,
    args: &RunArgs,
    addr: &str,
    stores: Arc<Stores>,
) -> Result<(), String> {
    use crate::webhook::{certs, inject::IdentityFacts, inject::InjectConfig, server};
    let path = args
        .inject_config
        .as_ref()
        .ok_or("--webhook-listen needs --inject-config")?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let inject: InjectConfig =
        serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    // One serving certificate for every replica, kept in a Secret, so the caBundle matches
    // whichever replica the API server reaches.
    let stored = load_or_create_secret(
        client,
        &args.lease_namespace,
        "tollgate-webhook-tls",
        || {
            let c = certs::webhook_certs(&args.webhook_service, &args.lease_namespace, &[], 365)
                .map_err(|e| e.to_string())?;
            Ok([
                ("ca.crt".to_string(), c.ca.cert),
                ("tls.crt".to_string(), c.serving.cert),
                ("tls.key".to_string(), c.serving.key),
            ]
            .into())
        },
    )
    .await?;
    let get = |k: &str| stored.get(k).cloned().unwrap_or_default();
    let serving = certs::PemPair {
        cert: get("tls.crt"),
        key: get("tls.key"),
    };
    let ca_pem = get("ca.crt");
    let tls = server::tls_config(&serving)?;
    let facts: server::FactsLookup = Arc::new(move |ns: &str, agent: &str| {
        let world = stores.world();
        let mut secrets = Vec::new();
        let id = world
            .identities
            .iter()
            .find(|i| i.namespace().as_deref() == Some(ns) && i.name_any() == agent)?;
        {
            for t in &id.spec.tools {
                if let Some(tool) = world
                    .tools
                    .iter()
                    .find(|x| x.namespace().as_deref() == Some(ns) && &x.name_any() == t)
                {
                    if let Some(c) = &tool.spec.credentials {
                        secrets.push(c.secret_name.clone());
                    }
                }
            }
        }
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
    let bundle = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        ca_pem.as_bytes(),
    );
    for kind in [
        "mutatingwebhookconfigurations",
        "validatingwebhookconfigurations",
    ] {
        let ar = kube::api::ApiResource {
            group: "admissionregistration.k8s.io".into(),
            version: "v1".into(),
            api_version: "admissionregistration.k8s.io/v1".into(),
            kind: if kind.starts_with("mutating") {
                "MutatingWebhookConfiguration"
            } else {
                "ValidatingWebhookConfiguration"
            }
            .into(),
            plural: kind.into(),
        };
        let api: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &ar);
        match api.get_opt(&args.webhook_config_name).await {
            Ok(Some(mut obj)) => {
                if let Some(hooks) = obj.data.get_mut("webhooks").and_then(|w| w.as_array_mut()) {
                    for h in hooks {
                        h["clientConfig"]["caBundle"] = serde_json::json!(bundle);
                    }
                }
                if let Err(e) = api
                    .replace(&args.webhook_config_name, &PostParams::default(), &obj)
                    .await
                {
                    tracing::warn!(kind, error = %e, "could not update the webhook caBundle");
                }
            }
            Ok(None) => {
                tracing::warn!(kind, name = %args.webhook_config_name, "webhook configuration not found; caBundle not set")
            }
            Err(e) => tracing::warn!(kind, error = %e, "could not read the webhook configuration"),
        }
    }
    tracing::info!(%addr, "admission webhooks listening");
    Ok(())
}

/// A Secret's string data, created from `make` if it does not exist (shared by every replica:
/// the first to create it wins, the others read it).
async fn load_or_create_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    make: impl FnOnce() -> Result<std::collections::BTreeMap<String, String>, String>,
) -> Result<std::collections::BTreeMap<String, String>, String> {
    use k8s_openapi::api::core::v1::Secret;
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let read = |s: Secret| -> std::collections::BTreeMap<String, String> {
        s.data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
            .collect()
    };
    if let Some(s) = api
        .get_opt(name)
        .await
        .map_err(|e| format!("secret {namespace}/{name}: {e}"))?
    {
        return Ok(read(s));
    }
    let data = make()?;
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        string_data: Some(data.clone()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(data),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = api.get(name).await.map_err(|e| e.to_string())?;
            Ok(read(s))
        }
        Err(e) => Err(format!("secret {namespace}/{name}: {e}")),
    }
}

/// Where injected pods find the interception CA: a Secret (sidecar only) and a ConfigMap
/// (`ca.crt`, for the agent's trust store) in every namespace that has an identity.
struct CaDistribution {
    cert: String,
    /// Public roots plus `cert`, for the app containers' trust store.
    bundle: String,
    key: String,
    secret: String,
    config_map: String,
}

impl CaDistribution {
    async fn ensure(&self, client: &Client, world: &World) {
        use k8s_openapi::api::core::v1::{ConfigMap, Secret};
        let namespaces: std::collections::BTreeSet<String> = world
            .identities
            .iter()
            .filter_map(|i| i.namespace())
            .collect();
        for ns in namespaces {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
            if matches!(secrets.get_opt(&self.secret).await, Ok(None)) {
                let s = Secret {
                    metadata: kube::api::ObjectMeta {
                        name: Some(self.secret.clone()),
                        namespace: Some(ns.clone()),
                        ..Default::default()
                    },
                    string_data: Some(
                        [
                            ("tls.crt".to_string(), self.cert.clone()),
                            ("tls.key".to_string(), self.key.clone()),
                        ]
                        .into(),
                    ),
                    ..Default::default()
                };
                if let Err(e) = secrets.create(&PostParams::default(), &s).await {
                    tracing::warn!(namespace = %ns, error = %e, "could not create the interception CA Secret");
                }
            }
            let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
            let data: std::collections::BTreeMap<String, String> = [
                ("ca.crt".to_string(), self.cert.clone()),
                (
                    crate::webhook::inject::CA_BUNDLE_KEY.to_string(),
                    self.bundle.clone(),
                ),
            ]
            .into();
            match cms.get_opt(&self.config_map).await {
                Ok(None) => {
                    let c = ConfigMap {
                        metadata: kube::api::ObjectMeta {
                            name: Some(self.config_map.clone()),
                            namespace: Some(ns.clone()),
                            ..Default::default()
                        },
                        data: Some(data),
                        ..Default::default()
                    };
                    if let Err(e) = cms.create(&PostParams::default(), &c).await {
                        tracing::warn!(namespace = %ns, error = %e, "could not create the CA ConfigMap");
                    }
                }
                // Made by an older operator (no trust bundle) or stale: bring it up to date.
                Ok(Some(mut c)) if c.data.as_ref() != Some(&data) => {
                    c.data = Some(data);
                    if let Err(e) = cms
                        .replace(&self.config_map, &PostParams::default(), &c)
                        .await
                    {
                        tracing::warn!(namespace = %ns, error = %e, "could not update the CA ConfigMap");
                    }
                }
                _ => {}
            }
        }
    }
}

/// The last state events were published for, so each transition is announced once.
#[derive(Default)]
struct Transitions {
    ready: std::collections::HashMap<String, bool>,
    engaged: std::collections::HashMap<String, bool>,
}

impl Transitions {
    async fn publish(
        &mut self,
        rec: &kube::runtime::events::Recorder,
        world: &World,
        s: &Statuses,
    ) {
        use kube::runtime::events::{Event, EventType};
        for (ns, name, status) in &s.identities {
            let Some(obj) = world
                .identities
                .iter()
                .find(|i| i.namespace().as_deref() == Some(ns.as_str()) && &i.name_any() == name)
            else {
                continue;
            };
            let Some(c) = status.conditions.first() else {
                continue;
            };
            let ready = c.status == "True";
            if self.ready.insert(format!("{ns}/{name}"), ready) == Some(ready) {
                continue;
            }
            let ev = Event {
                type_: if ready {
                    EventType::Normal
                } else {
                    EventType::Warning
                },
                reason: c.reason.clone(),
                note: Some(c.message.chars().take(1000).collect()),
                action: "BuildSnapshot".into(),
                secondary: None,
            };
            if let Err(e) = rec.publish(&ev, &obj.object_ref(&())).await {
                tracing::debug!(error = %e, "event not published");
            }
        }
        for k in &world.kill_switches {
            let engaged = k.spec.engaged;
            if self.engaged.insert(k.name_any(), engaged) == Some(engaged) {
                continue;
            }
            let ev = Event {
                type_: if engaged {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: if engaged { "Engaged" } else { "Lifted" }.into(),
                note: Some(k.spec.reason.chars().take(1000).collect()),
                action: "PropagateKillSwitch".into(),
                secondary: None,
            };
            if let Err(e) = rec.publish(&ev, &k.object_ref(&())).await {
                tracing::debug!(error = %e, "event not published");
            }
        }
    }
}

/// Each identity's ServiceAccount exists, owned by the identity (created if missing, never
/// taken over if someone else made it).
async fn ensure_service_accounts(client: &Client, world: &World) {
    use k8s_openapi::api::core::v1::ServiceAccount;
    for id in &world.identities {
        let ns = id.namespace().unwrap_or_default();
        let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
        match api.get_opt(&id.spec.service_account).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                let sa = ServiceAccount {
                    metadata: kube::api::ObjectMeta {
                        name: Some(id.spec.service_account.clone()),
                        namespace: Some(ns.clone()),
                        owner_references: id.controller_owner_ref(&()).map(|o| vec![o]),
                        labels: Some([("tollgate.dev/agent".to_string(), id.name_any())].into()),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                if let Err(e) = api.create(&PostParams::default(), &sa).await {
                    tracing::warn!(error = %e, sa = %id.spec.service_account, "could not create the identity's ServiceAccount");
                }
            }
            Err(e) => tracing::debug!(error = %e, "ServiceAccount lookup failed"),
        }
    }
}

impl Statuses {
    /// Put reported spend into identity and tenant statuses.
    pub fn spend(
        &mut self,
        world: &World,
        agents: &std::collections::HashMap<String, f64>,
        tenants: &std::collections::HashMap<String, f64>,
    ) {
        for (ns, name, st) in &mut self.identities {
            st.spend_today_usd = agents.get(&format!("{ns}/{name}")).copied().unwrap_or(0.0);
        }
        for t in &world.tenants {
            let g = t.meta().generation.unwrap_or(0);
            self.tenants.push((
                String::new(),
                t.name_any(),
                crate::crd::TenantStatus {
                    conditions: vec![build::condition("Ready", true, "Accepted", "", g)],
                    observed_generation: g,
                    spend_today_usd: tenants.get(&t.name_any()).copied().unwrap_or(0.0),
                },
            ));
        }
    }
}

impl Statuses {
    /// An identity whose served snapshot a sidecar rejected is not Ready: its sidecars run an
    /// older snapshot (and fail closed past `maxStaleness`).
    pub fn rejected(&mut self, hub: &Hub, rejected: &crate::server::Rejections) {
        for (ns, name, st) in &mut self.identities {
            let agent = format!("{ns}/{name}");
            let served = hub.get(&agent).map(|s| s.hash).unwrap_or_default();
            let Some((_, error)) = rejected
                .iter()
                .find(|((a, _), (hash, _))| *a == agent && *hash == served)
                .map(|(_, v)| v)
            else {
                continue;
            };
            {
                st.conditions = vec![build::condition(
                    "Ready",
                    false,
                    "SnapshotRejected",
                    &format!(
                        "a sidecar could not apply snapshot version {}: {error}",
                        st.snapshot_version
                    ),
                    st.observed_generation,
                )];
            }
        }
    }
}

/// Statuses computed by a recompute, to be written by the leader.
#[derive(Default)]
pub struct Statuses {
    tenants: Vec<(String, String, crate::crd::TenantStatus)>,
    identities: Vec<(String, String, AgentIdentityStatus)>,
    policies: Vec<(String, String, CommonStatus)>,
    tools: Vec<(String, String, CommonStatus)>,
    kill_switches: Vec<(String, KillSwitchStatus)>,
}

/// Build every identity, publish what changed, and compute every status.
pub fn recompute(world: &World, hub: &Hub, published: &mut HashSet<String>) -> Statuses {
    let mut out = Statuses::default();
    let mut live = HashSet::new();
    for id in &world.identities {
        let key = build::key_of(id);
        let ns = id.namespace().unwrap_or_default();
        let generation = id.meta().generation.unwrap_or(0);
        live.insert(key.clone());
        let (cond, version) = match build::build_agent(world, id) {
            Ok(config) => {
                if let Some(v) = hub.publish(&key, &ns, &id.spec.service_account, &config) {
                    tracing::info!(agent = %key, version = v, "snapshot published");
                }
                published.insert(key.clone());
                let v = hub.get(&key).map(|s| s.version).unwrap_or(0);
                (
                    build::condition(
                        "Ready",
                        true,
                        "SnapshotServed",
                        &format!("snapshot version {v}"),
                        generation,
                    ),
                    v,
                )
            }
            Err(problems) => {
                // The last good snapshot stays served; status says why the new one is not.
                tracing::warn!(agent = %key, problems = ?problems, "identity does not build; keeping its last good snapshot");
                let v = hub.get(&key).map(|s| s.version).unwrap_or(0);
                (
                    build::condition(
                        "Ready",
                        false,
                        "InvalidReferences",
                        &problems.join("; "),
                        generation,
                    ),
                    v,
                )
            }
        };
        out.identities.push((
            ns,
            id.name_any(),
            AgentIdentityStatus {
                conditions: vec![cond],
                observed_generation: generation,
                snapshot_version: version,
                spend_today_usd: id.status.as_ref().map(|s| s.spend_today_usd).unwrap_or(0.0),
            },
        ));
    }
    for gone in published
        .iter()
        .filter(|k| !live.contains(*k))
        .cloned()
        .collect::<Vec<_>>()
    {
        hub.remove(&gone);
        published.remove(&gone);
    }
    for p in &world.policies {
        let g = p.meta().generation.unwrap_or(0);
        let cond = match build::validate_policy(p) {
            Ok(()) => build::condition("Compiled", true, "Compiled", "", g),
            Err(e) => build::condition("Compiled", false, "CompileError", &e, g),
        };
        out.policies.push((
            p.namespace().unwrap_or_default(),
            p.name_any(),
            CommonStatus {
                conditions: vec![cond],
                observed_generation: g,
            },
        ));
    }
    for t in &world.tools {
        let g = t.meta().generation.unwrap_or(0);
        let cond = match build::validate_tool(t) {
            Ok(()) => build::condition("Valid", true, "Valid", "", g),
            Err(e) => build::condition("Valid", false, "Invalid", &e, g),
        };
        out.tools.push((
            t.namespace().unwrap_or_default(),
            t.name_any(),
            CommonStatus {
                conditions: vec![cond],
                observed_generation: g,
            },
        ));
    }
    for k in &world.kill_switches {
        let g = k.meta().generation.unwrap_or(0);
        let agents = build::affected_agents(world, k);
        let msg = if k.spec.engaged {
            format!("affects {} agent(s)", agents.len())
        } else {
            "lifted".into()
        };
        out.kill_switches.push((
            k.name_any(),
            KillSwitchStatus {
                conditions: vec![build::condition(
                    "Engaged",
                    k.spec.engaged,
                    if k.spec.engaged { "Engaged" } else { "Lifted" },
                    &msg,
                    g,
                )],
                observed_generation: g,
                affected_agents: if k.spec.engaged {
                    agents.len() as i64
                } else {
                    0
                },
                agents: if k.spec.engaged { agents } else { Vec::new() },
            },
        ));
    }
    out
}

/// Conditions equal apart from their transition time.
fn same_conditions(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            (
                &x.type_,
                &x.status,
                &x.reason,
                &x.message,
                x.observed_generation,
            ) == (
                &y.type_,
                &y.status,
                &y.reason,
                &y.message,
                y.observed_generation,
            )
        })
}

async fn patch_status<K>(api: Api<K>, name: &str, status: impl Serialize) -> bool
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let patch = Patch::Merge(serde_json::json!({ "status": status }));
    match api
        .patch_status(name, &PatchParams::default(), &patch)
        .await
    {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(name, error = %e, "status write failed");
            false
        }
    }
}

/// Patch each computed status that differs from the object's current one.
async fn write_kind<K, S>(
    objects: &[K],
    statuses: Vec<(String, String, S)>,
    api: impl Fn(&str) -> Api<K>,
    current: impl Fn(&K) -> Option<S>,
    same: impl Fn(&S, &S) -> bool,
) -> u64
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize + Default,
{
    let mut errors = 0;
    for (ns, name, status) in statuses {
        let cur = objects
            .iter()
            .find(|o| o.namespace().unwrap_or_default() == ns && o.name_any() == name)
            .and_then(&current)
            .unwrap_or_default();
        if same(&cur, &status) {
            continue;
        }
        if !patch_status(api(&ns), &name, &status).await {
            errors += 1;
        }
    }
    errors
}

/// A new `ApprovalRequest` has no status (the API server drops status on create): mark it
/// `Pending` so `kubectl get approvalrequests` shows a PHASE.
async fn mark_pending(client: &Client, world: &World) -> u64 {
    let mut errors = 0;
    for a in &world.approvals {
        if a.status.as_ref().and_then(|s| s.phase.as_deref()).is_some() {
            continue;
        }
        // Conditional on the cached resourceVersion: never overwrite a decision made since.
        let api =
            Api::<ApprovalRequest>::namespaced(client.clone(), &a.namespace().unwrap_or_default());
        let mut pending = a.clone();
        pending.status = Some(crate::crd::ApprovalRequestStatus {
            phase: Some("Pending".into()),
            ..Default::default()
        });
        match api
            .replace_status(&a.name_any(), &PostParams::default(), &pending)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => {
                tracing::warn!(name = %a.name_any(), error = %e, "could not mark the approval request Pending");
                errors += 1;
            }
        }
    }
    errors
}

async fn write_statuses(client: &Client, world: &World, s: Statuses) -> u64 {
    mark_pending(client, world).await + write_statuses_of_kinds(client, world, s).await
}

async fn write_statuses_of_kinds(client: &Client, world: &World, s: Statuses) -> u64 {
    let common = |a: &CommonStatus, b: &CommonStatus| {
        same_conditions(&a.conditions, &b.conditions)
            && a.observed_generation == b.observed_generation
    };
    write_kind(
        &world.identities,
        s.identities,
        |ns| Api::<AgentIdentity>::namespaced(client.clone(), ns),
        |o| o.status.clone(),
        |a, b| {
            same_conditions(&a.conditions, &b.conditions)
                && a.snapshot_version == b.snapshot_version
                && a.observed_generation == b.observed_generation
                && a.spend_today_usd == b.spend_today_usd
        },
    )
    .await
        + write_kind(
            &world.tenants,
            s.tenants,
            |_| Api::<Tenant>::all(client.clone()),
            |o| o.status.clone(),
            |a, b| {
                same_conditions(&a.conditions, &b.conditions)
                    && a.spend_today_usd == b.spend_today_usd
                    && a.observed_generation == b.observed_generation
            },
        )
        .await
        + write_kind(
            &world.policies,
            s.policies,
            |ns| Api::<AgentPolicy>::namespaced(client.clone(), ns),
            |o| o.status.clone(),
            common,
        )
        .await
        + write_kind(
            &world.tools,
            s.tools,
            |ns| Api::<Tool>::namespaced(client.clone(), ns),
            |o| o.status.clone(),
            common,
        )
        .await
        + write_kind(
            &world.kill_switches,
            s.kill_switches
                .into_iter()
                .map(|(n, st)| (String::new(), n, st))
                .collect(),
            |_| Api::<KillSwitch>::all(client.clone()),
            |o| o.status.clone(),
            |a, b| {
                same_conditions(&a.conditions, &b.conditions)
                    && a.agents == b.agents
                    && a.observed_generation == b.observed_generation
            },
        )
        .await
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
    st: Arc<ServerState>,
    shutdown: tokio_util::sync::CancellationToken,
) {
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
            if leader {
                // Reconcile everything now: objects created during the failover have had
                // no status, ServiceAccount or CA copies yet.
                st.dirty.notify_one();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.cancelled() => {
                if st.leader.swap(false, Ordering::SeqCst) {
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
