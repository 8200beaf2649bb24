//! Certificates rotating under load, with lifetimes of seconds: the operator binary on the
//! in-process test API server, its webhook listener, and a real sidecar intercepting TLS.
//!
//! Throughout, every webhook handshake verifies against the `caBundle` the API server held
//! just before it, and every leaf the sidecar mints verifies against CAs that were already in
//! the agents' trust store (the namespace's CA ConfigMap) before the sidecar signed with them.
//! Both certificates rotate several times, and the sidecar picks up each new CA without a
//! restart.

use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_operator::testapi::TestApiServer;
use tollgate_tests::harness::{bin, eventually, free_port, TestProxy};

fn b64(s: &str) -> String {
    use base64::Engine;
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .unwrap_or_default(),
    )
    .unwrap_or_default()
}

fn certs(pem: &str) -> Vec<String> {
    pem.split_inclusive("-----END CERTIFICATE-----")
        .map(|c| c.trim().to_string())
        .filter(|c| c.contains("BEGIN CERTIFICATE"))
        .collect()
}

fn client(roots_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut roots_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// A TLS handshake over `t` as `name` trusting `roots_pem`: the peer's leaf (DER), or why not.
fn handshake(t: TcpStream, roots_pem: &str, name: &str) -> Result<Vec<u8>, String> {
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(client(roots_pem), name).unwrap();
    let mut sock = t;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
    }
    Ok(conn.peer_certificates().unwrap()[0].as_ref().to_vec())
}

fn tunnel(proxy: SocketAddr, authority: &str) -> TcpStream {
    let mut t = TcpStream::connect(proxy).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        t,
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(t.read(&mut b).unwrap(), 1, "proxy closed during CONNECT");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    t
}

fn bundle(api: &TestApiServer, plural: &str) -> String {
    api.get("admissionregistration.k8s.io/v1", plural, "", "tollgate")
        .and_then(|o| {
            o["webhooks"][0]["clientConfig"]["caBundle"]
                .as_str()
                .map(b64)
        })
        .unwrap_or_default()
}

#[test]
fn webhook_and_interception_certificates_rotate_without_a_gap_or_a_restart() {
    let api = TestApiServer::start();
    api.add_token(
        "tok-billing",
        "system:serviceaccount:agents:billing-agent",
        &["tollgate"],
    );
    api.put("tools", json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "Tool",
        "metadata": {"name": "local", "namespace": "agents"}, "spec": {"match": {"host": "localhost"}}}));
    api.put(
        "agentidentities",
        json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": {"name": "billing", "namespace": "agents"},
        "spec": {"serviceAccount": "billing-agent", "tenants": ["acme"], "tools": ["local"]}}),
    );
    for (plural, kind) in [
        (
            "mutatingwebhookconfigurations",
            "MutatingWebhookConfiguration",
        ),
        (
            "validatingwebhookconfigurations",
            "ValidatingWebhookConfiguration",
        ),
    ] {
        api.put(plural, json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind, "metadata": {"name": "tollgate"},
            "webhooks": [{"name": "x.tollgate.dev", "clientConfig": {"service": {"name": "tollgate-operator", "namespace": "tollgate-system", "path": "/mutate"}}}]}));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inject.yaml"), "image: tollgate-proxy:test\noperatorUrl: http://tollgate-operator.tollgate-system.svc:8080\n").unwrap();
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, api.kubeconfig()).unwrap();
    let (port, wport) = (free_port(), free_port());
    let log = std::fs::File::create(dir.path().join("operator.log")).unwrap();
    let mut op = Command::new(bin("tollgate-operator"))
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--no-leader-elect",
        ])
        .args([
            "--webhook-listen",
            &format!("127.0.0.1:{wport}"),
            "--inject-config",
        ])
        .arg(dir.path().join("inject.yaml"))
        .args([
            "--webhook-ca-lifetime-seconds",
            "9",
            "--webhook-cert-lifetime-seconds",
            "6",
            "--intercept-ca-lifetime-seconds",
            "9",
            "--intercept-ca-grace-seconds",
            "1",
            "--cert-check-interval-seconds",
            "1",
        ])
        .env("KUBECONFIG", &kc)
        .env("TOLLGATE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let secret = |name: &str, key: &str| {
        api.get("v1", "secrets", "tollgate-system", name)
            .and_then(|s| s["data"][key].as_str().map(b64))
    };
    eventually("interception CA created", || {
        secret("tollgate-intercept-ca", "tls.key").is_some()
    });
    eventually("caBundle published", || {
        !bundle(&api, "validatingwebhookconfigurations").is_empty()
    });
    // A real sidecar, started with the CA as mounted at injection.
    let sdir = tempfile::tempdir().unwrap();
    std::fs::write(sdir.path().join("token"), "tok-billing").unwrap();
    std::fs::write(
        sdir.path().join("ca.crt"),
        secret("tollgate-intercept-ca", "tls.crt").unwrap(),
    )
    .unwrap();
    std::fs::write(
        sdir.path().join("ca.key"),
        secret("tollgate-intercept-ca", "tls.key").unwrap(),
    )
    .unwrap();
    let (pp, ap) = (free_port(), free_port());
    let local = format!("listen: {{proxy: \"127.0.0.1:{pp}\", admin: \"127.0.0.1:{ap}\"}}\nagent: {{name: local, tenants: []}}\naudit: {{path: audit.jsonl}}\ntls: {{intercept: {{caCert: ca.crt, caKey: ca.key}}}}\n");
    let token_file = sdir.path().join("token").display().to_string();
    let url = format!("http://127.0.0.1:{port}");
    let sidecar = TestProxy::start_custom(
        sdir,
        &local,
        format!("127.0.0.1:{pp}").parse().unwrap(),
        format!("127.0.0.1:{ap}").parse().unwrap(),
        &[],
        &[
            ("TOLLGATE_OPERATOR", url.as_str()),
            ("TOLLGATE_AGENT", "agents/billing"),
            ("TOLLGATE_TOKEN_FILE", token_file.as_str()),
        ],
    );
    eventually("sidecar has its snapshot", || {
        tollgate_tests::harness::get(sidecar.admin, "/readyz")
            .map(|r| r.status == 200)
            .unwrap_or(false)
    });

    // The agents' trust store, as it was at each moment: CA → first time it was trusted.
    let mut trusted_since: BTreeMap<String, Instant> = BTreeMap::new();
    let mut serving_seen = BTreeSet::new();
    let mut webhook_cas = BTreeSet::new();
    // Signing CA → first time a leaf signed by it was seen.
    let mut signing_seen: BTreeMap<String, Instant> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while Instant::now() < deadline && (signing_seen.len() < 3 || webhook_cas.len() < 3) {
        // Webhook: the serving certificate verifies against the bundle published before it.
        let before = bundle(&api, "validatingwebhookconfigurations");
        let mutating = bundle(&api, "mutatingwebhookconfigurations");
        assert!(!before.is_empty());
        for ca in certs(&before) {
            webhook_cas.insert(ca);
        }
        let t = TcpStream::connect(("127.0.0.1", wport)).unwrap();
        let leaf =
            handshake(t, &before, "tollgate-operator.tollgate-system.svc").unwrap_or_else(|e| {
                panic!("the webhook serves a certificate the caBundle does not trust: {e}")
            });
        let t = TcpStream::connect(("127.0.0.1", wport)).unwrap();
        handshake(t, &mutating, "tollgate-operator.tollgate-system.svc")
            .expect("both webhook configurations trust the serving certificate");
        serving_seen.insert(leaf);
        // Interception: record what the namespace's trust store holds now...
        let cm = api
            .get("v1", "configmaps", "agents", "tollgate-ca")
            .and_then(|c| c["data"]["ca.crt"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let now = Instant::now();
        for ca in certs(&cm) {
            trusted_since.entry(ca).or_insert(now);
        }
        // ...then the sidecar's leaf must chain to a CA trusted before this moment.
        let all_trusted: String = trusted_since.keys().map(|c| format!("{c}\n")).collect();
        let t = tunnel(sidecar.proxy, "localhost:443");
        handshake(t, &all_trusted, "localhost").unwrap_or_else(|e| {
            panic!("the sidecar signed with a CA the agents do not trust yet: {e}")
        });
        let signer = trusted_since
            .keys()
            .find(|ca| {
                let t = tunnel(sidecar.proxy, "localhost:443");
                handshake(t, ca, "localhost").is_ok()
            })
            .cloned()
            .expect("one trusted CA signed it");
        signing_seen.entry(signer).or_insert(now);
        std::thread::sleep(Duration::from_millis(250));
    }
    let log = std::fs::read_to_string(dir.path().join("operator.log")).unwrap_or_default();
    assert!(
        webhook_cas.len() >= 3 && serving_seen.len() >= 3,
        "the webhook certificates rotated (CAs {}, serving certificates {}):\n{log}",
        webhook_cas.len(),
        serving_seen.len()
    );
    assert!(
        signing_seen.len() >= 3,
        "the sidecar signed with {} CA(s); it should pick up each rotation:\n{log}",
        signing_seen.len()
    );
    for (ca, used) in &signing_seen {
        assert!(
            trusted_since[ca] <= *used,
            "a CA signed before the agents trusted it"
        );
    }
    let _ = op.kill();
    let _ = op.wait();
}
