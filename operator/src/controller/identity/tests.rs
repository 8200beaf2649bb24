//! The pure steps of the identity reconcile: no client, no API server.

use super::*;
use kube::runtime::reflector;
use kube::runtime::watcher::Event;
use serde_json::json;

fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap()
}

fn identity(name: &str, ns: &str, tools: &[&str]) -> AgentIdentity {
    obj(
        json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": {"name": name, "namespace": ns, "generation": 2},
        "spec": {"serviceAccount": format!("{name}-sa"), "tenants": ["acme"], "tools": tools}}),
    )
}

fn store<K>(objs: Vec<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (r, mut w) = reflector::store();
    w.apply_watcher_event(&Event::Init);
    for o in objs {
        w.apply_watcher_event(&Event::InitApply(o));
    }
    w.apply_watcher_event(&Event::InitDone);
    r
}

fn kill_switch(name: &str, scope: serde_json::Value, engaged: bool) -> KillSwitch {
    obj(
        json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "KillSwitch",
        "metadata": {"name": name}, "spec": {"scope": scope, "engaged": engaged, "reason": "r"}}),
    )
}

fn names(refs: Vec<ObjectRef<AgentIdentity>>) -> Vec<String> {
    let mut v: Vec<String> = refs
        .into_iter()
        .map(|r| format!("{}/{}", r.namespace.unwrap_or_default(), r.name))
        .collect();
    v.sort();
    v
}

#[test]
fn a_tool_maps_only_to_identities_in_its_namespace_that_list_it() {
    let ids = store(vec![
        identity("a", "agents", &["refund"]),
        identity("b", "agents", &["search"]),
        identity("c", "other", &["refund"]),
    ]);
    let tool: Tool = obj(
        json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "Tool",
        "metadata": {"name": "refund", "namespace": "agents"}, "spec": {"match": {"host": "x"}}}),
    );
    assert_eq!(names(map_tool(&ids, &tool)), ["agents/a"]);
}

#[test]
fn a_kill_switch_maps_to_its_scope_engaged_or_not_and_to_identities_still_holding_it() {
    let ids = store(vec![
        identity("a", "agents", &[]),
        identity("b", "agents", &[]),
        identity("c", "other", &[]),
    ]);
    let none = HashMap::new();
    let ns = kill_switch("k", json!({"namespace": "agents"}), true);
    assert_eq!(
        names(map_kill_switch(&ids, &none, &ns)),
        ["agents/a", "agents/b"]
    );
    // Lifting must reach the same identities.
    let lifted = kill_switch("k", json!({"namespace": "agents"}), false);
    assert_eq!(
        names(map_kill_switch(&ids, &none, &lifted)),
        ["agents/a", "agents/b"]
    );
    // The scope moved to another agent: the one still holding it is reconciled too.
    let moved = kill_switch("k", json!({"namespace": "other", "agent": "c"}), true);
    let holders: HashMap<String, Vec<String>> =
        [("agents/a".to_string(), vec!["k".to_string()])].into();
    assert_eq!(
        names(map_kill_switch(&ids, &holders, &moved)),
        ["agents/a", "other/c"]
    );
    let all = kill_switch("all", json!({"all": true}), true);
    assert_eq!(names(map_kill_switch(&ids, &none, &all)).len(), 3);
}

#[test]
fn dereference_reads_only_what_the_identity_refers_to() {
    let id = identity("a", "agents", &["refund", "missing"]);
    let tool = |name: &str, ns: &str| -> Tool {
        obj(
            json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "Tool",
            "metadata": {"name": name, "namespace": ns}, "spec": {"match": {"host": "x"}}}),
        )
    };
    let approval = |name: &str, agent: &str| -> ApprovalRequest {
        obj(
            json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "ApprovalRequest",
            "metadata": {"name": name, "namespace": "agents"},
            "spec": {"key": "k", "agent": agent, "serviceAccount": "s", "tenant": "acme", "run": "r", "tool": "t", "summary": "s", "expiresAt": "2030-01-01T00:00:00Z"}}),
        )
    };
    let stores = Stores {
        identities: store(vec![id.clone()]),
        tools: store(vec![
            tool("refund", "agents"),
            tool("refund", "other"),
            tool("search", "agents"),
        ]),
        policies: store(vec![]),
        tenants: store(vec![]),
        kill_switches: store(vec![kill_switch("k", json!({"all": true}), true)]),
        approvals: store(vec![approval("mine", "a"), approval("theirs", "b")]),
        service_accounts: store(vec![]),
    };
    let w = dereference(&stores, &id);
    assert_eq!(w.tools.len(), 1);
    assert_eq!(w.tools[0].namespace().as_deref(), Some("agents"));
    assert_eq!(w.kill_switches.len(), 1);
    assert_eq!(
        w.approvals.iter().map(|a| a.name_any()).collect::<Vec<_>>(),
        ["mine"]
    );
    // The missing tool makes the build fail with a reason, which is an invalid spec.
    match validate_and_build(&w, &id) {
        Err(Error::InvalidSpec(p)) => {
            assert!(
                p.iter().any(|m| m.contains("Tool missing not found")),
                "{p:?}"
            )
        }
        other => panic!("expected an invalid spec, got {other:?}"),
    }
}

#[test]
fn desired_status_says_why_an_identity_is_not_ready() {
    let id = identity("a", "agents", &[]);
    let ok = desired_status(&id, Ok(()), 7, None, 1.5);
    assert_eq!(ok.conditions[0].status, "True");
    assert_eq!(ok.conditions[0].message, "snapshot version 7");
    assert_eq!((ok.snapshot_version, ok.observed_generation), (7, 2));
    assert_eq!(ok.spend_today_usd, 1.5);
    let problems = vec!["Tool x not found".to_string()];
    let bad = desired_status(&id, Err(&problems), 7, None, 0.0);
    assert_eq!(
        (
            bad.conditions[0].status.as_str(),
            bad.conditions[0].reason.as_str()
        ),
        ("False", "InvalidReferences")
    );
    assert_eq!(
        bad.snapshot_version, 7,
        "the last good version stays served"
    );
    let rejected = desired_status(&id, Ok(()), 7, Some("cannot read x"), 0.0);
    assert_eq!(rejected.conditions[0].reason, "SnapshotRejected");
    assert!(rejected.conditions[0].message.contains("cannot read x"));
}

#[test]
fn an_unchanged_condition_keeps_its_transition_time_and_the_status_is_current() {
    let mut id = identity("a", "agents", &[]);
    let first = desired_status(&id, Ok(()), 7, None, 0.0);
    let mut stored = first.clone();
    stored.conditions[0].last_transition_time = "2020-01-01T00:00:00Z".into();
    id.status = Some(stored);
    let again = desired_status(&id, Ok(()), 7, None, 0.0);
    assert_eq!(
        again.conditions[0].last_transition_time,
        "2020-01-01T00:00:00Z"
    );
    assert!(status_current(&id, &again));
    let newer = desired_status(&id, Ok(()), 8, None, 0.0);
    assert!(!status_current(&id, &newer));
    let flipped = desired_status(&id, Err(&["x".to_string()]), 7, None, 0.0);
    assert_ne!(
        flipped.conditions[0].last_transition_time,
        "2020-01-01T00:00:00Z"
    );
}

#[test]
fn a_rejection_counts_only_for_the_snapshot_served() {
    let rejected: Rejections = [(
        ("agents/a".to_string(), "pod-1".to_string()),
        ("h1".to_string(), "bad".to_string()),
    )]
    .into();
    assert_eq!(rejection(&rejected, "agents/a", "h1"), Some("bad"));
    assert_eq!(rejection(&rejected, "agents/a", "h2"), None);
    assert_eq!(rejection(&rejected, "agents/b", "h1"), None);
}
