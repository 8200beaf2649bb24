//! The controllers that only write status: `Tool` (Valid), `AgentPolicy` (Compiled),
//! `Tenant` (Ready, spend), `KillSwitch` (Engaged, affected agents) and `ApprovalRequest`
//! (Pending). Each is dereference (caches) → validate (pure) → status (server-side apply),
//! and runs on every replica but writes only on the leader.

use super::{apply_status, keep_transition_times, same_conditions, Context, Error};
use crate::build::{self, World};
use crate::crd::{
    AgentPolicy, ApprovalRequest, CommonStatus, KillSwitch, KillSwitchStatus, ObservedDefinition,
    Tenant, TenantStatus, Tool, ToolStatus,
};
use crate::server::ReportedDefinition;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Publish a transition event (best effort: a lost event is logged, not retried).
pub async fn event(
    ctx: &Context,
    obj: &k8s_openapi::api::core::v1::ObjectReference,
    good: bool,
    reason: &str,
    note: &str,
    action: &str,
) {
    use kube::runtime::events::{Event, EventType};
    let ev = Event {
        type_: if good {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, obj).await {
        tracing::debug!(error = %e, "event not published");
    }
}

fn common_current(old: Option<&CommonStatus>, want: &CommonStatus) -> bool {
    old.is_some_and(|o| {
        same_conditions(&o.conditions, &want.conditions)
            && o.observed_generation == want.observed_generation
    })
}

/// The condition a pinned tool's definition is reported under.
pub const DEFINITION_PINNED: &str = "DefinitionPinned";

/// A Tool's status (pure): Valid (or the first problem with its schema, match or pin) and,
/// for a pinned MCP tool, `DefinitionPinned` from what its agents' sidecars `reported`
/// seeing advertised (or, with no report since the operator started, the kept
/// `observedDefinition`). A changed definition reported by any sidecar wins over matching
/// ones: one server that pulls the rug is enough.
pub fn tool_status(t: &Tool, reported: &[ReportedDefinition]) -> ToolStatus {
    let g = t.meta().generation.unwrap_or(0);
    let cond = match build::validate_tool(t) {
        Ok(()) => build::condition("Valid", true, "Valid", "", g),
        Err(e) => build::condition("Valid", false, "Invalid", &e, g),
    };
    let pinned = t
        .spec
        .pin
        .as_ref()
        .and_then(tollgate_proxy::pins::pin_sha256);
    let newest =
        |a: &&ReportedDefinition, b: &&ReportedDefinition| a.observed_at.cmp(&b.observed_at);
    let changed = pinned
        .as_ref()
        .and_then(|p| reported.iter().filter(|r| &r.sha256 != p).max_by(newest));
    let observed = changed
        .or_else(|| reported.iter().max_by(newest))
        .map(|r| ObservedDefinition {
            sha256: r.sha256.clone(),
            definition: r.definition.clone(),
            agent: r.agent.clone(),
            observed_at: r.observed_at.clone(),
        })
        .or_else(|| {
            t.status
                .as_ref()
                .and_then(|s| s.observed_definition.clone())
        });
    let mut conditions = vec![cond];
    if let Some(p) = &pinned {
        conditions.push(match &observed {
            None => crate::crd::Condition {
                status: "Unknown".into(),
                ..build::condition(
                    DEFINITION_PINNED,
                    false,
                    "NotObserved",
                    "no sidecar has reported the definition its MCP server advertises yet",
                    g,
                )
            },
            Some(o) if &o.sha256 == p => build::condition(
                DEFINITION_PINNED,
                true,
                "Matches",
                &format!("the server advertises the pinned definition (sha256 {p})"),
                g,
            ),
            Some(o) => build::condition(
                DEFINITION_PINNED,
                false,
                "DefinitionChanged",
                &format!(
                    "a sidecar of {} saw sha256 {} advertised, sha256 {p} is pinned: the tool is withheld and its calls refused (kubectl tollgate tools diff {})",
                    o.agent,
                    o.sha256,
                    t.name_any()
                ),
                g,
            ),
        });
    }
    let mut s = ToolStatus {
        conditions,
        observed_generation: g,
        observed_definition: observed,
    };
    if let Some(old) = &t.status {
        keep_transition_times(&old.conditions, &mut s.conditions);
    }
    s
}

/// The `DefinitionPinned` reason of a status, if any.
fn pinned_reason(s: Option<&ToolStatus>) -> Option<&str> {
    s.and_then(|s| s.conditions.iter().find(|c| c.type_ == DEFINITION_PINNED))
        .map(|c| c.reason.as_str())
}

/// An AgentPolicy's status (pure): Compiled, or the compiler's message.
pub fn policy_status(p: &AgentPolicy) -> CommonStatus {
    let g = p.meta().generation.unwrap_or(0);
    let cond = match build::validate_policy(p) {
        Ok(()) => build::condition("Compiled", true, "Compiled", "", g),
        Err(e) => build::condition("Compiled", false, "CompileError", &e, g),
    };
    let mut s = CommonStatus {
        conditions: vec![cond],
        observed_generation: g,
    };
    if let Some(old) = &p.status {
        keep_transition_times(&old.conditions, &mut s.conditions);
    }
    s
}

/// A Tenant's status (pure): accepted, with today's reported spend.
pub fn tenant_status(t: &Tenant, spend: f64) -> TenantStatus {
    let g = t.meta().generation.unwrap_or(0);
    let mut s = TenantStatus {
        conditions: vec![build::condition("Ready", true, "Accepted", "", g)],
        observed_generation: g,
        spend_today_usd: spend,
    };
    if let Some(old) = &t.status {
        keep_transition_times(&old.conditions, &mut s.conditions);
    }
    s
}

/// A KillSwitch's status (pure): Engaged or Lifted, and the agents it affects.
pub fn kill_switch_status(world: &World, k: &KillSwitch) -> KillSwitchStatus {
    let g = k.meta().generation.unwrap_or(0);
    let agents = if k.spec.engaged {
        build::affected_agents(world, k)
    } else {
        Vec::new()
    };
    let msg = if k.spec.engaged {
        format!("affects {} agent(s)", agents.len())
    } else {
        "lifted".into()
    };
    let mut s = KillSwitchStatus {
        conditions: vec![build::condition(
            "Engaged",
            k.spec.engaged,
            if k.spec.engaged { "Engaged" } else { "Lifted" },
            &msg,
            g,
        )],
        observed_generation: g,
        affected_agents: agents.len() as i64,
        agents,
    };
    if let Some(old) = &k.status {
        keep_transition_times(&old.conditions, &mut s.conditions);
    }
    s
}

fn finish(r: Result<(), kube::Error>) -> Result<Action, Error> {
    r.map_err(Error::Status)?;
    Ok(Action::await_change())
}

/// Reconcile a Tool: its status, and an Event when its pinned definition changes (Warning
/// `DefinitionChanged`) or matches again (Normal `DefinitionMatches`).
#[tracing::instrument(skip_all, fields(tool = %build::key_of(&*t)))]
pub async fn reconcile_tool(t: Arc<Tool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("Tool");
    let ns = t.namespace().unwrap_or_default();
    let reported: Vec<ReportedDefinition> = ctx
        .server
        .tool_definitions
        .lock()
        .expect("tool definitions lock")
        .get(&(ns.clone(), t.name_any()))
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    let want = tool_status(&t, &reported);
    let current = t.status.as_ref().is_some_and(|o| {
        same_conditions(&o.conditions, &want.conditions)
            && o.observed_generation == want.observed_generation
            && o.observed_definition == want.observed_definition
    });
    if !ctx.leader() || current {
        return Ok(Action::await_change());
    }
    let api: Api<Tool> = Api::namespaced(ctx.client.clone(), &ns);
    apply_status(&api, &t.name_any(), &want, None)
        .await
        .map_err(Error::Status)?;
    let (was, now) = (pinned_reason(t.status.as_ref()), pinned_reason(Some(&want)));
    if was != now {
        let note = want
            .conditions
            .iter()
            .find(|c| c.type_ == DEFINITION_PINNED)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        match now {
            Some("DefinitionChanged") => {
                event(
                    &ctx,
                    &t.object_ref(&()),
                    false,
                    "DefinitionChanged",
                    &note,
                    "CompareDefinition",
                )
                .await
            }
            Some("Matches") if was == Some("DefinitionChanged") => {
                event(
                    &ctx,
                    &t.object_ref(&()),
                    true,
                    "DefinitionMatches",
                    &note,
                    "CompareDefinition",
                )
                .await
            }
            _ => {}
        }
    }
    Ok(Action::await_change())
}

/// Reconcile an AgentPolicy.
#[tracing::instrument(skip_all, fields(policy = %build::key_of(&*p)))]
pub async fn reconcile_policy(p: Arc<AgentPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("AgentPolicy");
    let want = policy_status(&p);
    if !ctx.leader() || common_current(p.status.as_ref(), &want) {
        return Ok(Action::await_change());
    }
    let api: Api<AgentPolicy> =
        Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
    finish(apply_status(&api, &p.name_any(), &want, None).await)
}

/// Reconcile a Tenant.
#[tracing::instrument(skip_all, fields(tenant = %t.name_any()))]
pub async fn reconcile_tenant(t: Arc<Tenant>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("Tenant");
    let (_, spend) = ctx.server.spend_today(&super::identity::today());
    let want = tenant_status(&t, spend.get(&t.name_any()).copied().unwrap_or(0.0));
    let current = t.status.as_ref().is_some_and(|s| {
        same_conditions(&s.conditions, &want.conditions)
            && s.observed_generation == want.observed_generation
            && s.spend_today_usd == want.spend_today_usd
    });
    if !ctx.leader() || current {
        return Ok(Action::await_change());
    }
    let api: Api<Tenant> = Api::all(ctx.client.clone());
    finish(apply_status(&api, &t.name_any(), &want, None).await)
}

/// Reconcile a KillSwitch: its status, and an event when it is engaged or lifted.
#[tracing::instrument(skip_all, fields(kill_switch = %k.name_any()))]
pub async fn reconcile_kill_switch(k: Arc<KillSwitch>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("KillSwitch");
    if !ctx.synced.load(Ordering::SeqCst) {
        return Err(Error::NotSynced);
    }
    let world = World {
        identities: ctx
            .stores
            .identities
            .state()
            .iter()
            .map(|i| (**i).clone())
            .collect(),
        ..Default::default()
    };
    let want = kill_switch_status(&world, &k);
    let current = k.status.as_ref().is_some_and(|s| {
        same_conditions(&s.conditions, &want.conditions)
            && s.agents == want.agents
            && s.observed_generation == want.observed_generation
    });
    if !ctx.leader() || current {
        return Ok(Action::await_change());
    }
    let was_engaged = k
        .status
        .as_ref()
        .and_then(|s| s.conditions.first())
        .map(|c| c.status == "True");
    let api: Api<KillSwitch> = Api::all(ctx.client.clone());
    apply_status(&api, &k.name_any(), &want, None)
        .await
        .map_err(Error::Status)?;
    if was_engaged != Some(k.spec.engaged) {
        let reason = if k.spec.engaged { "Engaged" } else { "Lifted" };
        event(
            &ctx,
            &k.object_ref(&()),
            !k.spec.engaged,
            reason,
            &k.spec.reason,
            "PropagateKillSwitch",
        )
        .await;
    }
    Ok(Action::await_change())
}

/// Reconcile an ApprovalRequest: a new one (the API server drops status on create) is
/// marked `Pending` so `kubectl get approvalrequests` shows a PHASE. The apply carries the
/// cached `resourceVersion`, so it never overwrites a decision made since (409, ignored).
#[tracing::instrument(skip_all, fields(approval = %build::key_of(&*a)))]
pub async fn reconcile_approval(
    a: Arc<ApprovalRequest>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("ApprovalRequest");
    let pending = ctx
        .stores
        .approvals
        .state()
        .iter()
        .filter(|a| {
            a.status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .unwrap_or("Pending")
                == "Pending"
        })
        .count();
    ctx.metrics.approvals_pending.set(pending as i64);
    if !ctx.leader() || a.status.as_ref().and_then(|s| s.phase.as_deref()).is_some() {
        return Ok(Action::await_change());
    }
    let api: Api<ApprovalRequest> =
        Api::namespaced(ctx.client.clone(), &a.namespace().unwrap_or_default());
    // Only the phase: the apply owns no other field of the status.
    let want = serde_json::json!({"phase": "Pending"});
    match apply_status(
        &api,
        &a.name_any(),
        &want,
        a.meta().resource_version.as_deref(),
    )
    .await
    {
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Action::await_change()),
        r => finish(r),
    }
}
