//! The upstream request, rebuilt from the canonical call rather than copied from the agent.
//!
//! - URI: the target's scheme and authority, the canonical path, and the decided query pairs
//!   re-encoded (`application/x-www-form-urlencoded` bytes, `+` for space).
//! - Body: JSON re-serialised from the parsed value, a form re-serialised from the parsed
//!   object, an opaque body as decoded. The agent's bytes are never forwarded for a parsed
//!   body, so nothing a stricter or laxer parser could read differently survives.
//! - `Content-Type` is set by the proxy from the body kind (`application/json`,
//!   `application/x-www-form-urlencoded`, or the opaque body's media type); no
//!   `Content-Encoding`; `Content-Length` from the rebuilt body; `Host` from the target.
//! - Agent headers: only [`DEFAULT_FORWARD_HEADERS`], the tool's `forwardHeaders` and its
//!   meaning-carrying headers, and never [`NEVER_FORWARD_HEADERS`] whatever a tool lists.
//! - Set by the proxy: `X-Forwarded-Proto` and `X-Forwarded-Host` (the upstream request's
//!   own scheme and authority), `traceparent`, the tool's credential, and the
//!   `Idempotency-Key` in the tool's forwarding mode, and `Accept-Encoding` narrowed to the
//!   codings Tollgate decodes (so usage and MCP lists can be read from any answer).
//!   `X-Forwarded-For` is neither passed nor set: the agent is the sidecar's own pod, so the
//!   address would say nothing.

use super::headers::{DEFAULT_FORWARD_HEADERS, NEVER_FORWARD_HEADERS};
use super::{form, CanonicalBody, CanonicalCall, CanonicalError, IDEMPOTENCY_KEY};
use crate::config::IdempotencyKeyForwarding;
use crate::snapshot::Credential;
use crate::target::Target;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

/// What the rebuilt request needs beside the canonical call.
#[derive(Clone, Debug)]
pub struct RebuildOptions<'a> {
    /// The tool's `forwardHeaders` (lower-case names).
    pub forward_headers: &'a [HeaderName],
    /// The credential the tool injects, replacing the agent's copy of that header.
    pub credential: Option<&'a Credential>,
    /// The `traceparent` to send.
    pub traceparent: &'a str,
    /// The tool's `Idempotency-Key` forwarding mode.
    pub idempotency: IdempotencyKeyForwarding,
    /// Agent name (namespaces the `Idempotency-Key`).
    pub agent: &'a str,
    /// Tenant (namespaces the `Idempotency-Key`).
    pub tenant: &'a str,
}

/// The forwarded form of an agent's `Idempotency-Key` in `namespaced` mode:
/// `hex(sha256("tollgate-idempotency-v1" NUL agent NUL tenant NUL key))`. Two tenants (or two
/// agents) using the same key never collide upstream under one injected credential.
pub fn namespaced_idempotency_key(agent: &str, tenant: &str, key: &str) -> String {
    let mut h = Sha256::new();
    for part in ["tollgate-idempotency-v1", agent, tenant, key] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    hex::encode(h.finalize())
}

/// Build the upstream request from the canonical call (see the module docs).
pub fn rebuild(
    call: &CanonicalCall,
    target: &Target,
    agent_headers: &HeaderMap,
    opts: &RebuildOptions<'_>,
) -> Result<http::Request<Bytes>, CanonicalError> {
    let (body, content_type) = match &call.body {
        CanonicalBody::Empty => (Bytes::new(), None),
        CanonicalBody::Json(v) => (
            Bytes::from(serde_json::to_vec(v).expect("a JSON value serialises")),
            Some("application/json".to_string()),
        ),
        CanonicalBody::Form(m) => (
            Bytes::from(
                form::serialize_form(m).map_err(|detail| CanonicalError::Body {
                    kind: "form",
                    detail,
                })?,
            ),
            Some("application/x-www-form-urlencoded".to_string()),
        ),
        CanonicalBody::Opaque { media_type, bytes } => (
            bytes.clone(),
            (!media_type.is_empty()).then(|| media_type.clone()),
        ),
    };
    let mut uri = format!(
        "{}://{}{}",
        target.scheme.as_str(),
        target.authority(),
        call.path
    );
    if !call.query_pairs.is_empty() {
        uri.push('?');
        uri.push_str(&form::serialize_pairs(&call.query_pairs));
    }
    // Headers the agent declared hop-by-hop are dropped; one the tool forwards cannot be.
    let hop = super::headers::connection_tokens(agent_headers)?;
    if let Some(t) = hop
        .iter()
        .find(|t| !super::headers::may_drop(t, opts.forward_headers))
    {
        return Err(CanonicalError::ConnectionNamesEndToEnd(t.clone()));
    }
    let mut h = HeaderMap::new();
    let allowed = |n: &HeaderName| {
        let s = n.as_str();
        !NEVER_FORWARD_HEADERS.contains(&s)
            && !hop.iter().any(|t| t == s)
            && !s.starts_with("x-tollgate-")
            && (DEFAULT_FORWARD_HEADERS.contains(&s)
                || opts.forward_headers.contains(n)
                || call.headers.contains_key(s))
    };
    for (name, value) in agent_headers {
        if allowed(name) {
            h.append(name.clone(), value.clone());
        }
    }
    let bad = |name: &str| CanonicalError::BadHeader(name.into(), "cannot be encoded".into());
    h.insert(
        header::HOST,
        HeaderValue::from_str(&target.authority()).map_err(|_| bad("host"))?,
    );
    if let Some(ct) = content_type {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(&ct).map_err(|_| bad("content-type"))?,
        );
    }
    if !body.is_empty() || crate::target::is_mutating(&call.method) {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    if let Some(cred) = opts.credential {
        // Every credential the agent sent is dropped, not only this header's: the agent
        // never chooses the credential, and never learns it.
        super::headers::strip_agent_credentials(&mut h, cred);
        h.insert(cred.header.clone(), cred.value.clone());
    }
    // The codings Tollgate can read a response in, of those the agent accepts (see
    // headers::accept_encoding).
    if let Some(v) = super::headers::accept_encoding(agent_headers) {
        h.insert(header::ACCEPT_ENCODING, v);
    }
    if let Some(key) = &call.idempotency_key {
        let forwarded = match opts.idempotency {
            IdempotencyKeyForwarding::Namespaced => {
                namespaced_idempotency_key(opts.agent, opts.tenant, key)
            }
            IdempotencyKeyForwarding::Verbatim if opts.credential.is_some() => {
                return Err(CanonicalError::IdempotencyKey(
                    "this tool forwards keys verbatim, which under Tollgate's injected credential would share one key space across tenants; send the call without an Idempotency-Key".into(),
                ));
            }
            IdempotencyKeyForwarding::Verbatim => key.clone(),
        };
        h.insert(
            IDEMPOTENCY_KEY,
            HeaderValue::from_str(&forwarded).map_err(|_| bad("idempotency-key"))?,
        );
    }
    h.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(target.scheme.as_str()),
    );
    h.insert(
        HeaderName::from_static("x-forwarded-host"),
        HeaderValue::from_str(&target.authority()).map_err(|_| bad("x-forwarded-host"))?,
    );
    if let Ok(v) = HeaderValue::from_str(opts.traceparent) {
        h.insert(HeaderName::from_static("traceparent"), v);
    }
    let mut req = http::Request::builder()
        .method(call.method.clone())
        .uri(uri)
        .body(body)
        .map_err(|e| CanonicalError::BadHeader("request".into(), e.to_string()))?;
    *req.headers_mut() = h;
    Ok(req)
}
