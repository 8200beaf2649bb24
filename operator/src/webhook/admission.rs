//! AdmissionReview handlers, written against the JSON objects the API server sends so they can
//! be tested exactly as it calls them.
//!
//! - `/mutate-pod`: sidecar injection (see [`super::inject`]).
//! - `/mutate-stamp`: on `ApprovalRequest` status updates, stamps the deciding user from
//!   `userInfo` (never from the client's body), rejects self-approval by the agent's own
//!   ServiceAccount and any change to a decided request; on `KillSwitch` writes, stamps who
//!   engaged or lifted it.
//! - `/validate`: rejects an `AgentPolicy` whose Rego does not compile (naming the line) and a
//!   `Tool` whose input schema is not a valid JSON Schema.

use super::inject::{inject, IdentityFacts, InjectConfig};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use kube::core::DynamicObject;
use serde_json::{json, Value};

/// Annotation set on a `KillSwitch` by the stamping webhook.
pub const ENGAGED_BY: &str = "tollgate.dev/engaged-by";
/// Annotation set when a `KillSwitch` is lifted.
pub const LIFTED_BY: &str = "tollgate.dev/lifted-by";
/// Time of the last engage/lift.
pub const CHANGED_AT: &str = "tollgate.dev/changed-at";

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn to_value(o: &Option<DynamicObject>) -> Value {
    o.as_ref()
        .and_then(|o| serde_json::to_value(o).ok())
        .unwrap_or(Value::Null)
}

fn patched(
    req: &AdmissionRequest<DynamicObject>,
    before: &Value,
    after: &Value,
) -> AdmissionResponse {
    let resp = AdmissionResponse::from(req);
    let patch = json_patch::diff(before, after);
    if patch.0.is_empty() {
        return resp;
    }
    match resp.with_patch(patch) {
        Ok(r) => r,
        Err(e) => AdmissionResponse::from(req).deny(format!("cannot serialise patch: {e}")),
    }
}

/// `/mutate-pod`. `facts` looks up what the identity needs mounted (its tools' secrets), or
/// `None` when no such `AgentIdentity` exists: such a pod is refused, since its sidecar would
/// never get a snapshot and the pod would never become ready.
pub fn mutate_pod(
    req: &AdmissionRequest<DynamicObject>,
    cfg: &InjectConfig,
    facts: impl Fn(&str, &str) -> Option<IdentityFacts>,
) -> AdmissionResponse {
    let before = to_value(&req.object);
    let pod: k8s_openapi::api::core::v1::Pod = match serde_json::from_value(before.clone()) {
        Ok(p) => p,
        Err(e) => return AdmissionResponse::from(req).deny(format!("not a Pod: {e}")),
    };
    let Some(agent) = super::inject::wants_injection(&pod).map(str::to_owned) else {
        return AdmissionResponse::from(req);
    };
    let ns = req.namespace.clone().unwrap_or_default();
    if super::inject::is_injected(&pod) {
        return AdmissionResponse::from(req);
    }
    let Some(facts) = facts(&ns, &agent) else {
        return AdmissionResponse::from(req).deny(format!(
            "pod is labelled tollgate.dev/agent={agent} but there is no AgentIdentity {ns}/{agent}: create it first (kubectl get agentidentities -n {ns})"
        ));
    };
    match inject(pod, cfg, &facts) {
        Ok(out) => {
            let after = serde_json::to_value(&out).unwrap_or(Value::Null);
            patched(req, &before, &after)
        }
        Err(e) => AdmissionResponse::from(req).deny(e.to_string()),
    }
}

/// `/mutate-stamp`.
pub fn stamp(req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    match req.kind.kind.as_str() {
        "ApprovalRequest" => stamp_approval(req),
        "KillSwitch" => stamp_kill_switch(req),
        _ => AdmissionResponse::from(req),
    }
}

fn user(req: &AdmissionRequest<DynamicObject>) -> (String, Vec<String>) {
    (
        req.user_info.username.clone().unwrap_or_default(),
        req.user_info.groups.clone().unwrap_or_default(),
    )
}

fn phase(v: &Value) -> &str {
    v.pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("Pending")
}

fn stamp_approval(req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let before = to_value(&req.object);
    let old = to_value(&req.old_object);
    if req.operation != Operation::Update {
        // New requests are created by the operator on a sidecar's behalf; they start pending.
        let mut after = before.clone();
        if phase(&after) != "Pending" && req.operation == Operation::Create {
            return AdmissionResponse::from(req).deny("an ApprovalRequest must be created Pending");
        }
        if let Some(s) = after.get_mut("status").and_then(Value::as_object_mut) {
            s.remove("approver");
            s.remove("approverGroups");
        }
        return patched(req, &before, &after);
    }
    let (new_phase, old_phase) = (phase(&before), phase(&old));
    if old_phase != "Pending" {
        if new_phase != old_phase
            || before.pointer("/status/approver") != old.pointer("/status/approver")
        {
            return AdmissionResponse::from(req).deny(format!(
                "ApprovalRequest {} was already {old_phase}; decisions are final",
                req.name
            ));
        }
        let used = |v: &Value| v.pointer("/status/consumedAt").cloned();
        if used(&old).is_some() && used(&before) != used(&old) {
            return AdmissionResponse::from(req).deny(format!(
                "ApprovalRequest {} was already used; a use cannot be undone",
                req.name
            ));
        }
        return AdmissionResponse::from(req);
    }
    if new_phase == "Pending" {
        return AdmissionResponse::from(req);
    }
    if !matches!(new_phase, "Approved" | "Denied" | "Voided") {
        return AdmissionResponse::from(req).deny(format!(
            "status.phase must be Approved, Denied or Voided, not {new_phase:?}"
        ));
    }
    let (username, groups) = user(req);
    let ns = req.namespace.clone().unwrap_or_default();
    let agent_sa = before
        .pointer("/spec/serviceAccount")
        .or_else(|| old.pointer("/spec/serviceAccount"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if !agent_sa.is_empty() && username == format!("system:serviceaccount:{ns}:{agent_sa}") {
        return AdmissionResponse::from(req).deny(
            "self-approval: the agent's own ServiceAccount cannot decide its approval requests",
        );
    }
    if username.is_empty() {
        return AdmissionResponse::from(req)
            .deny("cannot decide an approval without an authenticated user");
    }
    if let Some(exp) = old.pointer("/spec/expiresAt").and_then(Value::as_str) {
        if exp <= now().as_str() {
            return AdmissionResponse::from(req)
                .deny(format!("ApprovalRequest {} expired at {exp}", req.name));
        }
    }
    let mut after = before.clone();
    let status = after
        .as_object_mut()
        .map(|o| o.entry("status").or_insert_with(|| json!({})));
    if let Some(Value::Object(s)) = status {
        s.insert("approver".into(), json!(username));
        s.insert("approverGroups".into(), json!(groups));
        s.insert("decidedAt".into(), json!(now()));
    }
    patched(req, &before, &after)
}

fn stamp_kill_switch(req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return AdmissionResponse::from(req);
    }
    let before = to_value(&req.object);
    let old = to_value(&req.old_object);
    let engaged = |v: &Value| {
        v.pointer("/spec/engaged")
            .and_then(Value::as_bool)
            .unwrap_or(true)
    };
    let was = req.operation == Operation::Update && engaged(&old);
    let is = engaged(&before);
    let (username, _) = user(req);
    let mut after = before.clone();
    let ann = after
        .pointer_mut("/metadata")
        .and_then(Value::as_object_mut)
        .map(|m| m.entry("annotations").or_insert_with(|| json!({})));
    if let Some(Value::Object(a)) = ann {
        // Whatever the client wrote into these annotations is replaced: they are facts the API
        // server vouches for, not claims.
        let old_ann = old
            .pointer("/metadata/annotations")
            .cloned()
            .unwrap_or(json!({}));
        for k in [ENGAGED_BY, LIFTED_BY, CHANGED_AT] {
            match old_ann.get(k) {
                Some(v) => a.insert(k.into(), v.clone()),
                None => a.remove(k),
            };
        }
        if is && (!was || req.operation == Operation::Create) {
            a.insert(ENGAGED_BY.into(), json!(username));
            a.insert(CHANGED_AT.into(), json!(now()));
        } else if !is && was {
            a.insert(LIFTED_BY.into(), json!(username));
            a.insert(CHANGED_AT.into(), json!(now()));
        }
    }
    patched(req, &before, &after)
}

/// `/validate`.
pub fn validate(req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    if req.operation == Operation::Delete {
        return AdmissionResponse::from(req);
    }
    let obj = to_value(&req.object);
    match req.kind.kind.as_str() {
        "AgentPolicy" => {
            let mut modules = Vec::new();
            if let Some(r) = obj.pointer("/spec/rego").and_then(Value::as_str) {
                modules.push((
                    format!(
                        "{}/{}.rego",
                        req.namespace.clone().unwrap_or_default(),
                        req.name
                    ),
                    r.to_string(),
                ));
            }
            for (i, m) in obj
                .pointer("/spec/modules")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let name = m
                    .get("name")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("module-{i}.rego"));
                if let Some(r) = m.get("rego").and_then(Value::as_str) {
                    modules.push((name, r.to_string()));
                }
            }
            if modules.is_empty() {
                return AdmissionResponse::from(req)
                    .deny("AgentPolicy has no Rego (spec.rego or spec.modules[].rego)");
            }
            match tollgate_policy::compile_check(&modules) {
                Ok(()) => AdmissionResponse::from(req),
                Err(e) => AdmissionResponse::from(req).deny(format!("Rego does not compile: {e}")),
            }
        }
        "Tool" => match obj.pointer("/spec/inputSchema") {
            Some(schema) if !schema.is_null() => match jsonschema::validator_for(schema) {
                Ok(_) => AdmissionResponse::from(req),
                Err(e) => AdmissionResponse::from(req)
                    .deny(format!("spec.inputSchema is not a valid JSON Schema: {e}")),
            },
            _ => AdmissionResponse::from(req),
        },
        _ => AdmissionResponse::from(req),
    }
}

#[cfg(test)]
mod tests;
