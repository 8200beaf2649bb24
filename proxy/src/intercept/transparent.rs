//! Transparent mode: connections redirected by the iptables rules of `tollgate-proxy iptables`
//! arrive on `listen.transparent`. The original destination comes from `SO_ORIGINAL_DST`; the
//! first byte tells TLS (a handshake record, handled exactly like a CONNECT, with the SNI
//! naming the host) from plain HTTP (the `Host` header names the host, the port is the original
//! one). Either way the call runs the ordinary pipeline, and the upstream connection is
//! re-originated by name, so a forged `Host` or SNI can only reach a real tool host.

use crate::intercept::conn::ConnLimits;
use crate::intercept::tunnel::{self, Expect};
use crate::intercept::Tunnel;
use crate::pipeline;
use crate::refusal::Refusal;
use crate::state::ProxyState;
use crate::target::{parse_authority, Scheme, Via};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The destination a redirected connection was originally for.
pub fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "SO_ORIGINAL_DST is not an IP address",
        )
    })
}

/// Serve the transparent listener until `shutdown`.
pub async fn serve_transparent(
    listener: TcpListener,
    state: Arc<ProxyState>,
    shutdown: CancellationToken,
) {
    let tracker = tokio_util::task::TaskTracker::new();
    let own = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "transparent accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tracker.spawn(async move {
            if let Err(e) = handle(state, stream, own).await {
                tracing::debug!(%peer, error = %e, "transparent connection ended");
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn handle(
    state: Arc<ProxyState>,
    stream: TcpStream,
    own: Option<SocketAddr>,
) -> std::io::Result<()> {
    let Some(snap) = state.snapshot.load_full() else {
        return Ok(());
    };
    let limits = ConnLimits::from_config(&snap.server.connection);
    let dst = match original_dst(&stream) {
        Ok(d) if Some(d) != own => d,
        Ok(_) | Err(_) => {
            // Not redirected (a direct connection to the listener, or no conntrack entry):
            // there is no destination to decide about.
            let local = stream.local_addr()?;
            let tunnel = Tunnel {
                scheme: Scheme::Http,
                host: local.ip().to_string(),
                port: local.port(),
                via: Via::Transparent,
            };
            let r = Refusal::BadRequest(
                "connection to the transparent listener without an original destination (is it redirected by iptables?)".into(),
            );
            pipeline::refuse_tunnel(&state, &snap, &tunnel, String::new(), r).await;
            return Ok(());
        }
    };
    let mut first = [0u8; 1];
    let n = match tokio::time::timeout(limits.header_read_timeout, stream.peek(&mut first)).await {
        Ok(r) => r?,
        Err(_) => {
            let tunnel = Tunnel {
                scheme: Scheme::Http,
                host: dst.ip().to_string(),
                port: dst.port(),
                via: Via::Transparent,
            };
            pipeline::refuse_tunnel(
                &state,
                &snap,
                &tunnel,
                String::new(),
                Refusal::BadRequest("the client sent nothing in time; closed".into()),
            )
            .await;
            return Ok(());
        }
    };
    if n == 0 {
        return Ok(());
    }
    if first[0] == 0x16 {
        let expect = Expect::Transparent { original_dst: dst };
        tunnel::serve_tls(state, snap, stream, expect, String::new(), limits).await;
        return Ok(());
    }
    serve_plain(state, stream, dst, limits).await;
    Ok(())
}

/// Plain HTTP redirected from port `dst.port()`: each request's `Host` names its host.
async fn serve_plain(
    state: Arc<ProxyState>,
    stream: TcpStream,
    dst: SocketAddr,
    limits: ConnLimits,
) {
    let closed = state.metrics.connections_closed.clone();
    let serve = move |req: hyper::Request<Incoming>| {
        let state = state.clone();
        async move {
            let tunnel = plain_tunnel(&req, dst);
            tunnel::serve_request(state, req, &tunnel).await
        }
    };
    crate::intercept::conn::serve_connection(TokioIo::new(stream), serve, limits, closed).await;
}

/// The tunnel a plain transparent request belongs to: the host its `Host` header names (or the
/// original IP when it names none), on the original port. [`crate::intercept::tunnel_target`]
/// then checks that the request agrees with it (a `Host` port other than the original one is
/// refused as misdirected).
fn plain_tunnel(req: &hyper::Request<Incoming>, dst: SocketAddr) -> Tunnel {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .and_then(|a| parse_authority(a, Scheme::Http).ok())
        .map(|(h, _)| h)
        .unwrap_or_else(|| dst.ip().to_string());
    Tunnel {
        scheme: Scheme::Http,
        host,
        port: dst.port(),
        via: Via::Transparent,
    }
}

/// The nat rules that redirect an agent pod's outbound TCP to the transparent listener.
#[derive(Clone, Debug)]
pub struct RedirectRules {
    /// UID the sidecar runs as; its own connections are not redirected.
    pub proxy_uid: u32,
    /// Destination ports to redirect.
    pub ports: Vec<u16>,
    /// Transparent listener port.
    pub to_port: u16,
    /// Admin port (never redirected).
    pub admin_port: u16,
    /// Also write ip6tables rules.
    pub ipv6: bool,
}

/// Chain holding Tollgate's rules in the nat table.
pub const CHAIN: &str = "TOLLGATE_OUTPUT";

impl RedirectRules {
    /// The commands, as argument vectors (`iptables`/`ip6tables` first).
    pub fn commands(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        let families: &[(&str, &str)] = if self.ipv6 {
            &[("iptables", "127.0.0.0/8"), ("ip6tables", "::1/128")]
        } else {
            &[("iptables", "127.0.0.0/8")]
        };
        for (bin, lo) in families {
            let rule = |args: &[&str]| -> Vec<String> {
                let mut v = vec![bin.to_string(), "-w".into(), "-t".into(), "nat".into()];
                v.extend(args.iter().map(|s| s.to_string()));
                v
            };
            let uid = self.proxy_uid.to_string();
            let admin = self.admin_port.to_string();
            let to = self.to_port.to_string();
            out.push(rule(&["-N", CHAIN]));
            out.push(rule(&[
                "-A",
                CHAIN,
                "-m",
                "owner",
                "--uid-owner",
                &uid,
                "-j",
                "RETURN",
            ]));
            out.push(rule(&["-A", CHAIN, "-o", "lo", "-j", "RETURN"]));
            out.push(rule(&["-A", CHAIN, "-d", lo, "-j", "RETURN"]));
            out.push(rule(&[
                "-A", CHAIN, "-p", "tcp", "--dport", &admin, "-j", "RETURN",
            ]));
            for p in &self.ports {
                let p = p.to_string();
                out.push(rule(&[
                    "-A",
                    CHAIN,
                    "-p",
                    "tcp",
                    "--dport",
                    &p,
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    &to,
                ]));
            }
            out.push(rule(&["-A", "OUTPUT", "-p", "tcp", "-j", CHAIN]));
        }
        out
    }

    /// The commands as a shell script (what `tollgate-proxy iptables` prints).
    pub fn script(&self) -> String {
        let mut s = String::from("#!/bin/sh\n# Tollgate transparent mode: redirect outbound TCP to the sidecar.\nset -e\n");
        for c in self.commands() {
            s.push_str(&c.join(" "));
            s.push('\n');
        }
        s
    }

    /// Install the rules. Idempotent: an existing chain is flushed and rebuilt, and the
    /// OUTPUT jump is added once.
    pub fn apply(&self) -> Result<(), String> {
        for c in self.commands() {
            let run = |args: &[String]| {
                std::process::Command::new(&args[0])
                    .args(&args[1..])
                    .output()
                    .map_err(|e| format!("{}: {e}", args[0]))
            };
            let is_new_chain = c.get(4).map(String::as_str) == Some("-N");
            let is_jump = c.get(5).map(String::as_str) == Some("OUTPUT");
            if is_new_chain {
                let out = run(&c)?;
                if !out.status.success() {
                    // Exists already: flush it and rebuild.
                    let mut flush = c.clone();
                    flush[4] = "-F".into();
                    let out = run(&flush)?;
                    if !out.status.success() {
                        return Err(format!(
                            "{}: {}",
                            flush.join(" "),
                            String::from_utf8_lossy(&out.stderr).trim()
                        ));
                    }
                }
                continue;
            }
            if is_jump {
                let mut check = c.clone();
                check[4] = "-C".into();
                if run(&check)?.status.success() {
                    continue;
                }
            }
            let out = run(&c)?;
            if !out.status.success() {
                return Err(format!(
                    "{}: {}",
                    c.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_exclude_the_proxy_loopback_and_admin_and_redirect_each_port() {
        let r = RedirectRules {
            proxy_uid: 1337,
            ports: vec![80, 443],
            to_port: 15006,
            admin_port: 15090,
            ipv6: true,
        };
        let s = r.script();
        assert!(
            s.contains("iptables -w -t nat -A TOLLGATE_OUTPUT -m owner --uid-owner 1337 -j RETURN")
        );
        assert!(s.contains("-A TOLLGATE_OUTPUT -d 127.0.0.0/8 -j RETURN"));
        assert!(s.contains("ip6tables -w -t nat -A TOLLGATE_OUTPUT -d ::1/128 -j RETURN"));
        assert!(s.contains("--dport 15090 -j RETURN"));
        assert!(s.contains("--dport 80 -j REDIRECT --to-ports 15006"));
        assert!(s.contains("--dport 443 -j REDIRECT --to-ports 15006"));
        assert!(s.contains("-A OUTPUT -p tcp -j TOLLGATE_OUTPUT"));
        // Exclusions come before any redirect.
        let first_redirect = s.find("REDIRECT").unwrap();
        assert!(s.find("--uid-owner").unwrap() < first_redirect);
        assert!(s.find("--dport 15090").unwrap() < first_redirect);
    }
}
