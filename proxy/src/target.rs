//! The `Target` of a call — the one shape every interception mode produces — and the
//! normalisation that makes the matcher and the upstream see the same bytes.
//!
//! Normalisation is strict on purpose: anything ambiguous (an encoded slash, a NUL, a
//! backslash, a dot segment that climbs above the root, a malformed escape) is refused rather
//! than guessed at, so no encoding trick can steer a call onto a more permissive tool.

use std::fmt;

/// Which way the call reached the sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Absolute-form request through `HTTP_PROXY`.
    ForwardProxy,
    /// `/u/<upstream>/…` on the proxy listener.
    BaseUrl,
    /// Decrypted from a `CONNECT` tunnel.
    Connect,
    /// Redirected by iptables (`SO_ORIGINAL_DST`).
    Transparent,
}

impl Via {
    /// Label used in audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::ForwardProxy => "forward",
            Via::BaseUrl => "base-url",
            Via::Connect => "connect",
            Via::Transparent => "transparent",
        }
    }
}

/// URL scheme of the upstream call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    /// `http` or `https`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
    /// 80 or 443.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
    /// Parse `http`/`https` (case-insensitive).
    pub fn parse(s: &str) -> Option<Scheme> {
        if s.eq_ignore_ascii_case("http") {
            Some(Scheme::Http)
        } else if s.eq_ignore_ascii_case("https") {
            Some(Scheme::Https)
        } else {
            None
        }
    }
}

/// A normalised call target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Scheme of the upstream call.
    pub scheme: Scheme,
    /// Lower-case host without trailing dot; IPv6 without brackets.
    pub host: String,
    /// Explicit or default port.
    pub port: u16,
    /// Upper-case method.
    pub method: http::Method,
    /// Normalised path: starts with `/`, no empty or dot segments, only necessary escapes.
    pub path: String,
    /// Raw query string (without `?`), forwarded unchanged.
    pub query: Option<String>,
    /// How the call arrived.
    pub via: Via,
}

impl Target {
    /// `path?query` as sent upstream.
    pub fn path_and_query(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{}", self.path, q),
            None => self.path.clone(),
        }
    }

    /// `host[:port]` for the Host header: the port is omitted when it is the default.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == self.scheme.default_port() {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// The full upstream URI.
    pub fn uri(&self) -> String {
        format!(
            "{}://{}{}",
            self.scheme.as_str(),
            self.authority(),
            self.path_and_query()
        )
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.uri())
    }
}

/// Why a target could not be normalised. Every variant is a 400.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Host missing, malformed, or carrying userinfo.
    #[error("invalid host {0:?}")]
    Host(String),
    /// Port not a number in 1..=65535.
    #[error("invalid port in {0:?}")]
    Port(String),
    /// The path is ambiguous or malformed.
    #[error("invalid path: {0}")]
    Path(&'static str),
    /// A scheme other than http/https.
    #[error("unsupported scheme {0:?}")]
    Scheme(String),
    /// Absolute-form URI and Host header disagree.
    #[error("request target authority {uri:?} does not match Host header {host:?}")]
    HostMismatch {
        /// Authority from the URI.
        uri: String,
        /// Host header value.
        host: String,
    },
}

/// Is the method one that changes state?
pub(crate) fn is_mutating(m: &http::Method) -> bool {
    !matches!(
        *m,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS | http::Method::TRACE
    )
}

/// Split and normalise an authority (`host[:port]`), applying the scheme's default port.
pub fn parse_authority(authority: &str, scheme: Scheme) -> Result<(String, u16), TargetError> {
    if authority.is_empty() || authority.contains('@') {
        return Err(TargetError::Host(authority.into()));
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let end = rest
            .find(']')
            .ok_or_else(|| TargetError::Host(authority.into()))?;
        let host = &rest[..end];
        let after = &rest[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(TargetError::Host(authority.into())),
        };
        host.parse::<std::net::Ipv6Addr>()
            .map_err(|_| TargetError::Host(authority.into()))?;
        (host.to_ascii_lowercase(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (normalise_host(h)?, Some(p)),
            None => (normalise_host(authority)?, None),
        }
    };
    let port = match port {
        None => scheme.default_port(),
        Some(p) => parse_port(p).ok_or_else(|| TargetError::Port(authority.into()))?,
    };
    Ok((host, port))
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|&n| n != 0)
}

/// Lower-case a DNS name or IPv4 literal and drop one trailing dot. Only LDH characters are
/// allowed, so homograph tricks must arrive as punycode and are compared literally.
pub fn normalise_host(host: &str) -> Result<String, TargetError> {
    let h = host.strip_suffix('.').unwrap_or(host);
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
        });
    if !ok {
        return Err(TargetError::Host(host.into()));
    }
    Ok(h.to_ascii_lowercase())
}

/// Normalise a request path. See the module docs for what is refused.
pub fn normalise_path(raw: &str) -> Result<String, TargetError> {
    if !raw.starts_with('/') {
        return Err(TargetError::Path("must start with '/'"));
    }
    let bytes = raw.as_bytes();
    // First pass: decode escapes of unreserved characters, canonicalise the rest, and refuse
    // anything that could mean different things to different parsers.
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .ok_or(TargetError::Path("truncated percent escape"))?;
                let v = hex_pair(hex).ok_or(TargetError::Path("malformed percent escape"))?;
                match v {
                    b'/' | b'\\' => return Err(TargetError::Path("encoded slash or backslash")),
                    0 => return Err(TargetError::Path("encoded NUL")),
                    b'%' => {
                        // Double encoding: refuse rather than let a second decoder downstream
                        // turn %252e into a dot segment the matcher never saw.
                        return Err(TargetError::Path("encoded percent sign (double encoding)"));
                    }
                    _ if is_unreserved(v) => decoded.push(v as char),
                    _ if v < 0x20 || v == 0x7f => {
                        return Err(TargetError::Path("encoded control character"))
                    }
                    _ => {
                        decoded.push('%');
                        decoded.push(char::from(b"0123456789ABCDEF"[(v >> 4) as usize]));
                        decoded.push(char::from(b"0123456789ABCDEF"[(v & 15) as usize]));
                    }
                }
                i += 3;
            }
            b'\\' => return Err(TargetError::Path("backslash")),
            0..=0x20 | 0x7f..=0xff => {
                return Err(TargetError::Path("raw control, space or non-ASCII byte"))
            }
            b'?' | b'#' => return Err(TargetError::Path("unexpected '?' or '#'")),
            _ => {
                decoded.push(b as char);
                i += 1;
            }
        }
    }
    // Second pass: drop empty and `.` segments, resolve `..` (refusing to climb above root).
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(TargetError::Path("dot segment above the root"));
                }
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (decoded.ends_with('/') && !segments.is_empty()) {
        out.push('/');
    }
    Ok(out)
}

fn hex_pair(h: &[u8]) -> Option<u8> {
    let d = |c: u8| (c as char).to_digit(16).map(|v| v as u8);
    Some(d(h[0])? << 4 | d(h[1])?)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The path with `;` parameters removed from every segment (`/a;x=1/b` → `/a/b`), as servlet
/// containers route it. Only used for matching tools that opt in (`request.pathParams`); the
/// canonical-call builder refuses parameters on empty or dot segments (`/..;/`) first.
pub fn strip_path_params(path: &str) -> String {
    path.split('/')
        .map(|seg| seg.split_once(';').map_or(seg, |(head, _)| head))
        .collect::<Vec<_>>()
        .join("/")
}

/// Normalise a query string: refuse control bytes, keep the rest byte for byte.
pub fn check_query(q: &str) -> Result<(), TargetError> {
    if q.bytes().any(|b| b <= 0x20 || b == 0x7f || b == b'#') || q.contains("%00") {
        return Err(TargetError::Path("control character in query"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
