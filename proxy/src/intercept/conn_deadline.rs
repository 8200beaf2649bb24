//! Connection deadlines for every agent connection, whatever its HTTP version.
//!
//! hyper's own HTTP/1 header read timeout starts when it begins reading a request head, and
//! the version-sniffing auto builder first waits for the client's opening bytes with no
//! timeout at all: a connection that sends nothing (or one byte) is never cut. HTTP/2 has no
//! header timeout, and an h2 connection with no streams stays open for as long as the client
//! answers pings. So each connection is served with two deadlines of its own:
//!
//! - **first request**: a request head must be complete within `server.headerReadTimeout`
//!   *of accept*; otherwise the connection is dropped (`reason="header_timeout"`);
//! - **idle**: once no request is in flight (a request is in flight from its head until its
//!   response body has been sent or dropped) for `server.idleTimeout`, the connection is shut
//!   down gracefully (HTTP/2 GOAWAY, HTTP/1 close) (`reason="idle"`).
//!
//! Both are counted in `tollgate_connections_closed_total{reason}`.

use crate::body::ResBody;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The two deadlines of a connection.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    /// From accept to the first complete request head.
    pub first_request: Duration,
    /// With no request in flight.
    pub idle: Duration,
}

/// Why the sidecar closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// No request head within the first-request deadline.
    HeaderTimeout,
    /// Nothing in flight for the idle deadline.
    Idle,
}

impl Closed {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Closed::HeaderTimeout => "header_timeout",
            Closed::Idle => "idle",
        }
    }
}

/// Requests seen on a connection and how many are still in flight.
#[derive(Clone, Copy, Debug, Default)]
struct Activity {
    started: u64,
    in_flight: usize,
}

/// Held while a request is in flight; released when its response body ends or is dropped.
struct InFlight(Arc<watch::Sender<Activity>>);

impl InFlight {
    fn begin(tx: &Arc<watch::Sender<Activity>>) -> Self {
        tx.send_modify(|a| {
            a.started += 1;
            a.in_flight += 1;
        });
        Self(tx.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|a| a.in_flight -= 1);
    }
}

/// A response body that keeps its request in flight until it is finished.
struct Tracked {
    inner: ResBody,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Resolves when a deadline passes; never, once the connection (every sender) is gone.
async fn reaper(mut rx: watch::Receiver<Activity>, d: Deadlines) -> Closed {
    let first = tokio::time::sleep(d.first_request);
    tokio::pin!(first);
    while rx.borrow_and_update().started == 0 {
        tokio::select! {
            _ = &mut first => return Closed::HeaderTimeout,
            r = rx.changed() => if r.is_err() { std::future::pending::<()>().await },
        }
    }
    loop {
        let now = *rx.borrow_and_update();
        if now.in_flight > 0 {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(d.idle) => {
                let later = *rx.borrow();
                if later.in_flight == 0 && later.started == now.started {
                    return Closed::Idle;
                }
            }
            r = rx.changed() => if r.is_err() { std::future::pending::<()>().await },
        }
    }
}

/// Serve `io` with `builder`, answering each request with `serve`, under `deadlines`. With
/// `upgrades`, HTTP/1 upgrades (CONNECT) are allowed. `shutdown` drains the connection
/// gracefully. Closures by a deadline are counted in `closed{reason}`.
pub async fn serve<IO, F, Fut>(
    builder: &auto::Builder<TokioExecutor>,
    io: TokioIo<IO>,
    serve: F,
    deadlines: Deadlines,
    closed: prometheus::IntCounterVec,
    shutdown: Option<CancellationToken>,
    upgrades: bool,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(hyper::Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = hyper::Response<ResBody>> + Send + 'static,
{
    let (tx, rx) = watch::channel(Activity::default());
    let tx = Arc::new(tx);
    let serve = Arc::new(serve);
    let svc = service_fn(move |req: hyper::Request<Incoming>| {
        let in_flight = InFlight::begin(&tx);
        let fut = serve(req);
        async move {
            let res = fut.await;
            Ok::<_, Infallible>(res.map(|inner| {
                Tracked {
                    inner,
                    _in_flight: in_flight,
                }
                .boxed()
            }))
        }
    });
    let reap = reaper(rx, deadlines);
    let stop = async {
        match &shutdown {
            Some(s) => s.cancelled().await,
            None => std::future::pending().await,
        }
    };
    // The two connection types share no trait for `graceful_shutdown`; the logic is the same.
    macro_rules! drive {
        ($conn:expr) => {{
            let conn = $conn;
            tokio::pin!(conn);
            tokio::pin!(reap);
            tokio::pin!(stop);
            tokio::select! {
                r = conn.as_mut() => r,
                why = &mut reap => {
                    closed.with_label_values(&[why.label()]).inc();
                    tracing::debug!(reason = why.label(), "closing an agent connection");
                    match why {
                        // Nothing to drain: dropping the connection closes the socket.
                        Closed::HeaderTimeout => Ok(()),
                        Closed::Idle => {
                            conn.as_mut().graceful_shutdown();
                            // A client that does not let go after GOAWAY is dropped.
                            tokio::time::timeout(deadlines.first_request, conn)
                                .await
                                .unwrap_or(Ok(()))
                        }
                    }
                }
                _ = &mut stop => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }};
    }
    if upgrades {
        drive!(builder.serve_connection_with_upgrades(io, svc))
    } else {
        drive!(builder.serve_connection(io, svc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real (short) time: the assertions are on what closes the connection, never on how
    // long it took.
    fn deadlines() -> Deadlines {
        Deadlines {
            first_request: Duration::from_millis(50),
            idle: Duration::from_millis(100),
        }
    }

    #[tokio::test]
    async fn a_connection_without_a_request_is_cut_at_the_first_deadline() {
        let (_tx, rx) = watch::channel(Activity::default());
        assert_eq!(reaper(rx, deadlines()).await, Closed::HeaderTimeout);
    }

    #[tokio::test]
    async fn a_response_in_flight_keeps_the_connection_past_the_idle_deadline() {
        let (tx, rx) = watch::channel(Activity::default());
        let tx = Arc::new(tx);
        let task = tokio::spawn(reaper(rx, deadlines()));
        let held = InFlight::begin(&tx);
        // A long response (a stream) keeps the connection open past the idle deadline.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!task.is_finished());
        drop(held);
        assert_eq!(task.await.unwrap(), Closed::Idle);
    }
}
