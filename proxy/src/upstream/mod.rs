//! Forwarding: one pooled hyper client per connect timeout, TLS originated with rustls against
//! the webpki roots plus `tls.extraCaFile`, with connect and header timeouts (the body's total
//! and idle timeouts are [`stream`]'s).

pub(crate) mod forward;
pub(crate) mod stream;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How an upstream call failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connect, TLS or protocol error.
    #[error("upstream request failed: {0}")]
    Failed(String),
    /// No response headers within the timeout.
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
}

impl UpstreamError {
    /// Metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Failed(_) => "failed",
            UpstreamError::Timeout(_) => "timeout",
        }
    }
}

/// Pool of upstream clients.
#[derive(Clone)]
pub struct Upstreams {
    tls: Arc<rustls::ClientConfig>,
    clients: Arc<Mutex<HashMap<Duration, HttpsClient>>>,
}

impl Upstreams {
    /// Build the TLS config: webpki roots plus an optional extra CA bundle (PEM).
    pub fn new(extra_ca: Option<&std::path::Path>) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = extra_ca {
            let pem = std::fs::read(path)
                .map_err(|e| format!("tls.extraCaFile {}: {e}", path.display()))?;
            let mut n = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| format!("tls.extraCaFile: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("tls.extraCaFile: {e}"))?;
                n += 1;
            }
            if n == 0 {
                return Err(format!(
                    "tls.extraCaFile {}: no certificates found",
                    path.display()
                ));
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            tls: Arc::new(tls),
            clients: Arc::default(),
        })
    }

    fn client(&self, connect_timeout: Duration) -> HttpsClient {
        let mut clients = self.clients.lock().expect("client pool lock");
        clients
            .entry(connect_timeout)
            .or_insert_with(|| {
                let mut http = HttpConnector::new();
                http.enforce_http(false);
                http.set_connect_timeout(Some(connect_timeout));
                http.set_nodelay(true);
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config((*self.tls).clone())
                    .https_or_http()
                    .enable_all_versions()
                    .wrap_connector(http);
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(60))
                    .build(https)
            })
            .clone()
    }

    /// Send a request; resolves at the response headers. The body streams afterwards and is
    /// bounded by `total` through [`TimedBody`]-style wrapping in the caller.
    pub async fn send(
        &self,
        req: http::Request<Full<Bytes>>,
        connect: Duration,
        header: Duration,
    ) -> Result<http::Response<hyper::body::Incoming>, UpstreamError> {
        let client = self.client(connect);
        match tokio::time::timeout(header, client.request(req)).await {
            Err(_) => Err(UpstreamError::Timeout(header)),
            Ok(Err(e)) => {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                if msg.contains("timed out") || msg.contains("timeout") {
                    Err(UpstreamError::Timeout(connect))
                } else {
                    Err(UpstreamError::Failed(msg))
                }
            }
            Ok(Ok(res)) => Ok(res),
        }
    }
}
