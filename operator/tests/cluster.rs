//! Real-cluster suite. Runs against the cluster in `TOLLGATE_TEST_KUBECONFIG`; without it
//! each test prints why and passes as skipped, unless `TOLLGATE_TEST_REQUIRE_CLUSTER=1`, which
//! turns a missing cluster into a failure. Each test uses a fresh namespace and removes it.
//!
//! Against a real API server this covers what the in-process test server cannot model:
//! server-side apply of the generated CRDs (schema validation, CEL), status subresources,
//! watch semantics, and TokenReview of a real projected token.

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use std::time::{Duration, Instant};
use tollgate_operator::crd::{self, AgentIdentity, AgentPolicy, KillSwitch, Tenant, Tool};

/// The cluster to test against, or `None` (skip) when none is configured.
async fn cluster() -> Option<Client> {
    let Ok(path) = std::env::var("TOLLGATE_TEST_KUBECONFIG") else {
        if std::env::var("TOLLGATE_TEST_REQUIRE_CLUSTER").as_deref() == Ok("1") {
            panic!("TOLLGATE_TEST_REQUIRE_CLUSTER=1 but TOLLGATE_TEST_KUBECONFIG is not set");
        }
        eprintln!("skipped: set TOLLGATE_TEST_KUBECONFIG to run the real-cluster suite");
        return None;
    };
    std::env::set_var("KUBECONFIG", &path);
    let kc = kube::config::Kubeconfig::read_from(&path).expect("TOLLGATE_TEST_KUBECONFIG reads");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("kubeconfig is usable");
    Some(Client::try_from(cfg).expect("client"))
}

async fn apply_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, v) in crd::crds() {
        let name = v["metadata"]["name"].as_str().unwrap().to_string();
        api.patch(
            &name,
            &PatchParams::apply("tollgate-test").force(),
            &Patch::Apply(&v),
        )
        .await
        .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
        let t0 = Instant::now();
        loop {
            let c = api.get(&name).await.unwrap();
            let established = c
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "CRD {name} not established"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

struct TestNs {
    name: String,
}

impl TestNs {
    async fn new(client: &Client) -> Self {
        let name = format!("tollgate-test-{:x}", rand::random::<u32>());
        let api: Api<Namespace> = Api::all(client.clone());
        api.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
        )
        .await
        .unwrap();
        Self { name }
    }
}

impl Drop for TestNs {
    /// Clean up on a thread with its own runtime and its own client. The test's `Client` must
    /// not be used here: its connection worker lives on the test's runtime, which is blocked
    /// in this `drop` until the thread is joined — using it deadlocked and leaked namespaces.
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let Some(path) = std::env::var_os("TOLLGATE_TEST_KUBECONFIG") else {
                    return;
                };
                let Ok(kc) = kube::config::Kubeconfig::read_from(&path) else {
                    return;
                };
                let Ok(cfg) = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await
                else {
                    return;
                };
                let Ok(client) = Client::try_from(cfg) else {
                    return;
                };
                let _ = Api::<Namespace>::all(client.clone())
                    .delete(&name, &DeleteParams::default())
                    .await;
                let _ = Api::<KillSwitch>::all(client.clone())
                    .delete(&format!("{name}-stop"), &DeleteParams::default())
                    .await;
                let _ = Api::<Tenant>::all(client)
                    .delete(&name, &DeleteParams::default())
                    .await;
            })
        })
        .join();
    }
}

async fn create_kinds(client: &Client, ns: &str, rego: &str) {
    let pp = PostParams::default();
    Api::<Tenant>::all(client.clone())
        .create(&pp, &serde_json::from_value(json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": ns}, "spec": {"budgets": {"dayUsd": 10.0}}})).unwrap())
        .await
        .unwrap();
    Api::<Tool>::namespaced(client.clone(), ns)
        .create(&pp, &serde_json::from_value(json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "Tool", "metadata": {"name": "notes"}, "spec": {"match": {"host": "notes.example.com", "methods": ["POST"], "path": "/v1/notes"}}})).unwrap())
        .await
        .unwrap();
    Api::<AgentPolicy>::namespaced(client.clone(), ns)
        .create(&pp, &serde_json::from_value(json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentPolicy", "metadata": {"name": "p"}, "spec": {"rego": rego}})).unwrap())
        .await
        .unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": "agent"}})).unwrap(),
        )
        .await
        .unwrap();
    Api::<AgentIdentity>::namespaced(client.clone(), ns)
        .create(&pp, &serde_json::from_value(json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentIdentity", "metadata": {"name": "agent"},
            "spec": {"serviceAccount": "agent", "tenants": [ns], "tools": ["notes"], "policies": ["p"]}})).unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn crds_apply_and_every_kind_is_accepted_and_validated() {
    let Some(client) = cluster().await else {
        return;
    };
    apply_crds(&client).await;
    let ns = TestNs::new(&client).await;
    create_kinds(
        &client,
        &ns.name,
        "package tollgate\nimport rego.v1\ndeny contains \"no\" if false\n",
    )
    .await;
    // CEL: a kill switch with an empty scope is rejected by the API server.
    let bad = Api::<KillSwitch>::all(client.clone())
        .create(&PostParams::default(), &serde_json::from_value(json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "KillSwitch", "metadata": {"name": format!("{}-bad", ns.name)}, "spec": {"scope": {}, "reason": "x"}})).unwrap())
        .await;
    assert!(
        bad.is_err(),
        "an empty kill-switch scope must be rejected by the CRD's CEL rule"
    );
}

#[tokio::test]
async fn reconcile_serve_propagate_and_report() {
    let Some(client) = cluster().await else {
        return;
    };
    apply_crds(&client).await;
    let ns = TestNs::new(&client).await;
    create_kinds(
        &client,
        &ns.name,
        "package tollgate\nimport rego.v1\ndeny contains \"no\" if false\n",
    )
    .await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let args = tollgate_operator::run::RunArgs {
        listen: format!("127.0.0.1:{port}"),
        identity: "test".into(),
        lease_namespace: ns.name.clone(),
        no_leader_elect: true,
        webhook_listen: None,
        inject_config: None,
        webhook_service: "tollgate-operator".into(),
        webhook_config_name: "tollgate".into(),
        certs: Default::default(),
    };
    tokio::spawn(async move { tollgate_operator::run::run(args).await });
    // Reconciled to Ready.
    let ids: Api<AgentIdentity> = Api::namespaced(client.clone(), &ns.name);
    let t0 = Instant::now();
    loop {
        let i = ids.get("agent").await.unwrap();
        if i.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        }) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "identity never became Ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A real projected-style token for the agent's ServiceAccount, audience tollgate.
    let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns.name);
    let tr: TokenRequest = sa
        .create_token_request(
            "agent",
            &PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec {
                    audiences: vec!["tollgate".into()],
                    expiration_seconds: Some(600),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let token = tr.status.map(|s| s.token).expect("token issued");
    let http = reqwest_like(
        port,
        &format!(
            "/v1/snapshot?agent={}/agent&version=0&timeoutSeconds=1",
            ns.name
        ),
        &token,
    )
    .await;
    assert_eq!(http.0, 200, "{}", http.1);
    let v: serde_json::Value = serde_json::from_str(&http.1).unwrap();
    let hash = v["hash"].as_str().unwrap().to_string();
    // Kill switch: time from apply to the long-poll answering with the new snapshot.
    let t0 = Instant::now();
    Api::<KillSwitch>::all(client.clone())
        .create(&PostParams::default(), &serde_json::from_value(json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "KillSwitch", "metadata": {"name": format!("{}-stop", ns.name)}, "spec": {"scope": {"namespace": ns.name}, "reason": "test"}})).unwrap())
        .await
        .unwrap();
    let changed = reqwest_like(
        port,
        &format!(
            "/v1/snapshot?agent={}/agent&hash={hash}&timeoutSeconds=30",
            ns.name
        ),
        &token,
    )
    .await;
    println!(
        "kill switch reached the snapshot API in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    assert!(
        changed.1.contains(&format!("{}-stop", ns.name)),
        "{}",
        changed.1
    );
    // Another ServiceAccount's token is refused.
    let other = reqwest_like(
        port,
        "/v1/snapshot?agent=kube-system/agent&version=0&timeoutSeconds=1",
        &token,
    )
    .await;
    assert_eq!(other.0, 403);
    // A bad policy is reported in status.
    let pols: Api<AgentPolicy> = Api::namespaced(client.clone(), &ns.name);
    pols.patch("p", &PatchParams::default(), &Patch::Merge(json!({"spec": {"rego": "package tollgate\nimport rego.v1\ndeny contains x if {\n x := \n}\n"}})))
        .await
        .unwrap();
    let t0 = Instant::now();
    loop {
        let p = pols.get("p").await.unwrap();
        if p.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Compiled" && c.status == "False")
        }) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "bad policy never reported"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A GET with a bearer token over a plain TCP connection (status, body).
async fn reqwest_like(port: u16, path: &str, token: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}
