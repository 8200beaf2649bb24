//! Reconciles against a scripted API server: every request the reconcile makes is checked, in
//! order, and answered by the test (as controller-rs's `ApiServerVerifier` does), and a
//! reconcile that makes a call the test did not expect, or misses one, fails.

use super::*;
use crate::crd::{AgentIdentity, ApprovalRequest, KillSwitch, Tool};
use crate::pki::{CaDistribution, CaMaterial};
use http::{Request, Response};
use kube::client::Body;
use kube::runtime::reflector;
use kube::runtime::watcher::Event;
use serde_json::{json, Value};
use tokio::sync::{mpsc as tmpsc, oneshot};

type Call = (Request<Body>, oneshot::Sender<Response<Body>>);

/// The scripted API server's side.
struct Verifier(tmpsc::UnboundedReceiver<Call>);

fn mock_client() -> (Client, Verifier) {
    let (tx, rx) = tmpsc::unbounded_channel::<Call>();
    let svc = tower::service_fn(move |req: Request<Body>| {
        let tx = tx.clone();
        async move {
            let (rtx, rrx) = oneshot::channel();
            tx.send((req, rtx)).map_err(|_| "verifier gone")?;
            rrx.await.map_err(|_| "no answer")
        }
    });
    (Client::new(svc, "default"), Verifier(rx))
}

impl Verifier {
    /// The next request must be `method path` (the query, when given, must contain each of
    /// `query`'s `k=v` pairs); answer it with `status` and `body`, and return its JSON body.
    async fn expect(
        &mut self,
        method: &str,
        path: &str,
        query: &[&str],
        status: u16,
        body: Value,
    ) -> Value {
        let (req, tx) = tokio::time::timeout(Duration::from_secs(10), self.0.recv())
            .await
            .unwrap_or_else(|_| panic!("expected {method} {path}, but no request came"))
            .expect("client alive");
        let got = format!("{} {}", req.method(), req.uri().path());
        assert_eq!(got, format!("{method} {path}"), "request out of order");
        let q = req.uri().query().unwrap_or("").to_string();
        for kv in query {
            assert!(
                q.split('&').any(|p| p == *kv),
                "{got}: query {q:?} lacks {kv}"
            );
        }
        use http_body_util::BodyExt;
        let bytes = req.into_body().collect().await.unwrap().to_bytes();
        let sent = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        let resp = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string().into_bytes()))
            .unwrap();
        tx.send(resp).expect("client waiting");
        sent
    }

    /// No request is left unanswered.
    fn done(mut self) {
        if let Ok((req, _)) = self.0.try_recv() {
            panic!("unexpected request {} {}", req.method(), req.uri());
        }
    }
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason})
}

fn store<K>(objs: Vec<K>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let (r, mut w) = reflector::store();
    w.apply_watcher_event(&Event::Init);
    for o in objs {
        w.apply_watcher_event(&Event::InitApply(o));
    }
    w.apply_watcher_event(&Event::InitDone);
    r
}

fn identity(tools: &[&str]) -> AgentIdentity {
    serde_json::from_value(json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": {"name": "billing", "namespace": "agents", "uid": "u-1", "generation": 1, "resourceVersion": "5"},
        "spec": {"serviceAccount": "billing-agent", "tenants": ["acme"], "tools": tools}}))
    .unwrap()
}

struct World {
    identities: Vec<AgentIdentity>,
    tools: Vec<Tool>,
    kill_switches: Vec<KillSwitch>,
    approvals: Vec<ApprovalRequest>,
    service_accounts: Vec<k8s_openapi::api::core::v1::ServiceAccount>,
}

fn context(client: Client, w: World, leader: bool) -> Arc<Context> {
    let metrics = Arc::new(Metrics::default());
    let hub = Arc::new(Hub::with_metrics(metrics.clone()));
    let server = Arc::new(ServerState {
        hub: hub.clone(),
        auth: crate::server::Authenticator::new(client.clone()),
        client: client.clone(),
        metrics: metrics.clone(),
        ready: true.into(),
        leader: leader.into(),
        usage: Default::default(),
        triggers: Default::default(),
        rejected: Default::default(),
        tool_definitions: Default::default(),
        intercept_ca: Default::default(),
    });
    let stores = Stores {
        identities: store(w.identities),
        tools: store(w.tools),
        policies: store(vec![]),
        tenants: store(vec![]),
        kill_switches: store(w.kill_switches),
        approvals: store(w.approvals),
        service_accounts: store(w.service_accounts),
    };
    let ca = CaDistribution::new(
        CaMaterial {
            trusted: "CA".into(),
            cert: "CA".into(),
            key: "KEY".into(),
            bundle: "ROOTS+CA".into(),
        },
        "tollgate-intercept-ca".into(),
        "tollgate-ca".into(),
    );
    let ctx = Context::new(
        client,
        hub,
        metrics,
        server,
        stores,
        Some(Arc::new(ca)),
        kube::runtime::events::Reporter {
            controller: "tollgate-operator".into(),
            instance: Some("test".into()),
        },
    );
    ctx.synced.store(true, Ordering::SeqCst);
    Arc::new(ctx)
}

fn world(identities: Vec<AgentIdentity>) -> World {
    World {
        identities,
        tools: vec![],
        kill_switches: vec![],
        approvals: vec![],
        service_accounts: vec![],
    }
}

const SSA: [&str; 2] = ["fieldManager=tollgate-operator", "force=true"];

#[tokio::test]
async fn a_new_identity_gets_its_service_account_ca_copies_status_and_event_in_order() {
    let (client, mut api) = mock_client();
    let id = identity(&[]);
    let ctx = context(client, world(vec![id.clone()]), true);
    let task = tokio::spawn(identity::reconcile(Arc::new(id.clone()), ctx.clone()));
    let sa = api
        .expect(
            "POST",
            "/api/v1/namespaces/agents/serviceaccounts",
            &[],
            201,
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "billing-agent", "namespace": "agents"}}),
        )
        .await;
    assert_eq!(sa["metadata"]["name"], "billing-agent");
    assert_eq!(
        sa["metadata"]["ownerReferences"][0]["uid"], "u-1",
        "owned by the identity"
    );
    api.expect(
        "GET",
        "/api/v1/namespaces/agents/secrets/tollgate-intercept-ca",
        &[],
        404,
        not_found(),
    )
    .await;
    let secret = api
        .expect(
            "POST",
            "/api/v1/namespaces/agents/secrets",
            &[],
            201,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tollgate-intercept-ca"}}),
        )
        .await;
    assert_eq!(secret["stringData"]["tls.key"], "KEY");
    assert_eq!(secret["stringData"]["ca.crt"], "CA");
    api.expect(
        "GET",
        "/api/v1/namespaces/agents/configmaps/tollgate-ca",
        &[],
        404,
        not_found(),
    )
    .await;
    let cm = api
        .expect(
            "POST",
            "/api/v1/namespaces/agents/configmaps",
            &[],
            201,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tollgate-ca"}}),
        )
        .await;
    assert_eq!(cm["data"]["ca-bundle.crt"], "ROOTS+CA");
    let st = api
        .expect(
            "PATCH",
            "/apis/tollgate.dev/v1alpha1/namespaces/agents/agentidentities/billing/status",
            &SSA,
            200,
            serde_json::to_value(&id).unwrap(),
        )
        .await;
    assert_eq!(st["apiVersion"], "tollgate.dev/v1alpha1");
    assert_eq!(st["kind"], "AgentIdentity");
    assert_eq!(st["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(st["status"]["conditions"][0]["status"], "True");
    let served = ctx.hub.get("agents/billing").expect("published");
    assert_eq!(st["status"]["snapshotVersion"], served.version);
    api.expect(
        "POST",
        "/apis/events.k8s.io/v1/namespaces/agents/events",
        &[],
        201,
        json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}, "eventTime": null}),
    )
    .await;
    let action = task.await.unwrap().expect("reconciled");
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    api.done();
}

#[tokio::test]
async fn a_follower_publishes_the_snapshot_and_makes_no_api_call() {
    let (client, api) = mock_client();
    let id = identity(&[]);
    let ctx = context(client, world(vec![id.clone()]), false);
    identity::reconcile(Arc::new(id), ctx.clone())
        .await
        .expect("reconciled");
    assert!(ctx.hub.get("agents/billing").is_some());
    api.done();
}

#[tokio::test]
async fn an_identity_with_a_missing_tool_reports_it_waits_for_a_change_and_is_counted() {
    let (client, mut api) = mock_client();
    let id = identity(&["refund"]);
    let mut w = world(vec![id.clone()]);
    w.service_accounts =
        vec![
            serde_json::from_value(json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "billing-agent", "namespace": "agents"}}))
            .unwrap(),
        ];
    let ctx = context(client, w, true);
    let task = tokio::spawn(identity::reconcile(Arc::new(id.clone()), ctx.clone()));
    // The ServiceAccount is in the cache: not created again.
    api.expect(
        "GET",
        "/api/v1/namespaces/agents/secrets/tollgate-intercept-ca",
        &[],
        200,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tollgate-intercept-ca"},
               "data": {"tls.crt": "Q0E=", "tls.key": "S0VZ", "ca.crt": "Q0E="}}),
    )
    .await;
    api.expect(
        "GET",
        "/api/v1/namespaces/agents/configmaps/tollgate-ca",
        &[],
        200,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tollgate-ca"},
               "data": {"ca.crt": "CA", "ca-bundle.crt": "ROOTS+CA"}}),
    )
    .await;
    let st = api
        .expect(
            "PATCH",
            "/apis/tollgate.dev/v1alpha1/namespaces/agents/agentidentities/billing/status",
            &SSA,
            200,
            serde_json::to_value(&id).unwrap(),
        )
        .await;
    assert_eq!(st["status"]["conditions"][0]["reason"], "InvalidReferences");
    assert_eq!(
        st["status"]["snapshotVersion"], 0,
        "nothing was ever served"
    );
    api.expect(
        "POST",
        "/apis/events.k8s.io/v1/namespaces/agents/events",
        &[],
        201,
        json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}}),
    )
    .await;
    let err = task.await.unwrap().expect_err("invalid spec");
    assert_eq!(err.metric_label(), "invalid_spec");
    assert_eq!(
        error_policy(Arc::new(id), &err, ctx.clone()),
        Action::await_change()
    );
    assert_eq!(
        ctx.metrics
            .reconcile_errors
            .with_label_values(&["AgentIdentity", "invalid_spec"])
            .get(),
        1
    );
    assert!(ctx.hub.get("agents/billing").is_none(), "nothing served");
    api.done();
}

#[tokio::test]
async fn a_failed_status_write_backs_off_exponentially() {
    let (client, mut api) = mock_client();
    let id = identity(&[]);
    let mut w = world(vec![id.clone()]);
    w.service_accounts =
        vec![
            serde_json::from_value(json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "billing-agent", "namespace": "agents"}}))
            .unwrap(),
        ];
    let ctx = context(client, w, true);
    let mut waits = Vec::new();
    for round in 0..3 {
        let task = tokio::spawn(identity::reconcile(Arc::new(id.clone()), ctx.clone()));
        if round == 0 {
            for (path, body) in [
                (
                    "secrets/tollgate-intercept-ca",
                    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tollgate-intercept-ca"}, "data": {"tls.crt": "Q0E=", "tls.key": "S0VZ", "ca.crt": "Q0E="}}),
                ),
                (
                    "configmaps/tollgate-ca",
                    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tollgate-ca"}, "data": {"ca.crt": "CA", "ca-bundle.crt": "ROOTS+CA"}}),
                ),
            ] {
                api.expect(
                    "GET",
                    &format!("/api/v1/namespaces/agents/{path}"),
                    &[],
                    200,
                    body,
                )
                .await;
            }
        }
        // The namespace's copies were checked once; only the status is retried.
        api.expect(
            "PATCH",
            "/apis/tollgate.dev/v1alpha1/namespaces/agents/agentidentities/billing/status",
            &SSA,
            500,
            status(500, "InternalError"),
        )
        .await;
        let err = task.await.unwrap().expect_err("status write failed");
        assert_eq!(err.metric_label(), "status");
        waits.push(error_policy(Arc::new(id.clone()), &err, ctx.clone()));
    }
    assert_eq!(
        waits,
        [
            Action::requeue(Duration::from_millis(500)),
            Action::requeue(Duration::from_millis(1000)),
            Action::requeue(Duration::from_millis(2000)),
        ]
    );
    api.done();
}

#[tokio::test]
async fn a_new_approval_request_is_marked_pending_conditionally_and_a_decision_wins() {
    let (client, mut api) = mock_client();
    let a: ApprovalRequest = serde_json::from_value(json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "ApprovalRequest",
        "metadata": {"name": "ap-1", "namespace": "agents", "resourceVersion": "41"},
        "spec": {"key": "k", "agent": "billing", "serviceAccount": "billing-agent", "tenant": "acme", "run": "r", "tool": "t", "summary": "s", "expiresAt": "2030-01-01T00:00:00Z"}}))
    .unwrap();
    let mut w = world(vec![]);
    w.approvals = vec![a.clone()];
    let ctx = context(client, w, true);
    let task = tokio::spawn(status::reconcile_approval(Arc::new(a.clone()), ctx.clone()));
    let body = api
        .expect(
            "PATCH",
            "/apis/tollgate.dev/v1alpha1/namespaces/agents/approvalrequests/ap-1/status",
            &["fieldManager=tollgate-operator"],
            409,
            status(409, "Conflict"),
        )
        .await;
    assert_eq!(
        body["status"],
        json!({"phase": "Pending"}),
        "only the phase"
    );
    assert_eq!(
        body["metadata"]["resourceVersion"], "41",
        "conditional on the version read"
    );
    // Someone decided in between: the conflict is the expected outcome, not an error.
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    assert_eq!(ctx.metrics.approvals_pending.get(), 1);
    api.done();
}

#[tokio::test]
async fn a_kill_switch_status_counts_the_agents_it_affects() {
    let (client, mut api) = mock_client();
    let k: KillSwitch = serde_json::from_value(json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "KillSwitch",
        "metadata": {"name": "stop", "generation": 4}, "spec": {"scope": {"namespace": "agents"}, "engaged": true, "reason": "incident"}}))
    .unwrap();
    let mut w = world(vec![identity(&[])]);
    w.kill_switches = vec![k.clone()];
    let ctx = context(client, w, true);
    let task = tokio::spawn(status::reconcile_kill_switch(
        Arc::new(k.clone()),
        ctx.clone(),
    ));
    let body = api
        .expect(
            "PATCH",
            "/apis/tollgate.dev/v1alpha1/killswitches/stop/status",
            &SSA,
            200,
            serde_json::to_value(&k).unwrap(),
        )
        .await;
    assert_eq!(body["status"]["agents"], json!(["agents/billing"]));
    assert_eq!(body["status"]["affectedAgents"], 1);
    assert_eq!(body["status"]["observedGeneration"], 4);
    api.expect(
        "POST",
        "/apis/events.k8s.io/v1/namespaces/default/events",
        &[],
        201,
        json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}}),
    )
    .await;
    task.await.unwrap().unwrap();
    api.done();
}

/// A pinned Tool's `DefinitionPinned` condition from sidecar reports (pure): not observed,
/// matching, and a changed definition from any one sidecar winning over matching ones; with no
/// report since a restart, the kept `observedDefinition` decides.
#[test]
fn a_pinned_tools_condition_follows_what_sidecars_report() {
    use crate::server::ReportedDefinition;
    let good = "a".repeat(64);
    let bad = "b".repeat(64);
    let mut t: Tool = serde_json::from_value(json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "Tool",
        "metadata": {"name": "orders", "namespace": "agents", "generation": 2},
        "spec": {"match": {"host": "mcp.internal", "mcpTool": "lookup"}, "pin": {"sha256": good}}
    }))
    .unwrap();
    let report = |sha: &str, agent: &str, at: &str| ReportedDefinition {
        sha256: sha.into(),
        definition: Some(json!({"name": "lookup", "description": sha, "inputSchema": null})),
        agent: agent.into(),
        observed_at: at.into(),
    };
    let cond = |s: &crate::crd::ToolStatus| {
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == status::DEFINITION_PINNED)
            .unwrap();
        (c.status.clone(), c.reason.clone())
    };
    let s = status::tool_status(&t, &[]);
    assert_eq!(cond(&s), ("Unknown".into(), "NotObserved".into()));
    assert_eq!(s.conditions[0].type_, "Valid");
    let s = status::tool_status(&t, &[report(&good, "agents/a", "2026-01-01T00:00:02Z")]);
    assert_eq!(cond(&s), ("True".into(), "Matches".into()));
    // An older changed report from another sidecar still wins over a newer matching one.
    let s = status::tool_status(
        &t,
        &[
            report(&bad, "agents/b", "2026-01-01T00:00:01Z"),
            report(&good, "agents/a", "2026-01-01T00:00:02Z"),
        ],
    );
    assert_eq!(cond(&s), ("False".into(), "DefinitionChanged".into()));
    let o = s.observed_definition.clone().unwrap();
    assert_eq!(
        (o.sha256.as_str(), o.agent.as_str()),
        (bad.as_str(), "agents/b")
    );
    assert!(s.conditions[1].message.contains(&good) && s.conditions[1].message.contains(&bad));
    // After a restart (no reports), the kept observation decides; re-pinned to it, it matches.
    t.status = Some(s);
    let s = status::tool_status(&t, &[]);
    assert_eq!(cond(&s), ("False".into(), "DefinitionChanged".into()));
    t.spec.pin = Some(tollgate_proxy::config::ToolPin {
        sha256: Some(bad.clone()),
        definition: None,
    });
    assert_eq!(
        cond(&status::tool_status(&t, &[])),
        ("True".into(), "Matches".into())
    );
    // An unpinned tool has no DefinitionPinned condition, but keeps what was observed.
    t.spec.pin = None;
    let s = status::tool_status(&t, &[report(&good, "agents/a", "2026-01-01T00:00:03Z")]);
    assert_eq!(s.conditions.len(), 1);
    assert_eq!(s.observed_definition.unwrap().sha256, good);
    // A malformed pin makes the Tool invalid.
    t.spec.pin = Some(tollgate_proxy::config::ToolPin {
        sha256: Some("xyz".into()),
        definition: None,
    });
    let s = status::tool_status(&t, &[]);
    assert_eq!(s.conditions[0].status, "False");
    assert!(
        s.conditions[0].message.contains("spec.pin.sha256"),
        "{:?}",
        s.conditions[0]
    );
}
