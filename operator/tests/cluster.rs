//! Real-cluster suite (issue 18). Runs against the cluster in `TOLLGATE_TEST_KUBECONFIG`;
//! without it each test prints why and passes as skipped, unless
//! `TOLLGATE_TEST_REQUIRE_CLUSTER=1`, which turns a missing cluster into a failure. How to run
//! it (kind, k3s or any cluster) is in docs/testing-on-a-cluster.md.
//!
//! ```text
//! cargo build --workspace --bins      # the tests start target/debug/tollgate-{operator,proxy}
//! TOLLGATE_TEST_KUBECONFIG=$HOME/.kube/config TOLLGATE_TEST_REQUIRE_CLUSTER=1 \
//!   TOLLGATE_TEST_OPERATOR_IMAGE=tollgate-operator:dev TOLLGATE_TEST_PROXY_IMAGE=tollgate-proxy:dev \
//!   cargo nextest run -p tollgate-operator --test cluster
//! ```
//!
//! Where the operator runs, per test:
//! - **Out of cluster** (the test starts `target/debug/tollgate-operator run` against the
//!   kubeconfig, its Lease and CA Secrets in the test's namespace): the CRDs and CEL rules,
//!   reconcile to Ready, snapshots through real TokenReview (a TokenRequest token; another
//!   ServiceAccount's and a wrong audience refused), a kill switch reaching a real
//!   `tollgate-proxy` sidecar, the examples to Ready, the approval cycle with two replicas
//!   (single use cluster-wide), leader failover. These need only the API server, so they also
//!   run in CI against the in-process test API server (`tests/tests/cluster_suite.rs` writes a
//!   kubeconfig pointing at it).
//! - **In cluster** (`helm upgrade --install` of `charts/tollgate` into a fresh namespace with
//!   the images in `TOLLGATE_TEST_OPERATOR_IMAGE` / `TOLLGATE_TEST_PROXY_IMAGE`): the chart
//!   install, its validating webhook refusing bad Rego, and pod injection admitted by the
//!   server. These need a real server (pods, admission); against the in-process one they
//!   skip, and under `TOLLGATE_TEST_REQUIRE_CLUSTER=1` fail.
//!
//! Every test works whether or not the chart's admission webhooks are installed: the objects
//! it creates pass them, and a refusal by the validating webhook counts as the check it makes.
//! Each test removes what it created with an explicit async cleanup; if it panics first, a
//! `Drop` fallback removes it on its own thread, runtime and client (the test's client must not
//! be used there: its connection worker lives on the runtime `drop` blocks).
//!
//! (One file, about 1,100 lines: one suite with one namespace fixture and cleanup, run as
//! one binary against a real cluster; `tests/tests/cluster_suite.rs` runs this binary.)

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tollgate_operator::crd::{
    self, AgentIdentity, AgentPolicy, ApprovalRequest, KillSwitch, Tenant,
};

const GV: &str = "tollgate.dev/v1alpha1";

/// The cluster under test.
struct Cluster {
    client: Client,
    kubeconfig: PathBuf,
    /// The in-process test API server (no pods, no admission, no CEL on custom objects).
    in_process: bool,
}

fn require_cluster() -> bool {
    std::env::var("TOLLGATE_TEST_REQUIRE_CLUSTER").as_deref() == Ok("1")
}

/// The cluster to test against, or `None` (skip) when none is configured.
async fn cluster() -> Option<Cluster> {
    let Some(path) = std::env::var_os("TOLLGATE_TEST_KUBECONFIG") else {
        assert!(
            !require_cluster(),
            "TOLLGATE_TEST_REQUIRE_CLUSTER=1 but TOLLGATE_TEST_KUBECONFIG is not set"
        );
        println!("skipped: set TOLLGATE_TEST_KUBECONFIG to run the real-cluster suite");
        return None;
    };
    let client = client_for(Path::new(&path))
        .await
        .expect("TOLLGATE_TEST_KUBECONFIG is a usable kubeconfig");
    let version: Value = client
        .request(http::Request::get("/version").body(Vec::new()).unwrap())
        .await
        .expect("the API server answers /version");
    let git_version = version["gitVersion"].as_str().unwrap_or("").to_string();
    let in_process = git_version.contains("tollgate-test");
    println!("cluster-suite: API server {git_version}");
    Some(Cluster {
        client,
        kubeconfig: PathBuf::from(path),
        in_process,
    })
}

async fn client_for(path: &Path) -> Result<Client, String> {
    let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| e.to_string())?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| e.to_string())?;
    Client::try_from(cfg).map_err(|e| e.to_string())
}

impl Cluster {
    /// Can this cluster run `what`? The in-process server cannot run pods or admission: skip
    /// there, or fail under `TOLLGATE_TEST_REQUIRE_CLUSTER=1`.
    fn real_server_for(&self, what: &str) -> bool {
        if !self.in_process {
            return true;
        }
        assert!(
            !require_cluster(),
            "TOLLGATE_TEST_REQUIRE_CLUSTER=1 but the API server is the in-process test server, which cannot run {what}"
        );
        println!("skipped: {what} needs a real API server");
        false
    }
}

fn passed(test: &str) {
    println!("cluster-suite: {test} passed");
}

async fn until<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !f().await {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "{what}: not within {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
        until(&format!("CRD {name} established"), 60, || async {
            api.get(&name).await.is_ok_and(|c| {
                c.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            })
        })
        .await;
    }
}

/// What a test created: a namespace (deleted with everything in it) and cluster-scoped
/// objects.
struct TestNs {
    name: String,
    kubeconfig: PathBuf,
    tenants: Vec<String>,
    kill_switches: Vec<String>,
    cleaned: bool,
}

impl TestNs {
    async fn new(c: &Cluster) -> Self {
        let name = format!("tollgate-test-{:08x}", rand::random::<u32>());
        Self::create(c, &name, json!({})).await
    }

    /// A namespace with these labels.
    async fn create(c: &Cluster, name: &str, labels: Value) -> Self {
        let api: Api<Namespace> = Api::all(c.client.clone());
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}});
        api.patch(
            name,
            &PatchParams::apply("tollgate-test").force(),
            &Patch::Apply(&ns),
        )
        .await
        .unwrap_or_else(|e| panic!("namespace {name}: {e}"));
        Self {
            name: name.to_string(),
            kubeconfig: c.kubeconfig.clone(),
            tenants: vec![],
            kill_switches: vec![],
            cleaned: false,
        }
    }

    /// Remove everything, on the test's runtime and client.
    async fn cleanup(mut self, client: &Client) {
        remove(client, &self.name, &self.tenants, &self.kill_switches).await;
        self.cleaned = true;
    }
}

async fn remove(client: &Client, ns: &str, tenants: &[String], kill_switches: &[String]) {
    let dp = DeleteParams::default();
    for k in kill_switches {
        let _ = Api::<KillSwitch>::all(client.clone()).delete(k, &dp).await;
    }
    for t in tenants {
        let _ = Api::<Tenant>::all(client.clone()).delete(t, &dp).await;
    }
    let _ = Api::<Namespace>::all(client.clone()).delete(ns, &dp).await;
}

impl Drop for TestNs {
    /// Only after a panic skipped [`TestNs::cleanup`]: a thread with its own runtime and its
    /// own client removes what the test created.
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let (name, path) = (self.name.clone(), self.kubeconfig.clone());
        let (tenants, kills) = (self.tenants.clone(), self.kill_switches.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Runtime::new() else {
                return;
            };
            rt.block_on(async move {
                if let Ok(client) = client_for(&path).await {
                    remove(&client, &name, &tenants, &kills).await;
                }
            })
        })
        .join();
    }
}

/// The objects of the basic scenario in `ns`: a tenant, a tool on `upstream`, a policy, the
/// agent's ServiceAccount and its identity.
async fn create_kinds(client: &Client, ns: &mut TestNs, rego: &str, upstream: &str) {
    let n = ns.name.clone();
    Api::<Tenant>::all(client.clone())
        .create(&PostParams::default(), &serde_json::from_value(json!({"apiVersion": GV, "kind": "Tenant", "metadata": {"name": n}, "spec": {"budgets": {"dayUsd": 10.0}}})).unwrap())
        .await
        .unwrap();
    ns.tenants.push(n.clone());
    let pp = PostParams::default();
    Api::<crd::Tool>::namespaced(client.clone(), &n)
        .create(&pp, &serde_json::from_value(json!({"apiVersion": GV, "kind": "Tool", "metadata": {"name": "notes"}, "spec": {"match": {"host": upstream, "methods": ["POST"], "path": "/v1/notes"}}})).unwrap())
        .await
        .unwrap();
    Api::<AgentPolicy>::namespaced(client.clone(), &n)
        .create(&pp, &serde_json::from_value(json!({"apiVersion": GV, "kind": "AgentPolicy", "metadata": {"name": "p"}, "spec": {"rego": rego}})).unwrap())
        .await
        .unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), &n)
        .create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": "agent"}})).unwrap(),
        )
        .await
        .unwrap();
    Api::<AgentIdentity>::namespaced(client.clone(), &n)
        .create(&pp, &serde_json::from_value(json!({"apiVersion": GV, "kind": "AgentIdentity", "metadata": {"name": "agent"},
            "spec": {"serviceAccount": "agent", "tenants": [n], "tools": ["notes"], "policies": ["p"], "maxStaleness": "10s"}})).unwrap())
        .await
        .unwrap();
}

const ALLOW_ALL: &str = "package tollgate\nimport rego.v1\ndeny contains \"no\" if false\n";

/// A token for `sa` in `ns` from the API server's TokenRequest, for `audience`.
async fn token(client: &Client, ns: &str, sa: &str, audience: &str) -> String {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let tr = api
        .create_token_request(
            sa,
            &PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec {
                    audiences: vec![audience.into()],
                    expiration_seconds: Some(3600),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("TokenRequest");
    tr.status.map(|s| s.token).expect("a token is issued")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn binary(name: &str) -> PathBuf {
    let operator = PathBuf::from(env!("CARGO_BIN_EXE_tollgate-operator"));
    let p = operator.with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins`",
        p.display()
    );
    p
}

/// `target/debug/tollgate-operator run` against the cluster's kubeconfig, killed on drop.
struct OperatorProcess {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl OperatorProcess {
    /// With `identity`, the replica takes part in leader election (Lease in `ns`).
    async fn start(c: &Cluster, ns: &str, identity: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["run", "--listen", &listen, "--lease-namespace", ns];
        match identity {
            Some(id) => args.extend(["--identity", id]),
            None => args.push("--no-leader-elect"),
        }
        let log = std::fs::File::create(dir.path().join("operator.log")).unwrap();
        let child = Command::new(binary("tollgate-operator"))
            .args(&args)
            .env("KUBECONFIG", &c.kubeconfig)
            .env("TOLLGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let op = Self {
            child,
            port,
            _dir: dir,
        };
        until("operator ready", 60, || async {
            http(port, "GET", "/readyz", None, None)
                .await
                .is_ok_and(|r| r.0 == 200)
        })
        .await;
        op
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGTERM, as Kubernetes stops a pod.
    fn terminate(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let _ = self.child.wait();
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real `tollgate-proxy` sidecar of `ns/agent` (out of cluster), killed on drop.
struct Sidecar {
    child: Child,
    proxy: u16,
    admin: u16,
    dir: tempfile::TempDir,
}

impl Sidecar {
    async fn start(operator: &str, agent: &str, token: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), token).unwrap();
        let (proxy, admin) = (free_port(), free_port());
        let config = dir.path().join("local.yaml");
        std::fs::write(
            &config,
            format!("listen: {{proxy: \"127.0.0.1:{proxy}\", admin: \"127.0.0.1:{admin}\"}}\nagent: {{name: local, tenants: []}}\naudit: {{path: audit.jsonl}}\n"),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
        let child = Command::new(binary("tollgate-proxy"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .current_dir(dir.path())
            .env("TOLLGATE_OPERATOR", operator)
            .env("TOLLGATE_AGENT", agent)
            .env("TOLLGATE_TOKEN_FILE", dir.path().join("token"))
            .env("POD_NAME", format!("sidecar-{proxy}"))
            .env("TOLLGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let s = Self {
            child,
            proxy,
            admin,
            dir,
        };
        until("sidecar admin up", 30, || async {
            http(s.admin, "GET", "/healthz", None, None).await.is_ok()
        })
        .await;
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// A tool call through the sidecar (status, body).
    async fn call(&self, upstream: &str, tenant: &str, text: &str) -> (u16, String) {
        let body = json!({"text": text}).to_string();
        http(
            self.proxy,
            "POST",
            &format!("http://{upstream}/v1/notes"),
            Some(tenant),
            Some(&body),
        )
        .await
        .unwrap_or((0, String::new()))
    }

    /// Wait (60 s) until a short note goes through (the first snapshot is installed).
    async fn wait_forwarding(&self, upstream: &str, tenant: &str) {
        let t0 = Instant::now();
        loop {
            let (code, body) = self.call(upstream, tenant, "hi").await;
            if code == 200 {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the sidecar never forwarded: {code} {body}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The approval grants of the snapshot in force.
    async fn grants(&self) -> Vec<String> {
        let Ok((_, body)) = http(self.admin, "GET", "/config", None, None).await else {
            return vec![];
        };
        serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| {
                v["approvalGrants"].as_array().map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
            })
            .unwrap_or_default()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback upstream answering every request 200, counting them.
struct Upstream {
    addr: String,
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Upstream {
    async fn start() -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c2 = count.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let c = c2.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    let mut got = Vec::new();
                    // Read the head and a Content-Length body, then answer.
                    loop {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&got).to_string();
                        if let Some((head, body)) = text.split_once("\r\n\r\n") {
                            let len = head
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length:")
                                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                                })
                                .unwrap_or(0);
                            if body.len() >= len {
                                break;
                            }
                        }
                    }
                    c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{\"ok\":true}")
                        .await;
                });
            }
        });
        Self { addr, count }
    }

    fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// One HTTP/1.1 request over a plain TCP connection to loopback `port` (status, body);
/// `tenant` adds `X-Tollgate-Tenant`. [`get_with_token`] sends a bearer token.
async fn http(
    port: u16,
    method: &str,
    target: &str,
    tenant: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    // A proxied request names its upstream in the target; Host must agree with it.
    let host = target
        .strip_prefix("http://")
        .and_then(|t| t.split('/').next())
        .unwrap_or("127.0.0.1");
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some(t) = tenant {
        head.push_str(&format!("X-Tollgate-Tenant: {t}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    head.push_str(body.unwrap_or(""));
    exchange(port, &head).await
}

async fn get_with_token(port: u16, path: &str, token: &str) -> (u16, String) {
    exchange(port, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"))
        .await
        .unwrap_or((0, String::new()))
}

async fn exchange(port: u16, request: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // Chunked bodies (hyper's default for streamed answers): join the chunks.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_string()
    };
    Ok((status, body))
}

async fn condition<K>(api: &Api<K>, name: &str, type_: &str) -> Option<String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + serde::Serialize,
{
    let v = serde_json::to_value(api.get(name).await.ok()?).ok()?;
    v["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_apply_and_every_kind_is_accepted() {
    let Some(c) = cluster().await else { return };
    apply_crds(&c.client).await;
    let mut ns = TestNs::new(&c).await;
    create_kinds(&c.client, &mut ns, ALLOW_ALL, "notes.example.com").await;
    ns.cleanup(&c.client).await;
    passed("crds_apply_and_every_kind_is_accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cel_rules_reject_invalid_objects() {
    let Some(c) = cluster().await else { return };
    if !c.real_server_for("CEL validation of custom objects") {
        return;
    }
    apply_crds(&c.client).await;
    let name = format!("tollgate-test-bad-{:08x}", rand::random::<u32>());
    let bad = Api::<KillSwitch>::all(c.client.clone())
        .create(&PostParams::default(), &serde_json::from_value(json!({"apiVersion": GV, "kind": "KillSwitch", "metadata": {"name": name}, "spec": {"scope": {}, "reason": "x"}})).unwrap())
        .await;
    if bad.is_ok() {
        let _ = Api::<KillSwitch>::all(c.client.clone())
            .delete(&name, &DeleteParams::default())
            .await;
    }
    assert!(
        bad.is_err(),
        "an empty kill-switch scope must be rejected by the CRD's CEL rule"
    );
    passed("cel_rules_reject_invalid_objects");
}

/// Out of cluster: reconcile to Ready, a snapshot through real TokenReview, refusals of
/// another ServiceAccount's token and a wrong audience, a kill switch reaching a real sidecar,
/// a bad policy refused (webhook) or reported in status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_serve_propagate_and_report() {
    let Some(c) = cluster().await else { return };
    apply_crds(&c.client).await;
    let up = Upstream::start().await;
    let mut ns = TestNs::new(&c).await;
    create_kinds(&c.client, &mut ns, ALLOW_ALL, &up.addr).await;
    let op = OperatorProcess::start(&c, &ns.name, None).await;
    let ids: Api<AgentIdentity> = Api::namespaced(c.client.clone(), &ns.name);
    until("identity Ready", 60, || async {
        condition(&ids, "agent", "Ready").await.as_deref() == Some("True")
    })
    .await;
    // A token from the API server's TokenRequest, reviewed by the operator with TokenReview.
    let tok = token(&c.client, &ns.name, "agent", "tollgate").await;
    let agent = format!("{}/agent", ns.name);
    let (code, body) = get_with_token(
        op.port,
        &format!("/v1/snapshot?agent={agent}&version=0&timeoutSeconds=1"),
        &tok,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    // The right ServiceAccount with the wrong audience, and another ServiceAccount: refused.
    let wrong_aud = token(&c.client, &ns.name, "agent", "not-tollgate").await;
    let (code, body) = get_with_token(
        op.port,
        &format!("/v1/snapshot?agent={agent}&version=0&timeoutSeconds=1"),
        &wrong_aud,
    )
    .await;
    assert_eq!(code, 403, "a wrong audience is refused: {body}");
    Api::<ServiceAccount>::namespaced(c.client.clone(), &ns.name)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "intruder"}})).unwrap(),
        )
        .await
        .unwrap();
    let other = token(&c.client, &ns.name, "intruder", "tollgate").await;
    let (code, body) = get_with_token(
        op.port,
        &format!("/v1/snapshot?agent={agent}&version=0&timeoutSeconds=1"),
        &other,
    )
    .await;
    assert_eq!(code, 403, "another ServiceAccount is refused: {body}");

    // A real sidecar serves the identity; a kill switch reaches it.
    let sidecar = Sidecar::start(&op.url(), &agent, &tok).await;
    sidecar.wait_forwarding(&up.addr, &ns.name).await;
    let stop = format!("{}-stop", ns.name);
    ns.kill_switches.push(stop.clone());
    let t0 = Instant::now();
    Api::<KillSwitch>::all(c.client.clone())
        .create(&PostParams::default(), &serde_json::from_value(json!({"apiVersion": GV, "kind": "KillSwitch", "metadata": {"name": stop}, "spec": {"scope": {"namespace": ns.name}, "engaged": true, "reason": "cluster-suite stop"}})).unwrap())
        .await
        .unwrap();
    until("the kill switch reaches the sidecar", 30, || async {
        let (code, body) = sidecar.call(&up.addr, &ns.name, "hello").await;
        code == 503 && body.contains("cluster-suite stop")
    })
    .await;
    println!(
        "kill switch reached the sidecar in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );

    // A bad policy: the chart's validating webhook refuses it, or (no webhook) the operator
    // reports it in status.
    let pols: Api<AgentPolicy> = Api::namespaced(c.client.clone(), &ns.name);
    let patched = pols
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"rego": "package tollgate\nimport rego.v1\ndeny contains x if {\n x := \n}\n"}})),
        )
        .await;
    match patched {
        Err(kube::Error::Api(e)) => {
            assert!(
                e.code == 400 || e.code == 403 || e.code == 422,
                "refused by the validating webhook: {e:?}"
            );
        }
        Err(e) => panic!("{e}"),
        Ok(_) => {
            until("bad policy reported", 60, || async {
                condition(&pols, "p", "Compiled").await.as_deref() == Some("False")
            })
            .await
        }
    }
    drop(sidecar);
    drop(op);
    ns.cleanup(&c.client).await;
    passed("reconcile_serve_propagate_and_report");
}

/// Out of cluster: `examples/kubernetes/` applied as a user would, every Tollgate object
/// reconciled (identity Ready, tools Valid, policy Compiled, kill switch Engaged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_reconcile_to_ready() {
    let Some(c) = cluster().await else { return };
    apply_crds(&c.client).await;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for d in yaml_serde::Deserializer::from_str(&text) {
            let v = Value::deserialize(d).unwrap();
            if !v.is_null() {
                docs.push(v);
            }
        }
    }
    let ns_name = docs
        .iter()
        .find(|d| d["kind"] == "Namespace")
        .and_then(|d| d["metadata"]["name"].as_str())
        .expect("the examples create their namespace")
        .to_string();
    let mut ns = TestNs::create(&c, &ns_name, json!({})).await;
    let op = OperatorProcess::start(&c, &ns.name, None).await;
    for d in &docs {
        let kind = d["kind"].as_str().unwrap();
        let name = d["metadata"]["name"].as_str().unwrap();
        let (group, version) = match d["apiVersion"].as_str().unwrap().split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", d["apiVersion"].as_str().unwrap()),
        };
        let plural = match kind {
            "Namespace" => "namespaces",
            "Secret" => "secrets",
            "Deployment" => "deployments",
            "Tenant" => "tenants",
            "Tool" => "tools",
            "AgentPolicy" => "agentpolicies",
            "AgentIdentity" => "agentidentities",
            "KillSwitch" => "killswitches",
            other => panic!("the examples gained a kind this suite does not know: {other}"),
        };
        match kind {
            "Tenant" => ns.tenants.push(name.into()),
            "KillSwitch" => ns.kill_switches.push(name.into()),
            _ => {}
        }
        let ar =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let api: Api<DynamicObject> = match d["metadata"]["namespace"].as_str() {
            Some(n) => Api::namespaced_with(c.client.clone(), n, &ar),
            None => Api::all_with(c.client.clone(), &ar),
        };
        api.patch(
            name,
            &PatchParams::apply("tollgate-test").force(),
            &Patch::Apply(d),
        )
        .await
        .unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
    }
    let names = |kind: &str| -> Vec<String> {
        docs.iter()
            .filter(|d| d["kind"] == kind)
            .map(|d| d["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let tools: Api<crd::Tool> = Api::namespaced(c.client.clone(), &ns.name);
    let policies: Api<AgentPolicy> = Api::namespaced(c.client.clone(), &ns.name);
    let ids: Api<AgentIdentity> = Api::namespaced(c.client.clone(), &ns.name);
    let kills: Api<KillSwitch> = Api::all(c.client.clone());
    for n in names("Tool") {
        wait_true(&tools, &n, "Valid").await;
    }
    for n in names("AgentPolicy") {
        wait_true(&policies, &n, "Compiled").await;
    }
    for n in names("KillSwitch") {
        wait_true(&kills, &n, "Engaged").await;
    }
    assert!(!names("AgentIdentity").is_empty());
    for n in names("AgentIdentity") {
        wait_true(&ids, &n, "Ready").await;
    }
    drop(op);
    ns.cleanup(&c.client).await;
    passed("the_examples_reconcile_to_ready");
}

/// Wait (60 s) until condition `ty` of `name` is `True`.
async fn wait_true<K>(api: &Api<K>, name: &str, ty: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + serde::Serialize,
{
    until(&format!("{name} {ty}"), 60, || async {
        condition(api, name, ty).await.as_deref() == Some("True")
    })
    .await
}

async fn lease_holder(client: &Client, ns: &str) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), ns)
        .get_opt("tollgate-operator")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

/// Out of cluster, two replicas with leader election: a held call becomes an
/// ApprovalRequest, is approved, and of two sidecars (one per replica) racing the identical
/// call exactly one goes through; the use is recorded in the ApprovalRequest status and a
/// restarted sidecar cannot use it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_are_single_use_across_two_operator_replicas() {
    let Some(c) = cluster().await else { return };
    apply_crds(&c.client).await;
    let up = Upstream::start().await;
    let mut ns = TestNs::new(&c).await;
    create_kinds(
        &c.client,
        &mut ns,
        "package tollgate\nimport rego.v1\nrequire_approval contains \"long notes need a human\" if count(input.request.body.text) > 10\n",
        &up.addr,
    )
    .await;
    let a = OperatorProcess::start(&c, &ns.name, Some("replica-a")).await;
    let b = OperatorProcess::start(&c, &ns.name, Some("replica-b")).await;
    let agent = format!("{}/agent", ns.name);
    let tok = token(&c.client, &ns.name, "agent", "tollgate").await;
    let sa = Sidecar::start(&a.url(), &agent, &tok).await;
    let sb = Sidecar::start(&b.url(), &agent, &tok).await;
    let refund = "refund order 1234 in full";
    let tenant = ns.name.clone();
    let t0 = Instant::now();
    let id = loop {
        let (code, body) = sa.call(&up.addr, &tenant, refund).await;
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        match v["approval"].as_str() {
            Some(id) if code == 403 => break id.to_string(),
            _ => {
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "the call was never held for approval: {code} {body}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let aprs: Api<ApprovalRequest> = Api::namespaced(c.client.clone(), &ns.name);
    until("ApprovalRequest created", 30, || async {
        aprs.get_opt(&id).await.ok().flatten().is_some()
    })
    .await;
    aprs.patch_status(
        &id,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Approved", "reason": "cluster suite"}})),
    )
    .await
    .expect("approve (the chart's stamping webhook, if installed, records the approver)");
    until("both sidecars hold the grant", 60, || async {
        sa.grants().await.contains(&id) && sb.grants().await.contains(&id)
    })
    .await;
    let before = up.count();
    let (ra, rb) = tokio::join!(
        sa.call(&up.addr, &tenant, refund),
        sb.call(&up.addr, &tenant, refund)
    );
    let codes = [ra.0, rb.0];
    assert_eq!(
        codes.iter().filter(|c| **c == 200).count(),
        1,
        "exactly one of the racing sidecars goes through: {codes:?}\n{}\n{}",
        sa.log(),
        sb.log()
    );
    assert_eq!(up.count(), before + 1, "the upstream saw one refund");
    let status = aprs.get(&id).await.unwrap().status.unwrap_or_default();
    assert!(status.consumed_at.is_some(), "{status:?}");
    drop(sa);
    let restarted = Sidecar::start(&b.url(), &agent, &tok).await;
    restarted.wait_forwarding(&up.addr, &tenant).await;
    for s in [&restarted, &sb] {
        let (code, body) = s.call(&up.addr, &tenant, refund).await;
        assert_eq!(code, 403, "used once: {body}");
    }
    assert_eq!(up.count(), before + 2, "one refund and one short note");
    drop((restarted, sb, a, b));
    ns.cleanup(&c.client).await;
    passed("approvals_are_single_use_across_two_operator_replicas");
}

/// Out of cluster, two replicas: the leader is stopped (SIGTERM, as when its pod is
/// deleted) and releases the Lease; the other takes it and at once reconciles an identity
/// created during the failover (status, owned ServiceAccount).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_reconciles_at_once() {
    let Some(c) = cluster().await else { return };
    apply_crds(&c.client).await;
    let mut ns = TestNs::new(&c).await;
    create_kinds(&c.client, &mut ns, ALLOW_ALL, "notes.example.com").await;
    let mut a = OperatorProcess::start(&c, &ns.name, Some("replica-a")).await;
    until("replica-a leads", 60, || async {
        lease_holder(&c.client, &ns.name).await.as_deref() == Some("replica-a")
    })
    .await;
    let b = OperatorProcess::start(&c, &ns.name, Some("replica-b")).await;
    a.terminate();
    assert_ne!(
        lease_holder(&c.client, &ns.name).await.as_deref(),
        Some("replica-a"),
        "the Lease is released on shutdown"
    );
    Api::<AgentIdentity>::namespaced(c.client.clone(), &ns.name)
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"apiVersion": GV, "kind": "AgentIdentity", "metadata": {"name": "late"},
            "spec": {"serviceAccount": "late-agent", "tenants": [ns.name]}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let t0 = Instant::now();
    until("replica-b leads", 30, || async {
        lease_holder(&c.client, &ns.name).await.as_deref() == Some("replica-b")
    })
    .await;
    println!("takeover after the leader stopped: {:?}", t0.elapsed());
    let ids: Api<AgentIdentity> = Api::namespaced(c.client.clone(), &ns.name);
    let sas: Api<ServiceAccount> = Api::namespaced(c.client.clone(), &ns.name);
    until(
        "the new leader reconciled the identity created during the failover",
        60,
        || async {
            condition(&ids, "late", "Ready").await.as_deref() == Some("True")
                && sas.get_opt("late-agent").await.ok().flatten().is_some()
        },
    )
    .await;
    drop(b);
    ns.cleanup(&c.client).await;
    passed("leader_failover_reconciles_at_once");
}

fn helm() -> Command {
    Command::new(std::env::var("TOLLGATE_TEST_HELM").unwrap_or_else(|_| "helm".into()))
}

fn image(var: &str) -> (String, String) {
    let v = std::env::var(var).unwrap_or_else(|_| {
        panic!("set {var}=REPOSITORY:TAG to an image the cluster can pull (kind: `kind load docker-image`)")
    });
    match v.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
        Some((r, t)) => (r.into(), t.into()),
        None => (v, "latest".into()),
    }
}

/// In cluster: the chart installs with real Helm, the operator becomes ready and leads, its
/// validating webhook refuses bad Rego, and a labelled pod is admitted with the sidecar
/// injected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_installs_and_injects_pods() {
    let Some(c) = cluster().await else { return };
    if !c.real_server_for("a Helm install (pods, admission webhooks)") {
        return;
    }
    apply_crds(&c.client).await;
    let (op_repo, op_tag) = image("TOLLGATE_TEST_OPERATOR_IMAGE");
    let (px_repo, px_tag) = image("TOLLGATE_TEST_PROXY_IMAGE");
    let system = TestNs::new(&c).await;
    let release = format!("tg{:06x}", rand::random::<u32>() & 0xff_ffff);
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/tollgate");
    let out = helm()
        .args(["upgrade", "--install", &release])
        .arg(&chart)
        .args(["--namespace", &system.name, "--wait", "--timeout", "300s"])
        .args(["--kubeconfig"])
        .arg(&c.kubeconfig)
        // The suite applied the generated CRDs (the same files as the chart's copy).
        .args(["--set", "crds.install=false"])
        .args(["--set", &format!("operator.image.repository={op_repo}")])
        .args(["--set", &format!("operator.image.tag={op_tag}")])
        .args(["--set", &format!("sidecar.image.repository={px_repo}")])
        .args(["--set", &format!("sidecar.image.tag={px_tag}")])
        .output()
        .expect("helm is installed (or set TOLLGATE_TEST_HELM)");
    let uninstall = || {
        let _ = helm()
            .args([
                "uninstall",
                &release,
                "--namespace",
                &system.name,
                "--kubeconfig",
            ])
            .arg(&c.kubeconfig)
            .output();
    };
    if !out.status.success() {
        uninstall();
        panic!(
            "helm install failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let deploys: Api<Deployment> = Api::namespaced(c.client.clone(), &system.name);
    let name = format!("{release}-operator");
    until("the operator Deployment is available", 300, || async {
        deploys
            .get(&name)
            .await
            .is_ok_and(|d| d.status.and_then(|s| s.available_replicas).unwrap_or(0) >= 1)
    })
    .await;
    until("a replica leads", 120, || async {
        lease_holder(&c.client, &system.name).await.is_some()
    })
    .await;

    // Admission: bad Rego is refused by the validating webhook.
    let mut agents = TestNs::create(
        &c,
        &format!("tollgate-test-inj-{:08x}", rand::random::<u32>()),
        json!({"tollgate.dev/inject": "enabled"}),
    )
    .await;
    let refused = Api::<AgentPolicy>::namespaced(c.client.clone(), &agents.name)
        .create(&PostParams::default(), &serde_json::from_value(json!({"apiVersion": GV, "kind": "AgentPolicy", "metadata": {"name": "bad"}, "spec": {"rego": "package tollgate\ndeny contains x if {\n x := \n}\n"}})).unwrap())
        .await;
    assert!(refused.is_err(), "the validating webhook refuses bad Rego");
    // Injection: a labelled pod is admitted with the sidecar.
    create_kinds(&c.client, &mut agents, ALLOW_ALL, "notes.example.com").await;
    let ids: Api<AgentIdentity> = Api::namespaced(c.client.clone(), &agents.name);
    until("identity Ready (in-cluster operator)", 120, || async {
        condition(&ids, "agent", "Ready").await.as_deref() == Some("True")
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), &agents.name);
    let pod = pods
        .create(&PostParams::default(), &serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "agent", "labels": {"tollgate.dev/agent": "agent"}},
            "spec": {"serviceAccountName": "agent", "containers": [{"name": "agent", "image": "registry.k8s.io/pause:3.9"}]}})).unwrap())
        .await
        .expect("the server admits the labelled pod");
    let spec = serde_json::to_value(&pod.spec).unwrap();
    let injected = spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["containers"].as_array().into_iter().flatten())
        .any(|c| c["name"] == tollgate_operator::webhook::inject::SIDECAR_NAME);
    assert!(injected, "the sidecar is injected: {spec}");
    agents.cleanup(&c.client).await;
    uninstall();
    system.cleanup(&c.client).await;
    passed("the_chart_installs_and_injects_pods");
}
