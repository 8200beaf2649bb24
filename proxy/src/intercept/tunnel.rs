//! Tunnels: a CONNECT after its `200`, or a transparent connection redirected by iptables.
//!
//! A TLS tunnel is read up to the ClientHello first. Its SNI must agree with the tunnel's host
//! (CONNECT) or name a tool host (transparent); then the agent's TLS is terminated with a leaf
//! minted by the interception CA, and every decrypted request runs the ordinary pipeline with
//! its target pinned to the tunnel ([`crate::intercept::tunnel_target`]). Bytes that are not
//! TLS, a ClientHello without SNI for a named host, an SNI for another host, and a handshake
//! that never finishes are refused and recorded. Nothing in a tunnel reaches an upstream
//! without passing the pipeline, except a configured passthrough host, which is recorded as
//! such.

use crate::intercept::conn::ConnLimits;
use crate::intercept::Tunnel;
use crate::pipeline;
use crate::refusal::Refusal;
use crate::snapshot::Snapshot;
use crate::state::ProxyState;
use crate::target::{normalise_host, Scheme};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest ClientHello accepted (real ones are a few hundred bytes; post-quantum key shares
/// push them past 1 KiB).
const MAX_HELLO_BYTES: usize = 32 * 1024;

/// The first flight of a connection.
pub enum Hello {
    /// A TLS ClientHello, parsed; `seen` holds the raw bytes (replayed for passthrough).
    Tls {
        /// The parsed hello, ready to continue the handshake.
        accepted: Box<rustls::server::Accepted>,
        /// Normalised SNI, if sent.
        sni: Option<String>,
        /// Every byte read so far.
        seen: Vec<u8>,
    },
    /// The first bytes are not a TLS handshake record.
    NotTls(Vec<u8>),
    /// TLS framing, but not a valid ClientHello.
    BadTls(String),
    /// The peer closed before sending anything.
    Closed,
}

/// Read a connection's first flight and parse it as a ClientHello.
pub async fn read_client_hello<IO: AsyncRead + Unpin>(io: &mut IO) -> std::io::Result<Hello> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Ok(if seen.is_empty() {
                Hello::Closed
            } else {
                Hello::BadTls("connection closed inside the ClientHello".into())
            });
        }
        if seen.is_empty() && chunk[0] != 0x16 {
            return Ok(Hello::NotTls(chunk[..n].to_vec()));
        }
        seen.extend_from_slice(&chunk[..n]);
        if seen.len() > MAX_HELLO_BYTES {
            return Ok(Hello::BadTls("ClientHello too large".into()));
        }
        let mut rd: &[u8] = &chunk[..n];
        while !rd.is_empty() {
            if let Err(e) = acceptor.read_tls(&mut rd) {
                return Ok(Hello::BadTls(e.to_string()));
            }
        }
        match acceptor.accept() {
            Ok(None) => continue,
            Ok(Some(accepted)) => {
                let sni = accepted
                    .client_hello()
                    .server_name()
                    .map(|s| normalise_host(s).unwrap_or_else(|_| s.to_ascii_lowercase()));
                return Ok(Hello::Tls {
                    accepted: Box::new(accepted),
                    sni,
                    seen,
                });
            }
            Err((e, _alert)) => return Ok(Hello::BadTls(e.to_string())),
        }
    }
}

/// What a TLS tunnel is expected to carry.
pub enum Expect {
    /// A CONNECT to this host and port: the SNI must agree.
    Connect {
        /// Normalised host.
        host: String,
        /// Port.
        port: u16,
    },
    /// A transparent connection to this original destination: the SNI names the host.
    Transparent {
        /// `SO_ORIGINAL_DST`.
        original_dst: SocketAddr,
    },
}

fn is_ip(host: &str) -> bool {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok()
}

/// Tools served on `host:port` over TLS, if every one of them is `passthrough` (then the first
/// one's index); `None` when any is intercepted or none exists.
pub fn passthrough_tool(snap: &Snapshot, host: &str, port: u16) -> Option<usize> {
    let tools = snap.catalog.tools_on(host, port, Scheme::Https);
    let all = !tools.is_empty() && tools.iter().all(|&i| snap.tools[i].config.passthrough);
    all.then(|| tools[0])
}

/// Serve a TLS tunnel: check the ClientHello, then intercept (or pass through).
pub async fn serve_tls<IO>(
    state: Arc<ProxyState>,
    snap: Arc<Snapshot>,
    mut io: IO,
    expect: Expect,
    tenant: String,
    limits: ConnLimits,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut tunnel = match &expect {
        Expect::Connect { host, port } => Tunnel {
            scheme: Scheme::Https,
            host: host.clone(),
            port: *port,
            via: crate::target::Via::Connect,
        },
        Expect::Transparent { original_dst } => Tunnel {
            scheme: Scheme::Https,
            host: original_dst.ip().to_string(),
            port: original_dst.port(),
            via: crate::target::Via::Transparent,
        },
    };
    let refuse = |tunnel: Tunnel, r: Refusal| {
        let state = state.clone();
        let snap = snap.clone();
        let tenant = tenant.clone();
        async move { pipeline::refuse_tunnel(&state, &snap, &tunnel, tenant, r).await }
    };
    let hello =
        match tokio::time::timeout(limits.header_read_timeout, read_client_hello(&mut io)).await {
            Err(_) => {
                let secs = limits.header_read_timeout.as_secs_f64();
                refuse(
                    tunnel,
                    Refusal::BadRequest(format!(
                        "no TLS ClientHello within {secs}s; the tunnel was closed"
                    )),
                )
                .await;
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "tunnel read failed before the ClientHello");
                return;
            }
            Ok(Ok(h)) => h,
        };
    let (accepted, sni, seen) = match hello {
        Hello::Closed => return,
        Hello::NotTls(_) => {
            let res = refuse(
                tunnel,
                Refusal::BadRequest(
                    "the tunnel carries bytes that are not TLS; only TLS may cross a TLS tunnel"
                        .into(),
                ),
            )
            .await;
            // The peer may be speaking plain HTTP: answer in kind, then close.
            let _ = write_plain_response(&mut io, res).await;
            let _ = io.shutdown().await;
            return;
        }
        Hello::BadTls(m) => {
            refuse(
                tunnel,
                Refusal::BadRequest(format!("malformed TLS ClientHello: {m}")),
            )
            .await;
            return;
        }
        Hello::Tls {
            accepted,
            sni,
            seen,
        } => (accepted, sni, seen),
    };
    match (&expect, &sni) {
        (Expect::Connect { host, .. }, Some(s)) if s != host => {
            refuse(
                tunnel,
                Refusal::Misdirected(format!("TLS SNI {s} differs from the CONNECT host {host}")),
            )
            .await;
            return;
        }
        (Expect::Connect { host, .. }, None) if !is_ip(host) => {
            refuse(
                tunnel,
                Refusal::BadRequest(format!(
                    "TLS ClientHello without SNI in a tunnel to {host}; the host must be named"
                )),
            )
            .await;
            return;
        }
        (Expect::Transparent { .. }, Some(s)) => tunnel.host = s.clone(),
        _ => {}
    }
    if let Expect::Transparent { original_dst } = &expect {
        if !snap
            .catalog
            .host_known(&tunnel.host, tunnel.port, Scheme::Https)
        {
            let what = match &sni {
                Some(s) => format!("TLS to {s}:{}", tunnel.port),
                None => format!("TLS without SNI to {original_dst}"),
            };
            refuse(
                tunnel,
                Refusal::ConnectNotAllowed(format!("{what} matches none of this agent's tools")),
            )
            .await;
            return;
        }
        if let Some(tool) = passthrough_tool(&snap, &tunnel.host, tunnel.port) {
            // The same host-level gate as a CONNECT passthrough, and the upstream is the tool
            // host the SNI named, dialled by name: never the original destination, which the
            // agent chose.
            let gate = crate::intercept::passthrough::transparent_tenant(&snap);
            let label = gate.clone().unwrap_or_default();
            let gated =
                crate::intercept::passthrough::host_gate(&snap, gate, &tunnel.host, tunnel.port);
            let tenant = match gated {
                Ok(t) => t,
                Err(r) => {
                    pipeline::refuse_tunnel(&state, &snap, &tunnel, label, r).await;
                    return;
                }
            };
            let up = crate::intercept::passthrough::connect_tool_host(
                &snap,
                tool,
                &tunnel.host,
                tunnel.port,
            )
            .await;
            let up = match up {
                Ok(s) => s,
                Err(r) => {
                    pipeline::refuse_tunnel(&state, &snap, &tunnel, label, r).await;
                    return;
                }
            };
            let run = crate::identify::mint(&snap.agent.runs);
            if let Err(r) =
                pipeline::record_passthrough(&state, &snap, &tunnel, tenant, run, tool).await
            {
                refuse(tunnel, r).await;
                return;
            }
            splice(io, up, &seen).await;
            return;
        }
    }
    let Some(ca) = snap.intercept.clone() else {
        refuse(
            tunnel,
            Refusal::ConnectNotAllowed(
                "TLS interception is not configured (tls.intercept); an opaque tunnel would bypass policy".into(),
            ),
        )
        .await;
        return;
    };
    let config = match ca.server_config(&tunnel.host) {
        Ok(c) => c,
        Err(e) => {
            refuse(tunnel, Refusal::BadRequest(e.to_string())).await;
            return;
        }
    };
    let start = tokio_rustls::StartHandshake::from_parts(*accepted, io);
    let tls =
        match tokio::time::timeout(limits.header_read_timeout, start.into_stream(config)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                refuse(
                    tunnel,
                    Refusal::BadRequest(format!("TLS handshake with the agent failed: {e}")),
                )
                .await;
                return;
            }
            Err(_) => {
                refuse(
                    tunnel,
                    Refusal::BadRequest("TLS handshake did not finish in time".into()),
                )
                .await;
                return;
            }
        };
    serve_http(state, TokioIo::new(tls), tunnel, limits).await;
}

/// Serve HTTP (either version) on a decrypted or plain tunnel stream.
pub async fn serve_http<IO>(
    state: Arc<ProxyState>,
    io: TokioIo<IO>,
    tunnel: Tunnel,
    limits: ConnLimits,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let tunnel = Arc::new(tunnel);
    let closed = state.metrics.connections_closed.clone();
    let serve = move |req: hyper::Request<Incoming>| {
        let state = state.clone();
        let tunnel = tunnel.clone();
        async move { serve_request(state, req, &tunnel).await }
    };
    crate::intercept::conn::serve_connection(io, serve, limits, closed).await;
}

/// One request inside a tunnel (decrypted TLS or plain transparent). A request-line `CONNECT`
/// is refused here: the tunnel is already pinned to one host, and a CONNECT inside it would be
/// decided as one path while the upstream received `CONNECT host:port`. Everything else runs the
/// ordinary pipeline.
pub async fn serve_request(
    state: Arc<ProxyState>,
    req: hyper::Request<Incoming>,
    tunnel: &Tunnel,
) -> hyper::Response<crate::body::ResBody> {
    if req.method() == http::Method::CONNECT {
        if let Some(snap) = state.snapshot.load_full() {
            let tenant = crate::identify::tenant(req.headers(), &snap).unwrap_or_default();
            let target = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
            let shown: String = target
                .chars()
                .take(128)
                .filter(|c| !c.is_control())
                .collect();
            let r = Refusal::BadRequest(format!(
                "CONNECT {shown} inside a tunnel to {}:{}; a tunnel carries requests for its own host only, open another tunnel instead",
                tunnel.host, tunnel.port
            ));
            return pipeline::refuse_tunnel(&state, &snap, tunnel, tenant, r).await;
        }
    }
    pipeline::handle_in_tunnel(state, req, tunnel).await
}

/// Pass a recorded TLS connection through to the tool host, untouched: the bytes read so far
/// (the ClientHello) first, then both directions until either side closes.
async fn splice<IO>(mut io: IO, mut up: tokio::net::TcpStream, first: &[u8])
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    if up.write_all(first).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut io, &mut up).await;
}

/// Write a refusal as a minimal HTTP/1.1 response (for plain bytes in a TLS tunnel).
async fn write_plain_response<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    res: hyper::Response<crate::body::ResBody>,
) -> std::io::Result<()> {
    use http_body_util::BodyExt;
    let (parts, body) = res.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    head.extend_from_slice(&body);
    io.write_all(&head).await
}
