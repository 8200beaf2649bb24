//! Request headers: which agent headers are forwarded and which never are (with the agent's
//! credentials and `Accept-Encoding` as sent upstream), headers that
//! different parsers read differently, and the media type of the body.

use super::CanonicalError;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Agent headers forwarded to every tool: content negotiation, caching preconditions, the
/// agent's own credential (replaced when the tool injects one), W3C trace state, and the
/// version headers the common API SDKs require.
pub const DEFAULT_FORWARD_HEADERS: &[&str] = &[
    "accept",
    "accept-language",
    "user-agent",
    "authorization",
    "x-api-key",
    "api-key",
    "cache-control",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "range",
    "prefer",
    "tracestate",
    "baggage",
    "mcp-session-id",
    "mcp-protocol-version",
    "mcp-method",
    "mcp-name",
    "last-event-id",
    "anthropic-version",
    "anthropic-beta",
    "openai-organization",
    "openai-project",
    "openai-beta",
    "stripe-version",
    "x-github-api-version",
    "notion-version",
];

/// Headers never forwarded from the agent, even when a tool lists them: framing and
/// connection headers (the proxy frames the request), headers upstreams trust from a proxy
/// (forwarded-for, original-URL rewrites, method overrides), content headers the proxy sets,
/// and Tollgate's own.
pub const NEVER_FORWARD_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "traceparent",
    "idempotency-key",
];

/// Headers an SDK carries its (placeholder) API key in. Where the tool injects a credential,
/// every one of them is dropped, not only the injected header: an OpenAI SDK pointed at an
/// Anthropic-style tool still sends `Authorization`, and the upstream must see one key, the
/// injected one.
pub(crate) const AGENT_CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "x-auth-token",
];

/// Drop every credential the agent supplied for a call whose credential Tollgate injects:
/// the agent never chooses the credential, and never learns it.
pub(crate) fn strip_agent_credentials(h: &mut HeaderMap, injected: &crate::snapshot::Credential) {
    for name in AGENT_CREDENTIAL_HEADERS {
        h.remove(*name);
    }
    h.remove(&injected.header);
}

/// The `Accept-Encoding` sent upstream: the agent's, narrowed to the codings Tollgate reads
/// (gzip, deflate, br, zstd; `*` stands for the four). Responses are passed on as coded, so
/// the agent still gets the compression it asked for, and Tollgate can still decode any
/// answer for usage and MCP lists. `None` (identity) when the agent accepts none of them.
pub(crate) fn accept_encoding(agent: &HeaderMap) -> Option<HeaderValue> {
    const READ: [&str; 4] = ["gzip", "deflate", "br", "zstd"];
    let mut out: Vec<&str> = Vec::new();
    for v in agent.get_all(http::header::ACCEPT_ENCODING) {
        for item in v.to_str().unwrap_or("").split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            if refused {
                continue;
            }
            let coding = if coding == "x-gzip" {
                "gzip".into()
            } else {
                coding
            };
            for c in READ {
                if (coding == c || coding == "*") && !out.contains(&c) {
                    out.push(c);
                }
            }
        }
    }
    (!out.is_empty()).then(|| HeaderValue::from_str(&out.join(", ")).expect("token list"))
}

/// Headers that must appear at most once: proxies and frameworks disagree on which of two
/// copies counts (gunicorn reads the last `Content-Type`, most the first).
pub const SINGLETON_HEADERS: &[HeaderName] = &[
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::HOST,
    header::AUTHORIZATION,
];

/// Headers that turn one method into another in Rails, Laravel, Symfony, Express's
/// `method-override` and many Java stacks. Refused whatever their value.
pub const METHOD_OVERRIDE_HEADERS: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The hop-by-hop names a `Connection` header lists in ordinary use. Any other name it lists
/// is an agent-declared hop-by-hop header: dropped, as `Connection` asks, unless it names a
/// header the decision reads or the proxy forwards (`Connection: Content-Type` would make a
/// hop drop the header the decision was based on): that is refused (see [`check`]).
const CONNECTION_TOKENS: &[&str] = &[
    "close",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Whether `Connection` may name `token` (lower-case): a hop-by-hop name, or a header neither
/// read by the decision nor forwarded (`forwarded` lists the tool's own forwarded and
/// meaning-carrying headers).
pub(super) fn may_drop(token: &str, forwarded: &[HeaderName]) -> bool {
    CONNECTION_TOKENS.contains(&token)
        || !(NEVER_FORWARD_HEADERS.contains(&token)
            || DEFAULT_FORWARD_HEADERS.contains(&token)
            || token.starts_with("x-tollgate-")
            || forwarded.iter().any(|n| n.as_str() == token))
}

/// The names the `Connection` header lists, lower-case.
pub(super) fn connection_tokens(h: &HeaderMap) -> Result<Vec<String>, CanonicalError> {
    let mut out = Vec::new();
    for v in h.get_all(header::CONNECTION) {
        let v = v
            .to_str()
            .map_err(|_| CanonicalError::BadHeader("connection".into(), "not ASCII".into()))?;
        out.extend(
            v.split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .filter(|t| !t.is_empty()),
        );
    }
    Ok(out)
}

/// Refuse ambiguous headers (see the constants above). `meaning` are the tool's
/// meaning-carrying headers, which `Connection` may not name either.
pub(super) fn check(h: &HeaderMap, meaning: &[HeaderName]) -> Result<(), CanonicalError> {
    for name in SINGLETON_HEADERS {
        if h.get_all(name).iter().count() > 1 {
            return Err(CanonicalError::RepeatedHeader(name.as_str().to_string()));
        }
    }
    for name in METHOD_OVERRIDE_HEADERS {
        if h.contains_key(*name) {
            return Err(CanonicalError::MethodOverride(format!("header {name}")));
        }
    }
    for token in connection_tokens(h)? {
        if !may_drop(&token, meaning) {
            return Err(CanonicalError::ConnectionNamesEndToEnd(token));
        }
    }
    Ok(())
}

/// What the `Content-Type` says the body is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MediaType {
    /// No `Content-Type`.
    Absent,
    /// `application/json` or `application/<anything>+json`.
    Json,
    /// `application/x-www-form-urlencoded`.
    Form,
    /// Any other type: its essence (lower-case `type/subtype`).
    Other(String),
}

/// Parse the single `Content-Type` strictly: a `type/subtype` of token characters, then
/// `;name=value` parameters. A list (`a/b, c/d`), a repeated parameter, or a charset other than
/// UTF-8 on JSON or form is refused: decoders disagree on all of them.
pub fn media_type(h: &HeaderMap) -> Result<MediaType, CanonicalError> {
    let Some(v) = h.get(header::CONTENT_TYPE) else {
        return Ok(MediaType::Absent);
    };
    let bad = |why: &str| CanonicalError::BadContentType(why.to_string());
    let v = v.to_str().map_err(|_| bad("not ASCII"))?;
    let mut parts = v.split(';');
    let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    match essence.split_once('/') {
        Some((t, s)) if token(t) && token(s) => {}
        _ => return Err(bad("not a single type/subtype")),
    }
    let mut names = Vec::new();
    let mut charset = None;
    for p in parts {
        let (n, val) = p
            .split_once('=')
            .ok_or_else(|| bad("parameter without a value"))?;
        let n = n.trim().to_ascii_lowercase();
        if !token(&n) {
            return Err(bad("malformed parameter name"));
        }
        if names.contains(&n) {
            return Err(bad("repeated parameter"));
        }
        let val = val.trim().trim_matches('"').to_ascii_lowercase();
        if n == "charset" {
            charset = Some(val);
        }
        names.push(n);
    }
    let kind = if essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
    {
        MediaType::Json
    } else if essence == "application/x-www-form-urlencoded" {
        MediaType::Form
    } else {
        return Ok(MediaType::Other(essence));
    };
    if let Some(c) = charset {
        if c != "utf-8" && c != "utf8" {
            return Err(CanonicalError::BadContentType(format!(
                "charset {c:?}: JSON and form bodies must be UTF-8"
            )));
        }
    }
    Ok(kind)
}

/// The single value of header `name`, as visible ASCII; `None` when absent.
pub(super) fn single_value(
    h: &HeaderMap,
    name: &HeaderName,
) -> Result<Option<String>, CanonicalError> {
    let mut values = h.get_all(name).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(CanonicalError::RepeatedHeader(name.as_str().to_string()));
    }
    let s = v
        .to_str()
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| (0x20..0x7f).contains(&b)))
        .ok_or_else(|| {
            CanonicalError::BadHeader(name.as_str().to_string(), "not visible ASCII".into())
        })?;
    Ok(Some(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    #[test]
    fn every_agent_credential_is_dropped_where_one_is_injected() {
        let mut h = HeaderMap::new();
        for n in [
            "authorization",
            "x-api-key",
            "api-key",
            "x-goog-api-key",
            "x-kept",
        ] {
            h.insert(
                HeaderName::from_static(n),
                "agent-placeholder".parse().unwrap(),
            );
        }
        let cred = crate::snapshot::Credential {
            header: HeaderName::from_static("x-api-key"),
            value: "real".parse().unwrap(),
        };
        strip_agent_credentials(&mut h, &cred);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn accept_encoding_is_narrowed_to_what_tollgate_reads() {
        let ae = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::ACCEPT_ENCODING, v.parse().unwrap());
            accept_encoding(&h).map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(ae("gzip, deflate").as_deref(), Some("gzip, deflate"));
        assert_eq!(
            ae("br;q=0.9, compress, x-gzip").as_deref(),
            Some("br, gzip")
        );
        assert_eq!(ae("zstd;q=0, gzip").as_deref(), Some("gzip"));
        assert_eq!(ae("*").as_deref(), Some("gzip, deflate, br, zstd"));
        assert_eq!(ae("identity"), None);
        assert_eq!(accept_encoding(&HeaderMap::new()), None);
    }
}
