//! Intercept: turn an incoming request (forward-proxy absolute form, or base-URL `/u/<name>/…`)
//! into the one [`Target`] shape. CONNECT and transparent mode produce the same shape from
//! their own listeners.

pub mod conn;
pub mod conn_deadline;
pub mod connect;
pub mod passthrough;
pub mod server;
pub mod transparent;
pub mod tunnel;

use crate::refusal::Refusal;
use crate::snapshot::Snapshot;
use crate::target::{check_query, normalise_path, parse_authority, Scheme, Target, Via};
use http::header::HOST;
use http::request::Parts;

/// Prefix of base-URL mode paths.
pub const BASE_URL_PREFIX: &str = "/u/";

/// The request's single `Host` header, if any (two are refused: parsers disagree on which).
fn host_header(parts: &Parts) -> Result<Option<&str>, Refusal> {
    let hosts: Vec<_> = parts.headers.get_all(HOST).iter().collect();
    if hosts.len() > 1 {
        return Err(Refusal::BadRequest("more than one Host header".into()));
    }
    hosts
        .first()
        .map(|h| {
            h.to_str()
                .map_err(|_| Refusal::BadRequest("Host header is not ASCII".into()))
        })
        .transpose()
}

/// Derive the target of a plain (non-CONNECT) request on the proxy listener.
pub fn target_of(parts: &Parts, snap: &Snapshot) -> Result<Target, Refusal> {
    let host_header = host_header(parts)?;
    let uri = &parts.uri;
    // HTTP/2 has no origin form: every request names its `:authority`, which for a client
    // using base-URL mode over h2c is the proxy itself. A `/u/<upstream>` path is base-URL mode
    // there (h2 forward proxies use CONNECT).
    let h2_base_url =
        parts.version == http::Version::HTTP_2 && uri.path().starts_with(BASE_URL_PREFIX);
    if let Some(authority) = uri.authority().filter(|_| !h2_base_url) {
        // Absolute form: the URI is authoritative, and a Host header that disagrees with it is
        // a request-smuggling smell (RFC 9112 says ignore Host; we refuse instead).
        let scheme = uri
            .scheme_str()
            .and_then(Scheme::parse)
            .ok_or_else(|| Refusal::BadRequest(format!("unsupported scheme in {uri}")))?;
        let (host, port) = parse_authority(authority.as_str(), scheme)
            .map_err(|e| Refusal::BadRequest(e.to_string()))?;
        if let Some(h) = host_header {
            let hp = parse_authority(h, scheme)
                .map_err(|e| Refusal::BadRequest(format!("Host header: {e}")))?;
            if hp != (host.clone(), port) {
                return Err(Refusal::BadRequest(format!(
                    "request target authority {authority} does not match Host header {h}"
                )));
            }
        }
        let path = normalise_path(if uri.path().is_empty() {
            "/"
        } else {
            uri.path()
        })
        .map_err(|e| Refusal::BadRequest(e.to_string()))?;
        let query = uri.query().map(str::to_owned);
        if let Some(q) = &query {
            check_query(q).map_err(|e| Refusal::BadRequest(e.to_string()))?;
        }
        return Ok(Target {
            scheme,
            host,
            port,
            method: parts.method.clone(),
            path,
            query,
            via: Via::ForwardProxy,
        });
    }
    let raw_path = uri.path();
    if let Some(rest) = raw_path.strip_prefix(BASE_URL_PREFIX) {
        let (name, tail) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let up = snap.upstreams.get(name).ok_or_else(|| {
            Refusal::UnknownTool(format!(
                "no upstream named {name:?}; configured: {}",
                names(snap)
            ))
        })?;
        let tail = normalise_path(tail).map_err(|e| Refusal::BadRequest(e.to_string()))?;
        let path = if up.base_path.is_empty() {
            tail
        } else {
            format!("{}{}", up.base_path, if tail == "/" { "" } else { &tail })
        };
        let path = if path.is_empty() {
            "/".to_string()
        } else {
            path
        };
        let query = uri.query().map(str::to_owned);
        if let Some(q) = &query {
            check_query(q).map_err(|e| Refusal::BadRequest(e.to_string()))?;
        }
        return Ok(Target {
            scheme: up.scheme,
            host: up.host.clone(),
            port: up.port,
            method: parts.method.clone(),
            path,
            query,
            via: Via::BaseUrl,
        });
    }
    Err(Refusal::BadRequest(format!(
        "not a proxy request: use an absolute URL through HTTP_PROXY, or base-URL mode {BASE_URL_PREFIX}<upstream>/… (upstreams: {})",
        names(snap)
    )))
}

fn names(snap: &Snapshot) -> String {
    let mut v: Vec<&str> = snap.upstreams.keys().map(String::as_str).collect();
    v.sort_unstable();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// The destination a tunnel (CONNECT or transparent) was opened for. Every request inside it
/// must be for this host and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tunnel {
    /// `https` for intercepted TLS, `http` for plain transparent connections.
    pub scheme: Scheme,
    /// Normalised host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// CONNECT or transparent.
    pub via: Via,
}

/// Derive the target of a request that arrived inside a tunnel. The request's authority
/// (`:authority`, absolute form or `Host`) must name the tunnel's own host and port: a tunnel
/// opened for one host cannot carry calls to another.
pub fn tunnel_target(parts: &Parts, tunnel: &Tunnel) -> Result<Target, Refusal> {
    let host_header = host_header(parts)?;
    let uri = &parts.uri;
    if let Some(s) = uri.scheme_str() {
        if Scheme::parse(s) != Some(tunnel.scheme) {
            return Err(Refusal::BadRequest(format!(
                "a {} tunnel cannot carry a {s}:// request",
                tunnel.scheme.as_str()
            )));
        }
    }
    let mut named = Vec::new();
    if let Some(a) = uri.authority() {
        named.push(a.as_str());
    }
    if let Some(h) = host_header {
        named.push(h);
    }
    if named.is_empty() {
        return Err(Refusal::BadRequest(
            "request names no host (no Host header or :authority)".into(),
        ));
    }
    for authority in named {
        let hp = parse_authority(authority, tunnel.scheme)
            .map_err(|e| Refusal::BadRequest(format!("request authority: {e}")))?;
        if hp != (tunnel.host.clone(), tunnel.port) {
            return Err(Refusal::Misdirected(format!(
                "this tunnel was opened for {}:{}; a request for {authority} must open its own",
                tunnel.host, tunnel.port
            )));
        }
    }
    let path = normalise_path(if uri.path().is_empty() {
        "/"
    } else {
        uri.path()
    })
    .map_err(|e| Refusal::BadRequest(e.to_string()))?;
    let query = uri.query().map(str::to_owned);
    if let Some(q) = &query {
        check_query(q).map_err(|e| Refusal::BadRequest(e.to_string()))?;
    }
    Ok(Target {
        scheme: tunnel.scheme,
        host: tunnel.host.clone(),
        port: tunnel.port,
        method: parts.method.clone(),
        path,
        query,
        via: tunnel.via,
    })
}

#[cfg(test)]
mod tunnel_tests {
    use super::*;

    fn parts(uri: &str, hosts: &[&str]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn tunnel() -> Tunnel {
        Tunnel {
            scheme: Scheme::Https,
            host: "api.example.com".into(),
            port: 443,
            via: Via::Connect,
        }
    }

    #[test]
    fn requests_inside_a_tunnel_must_name_its_host() {
        let t = tunnel_target(&parts("/v1/x?a=1", &["API.example.com."]), &tunnel()).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("api.example.com", 443, "/v1/x")
        );
        assert_eq!(t.via, Via::Connect);
        let t = tunnel_target(&parts("https://api.example.com:443/v1/x", &[]), &tunnel()).unwrap();
        assert_eq!(t.path, "/v1/x");
        for (uri, hosts) in [
            ("/v1/x", vec!["evil.example.com"]),
            ("/v1/x", vec!["api.example.com:8443"]),
            ("https://evil.example.com/v1/x", vec![]),
            ("https://api.example.com/v1/x", vec!["evil.example.com"]),
        ] {
            let r = tunnel_target(&parts(uri, &hosts), &tunnel()).unwrap_err();
            assert!(
                matches!(r, Refusal::Misdirected(_)),
                "{uri} {hosts:?}: {r:?}"
            );
        }
        for (uri, hosts) in [
            ("/v1/x", vec![]),
            ("/v1/x", vec!["api.example.com", "api.example.com"]),
            ("http://api.example.com/v1/x", vec![]),
            ("/v1/%2e%2e/%2e%2e/admin", vec!["api.example.com"]),
        ] {
            let r = tunnel_target(&parts(uri, &hosts), &tunnel()).unwrap_err();
            assert!(
                matches!(r, Refusal::BadRequest(_)),
                "{uri} {hosts:?}: {r:?}"
            );
        }
    }
}
