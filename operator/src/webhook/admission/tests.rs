use super::*;
use kube::core::admission::AdmissionReview;

/// Build a request as the API server sends it (AdmissionReview v1 JSON).
fn review(
    kind: &str,
    resource: &str,
    sub: Option<&str>,
    op: &str,
    user: &str,
    object: Value,
    old: Value,
) -> AdmissionRequest<DynamicObject> {
    let (group, version) = if kind == "Pod" {
        ("", "v1")
    } else {
        ("tollgate.dev", "v1alpha1")
    };
    let rv: AdmissionReview<DynamicObject> = serde_json::from_value(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "subResource": sub,
            "name": object.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("x"),
            "namespace": "billing",
            "operation": op,
            "userInfo": {"username": user, "groups": ["sre", "system:authenticated"]},
            "object": object,
            "oldObject": if old.is_null() { Value::Null } else { old },
            "dryRun": false
        }
    }))
    .unwrap();
    rv.try_into().unwrap()
}

fn apply(resp: &AdmissionResponse, obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(p) = &resp.patch {
        let patch: json_patch::Patch = serde_json::from_slice(p).unwrap();
        json_patch::patch(&mut v, &patch).unwrap();
    }
    v
}

fn approval(phase: &str, extra_status: Value) -> Value {
    let mut status = json!({"phase": phase});
    if let (Some(s), Some(e)) = (status.as_object_mut(), extra_status.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "ApprovalRequest",
           "metadata": {"name": "apr-1", "namespace": "billing"},
           "spec": {"serviceAccount": "billing-agent", "key": "abc", "expiresAt": "2999-01-01T00:00:00Z"},
           "status": status})
}

#[test]
fn approver_is_stamped_from_user_info_not_the_client() {
    let old = approval("Pending", json!({}));
    let new = approval("Approved", json!({"approver": "someone-else"}));
    let req = review(
        "ApprovalRequest",
        "approvalrequests",
        Some("status"),
        "UPDATE",
        "alice@example.com",
        new.clone(),
        old,
    );
    let resp = stamp(&req);
    assert!(resp.allowed, "{:?}", resp.result);
    let out = apply(&resp, &new);
    assert_eq!(out["status"]["approver"], "alice@example.com");
    assert_eq!(out["status"]["approverGroups"][0], "sre");
    assert!(out["status"]["decidedAt"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn self_approval_and_changing_a_decision_are_rejected() {
    let old = approval("Pending", json!({}));
    let new = approval("Approved", json!({}));
    let req = review(
        "ApprovalRequest",
        "approvalrequests",
        Some("status"),
        "UPDATE",
        "system:serviceaccount:billing:billing-agent",
        new,
        old,
    );
    let resp = stamp(&req);
    assert!(!resp.allowed);
    assert!(resp.result.message.contains("self-approval"));
    let decided = approval("Denied", json!({"approver": "bob"}));
    let flip = approval("Approved", json!({"approver": "bob"}));
    let resp = stamp(&review(
        "ApprovalRequest",
        "approvalrequests",
        Some("status"),
        "UPDATE",
        "mallory",
        flip,
        decided,
    ));
    assert!(!resp.allowed);
    assert!(resp.result.message.contains("final"));
}

#[test]
fn a_recorded_use_is_allowed_but_cannot_be_undone() {
    let approved = approval("Approved", json!({"approver": "bob"}));
    let used = approval(
        "Approved",
        json!({"approver": "bob", "consumedAt": "2026-01-01T00:00:00Z", "consumedBy": "billing/a"}),
    );
    let record = review(
        "ApprovalRequest",
        "approvalrequests",
        Some("status"),
        "UPDATE",
        "system:serviceaccount:tollgate-system:tollgate-operator",
        used.clone(),
        approved.clone(),
    );
    assert!(stamp(&record).allowed, "the operator records the use");
    let undo = review(
        "ApprovalRequest",
        "approvalrequests",
        Some("status"),
        "UPDATE",
        "mallory",
        approved,
        used,
    );
    let resp = stamp(&undo);
    assert!(!resp.allowed);
    assert!(
        resp.result.message.contains("cannot be undone"),
        "{}",
        resp.result.message
    );
}

#[test]
fn expired_requests_cannot_be_approved() {
    let mut old = approval("Pending", json!({}));
    old["spec"]["expiresAt"] = json!("2001-01-01T00:00:00Z");
    let mut new = approval("Approved", json!({}));
    new["spec"]["expiresAt"] = json!("2001-01-01T00:00:00Z");
    let resp = stamp(&review(
        "ApprovalRequest",
        "approvalrequests",
        Some("status"),
        "UPDATE",
        "alice",
        new,
        old,
    ));
    assert!(!resp.allowed);
    assert!(resp.result.message.contains("expired"));
}

#[test]
fn kill_switch_engager_and_lifter_are_stamped() {
    let ks = |engaged: bool, ann: Value| json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "KillSwitch", "metadata": {"name": "stop-refunds", "annotations": ann}, "spec": {"engaged": engaged, "scope": {"tool": "stripe.create_refund"}}});
    let forged = ks(true, json!({ENGAGED_BY: "someone-innocent"}));
    let resp = stamp(&review(
        "KillSwitch",
        "killswitches",
        None,
        "CREATE",
        "oncall@example.com",
        forged.clone(),
        Value::Null,
    ));
    let out = apply(&resp, &forged);
    assert_eq!(
        out["metadata"]["annotations"][ENGAGED_BY],
        "oncall@example.com"
    );
    let lifted = ks(false, out["metadata"]["annotations"].clone());
    let resp = stamp(&review(
        "KillSwitch",
        "killswitches",
        None,
        "UPDATE",
        "lead@example.com",
        lifted.clone(),
        out,
    ));
    let out2 = apply(&resp, &lifted);
    assert_eq!(
        out2["metadata"]["annotations"][LIFTED_BY],
        "lead@example.com"
    );
    assert_eq!(
        out2["metadata"]["annotations"][ENGAGED_BY],
        "oncall@example.com"
    );
}

#[test]
fn bad_rego_and_bad_schemas_are_rejected() {
    let pol = |rego: &str| json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentPolicy", "metadata": {"name": "refunds"}, "spec": {"rego": rego}});
    let good = pol("package tollgate\nimport rego.v1\ndeny contains \"x\" if input.a == 1\n");
    assert!(
        validate(&review(
            "AgentPolicy",
            "agentpolicies",
            None,
            "CREATE",
            "u",
            good,
            Value::Null
        ))
        .allowed
    );
    let bad = pol("package tollgate\nimport rego.v1\ndeny contains x if {\n  x := \n}\n");
    let resp = validate(&review(
        "AgentPolicy",
        "agentpolicies",
        None,
        "CREATE",
        "u",
        bad,
        Value::Null,
    ));
    assert!(!resp.allowed);
    assert!(
        resp.result.message.contains("billing/refunds.rego:"),
        "names the line: {}",
        resp.result.message
    );
    let tool = |schema: Value| json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "Tool", "metadata": {"name": "t"}, "spec": {"inputSchema": schema}});
    assert!(
        validate(&review(
            "Tool",
            "tools",
            None,
            "CREATE",
            "u",
            tool(json!({"type": "object"})),
            Value::Null
        ))
        .allowed
    );
    assert!(
        !validate(&review(
            "Tool",
            "tools",
            None,
            "CREATE",
            "u",
            tool(json!({"type": "no-such-type"})),
            Value::Null
        ))
        .allowed
    );
}

#[test]
fn pods_are_patched_with_the_sidecar() {
    let cfg: InjectConfig = serde_json::from_value(
        json!({"image": "tollgate-proxy:test", "operatorUrl": "http://op:15080"}),
    )
    .unwrap();
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "billing", "labels": {"tollgate.dev/agent": "billing-dispute-v3"}}, "spec": {"containers": [{"name": "agent", "image": "python:3.12"}]}});
    let resp = mutate_pod(
        &review(
            "Pod",
            "pods",
            None,
            "CREATE",
            "system:serviceaccount:kube-system:replicaset-controller",
            pod.clone(),
            Value::Null,
        ),
        &cfg,
        |ns, agent| {
            assert_eq!((ns, agent), ("billing", "billing-dispute-v3"));
            Some(IdentityFacts {
                secrets: vec!["stripe".into()],
            })
        },
    );
    assert!(resp.allowed);
    let out = apply(&resp, &pod);
    assert_eq!(out["spec"]["initContainers"][0]["name"], "tollgate-proxy");
    assert_eq!(out["spec"]["initContainers"][0]["restartPolicy"], "Always");
    // Re-injection is a no-op: no patch.
    let again = mutate_pod(
        &review("Pod", "pods", None, "CREATE", "u", out.clone(), Value::Null),
        &cfg,
        |_, _| Some(IdentityFacts::default()),
    );
    assert!(again.patch.is_none());
    let plain = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
    assert!(mutate_pod(
        &review("Pod", "pods", None, "CREATE", "u", plain, Value::Null),
        &cfg,
        |_, _| Some(IdentityFacts::default())
    )
    .patch
    .is_none());
    // A pod labelled for an identity that does not exist is refused, not injected to hang.
    let resp = mutate_pod(
        &review("Pod", "pods", None, "CREATE", "u", pod.clone(), Value::Null),
        &cfg,
        |_, _| None,
    );
    assert!(!resp.allowed);
    assert!(
        resp.result
            .message
            .contains("no AgentIdentity billing/billing-dispute-v3"),
        "{}",
        resp.result.message
    );
}

#[test]
fn a_pending_request_can_be_voided_and_a_voided_one_not_decided() {
    let pending = approval("Pending", json!({}));
    let voided = approval("Voided", json!({"reason": "kill switch stop engaged"}));
    let void = review(
        "ApprovalRequest",
        "approvalrequests",
        Some("status"),
        "UPDATE",
        "system:serviceaccount:tollgate-system:tollgate-operator",
        voided.clone(),
        pending,
    );
    let resp = stamp(&void);
    assert!(resp.allowed, "{:?}", resp.result);
    let approve = review(
        "ApprovalRequest",
        "approvalrequests",
        Some("status"),
        "UPDATE",
        "alice@example.com",
        approval("Approved", json!({})),
        voided,
    );
    let resp = stamp(&approve);
    assert!(!resp.allowed);
    assert!(
        resp.result.message.contains("already Voided"),
        "{}",
        resp.result.message
    );
}
