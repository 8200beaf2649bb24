//! Read and parse the request body: framing checks, a bounded read with a timeout, and the
//! parse by media type. This is the seam where the canonical call is built (see
//! [`Decoded`]): what it returns is what the tool stages, schema, policy and the approval hash
//! see, and what forward re-sends.

use crate::input::{self, BodyKind};
use crate::refusal::Refusal;
use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Limited};
use serde_json::Value;
use std::time::Duration;

/// A request body, read and parsed.
#[derive(Debug)]
pub struct Decoded {
    /// The buffered bytes.
    pub bytes: Bytes,
    /// Media kind.
    pub kind: BodyKind,
    /// The parsed value (JSON or form); `None` when empty or opaque.
    pub parsed: Option<Value>,
}

/// Refuse request framings that different HTTP parsers read differently.
pub fn framing(h: &HeaderMap) -> Result<(), Refusal> {
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
pub async fn read<B>(
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

/// Parse a buffered body by its media type.
pub fn decode(headers: &HeaderMap, bytes: Bytes) -> Result<Decoded, Refusal> {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let kind = input::body_kind(content_type, &bytes);
    let parsed = match kind {
        BodyKind::Empty | BodyKind::Opaque => None,
        BodyKind::Json => Some(input::parse_json(&bytes).map_err(Refusal::UnparsableBody)?),
        BodyKind::Form => Some(input::parse_form(&bytes).map_err(Refusal::UnparsableBody)?),
    };
    Ok(Decoded {
        bytes,
        kind,
        parsed,
    })
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
