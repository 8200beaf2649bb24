//! How one agent connection is served: the limits every agent connection gets (header read
//! timeout against slowloris, header count and size caps, HTTP/2 reset-flood limits) and the
//! connection deadlines of [`crate::intercept::conn_deadline`] (a first request within the
//! header read timeout *of accept*, and idle connections of either HTTP version reaped). The
//! proxy listener, decrypted tunnels and transparent connections all go through here.

use crate::body::ResBody;
use crate::intercept::conn_deadline::Deadlines;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::time::Duration;

/// Connection limits, from `server:` config.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Header read timeout.
    pub header_read_timeout: Duration,
    /// Most headers.
    pub max_headers: usize,
    /// Largest header block.
    pub max_header_bytes: usize,
    /// A connection with no request in flight for this long is closed gracefully.
    pub idle_timeout: Duration,
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
            idle_timeout: s
                .idle_timeout
                .map(|d| d.get())
                .unwrap_or(Duration::from_secs(60)),
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

impl From<ConnLimits> for Deadlines {
    fn from(l: ConnLimits) -> Self {
        Self {
            first_request: l.header_read_timeout,
            idle: l.idle_timeout,
        }
    }
}

/// Serve one agent connection (a decrypted tunnel or a plain transparent one) with Tollgate's
/// limits and connection deadlines; `serve` answers each request.
pub async fn serve_connection<IO, F, Fut>(
    io: TokioIo<IO>,
    serve: F,
    limits: ConnLimits,
    closed: prometheus::IntCounterVec,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(hyper::Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<ResBody>> + Send + 'static,
{
    let builder = builder(limits);
    let deadlines = Deadlines::from(limits);
    let r =
        crate::intercept::conn_deadline::serve(&builder, io, serve, deadlines, closed, None, false)
            .await;
    if let Err(e) = r {
        tracing::debug!(error = %e, "tunnel connection ended with an error");
    }
}
