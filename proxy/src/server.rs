//! Listeners: the proxy listener (forward proxy + base URL; CONNECT is handed to
//! [`crate::connect`]) and its connection limits — header read timeout against slowloris,
//! header count and size caps, HTTP/2 reset-flood limits.

use crate::state::ProxyState;
use crate::upstream::ResBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Connection limits, from `server:` config.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Header read timeout.
    pub header_read_timeout: Duration,
    /// Most headers.
    pub max_headers: usize,
    /// Largest header block.
    pub max_header_bytes: usize,
}

impl ConnLimits {
    /// From the server config.
    pub fn from_config(s: &crate::config::ServerConfig) -> Self {
        Self {
            header_read_timeout: s
                .header_read_timeout
                .map(|d| d.get())
                .unwrap_or(Duration::from_secs(10)),
            max_headers: s.max_headers.unwrap_or(100),
            max_header_bytes: s.max_header_bytes.unwrap_or(64 * 1024),
        }
    }
}

/// The hyper connection builder with Tollgate's limits.
pub fn builder(limits: ConnLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

/// Serve the proxy listener until `shutdown` fires, then drain in-flight connections.
pub async fn serve_proxy(
    listener: TcpListener,
    state: Arc<ProxyState>,
    limits: ConnLimits,
    shutdown: CancellationToken,
) {
    let builder = Arc::new(builder(limits));
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let svc = service_fn(move |req: hyper::Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(dispatch(state, req).await) }
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn dispatch(
    state: Arc<ProxyState>,
    req: hyper::Request<Incoming>,
) -> hyper::Response<ResBody> {
    if req.method() == http::Method::CONNECT {
        return crate::connect::handle_connect(state, req).await;
    }
    crate::pipeline::handle(state, req).await
}
