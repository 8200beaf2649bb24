//! The `AgentIdentity` controller: each identity's snapshot, its ServiceAccount, the
//! interception CA copies in its namespace, and its status.

use super::{apply_status, keep_transition_times, same_conditions, Context, Error, Stores};
use crate::build::{self, World};
use crate::crd::{
    AgentIdentity, AgentIdentityStatus, AgentPolicy, ApprovalRequest, KillSwitch, Tenant, Tool,
};
use crate::server::Rejections;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource, ResourceExt};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_proxy::config::Config;

/// The kind label in metrics.
pub const KIND: &str = "AgentIdentity";

/// A healthy identity is reconciled again after this long even without events (status
/// spend, CA copies someone deleted).
const RESYNC: Duration = Duration::from_secs(300);

/// Dereference: the identity and what it refers to, from the watch caches. Kill switches are
/// all of them (the build keeps those whose scope covers the identity); approvals are the
/// identity's own.
pub fn dereference(stores: &Stores, id: &AgentIdentity) -> World {
    let ns = id.namespace().unwrap_or_default();
    let name = id.name_any();
    let get = |s: &Store<Tool>, n: &str| s.get(&ObjectRef::new(n).within(&ns));
    World {
        identities: vec![id.clone()],
        tools: id
            .spec
            .tools
            .iter()
            .filter_map(|t| get(&stores.tools, t).map(|t| (*t).clone()))
            .collect(),
        policies: id
            .spec
            .policies
            .iter()
            .filter_map(|p| {
                stores
                    .policies
                    .get(&ObjectRef::<AgentPolicy>::new(p).within(&ns))
                    .map(|p| (*p).clone())
            })
            .collect(),
        tenants: id
            .spec
            .tenants
            .iter()
            .filter_map(|t| {
                stores
                    .tenants
                    .get(&ObjectRef::<Tenant>::new(t))
                    .map(|t| (*t).clone())
            })
            .collect(),
        kill_switches: stores
            .kill_switches
            .state()
            .iter()
            .map(|k| (**k).clone())
            .collect(),
        approvals: stores
            .approvals
            .state()
            .iter()
            .filter(|a| a.namespace().as_deref() == Some(ns.as_str()) && a.spec.agent == name)
            .map(|a| (**a).clone())
            .collect(),
    }
}

/// Validate and build (pure): the snapshot config, or why there is none.
pub fn validate_and_build(world: &World, id: &AgentIdentity) -> Result<Config, Error> {
    build::build_agent(world, id).map_err(Error::InvalidSpec)
}

/// What a sidecar reported about the snapshot currently served: the first rejection of
/// `served_hash` by any sidecar of `agent`.
pub fn rejection<'a>(rejected: &'a Rejections, agent: &str, served_hash: &str) -> Option<&'a str> {
    rejected
        .iter()
        .find(|((a, _), (hash, _))| a == agent && hash == served_hash)
        .map(|(_, (_, error))| error.as_str())
}

/// The status an identity should have (pure): Ready with the served version when it built
/// and no sidecar rejected the served snapshot; otherwise why not. `served` is the version
/// served (the last good one when this build failed), `spend` today's reported spend.
pub fn desired_status(
    id: &AgentIdentity,
    built: Result<(), &[String]>,
    served: u64,
    rejected: Option<&str>,
    spend: f64,
) -> AgentIdentityStatus {
    let g = id.meta().generation.unwrap_or(0);
    let cond = match (built, rejected) {
        (Err(problems), _) => {
            build::condition("Ready", false, "InvalidReferences", &problems.join("; "), g)
        }
        (Ok(()), Some(error)) => build::condition(
            "Ready",
            false,
            "SnapshotRejected",
            &format!("a sidecar could not apply snapshot version {served}: {error}"),
            g,
        ),
        (Ok(()), None) => build::condition(
            "Ready",
            true,
            "SnapshotServed",
            &format!("snapshot version {served}"),
            g,
        ),
    };
    let mut status = AgentIdentityStatus {
        conditions: vec![cond],
        observed_generation: g,
        snapshot_version: served,
        spend_today_usd: spend,
    };
    if let Some(old) = &id.status {
        keep_transition_times(&old.conditions, &mut status.conditions);
    }
    status
}

/// Does the identity already have this status (transition times aside)?
pub fn status_current(id: &AgentIdentity, want: &AgentIdentityStatus) -> bool {
    id.status.as_ref().is_some_and(|s| {
        same_conditions(&s.conditions, &want.conditions)
            && s.snapshot_version == want.snapshot_version
            && s.observed_generation == want.observed_generation
            && s.spend_today_usd == want.spend_today_usd
    })
}

pub(crate) fn today() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}",
        now.year(),
        now.month() as u8,
        now.day()
    )
}

/// Reconcile one identity.
#[tracing::instrument(skip_all, fields(agent = %build::key_of(&*id)))]
pub async fn reconcile(id: Arc<AgentIdentity>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile(KIND);
    if !ctx.synced.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(Error::NotSynced);
    }
    let key = build::key_of(&*id);
    let world = dereference(&ctx.stores, &id);
    let built = validate_and_build(&world, &id);
    publish(&ctx, &id, &key, &built);
    if ctx.leader() {
        apply_children(&ctx, &id).await?;
        write_status(&ctx, &id, &key, &built).await?;
    }
    ctx.succeeded(&super::failure_key(&*id));
    match built {
        Ok(_) => Ok(Action::requeue(RESYNC)),
        Err(e) => Err(e),
    }
}

/// Apply (every replica): serve the new snapshot. A build that failed keeps the last good
/// snapshot served.
fn publish(ctx: &Context, id: &AgentIdentity, key: &str, built: &Result<Config, Error>) {
    let since = ctx.changes.lock().expect("changes").remove(key);
    match built {
        Ok(config) => {
            let ns = id.namespace().unwrap_or_default();
            if let Some(v) = ctx.hub.publish_since(
                key,
                &ns,
                &id.spec.service_account,
                config,
                since.unwrap_or_else(Instant::now),
            ) {
                tracing::info!(version = v, "snapshot published");
            }
            let held: Vec<String> = config
                .kill_switches
                .iter()
                .map(|k| k.name.clone())
                .collect();
            let mut holders = ctx.kill_switch_holders.lock().expect("holders");
            if held.is_empty() {
                holders.remove(key);
            } else {
                holders.insert(key.to_owned(), held);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "identity does not build; keeping its last good snapshot")
        }
    }
}

/// Apply (leader): the identity's ServiceAccount (created, owned, when missing; never taken
/// over when someone else made it) and the interception CA copies in its namespace.
async fn apply_children(ctx: &Context, id: &AgentIdentity) -> Result<(), Error> {
    let ns = id.namespace().unwrap_or_default();
    let sa = &id.spec.service_account;
    if ctx
        .stores
        .service_accounts
        .get(&ObjectRef::new(sa).within(&ns))
        .is_none()
    {
        let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns);
        let obj = ServiceAccount {
            metadata: kube::api::ObjectMeta {
                name: Some(sa.clone()),
                namespace: Some(ns.clone()),
                owner_references: id.controller_owner_ref(&()).map(|o| vec![o]),
                labels: Some([("tollgate.dev/agent".to_string(), id.name_any())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => tracing::info!(serviceaccount = %sa, "ServiceAccount created"),
            // Exists (made by someone else, so not in the labelled cache): leave it.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(source) => {
                return Err(Error::Apply {
                    action: format!("create ServiceAccount {ns}/{sa}"),
                    source,
                })
            }
        }
    }
    if let Some(ca) = &ctx.ca {
        ca.ensure_namespace(&ctx.client, &ns).await?;
    }
    Ok(())
}

/// Status (leader): server-side apply when it changed; an event when Ready flips.
async fn write_status(
    ctx: &Context,
    id: &AgentIdentity,
    key: &str,
    built: &Result<Config, Error>,
) -> Result<(), Error> {
    let served = ctx.hub.get(key);
    let version = served.as_ref().map(|s| s.version).unwrap_or(0);
    let hash = served.map(|s| s.hash).unwrap_or_default();
    let rejected = {
        let r = ctx.server.rejected.lock().expect("rejected lock");
        rejection(&r, key, &hash).map(str::to_owned)
    };
    let (spend, _) = ctx.server.spend_today(&today());
    let problems = match built {
        Err(Error::InvalidSpec(p)) => Err(p.as_slice()),
        _ => Ok(()),
    };
    let want = desired_status(
        id,
        problems,
        version,
        rejected.as_deref(),
        spend.get(key).copied().unwrap_or(0.0),
    );
    if status_current(id, &want) {
        return Ok(());
    }
    let api: Api<AgentIdentity> =
        Api::namespaced(ctx.client.clone(), &id.namespace().unwrap_or_default());
    apply_status(&api, &id.name_any(), &want, None)
        .await
        .map_err(Error::Status)?;
    let was_ready = id
        .status
        .as_ref()
        .and_then(|s| s.conditions.first())
        .map(|c| c.status == "True");
    if let Some(c) = want.conditions.first() {
        let ready = c.status == "True";
        if was_ready != Some(ready) {
            super::status::event(
                ctx,
                &id.object_ref(&()),
                ready,
                &c.reason,
                &c.message,
                "BuildSnapshot",
            )
            .await;
        }
    }
    Ok(())
}

/// Identities in `ns` whose `field` lists `name`.
fn referring(
    ids: &Store<AgentIdentity>,
    ns: Option<&str>,
    refers: impl Fn(&AgentIdentity) -> bool,
) -> Vec<ObjectRef<AgentIdentity>> {
    ids.state()
        .iter()
        .filter(|i| ns.is_none_or(|n| i.namespace().as_deref() == Some(n)))
        .filter(|i| refers(i))
        .map(|i| ObjectRef::from_obj(&**i))
        .collect()
}

/// Identities a Tool change affects: those in its namespace listing it.
pub fn map_tool(ids: &Store<AgentIdentity>, t: &Tool) -> Vec<ObjectRef<AgentIdentity>> {
    let name = t.name_any();
    referring(ids, t.namespace().as_deref(), |i| {
        i.spec.tools.contains(&name)
    })
}

/// Identities an AgentPolicy change affects.
pub fn map_policy(ids: &Store<AgentIdentity>, p: &AgentPolicy) -> Vec<ObjectRef<AgentIdentity>> {
    let name = p.name_any();
    referring(ids, p.namespace().as_deref(), |i| {
        i.spec.policies.contains(&name)
    })
}

/// Identities a Tenant change affects.
pub fn map_tenant(ids: &Store<AgentIdentity>, t: &Tenant) -> Vec<ObjectRef<AgentIdentity>> {
    let name = t.name_any();
    referring(ids, None, |i| i.spec.tenants.contains(&name))
}

/// Identities an ApprovalRequest change affects: the one it was opened for.
pub fn map_approval(
    ids: &Store<AgentIdentity>,
    a: &ApprovalRequest,
) -> Vec<ObjectRef<AgentIdentity>> {
    referring(ids, a.namespace().as_deref(), |i| {
        i.name_any() == a.spec.agent
    })
}

/// Identities a KillSwitch change affects: those its scope covers (engaged or not: lifting
/// it must reach them too), and those whose served snapshot holds it (its scope may have
/// moved away, or it was deleted).
pub fn map_kill_switch(
    ids: &Store<AgentIdentity>,
    holders: &HashMap<String, Vec<String>>,
    k: &KillSwitch,
) -> Vec<ObjectRef<AgentIdentity>> {
    let s = &k.spec.scope;
    let name = k.name_any();
    referring(ids, None, |i| {
        let ns = i.namespace().unwrap_or_default();
        let covered = s.all
            || (s.namespace.as_deref().is_none_or(|n| n == ns)
                && s.agent.as_deref().is_none_or(|a| a == i.name_any()));
        covered
            || holders
                .get(&build::key_of(i))
                .is_some_and(|h| h.contains(&name))
    })
}

#[cfg(test)]
mod tests;
