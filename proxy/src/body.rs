//! The body type of every response the proxy sends, forwarded or its own. Its error is boxed:
//! a forwarded body can be aborted by the proxy itself (see [`crate::upstream::stream`]), not
//! only by hyper.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};

/// The error a response body ends with.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Response body type used across the proxy.
pub(crate) type ResBody = BoxBody<Bytes, BoxError>;

/// Box a body for the response type.
pub(crate) fn full(b: impl Into<Bytes>) -> ResBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}
