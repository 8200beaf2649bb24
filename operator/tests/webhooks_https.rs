//! The webhooks called as the API server calls them: AdmissionReview v1 POSTed over HTTPS,
//! verified against the operator-generated CA bundle for the Service's DNS name.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::sync::Arc;
use tollgate_operator::webhook::{certs, inject::IdentityFacts, server};

async fn post(addr: std::net::SocketAddr, ca_pem: &str, path: &str, body: Value) -> Value {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("tollgate.tollgate-system.svc").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header("host", "tollgate.tollgate-system.svc")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

#[tokio::test]
async fn admission_reviews_over_https() {
    let c = certs::webhook_certs("tollgate", "tollgate-system", &[], 30).unwrap();
    let tls = server::tls_config(&c.serving).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hooks = server::Webhooks {
        inject: Arc::new(serde_json::from_value(json!({"image": "tollgate-proxy:test", "operatorUrl": "http://tollgate.tollgate-system.svc:15080"})).unwrap()),
        facts: Arc::new(|_, _| Some(IdentityFacts { secrets: vec!["stripe-key".into()] })),
    };
    tokio::spawn(server::serve(listener, tls, hooks));
    let review = |kind: &str,
                  group: &str,
                  resource: &str,
                  op: &str,
                  user: &str,
                  object: Value,
                  old: Value| {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "u-1", "kind": {"group": group, "version": if group.is_empty() { "v1" } else { "v1alpha1" }, "kind": kind},
            "resource": {"group": group, "version": "v1", "resource": resource}, "name": "x", "namespace": "billing",
            "operation": op, "userInfo": {"username": user}, "object": object, "oldObject": old}})
    };
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "billing", "labels": {"tollgate.dev/agent": "billing-dispute-v3"}}, "spec": {"containers": [{"name": "agent", "image": "python:3.12"}]}});
    let out = post(
        addr,
        &c.ca.cert,
        "/mutate-pod",
        review(
            "Pod",
            "",
            "pods",
            "CREATE",
            "system:serviceaccount:kube-system:replicaset-controller",
            pod.clone(),
            Value::Null,
        ),
    )
    .await;
    assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(out["response"]["uid"], "u-1");
    assert_eq!(out["response"]["allowed"], true);
    assert_eq!(out["response"]["patchType"], "JSONPatch");
    // Go's encoding/json (the API server) decodes []byte from a base64 string or from an array
    // of byte values; kube-core sends the array form.
    let raw: Vec<u8> = match &out["response"]["patch"] {
        Value::String(s) => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.decode(s).unwrap()
        }
        other => serde_json::from_value(other.clone()).unwrap(),
    };
    let patch: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    assert_eq!(
        patched["spec"]["initContainers"][0]["name"],
        "tollgate-proxy"
    );
    // Write the injected pod for schema validation by the chart tests' kubernetes-validate.
    if let Ok(dir) = std::env::var("TOLLGATE_INJECTED_POD_OUT") {
        std::fs::write(dir, serde_json::to_string_pretty(&patched).unwrap()).unwrap();
    }
    let bad = json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "AgentPolicy", "metadata": {"name": "p"}, "spec": {"rego": "package tollgate\ndeny contains"}});
    let out = post(
        addr,
        &c.ca.cert,
        "/validate",
        review(
            "AgentPolicy",
            "tollgate.dev",
            "agentpolicies",
            "CREATE",
            "alice",
            bad,
            Value::Null,
        ),
    )
    .await;
    assert_eq!(out["response"]["allowed"], false);
    assert!(out["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .contains("does not compile"));
    let out = post(
        addr,
        &c.ca.cert,
        "/nope",
        review(
            "Tool",
            "tollgate.dev",
            "tools",
            "CREATE",
            "a",
            json!({"metadata": {"name": "t"}}),
            Value::Null,
        ),
    )
    .await;
    assert_eq!(out["response"]["allowed"], false);
}
