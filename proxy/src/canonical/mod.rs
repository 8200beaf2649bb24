//! The canonical call: the one reading of a request that schema, policy, the approval hash and
//! the audit record decide on, and that the upstream request is rebuilt from.
//!
//! [`CanonicalCall::build`] reads a request strictly and refuses whatever two common parsers
//! could read differently ([`CanonicalError`], each with a stable [`CanonicalError::code`]):
//!
//! - headers: a repeated `Content-Type`, `Content-Length`, `Host` or `Authorization`, a
//!   `Connection` that names an end-to-end header, any method-override header
//!   (`X-HTTP-Method-Override`, `X-HTTP-Method`, `X-Method-Override`), a repeated
//!   meaning-carrying header;
//! - path: a `;` in a segment unless the tool opts in (and even then `..;`-style segments);
//! - query and body: see [`form`] and [`json`]; a `_method` field anywhere at the top level;
//!   a query field that is also a top-level body field (servlets and Flask's `request.values`
//!   merge the two); a body key that differs only in case from a property the tool's input
//!   schema declares (Go's `encoding/json` would fill that property from it);
//! - body: a `Content-Encoding` other than gzip, deflate, br, zstd (decoded with bounds, see
//!   [`crate::codec`]); a media type other than JSON or form, unless the tool declares its body
//!   opaque.
//!
//! The decided form is documented as [`CanonicalCall::to_value`]; [`rebuild`] turns it into
//! the upstream request.

mod form;
mod headers;
mod json;
mod keys;
mod rebuild;

pub use form::{pairs as query_pairs, parse_form, serialize_form, Repeats};
pub use headers::{
    media_type, MediaType, DEFAULT_FORWARD_HEADERS, METHOD_OVERRIDE_HEADERS, NEVER_FORWARD_HEADERS,
    SINGLETON_HEADERS,
};
pub use json::{parse_strict as parse_json, MAX_DEPTH};
pub use keys::fold_key;
pub use rebuild::{namespaced_idempotency_key, rebuild, RebuildOptions};

use crate::codec::{CodecError, DecodeLimits};
use crate::config::{BodyMode, ToolConfig};
use crate::target::Target;
use bytes::Bytes;
use http::{HeaderName, StatusCode};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// The `Idempotency-Key` header.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The decoded body of a canonical call.
#[derive(Clone, Debug, PartialEq)]
pub enum CanonicalBody {
    /// No body (or an empty one).
    Empty,
    /// A JSON value, parsed strictly.
    Json(Value),
    /// A form body, parsed strictly into an object.
    Form(Map<String, Value>),
    /// A body the tool declared opaque: forwarded as these (decoded) bytes.
    Opaque {
        /// The media type essence, e.g. `text/plain` (empty when none was sent).
        media_type: String,
        /// The decoded bytes.
        bytes: Bytes,
    },
}

impl CanonicalBody {
    /// What schema and policy see of the body: the parsed value, `null` when empty, and for
    /// an opaque body `{"opaque": true, "media_type", "bytes", "sha256"}`.
    pub fn value(&self) -> Value {
        match self {
            CanonicalBody::Empty => Value::Null,
            CanonicalBody::Json(v) => v.clone(),
            CanonicalBody::Form(m) => Value::Object(m.clone()),
            CanonicalBody::Opaque { media_type, bytes } => json!({
                "opaque": true,
                "media_type": media_type,
                "bytes": bytes.len(),
                "sha256": crate::policy::sha256_hex(bytes),
            }),
        }
    }

    /// `json`, `form`, `opaque` or `empty`.
    pub fn kind(&self) -> &'static str {
        match self {
            CanonicalBody::Empty => "empty",
            CanonicalBody::Json(_) => "json",
            CanonicalBody::Form(_) => "form",
            CanonicalBody::Opaque { .. } => "opaque",
        }
    }
}

/// The decided form of a call.
#[derive(Clone, Debug, PartialEq)]
pub struct CanonicalCall {
    /// Method (never overridden by a header or field: those are refused).
    pub method: http::Method,
    /// Normalised path (see [`crate::target::normalise_path`]).
    pub path: String,
    /// Decoded query pairs in their order; re-encoded as the forwarded query.
    pub query_pairs: Vec<(String, String)>,
    /// The structured query: `a[b]` nests, `a[]` and repeated keys become arrays of every
    /// value, canonical integers become numbers.
    pub query: Map<String, Value>,
    /// The decoded body.
    pub body: CanonicalBody,
    /// Meaning-carrying headers the tool declares, lower-case name → value.
    pub headers: BTreeMap<String, String>,
    /// The agent's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
}

/// The per-tool options the builder needs (from [`crate::config::RequestOptions`]).
#[derive(Clone, Debug, Default)]
pub struct CallOptions {
    /// Body mode.
    pub body: BodyMode,
    /// `;` parameters allowed in path segments.
    pub path_params: bool,
    /// Meaning-carrying headers.
    pub meaning_headers: Vec<HeaderName>,
    /// The tool's input schema, for the case-variant key check.
    pub schema: Option<Value>,
    /// Decoding bounds of the body.
    pub limits: Option<DecodeLimits>,
}

impl CallOptions {
    /// Options of a tool, under a body buffer limit. Header names were validated when the
    /// snapshot was built; an invalid one here is skipped.
    pub fn for_tool(tool: &ToolConfig, max_body: usize) -> Self {
        let r = &tool.request;
        Self {
            body: r.body,
            path_params: r.path_params,
            meaning_headers: r
                .meaning_headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .collect(),
            schema: tool.input_schema.clone(),
            limits: Some(DecodeLimits::for_body(max_body)),
        }
    }

    /// Options before any tool is known (an MCP endpoint, whose body picks the tool): strict
    /// defaults.
    pub fn strict(max_body: usize) -> Self {
        Self {
            limits: Some(DecodeLimits::for_body(max_body)),
            ..Default::default()
        }
    }
}

/// Why a request has no single reading. Every variant is a 400 (413 for a decoded body over
/// the limit) with a stable [`code`](CanonicalError::code).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    /// A header that must appear once appears more often.
    #[error("more than one {0} header")]
    RepeatedHeader(String),
    /// A header value is malformed.
    #[error("header {0}: {1}")]
    BadHeader(String, String),
    /// `Connection` names an end-to-end header.
    #[error("Connection names the end-to-end header {0:?}")]
    ConnectionNamesEndToEnd(String),
    /// A method-override header or `_method` field.
    #[error("method override ({0}) is refused: send the method you mean")]
    MethodOverride(String),
    /// `Content-Type` is malformed or ambiguous.
    #[error("Content-Type: {0}")]
    BadContentType(String),
    /// A media type the tool does not take.
    #[error("media type {0:?} is neither JSON nor form-urlencoded, and the tool does not declare its body opaque")]
    UnsupportedMediaType(String),
    /// `Content-Encoding` could not be decoded within bounds.
    #[error("Content-Encoding: {0}")]
    Encoding(CodecError),
    /// The body does not parse strictly as its media type.
    #[error("body is not valid {kind}: {detail}")]
    Body {
        /// `JSON` or `form`.
        kind: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The query does not parse strictly.
    #[error("query: {0}")]
    Query(String),
    /// The same field is in the query and the body.
    #[error("field {0:?} is both in the query and in the body")]
    QueryBodyConflict(String),
    /// A key differs only in case from a property of the tool's input schema.
    #[error("key {got:?} differs only in case from the declared property {declared:?}")]
    CaseVariantKey {
        /// The key sent.
        got: String,
        /// The schema's spelling.
        declared: String,
    },
    /// A `;` parameter in a path segment.
    #[error("path segment {0:?} carries a ';' parameter, which this tool does not accept")]
    PathParameter(String),
    /// An `Idempotency-Key` that cannot be forwarded as the tool requires.
    #[error("Idempotency-Key: {0}")]
    IdempotencyKey(String),
}

impl CanonicalError {
    /// Stable machine code, for the JSON error, the metric label and the audit reason.
    pub fn code(&self) -> &'static str {
        match self {
            CanonicalError::RepeatedHeader(_) => "repeated_header",
            CanonicalError::BadHeader(..) => "bad_header",
            CanonicalError::ConnectionNamesEndToEnd(_) => "connection_names_end_to_end_header",
            CanonicalError::MethodOverride(_) => "method_override",
            CanonicalError::BadContentType(_) => "bad_content_type",
            CanonicalError::UnsupportedMediaType(_) => "unsupported_media_type",
            CanonicalError::Encoding(e) => e.code(),
            CanonicalError::Body { .. } => "unparsable_body",
            CanonicalError::Query(_) => "unparsable_query",
            CanonicalError::QueryBodyConflict(_) => "query_body_conflict",
            CanonicalError::CaseVariantKey { .. } => "case_variant_key",
            CanonicalError::PathParameter(_) => "path_parameter",
            CanonicalError::IdempotencyKey(_) => "bad_idempotency_key",
        }
    }

    /// HTTP status: 413 for a decoded body over the size bound, 400 otherwise.
    pub fn status(&self) -> StatusCode {
        match self {
            CanonicalError::Encoding(CodecError::TooLarge(_)) => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Check a tool's `request` options at load time: header names parse, and an opaque body
/// has no input schema (an opaque body has no fields to validate). Returns (field, message).
pub fn validate_options(t: &ToolConfig) -> Result<(), (String, String)> {
    let r = &t.request;
    for (field, names) in [
        ("meaningHeaders", &r.meaning_headers),
        ("forwardHeaders", &r.forward_headers),
    ] {
        for n in names {
            let parsed = HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| (field.to_string(), format!("{n:?} is not a header name")))?;
            if NEVER_FORWARD_HEADERS.contains(&parsed.as_str()) {
                return Err((
                    field.to_string(),
                    format!("{n:?} is set by the proxy and never forwarded from the agent"),
                ));
            }
        }
    }
    if r.body == BodyMode::Opaque && t.input_schema.is_some() {
        return Err((
            "body".into(),
            "an opaque body cannot be validated against inputSchema; drop one of them".into(),
        ));
    }
    Ok(())
}

/// Refuse `_method` (in any case) as a field name.
fn reject_override_field(k: &str) -> Result<(), CanonicalError> {
    if keys::is_method_override_field(k) {
        return Err(CanonicalError::MethodOverride(format!("field {k:?}")));
    }
    Ok(())
}

impl CanonicalCall {
    /// Read a request into its canonical call, or refuse it. `target` is the normalised
    /// target (its path and raw query are read from it), `body` the buffered body as received.
    pub fn build(
        parts: &http::request::Parts,
        target: &Target,
        body: &[u8],
        opts: &CallOptions,
    ) -> Result<Self, CanonicalError> {
        headers::check(&parts.headers, &opts.meaning_headers)?;
        check_path(&target.path, opts.path_params)?;
        let query_pairs = match target.query.as_deref() {
            Some(q) => form::pairs(q.as_bytes()).map_err(CanonicalError::Query)?,
            None => Vec::new(),
        };
        let query = form::structure(&query_pairs, Repeats::Array).map_err(|e| {
            // A `_method` field is its own refusal, wherever it is.
            if e.starts_with("method override") {
                CanonicalError::MethodOverride("query field \"_method\"".into())
            } else {
                CanonicalError::Query(e)
            }
        })?;
        let mut meaning = BTreeMap::new();
        for name in &opts.meaning_headers {
            if let Some(v) = headers::single_value(&parts.headers, name)? {
                meaning.insert(name.as_str().to_string(), v);
            }
        }
        let idempotency_key = headers::single_value(&parts.headers, &IDEMPOTENCY_KEY)?;
        if let Some(k) = &idempotency_key {
            if k.len() > 255 {
                return Err(CanonicalError::IdempotencyKey(
                    "must be 1-255 visible ASCII characters".into(),
                ));
            }
        }
        let body = read_body(&parts.headers, body, opts)?;
        if let Some(top) = match &body {
            CanonicalBody::Json(Value::Object(m)) | CanonicalBody::Form(m) => Some(m),
            _ => None,
        } {
            for k in top.keys() {
                reject_override_field(k)?;
            }
            let folded: std::collections::HashSet<String> =
                top.keys().map(|k| fold_key(k)).collect();
            if let Some(k) = query.keys().find(|k| folded.contains(&fold_key(k))) {
                return Err(CanonicalError::QueryBodyConflict(k.clone()));
            }
        }
        if let Some(schema) = &opts.schema {
            let input = match &body {
                CanonicalBody::Empty => Value::Object(query.clone()),
                b => b.value(),
            };
            check_schema_spelling(schema, &input)?;
        }
        Ok(Self {
            method: target.method.clone(),
            path: target.path.clone(),
            query_pairs,
            query,
            body,
            headers: meaning,
            idempotency_key,
        })
    }

    /// The tool input schema validation and `input.request.body` see: the body's value, or
    /// the structured query when there is no body (a GET's parameters are its input). The
    /// query is always also in `input.request.query` and in [`to_value`](Self::to_value).
    pub fn tool_input(&self) -> Value {
        match &self.body {
            CanonicalBody::Empty => Value::Object(self.query.clone()),
            b => b.value(),
        }
    }

    /// The documented decided form, as recorded and hashed:
    /// `{"method", "path", "query", "body", "headers"}` (`body` is [`CanonicalBody::value`]).
    pub fn to_value(&self) -> Value {
        json!({
            "method": self.method.as_str(),
            "path": self.path,
            "query": self.query,
            "body": self.body.value(),
            "headers": self.headers,
        })
    }

    /// sha256 (hex) of the canonical JSON of [`to_value`](Self::to_value): what an approval
    /// binds. Any change of method, path, query, body or meaning-carrying header changes it.
    pub fn hash(&self) -> String {
        crate::policy::sha256_hex(&crate::policy::canonical_json(&self.to_value()))
    }
}

/// Refuse `;` in path segments unless allowed; when allowed, still refuse a parameter on an
/// empty or dot segment (`/..;x/` is `..` to Tomcat after it strips the parameter).
fn check_path(path: &str, allow_params: bool) -> Result<(), CanonicalError> {
    for seg in path.split('/') {
        if let Some((head, _)) = seg.split_once(';') {
            if !allow_params || head.is_empty() || head == "." || head == ".." {
                return Err(CanonicalError::PathParameter(seg.to_string()));
            }
        }
    }
    Ok(())
}

fn read_body(
    h: &http::HeaderMap,
    raw: &[u8],
    opts: &CallOptions,
) -> Result<CanonicalBody, CanonicalError> {
    let limits = opts
        .limits
        .unwrap_or_else(|| DecodeLimits::for_body(crate::snapshot::DEFAULT_MAX_BODY));
    let media = headers::media_type(h)?;
    let decoded: Bytes =
        match crate::codec::decode_by_headers(h, raw, &limits).map_err(CanonicalError::Encoding)? {
            Some(d) => d.into(),
            None => Bytes::copy_from_slice(raw),
        };
    if decoded.is_empty() {
        return Ok(CanonicalBody::Empty);
    }
    if opts.body == BodyMode::Opaque {
        let media_type = match media {
            MediaType::Absent => String::new(),
            MediaType::Json => essence(h).unwrap_or_else(|| "application/json".into()),
            MediaType::Form => "application/x-www-form-urlencoded".into(),
            MediaType::Other(e) => e,
        };
        return Ok(CanonicalBody::Opaque {
            media_type,
            bytes: decoded,
        });
    }
    match media {
        // SDKs often omit the type on JSON; such a body must then parse as JSON, and is
        // forwarded labelled as JSON.
        MediaType::Json | MediaType::Absent => json::parse_strict(&decoded)
            .map(CanonicalBody::Json)
            .map_err(|detail| CanonicalError::Body {
                kind: "JSON",
                detail,
            }),
        // A form of no fields (`&&`) re-serialises to no body at all, and a bodiless call's
        // input is its query: decide it as bodiless too, so the rebuilt request reads back
        // as the decided call (found by the canonical_call fuzz target).
        MediaType::Form => form::parse_form(&decoded)
            .map(|m| {
                if m.is_empty() {
                    CanonicalBody::Empty
                } else {
                    CanonicalBody::Form(m)
                }
            })
            .map_err(|detail| {
                if detail.starts_with("method override") {
                    CanonicalError::MethodOverride("form field \"_method\"".into())
                } else {
                    CanonicalError::Body {
                        kind: "form",
                        detail,
                    }
                }
            }),
        MediaType::Other(e) => Err(CanonicalError::UnsupportedMediaType(e)),
    }
}

fn essence(h: &http::HeaderMap) -> Option<String> {
    h.get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|e| e.trim().to_ascii_lowercase())
}

/// Refuse keys that differ only in case from a property the schema declares, following
/// `properties` and `items` down the value.
fn check_schema_spelling(schema: &Value, v: &Value) -> Result<(), CanonicalError> {
    match v {
        Value::Object(m) => {
            let Some(props) = schema.get("properties").and_then(Value::as_object) else {
                return Ok(());
            };
            for (k, child) in m {
                if let Some(sub) = props.get(k) {
                    check_schema_spelling(sub, child)?;
                    continue;
                }
                let f = fold_key(k);
                if let Some(declared) = props.keys().find(|p| fold_key(p) == f) {
                    return Err(CanonicalError::CaseVariantKey {
                        got: k.clone(),
                        declared: declared.clone(),
                    });
                }
            }
            Ok(())
        }
        Value::Array(a) => match schema.get("items") {
            Some(items) => a.iter().try_for_each(|x| check_schema_spelling(items, x)),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
