use super::*;
use crate::crd::*;
use serde_json::json;

fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap()
}

fn world() -> World {
    World {
        identities: vec![obj(
            json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentIdentity", "metadata": {"name": "billing", "namespace": "agents", "generation": 3},
            "spec": {"serviceAccount": "billing-agent", "tenants": ["acme"], "tools": ["stripe-refund"], "policies": ["refunds"], "budget": {"perRunUsd": 5.0}}}),
        )],
        tools: vec![obj(
            json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "Tool", "metadata": {"name": "stripe-refund", "namespace": "agents"},
            "spec": {"match": {"host": "api.stripe.com", "methods": ["POST"], "path": "/v1/refunds"}, "inputSchema": {"type": "object", "required": ["amount"]},
                     "risk": {"financial": true, "reversible": false}, "credentials": {"header": "Authorization", "prefix": "Bearer ", "secretName": "stripe", "key": "api-key"}}}),
        )],
        policies: vec![obj(
            json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentPolicy", "metadata": {"name": "refunds", "namespace": "agents"},
            "spec": {"rego": "package tollgate\nimport rego.v1\ndeny contains \"too big\" if input.request.body.amount > data.tollgate_config.max\n", "data": {"max": 100}}}),
        )],
        tenants: vec![obj(
            json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": "acme"}, "spec": {"budgets": {"dayUsd": 50.0}}}),
        )],
        kill_switches: vec![],
        approvals: vec![],
    }
}

#[test]
fn an_identity_builds_into_a_valid_proxy_config() {
    let w = world();
    let c = build_agent(&w, &w.identities[0]).unwrap();
    assert_eq!(c.agent.name, "billing");
    assert_eq!(c.agent.namespace, "agents");
    assert_eq!(c.tools.len(), 1);
    assert_eq!(c.tools[0].name, "stripe-refund");
    let cred = c.tools[0].credentials.as_ref().unwrap();
    assert_eq!(
        cred.value_from.file.as_deref(),
        Some("/var/run/tollgate/secrets/stripe/api-key"),
        "secrets are mounted, never put in the snapshot"
    );
    assert_eq!(c.policies.modules[0].name, "agents/refunds.rego");
    assert_eq!(c.policies.data["max"], 100);
    assert_eq!(c.tenants["acme"].budgets.day_usd, Some(50.0));
    assert_eq!(c.agent.budget.per_run_usd, Some(5.0));
    // It is exactly what the sidecar accepts.
    let mut check = c.clone();
    check.tools[0].credentials = None;
    tollgate_proxy::snapshot::Snapshot::build(check, 1, std::path::Path::new("/")).unwrap();
}

#[test]
fn missing_references_and_bad_rego_are_reported_not_built() {
    let mut w = world();
    w.identities[0].spec.tools.push("nope".into());
    let errs = build_agent(&w, &w.identities[0]).unwrap_err();
    assert!(
        errs.iter().any(|e| e.contains("Tool nope not found")),
        "{errs:?}"
    );
    let mut w = world();
    w.policies[0].spec.rego =
        Some("package tollgate\nimport rego.v1\ndeny contains x if {\n x := \n}\n".into());
    let errs = build_agent(&w, &w.identities[0]).unwrap_err();
    assert!(
        errs.iter()
            .any(|e| e.contains("does not compile") && e.contains("agents/refunds.rego")),
        "{errs:?}"
    );
    assert!(
        validate_policy(&w.policies[0]).unwrap_err().contains(":4"),
        "the error names the line"
    );
    let mut w = world();
    w.tools[0].spec.input_schema = Some(json!({"type": "nonsense"}));
    assert!(validate_tool(&w.tools[0]).is_err());
}

#[test]
fn kill_switches_and_decided_approvals_reach_the_snapshot() {
    let mut w = world();
    let ks = |name: &str, scope: serde_json::Value, engaged: bool| -> KillSwitch {
        obj(
            json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "KillSwitch", "metadata": {"name": name}, "spec": {"scope": scope, "engaged": engaged, "reason": "INC-1"}}),
        )
    };
    w.kill_switches = vec![
        ks("all", json!({"all": true}), true),
        ks("other-ns", json!({"namespace": "elsewhere"}), true),
        ks(
            "tenant",
            json!({"tenant": "acme", "tool": "stripe-refund"}),
            true,
        ),
        ks("lifted", json!({"agent": "billing"}), false),
    ];
    w.approvals = vec![
        obj(
            json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "ApprovalRequest", "metadata": {"name": "apr-1", "namespace": "agents"},
            "spec": {"key": "k1", "agent": "billing", "tenant": "acme", "tool": "stripe-refund", "summary": "refund", "expiresAt": "2099-01-01T00:00:00Z"},
            "status": {"phase": "Approved", "approver": "alice@example.com", "decidedAt": "2026-01-01T00:00:00Z"}}),
        ),
        obj(
            json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "ApprovalRequest", "metadata": {"name": "apr-2", "namespace": "agents"},
            "spec": {"key": "k2", "agent": "billing", "tenant": "acme", "tool": "stripe-refund", "summary": "refund", "expiresAt": "2099-01-01T00:00:00Z"},
            "status": {"phase": "Pending"}}),
        ),
    ];
    let c = build_agent(&w, &w.identities[0]).unwrap();
    let names: Vec<_> = c.kill_switches.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, vec!["all", "tenant"]);
    assert_eq!(c.approvals.granted.len(), 1);
    assert_eq!(c.approvals.granted[0].approver, "alice@example.com");
    assert_eq!(c.approvals.granted[0].decision, "approved");
    assert_eq!(
        affected_agents(&w, &w.kill_switches[0]),
        vec!["agents/billing".to_string()]
    );
    assert!(affected_agents(&w, &w.kill_switches[1]).is_empty());
}

#[test]
fn kill_switch_status_counts_only_agents_with_the_tool_or_tenant() {
    let mut w = world();
    let ks = |scope: serde_json::Value| -> KillSwitch {
        obj(
            json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "KillSwitch", "metadata": {"name": "k"}, "spec": {"scope": scope, "engaged": true, "reason": "INC-2"}}),
        )
    };
    let has = ks(json!({"namespace": "agents", "tool": "stripe-refund"}));
    let lacks = ks(json!({"namespace": "agents", "tool": "github-merge"}));
    let other_tenant = ks(json!({"tenant": "initech"}));
    assert_eq!(
        affected_agents(&w, &has),
        vec!["agents/billing".to_string()]
    );
    assert!(
        affected_agents(&w, &lacks).is_empty(),
        "billing has no github-merge"
    );
    assert!(
        affected_agents(&w, &other_tenant).is_empty(),
        "billing serves acme only"
    );
    w.kill_switches = vec![lacks];
    assert_eq!(affected_agents(&w, &w.kill_switches[0]).len(), 0);
}

#[test]
fn a_used_single_use_approval_is_withdrawn_from_the_snapshot() {
    let mut w = world();
    w.approvals = vec![obj(
        json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "ApprovalRequest", "metadata": {"name": "apr-1", "namespace": "agents"},
        "spec": {"key": "k1", "agent": "billing", "tenant": "acme", "tool": "stripe-refund", "summary": "refund", "expiresAt": "2099-01-01T00:00:00Z"},
        "status": {"phase": "Approved", "approver": "alice@example.com", "decidedAt": "2026-01-01T00:00:00Z"}}),
    )];
    assert_eq!(
        build_agent(&w, &w.identities[0])
            .unwrap()
            .approvals
            .granted
            .len(),
        1
    );
    w.approvals[0].status.as_mut().unwrap().consumed_at = Some("2026-01-01T00:01:00Z".into());
    assert!(build_agent(&w, &w.identities[0])
        .unwrap()
        .approvals
        .granted
        .is_empty());
}
