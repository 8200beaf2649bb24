//! The HTTPS listener the API server calls: `/mutate-pod`, `/mutate-stamp`, `/validate`, each
//! taking and returning an `AdmissionReview` v1.

use super::admission;
use super::certs::PemPair;
use super::inject::{IdentityFacts, InjectConfig};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kube::core::admission::{AdmissionResponse, AdmissionReview};
use kube::core::DynamicObject;
use std::convert::Infallible;
use std::sync::Arc;

/// Looks up what an identity needs mounted (namespace, identity name).
pub type FactsLookup = Arc<dyn Fn(&str, &str) -> Option<IdentityFacts> + Send + Sync>;

/// Webhook handler state.
#[derive(Clone)]
pub struct Webhooks {
    /// Injection settings.
    pub inject: Arc<InjectConfig>,
    /// Identity facts.
    pub facts: FactsLookup,
}

/// Build a rustls server config from a PEM pair.
pub fn tls_config(pair: &PemPair) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(pair.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(pair.key.as_bytes())
        .map_err(|e| e.to_string())?;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| e.to_string())?;
    Ok(Arc::new(cfg))
}

/// Handle one AdmissionReview body for a path.
pub fn handle(hooks: &Webhooks, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return (
                400,
                serde_json::to_vec(
                    &AdmissionResponse::invalid(format!("not an AdmissionReview: {e}"))
                        .into_review(),
                )
                .unwrap_or_default(),
            )
        }
    };
    let req = match review.try_into() {
        Ok(r) => r,
        Err(_) => {
            return (
                400,
                serde_json::to_vec(
                    &AdmissionResponse::invalid("AdmissionReview without a request").into_review(),
                )
                .unwrap_or_default(),
            )
        }
    };
    let resp = match path {
        "/mutate-pod" => {
            admission::mutate_pod(&req, &hooks.inject, |ns, agent| (hooks.facts)(ns, agent))
        }
        "/mutate-stamp" => admission::stamp(&req),
        "/validate" => admission::validate(&req),
        other => AdmissionResponse::from(&req).deny(format!("no webhook at {other}")),
    };
    (
        200,
        serde_json::to_vec(&resp.into_review()).unwrap_or_default(),
    )
}

/// Serve the webhooks over TLS until the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    hooks: Webhooks,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, hooks) = (acceptor.clone(), hooks.clone());
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream))
                    .await
            else {
                return;
            };
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let hooks = hooks.clone();
                async move {
                    let path = req.uri().path().to_string();
                    let body = Limited::new(req.into_body(), 8 * 1024 * 1024)
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    let (status, out) = handle(&hooks, &path, &body);
                    let mut res = hyper::Response::new(Full::new(Bytes::from(out)));
                    *res.status_mut() = hyper::StatusCode::from_u16(status)
                        .unwrap_or(hyper::StatusCode::BAD_REQUEST);
                    res.headers_mut().insert(
                        "content-type",
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(res)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}
