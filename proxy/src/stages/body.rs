//! Read the request body: framing checks and a bounded read with a timeout. The bytes read
//! here become the canonical call ([`crate::canonical::CanonicalCall::build`]); a request
//! with no single reading is refused by [`ambiguous`].

use crate::refusal::Refusal;
use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Limited};
use std::time::Duration;

/// Refuse request framings that different HTTP parsers read differently.
pub(crate) fn framing(h: &HeaderMap) -> Result<(), Refusal> {
    if h.contains_key(http::header::TRANSFER_ENCODING)
        && h.contains_key(http::header::CONTENT_LENGTH)
    {
        return Err(Refusal::BadRequest(
            "both Transfer-Encoding and Content-Length are set".into(),
        ));
    }
    if h.get_all(http::header::CONTENT_LENGTH).iter().count() > 1 {
        return Err(Refusal::BadRequest(
            "more than one Content-Length header".into(),
        ));
    }
    for te in h.get_all(http::header::TRANSFER_ENCODING) {
        let v = te.to_str().unwrap_or("").trim().to_ascii_lowercase();
        if v != "chunked" {
            return Err(Refusal::BadRequest(format!(
                "unsupported Transfer-Encoding {v:?}"
            )));
        }
    }
    Ok(())
}

/// Buffer the body, up to `max` bytes and within `timeout`.
pub(crate) async fn read<B>(
    body: B,
    headers: &HeaderMap,
    max: usize,
    timeout: Duration,
) -> Result<Bytes, Refusal>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    if let Some(len) = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max as u64 {
            return Err(Refusal::PayloadTooLarge(max));
        }
    }
    match tokio::time::timeout(timeout, Limited::new(body, max).collect()).await {
        Err(_) => Err(Refusal::BadRequest(format!(
            "request body not received within {}s",
            timeout.as_secs()
        ))),
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(Refusal::PayloadTooLarge(max))
            } else {
                Err(Refusal::BadRequest(format!(
                    "could not read request body: {e}"
                )))
            }
        }
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// The refusal of a request with no single reading (see [`crate::canonical`]).
pub(crate) fn ambiguous(e: crate::canonical::CanonicalError, max: usize) -> Refusal {
    if e.status() == http::StatusCode::PAYLOAD_TOO_LARGE {
        return Refusal::PayloadTooLarge(max);
    }
    match e {
        crate::canonical::CanonicalError::Body { .. } => Refusal::UnparsableBody(e.to_string()),
        e => Refusal::Ambiguous {
            code: e.code(),
            reason: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ambiguous_framing_is_refused() {
        let mut h = HeaderMap::new();
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("content-length", "3".parse().unwrap());
        assert!(framing(&h).is_err());
        let mut h = HeaderMap::new();
        h.insert("transfer-encoding", "gzip, chunked".parse().unwrap());
        assert!(framing(&h).is_err());
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused() {
        let body = http_body_util::Full::new(Bytes::from_static(b"0123456789"));
        let r = read(body, &HeaderMap::new(), 4, Duration::from_secs(1)).await;
        assert_eq!(r, Err(Refusal::PayloadTooLarge(4)));
    }
}
