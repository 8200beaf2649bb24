//! The operator's kube-runtime controllers: one per reconciled kind.
//!
//! - [`identity`]: `AgentIdentity` is the root. Its controller also watches `Tool`,
//!   `AgentPolicy`, `Tenant`, `KillSwitch` and `ApprovalRequest` (mapping each change to the
//!   identities it affects) and owns the identities' ServiceAccounts, so an event rebuilds only
//!   the snapshots it touches. Every replica runs it (each serves snapshots from its own
//!   caches); only the leader applies children and writes status.
//! - [`status`]: `Tool` (Valid; DefinitionPinned from sidecar reports), `AgentPolicy` (Compiled), `Tenant` (Ready, spend),
//!   `KillSwitch` (Engaged, affected agents) and `ApprovalRequest` (Pending) status, written by
//!   the leader.
//!
//! Every reconcile is split the same way: dereference (read the watch caches), validate and
//! build (pure functions, unit-tested without a client), apply, status. Each step fails with a
//! variant of [`Error`] whose [`Error::metric_label`] labels
//! `tollgate_operator_reconcile_errors_total`; [`error_policy`] waits for a change on an
//! invalid spec and backs off exponentially on API errors. Status is written by server-side
//! apply under the one field manager [`FIELD_MANAGER`].

pub mod identity;
pub mod status;

use crate::crd::Condition;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::server::ServerState;
use futures::channel::mpsc;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The field manager of every status (and child) the operator writes.
pub const FIELD_MANAGER: &str = "tollgate-operator";

/// How long a reconcile that found the caches not yet synced waits before trying again.
const SYNC_WAIT: Duration = Duration::from_millis(100);

/// Back-off after an API error: doubling from here...
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// ...up to here.
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Why a reconcile failed, by step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Dereference: the watch caches have not listed every kind yet, so what the object
    /// refers to cannot be read (building now could drop an engaged kill switch).
    #[error("the watch caches have not synced yet")]
    NotSynced,
    /// Validate and build: the spec (or what it refers to) is invalid; nothing changes until
    /// the objects do.
    #[error("invalid: {}", .0.join("; "))]
    InvalidSpec(Vec<String>),
    /// Apply: a child object (ServiceAccount, interception CA copies) could not be written.
    #[error("cannot {action}: {source}")]
    Apply {
        /// What was being applied.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Status: the server-side apply of the status failed.
    #[error("cannot write the status: {0}")]
    Status(#[source] kube::Error),
}

impl Error {
    /// Every [`Error::metric_label`].
    pub const LABELS: [&'static str; 4] = ["not_synced", "invalid_spec", "apply", "status"];

    /// The `error` label of `tollgate_operator_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NotSynced => "not_synced",
            Self::InvalidSpec(_) => "invalid_spec",
            Self::Apply { .. } => "apply",
            Self::Status(_) => "status",
        }
    }
}

/// Requests for reconciles that no watch event carries: a new leader reconciles everything,
/// a sidecar's spend or snapshot report reconciles its identity (and the tenants).
#[derive(Default)]
pub struct Triggers {
    all: Mutex<Vec<mpsc::UnboundedSender<()>>>,
    agents: Mutex<Vec<mpsc::UnboundedSender<ObjectRef<crate::crd::AgentIdentity>>>>,
    tenants: Mutex<Vec<mpsc::UnboundedSender<()>>>,
    tools: Mutex<Vec<mpsc::UnboundedSender<ObjectRef<crate::crd::Tool>>>>,
}

impl Triggers {
    /// A stream that yields when every object should be reconciled.
    pub fn subscribe_all(&self) -> mpsc::UnboundedReceiver<()> {
        let (tx, rx) = mpsc::unbounded();
        self.all.lock().expect("triggers").push(tx);
        rx
    }

    /// A stream of identities to reconcile.
    pub fn subscribe_agents(
        &self,
    ) -> mpsc::UnboundedReceiver<ObjectRef<crate::crd::AgentIdentity>> {
        let (tx, rx) = mpsc::unbounded();
        self.agents.lock().expect("triggers").push(tx);
        rx
    }

    /// A stream that yields when every tenant should be reconciled (spend changed).
    pub fn subscribe_tenants(&self) -> mpsc::UnboundedReceiver<()> {
        let (tx, rx) = mpsc::unbounded();
        self.tenants.lock().expect("triggers").push(tx);
        rx
    }

    /// A stream of Tools to reconcile (a sidecar reported their advertised definitions).
    pub fn subscribe_tools(&self) -> mpsc::UnboundedReceiver<ObjectRef<crate::crd::Tool>> {
        let (tx, rx) = mpsc::unbounded();
        self.tools.lock().expect("triggers").push(tx);
        rx
    }

    /// Reconcile the Tool `ns/name` (a sidecar reported what its server advertises).
    pub fn reconcile_tool(&self, ns: &str, name: &str) {
        for tx in self.tools.lock().expect("triggers").iter() {
            let _ = tx.unbounded_send(ObjectRef::new(name).within(ns));
        }
    }

    /// Reconcile everything (leadership gained).
    pub fn reconcile_all(&self) {
        for tx in self.all.lock().expect("triggers").iter() {
            let _ = tx.unbounded_send(());
        }
    }

    /// Reconcile the identity `ns/name` and the tenants (a sidecar reported).
    pub fn reconcile_agent(&self, agent: &str) {
        let Some((ns, name)) = agent.split_once('/') else {
            return;
        };
        for tx in self.agents.lock().expect("triggers").iter() {
            let _ = tx.unbounded_send(ObjectRef::new(name).within(ns));
        }
        for tx in self.tenants.lock().expect("triggers").iter() {
            let _ = tx.unbounded_send(());
        }
    }
}

/// The watch caches reconciles dereference from.
#[derive(Clone)]
pub struct Stores {
    /// Identities (the root controller's own cache).
    pub identities: Store<crate::crd::AgentIdentity>,
    /// Tools.
    pub tools: Store<crate::crd::Tool>,
    /// Policies.
    pub policies: Store<crate::crd::AgentPolicy>,
    /// Tenants.
    pub tenants: Store<crate::crd::Tenant>,
    /// Kill switches.
    pub kill_switches: Store<crate::crd::KillSwitch>,
    /// Approval requests.
    pub approvals: Store<crate::crd::ApprovalRequest>,
    /// The identities' ServiceAccounts (label `tollgate.dev/agent`).
    pub service_accounts: Store<k8s_openapi::api::core::v1::ServiceAccount>,
}

impl Stores {
    /// Wait until every cache has listed its kind once.
    pub async fn wait_until_ready(&self) -> Result<(), String> {
        ready(&self.identities).await?;
        ready(&self.tools).await?;
        ready(&self.policies).await?;
        ready(&self.tenants).await?;
        ready(&self.kill_switches).await?;
        ready(&self.approvals).await?;
        ready(&self.service_accounts).await
    }
}

/// Wait for a store to be ready. A store wakes only its latest waiter (its readiness is a
/// oneshot), and the controller that drives it waits too, so this asks again every 50 ms.
async fn ready<K>(store: &Store<K>) -> Result<(), String>
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        match tokio::time::timeout(Duration::from_millis(50), store.wait_until_ready()).await {
            Ok(r) => return r.map_err(|e| e.to_string()),
            Err(_) => continue,
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Snapshots served to sidecars.
    pub hub: Arc<Hub>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The snapshot server's state (leadership, sidecar reports).
    pub server: Arc<ServerState>,
    /// Watch caches.
    pub stores: Stores,
    /// Set once every cache has synced.
    pub synced: AtomicBool,
    /// Interception CA copies for the identities' namespaces (leader only).
    pub ca: Option<Arc<crate::pki::CaDistribution>>,
    /// Events on transitions.
    pub recorder: kube::runtime::events::Recorder,
    /// Which agents' served snapshots hold which kill switch, so a switch whose scope moves
    /// away (or that is deleted) still reaches the identities it was in.
    pub kill_switch_holders: Arc<Mutex<HashMap<String, Vec<String>>>>,
    /// When the operator first saw a change not yet published, per agent (propagation lag).
    pub changes: Arc<Mutex<HashMap<String, Instant>>>,
    /// Consecutive API failures per object, for the back-off.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context; `synced` starts false.
    pub fn new(
        client: Client,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        server: Arc<ServerState>,
        stores: Stores,
        ca: Option<Arc<crate::pki::CaDistribution>>,
        reporter: kube::runtime::events::Reporter,
    ) -> Self {
        Self {
            recorder: kube::runtime::events::Recorder::new(client.clone(), reporter),
            client,
            hub,
            metrics,
            server,
            stores,
            synced: AtomicBool::new(false),
            ca,
            kill_switch_holders: Default::default(),
            changes: Default::default(),
            failures: Default::default(),
        }
    }

    /// This replica writes status and children.
    pub fn leader(&self) -> bool {
        self.server.leader.load(Ordering::SeqCst)
    }

    fn succeeded(&self, key: &str) {
        self.failures.lock().expect("failures").remove(key);
    }

    fn backoff(&self, key: &str) -> Duration {
        let mut f = self.failures.lock().expect("failures");
        let n = f.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        BACKOFF_MIN
            .saturating_mul(1u32 << (*n - 1).min(20))
            .min(BACKOFF_MAX)
    }
}

/// The key failures are counted under.
fn failure_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

/// What to do after a failed reconcile: an invalid spec waits for a change (the watches
/// trigger on one), unsynced caches retry shortly, API errors back off exponentially.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    err: &Error,
    ctx: Arc<Context>,
) -> Action {
    if !matches!(err, Error::NotSynced) {
        ctx.metrics
            .reconcile_failed(&K::kind(&()), err.metric_label());
    }
    match err {
        Error::InvalidSpec(_) => Action::await_change(),
        Error::NotSynced => Action::requeue(SYNC_WAIT),
        Error::Apply { .. } | Error::Status(_) => {
            let wait = ctx.backoff(&failure_key(&*obj));
            tracing::warn!(kind = %K::kind(&()), name = %obj.name_any(), error = %err, ?wait, "reconcile failed; retrying");
            Action::requeue(wait)
        }
    }
}

/// Conditions equal apart from their transition time.
pub fn same_conditions(a: &[Condition], b: &[Condition]) -> bool {
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

/// Keep a condition's `lastTransitionTime` while its status does not change (the Kubernetes
/// convention: the time says when it last flipped).
pub fn keep_transition_times(old: &[Condition], new: &mut [Condition]) {
    for c in new {
        if let Some(o) = old
            .iter()
            .find(|o| o.type_ == c.type_ && o.status == c.status)
        {
            c.last_transition_time = o.last_transition_time.clone();
        }
    }
}

/// Server-side apply `status` to `name` under [`FIELD_MANAGER`]. With `resource_version`
/// the apply is conditional on it (a 409 when the object changed since it was read);
/// otherwise it is forced (the operator is the only writer of these fields).
pub async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    status: &impl serde::Serialize,
    resource_version: Option<&str>,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let mut body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": name},
        "status": status,
    });
    let mut params = PatchParams::apply(FIELD_MANAGER);
    match resource_version {
        Some(rv) => body["metadata"]["resourceVersion"] = serde_json::json!(rv),
        None => params = params.force(),
    }
    api.patch_status(name, &params, &Patch::Apply(&body))
        .await
        .map(|_| ())
}

/// Record that the operator saw a change affecting these identities now (the start of the
/// propagation lag), and pass them on.
fn noting(
    changes: &Mutex<HashMap<String, Instant>>,
    refs: Vec<ObjectRef<crate::crd::AgentIdentity>>,
) -> Vec<ObjectRef<crate::crd::AgentIdentity>> {
    let now = Instant::now();
    let mut c = changes.lock().expect("changes");
    for r in &refs {
        c.entry(format!(
            "{}/{}",
            r.namespace.as_deref().unwrap_or_default(),
            r.name
        ))
        .or_insert(now);
    }
    refs
}

/// Start the watch caches and every controller; the returned context's `synced` is set by the
/// caller once [`Stores::wait_until_ready`] returns.
///
/// Each kind's cache is written by the reflector its trigger stream runs through, so a
/// reconcile triggered by an object's change always finds that change in the cache.
pub fn start(
    client: Client,
    server: Arc<ServerState>,
    ca: Option<Arc<crate::pki::CaDistribution>>,
    reporter: kube::runtime::events::Reporter,
) -> Arc<Context> {
    use crate::crd::{AgentIdentity, AgentPolicy, ApprovalRequest, KillSwitch, Tenant, Tool};
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use kube::runtime::{reflector, watcher, Controller, WatchStreamExt};
    let cfg = watcher::Config::default;
    let (identities, ids_w) = reflector::store();
    let (tools, tools_w) = reflector::store();
    let (policies, policies_w) = reflector::store();
    let (tenants, tenants_w) = reflector::store();
    let (kill_switches, ks_w) = reflector::store();
    let (approvals, approvals_w) = reflector::store();
    let (service_accounts, sa_w) = reflector::store();
    let stores = Stores {
        identities: identities.clone(),
        tools,
        policies,
        tenants,
        kill_switches,
        approvals,
        service_accounts,
    };
    let hub = server.hub.clone();
    let metrics = server.metrics.clone();
    metrics.init_series(&Error::LABELS);
    let triggers = server.triggers.clone();
    let ctx = Arc::new(Context::new(
        client.clone(),
        hub.clone(),
        metrics,
        server,
        stores,
        ca,
        reporter,
    ));
    let all = |c: &Client| c.clone();

    // The root: identities. A deleted identity's snapshot stops being served; after a
    // re-list, those no longer listed are dropped too.
    let id_stream = {
        let (hub, holders, changes, ids) = (
            hub.clone(),
            ctx.kill_switch_holders.clone(),
            ctx.changes.clone(),
            identities.clone(),
        );
        watcher(Api::<AgentIdentity>::all(all(&client)), cfg())
            .default_backoff()
            .reflect(ids_w)
            .inspect(move |ev| match ev {
                Ok(watcher::Event::Apply(i)) => {
                    changes
                        .lock()
                        .expect("changes")
                        .entry(crate::build::key_of(i))
                        .or_insert_with(Instant::now);
                }
                Ok(watcher::Event::Delete(i)) => {
                    let key = crate::build::key_of(i);
                    hub.remove(&key);
                    holders.lock().expect("holders").remove(&key);
                }
                Ok(watcher::Event::InitDone) => {
                    let live: std::collections::HashSet<String> = ids
                        .state()
                        .iter()
                        .map(|i| crate::build::key_of(&**i))
                        .collect();
                    for (agent, _) in hub.agents() {
                        if !live.contains(&agent) {
                            hub.remove(&agent);
                            holders.lock().expect("holders").remove(&agent);
                        }
                    }
                }
                _ => {}
            })
            .applied_objects()
    };
    let sa_stream = watcher(
        Api::<ServiceAccount>::all(all(&client)),
        cfg().labels("tollgate.dev/agent"),
    )
    .default_backoff()
    .reflect(sa_w)
    .touched_objects();
    let tool_stream = watcher(Api::<Tool>::all(all(&client)), cfg())
        .default_backoff()
        .reflect(tools_w)
        .touched_objects();
    let policy_stream = watcher(Api::<AgentPolicy>::all(all(&client)), cfg())
        .default_backoff()
        .reflect(policies_w)
        .touched_objects();
    let tenant_stream = watcher(Api::<Tenant>::all(all(&client)), cfg())
        .default_backoff()
        .reflect(tenants_w)
        .touched_objects();
    let ks_stream = watcher(Api::<KillSwitch>::all(all(&client)), cfg())
        .default_backoff()
        .reflect(ks_w)
        .touched_objects();
    let approval_stream = watcher(Api::<ApprovalRequest>::all(all(&client)), cfg())
        .default_backoff()
        .reflect(approvals_w)
        .touched_objects();
    fn mapper<O>(
        ids: &Store<AgentIdentity>,
        changes: &Arc<Mutex<HashMap<String, Instant>>>,
        f: fn(&Store<AgentIdentity>, &O) -> Vec<ObjectRef<AgentIdentity>>,
    ) -> impl Fn(O) -> Vec<ObjectRef<AgentIdentity>> + Send + Sync + 'static
    where
        O: 'static,
    {
        let (ids, changes) = (ids.clone(), changes.clone());
        move |o| noting(&changes, f(&ids, &o))
    }
    let root = Controller::for_stream(id_stream, identities.clone())
        .owns_stream(sa_stream)
        .watches_stream(
            tool_stream,
            mapper(&identities, &ctx.changes, identity::map_tool),
        )
        .watches_stream(
            policy_stream,
            mapper(&identities, &ctx.changes, identity::map_policy),
        )
        .watches_stream(
            tenant_stream,
            mapper(&identities, &ctx.changes, identity::map_tenant),
        )
        .watches_stream(
            approval_stream,
            mapper(&identities, &ctx.changes, identity::map_approval),
        )
        .watches_stream(ks_stream, {
            let (ids, changes, holders) = (
                identities.clone(),
                ctx.changes.clone(),
                ctx.kill_switch_holders.clone(),
            );
            move |k: KillSwitch| {
                let holders = holders.lock().expect("holders").clone();
                noting(&changes, identity::map_kill_switch(&ids, &holders, &k))
            }
        })
        .reconcile_all_on(triggers.subscribe_all())
        .reconcile_on(triggers.subscribe_agents())
        .run(identity::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    tokio::spawn(root);

    let tools = Controller::new(Api::<Tool>::all(all(&client)), cfg())
        .reconcile_all_on(triggers.subscribe_all())
        .reconcile_on(triggers.subscribe_tools())
        .run(status::reconcile_tool, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    tokio::spawn(tools);
    let policies = Controller::new(Api::<AgentPolicy>::all(all(&client)), cfg())
        .reconcile_all_on(triggers.subscribe_all())
        .run(status::reconcile_policy, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    tokio::spawn(policies);
    let tenants = Controller::new(Api::<Tenant>::all(all(&client)), cfg())
        .reconcile_all_on(triggers.subscribe_all())
        .reconcile_all_on(triggers.subscribe_tenants())
        .run(status::reconcile_tenant, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    tokio::spawn(tenants);
    let approvals = Controller::new(Api::<ApprovalRequest>::all(all(&client)), cfg())
        .reconcile_all_on(triggers.subscribe_all())
        .run(status::reconcile_approval, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    tokio::spawn(approvals);
    // A kill switch's status counts the identities it affects: identity changes reconcile
    // every kill switch.
    let ks = Controller::new(Api::<KillSwitch>::all(all(&client)), cfg());
    let ks_store = ks.store();
    let ks = ks
        .watches(
            Api::<AgentIdentity>::all(all(&client)),
            cfg(),
            move |_: AgentIdentity| {
                ks_store
                    .state()
                    .iter()
                    .map(|k| ObjectRef::from_obj(&**k))
                    .collect::<Vec<_>>()
            },
        )
        .reconcile_all_on(triggers.subscribe_all())
        .run(status::reconcile_kill_switch, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    tokio::spawn(ks);
    ctx
}

#[cfg(test)]
mod tests;
