//! Listeners: the proxy listener (forward proxy + base URL; CONNECT is handed to
//! [`crate::intercept::connect`]), each connection served under the limits of
//! [`crate::intercept::conn`].

use crate::body::ResBody;
use crate::intercept::conn::{builder, ConnLimits};
use crate::state::ProxyState;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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
            let closed = state.metrics.connections_closed.clone();
            let serve = move |req: hyper::Request<Incoming>| dispatch(state.clone(), req);
            let r = crate::intercept::conn_deadline::serve(
                &builder,
                TokioIo::new(stream),
                serve,
                crate::intercept::conn_deadline::Deadlines::from(limits),
                closed,
                Some(shutdown),
                true,
            )
            .await;
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
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
        return crate::intercept::connect::handle_connect(state, req).await;
    }
    crate::pipeline::handle(state, req).await
}
