//! Forward: response header surgery (hop-by-hop per RFC 9110 §7.6.1), W3C `traceparent`, and
//! dry-run answers. The upstream request itself is rebuilt from the decided call
//! ([`crate::canonical::rebuild`]).

use crate::identify::RUN_HEADER;
use crate::target::Target;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION};
use http::HeaderMap;

/// Hop-by-hop headers never forwarded in either direction.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Remove hop-by-hop headers, including those the `Connection` header names.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(*n);
    }
}

/// Refuse protocol upgrades. A WebSocket (HTTP/1.1 `Upgrade: websocket`, or an HTTP/2
/// extended CONNECT) would turn one decided request into an undecided session, and an
/// `h2c` upgrade would bypass the request parser; neither is forwarded, and the agent is told
/// why in the JSON body instead of getting a silently downgraded plain GET.
pub(crate) fn check_upgrade(parts: &http::request::Parts) -> Result<(), crate::refusal::Refusal> {
    let upgrade = parts
        .headers
        .get(http::header::UPGRADE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let h2_protocol = parts
        .extensions
        .get::<hyper::ext::Protocol>()
        .map(|p| p.as_str().to_owned());
    match upgrade.or(h2_protocol) {
        None => Ok(()),
        Some(p) => Err(crate::refusal::Refusal::UpgradeRefused(format!(
            "protocol upgrade to {p:?} is not forwarded: Tollgate decides each call as an HTTP request, and a {p} session could not be decided call by call"
        ))),
    }
}

/// Continue the agent's trace (new span id under the same trace id), or start one.
/// Returns (traceparent, trace id).
pub(crate) fn traceparent(agent_headers: &HeaderMap) -> (String, String) {
    let span = format!("{:016x}", rand::random::<u64>() | 1);
    if let Some(tp) = agent_headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
    {
        let parts: Vec<&str> = tp.split('-').collect();
        let hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        };
        if parts.len() == 4
            && parts[0] == "00"
            && hex(parts[1], 32)
            && parts[1] != "0".repeat(32)
            && hex(parts[2], 16)
            && hex(parts[3], 2)
        {
            return (
                format!("00-{}-{span}-{}", parts[1], parts[3]),
                parts[1].to_string(),
            );
        }
    }
    let trace = format!("{:032x}", rand::random::<u128>() | 1);
    (format!("00-{trace}-{span}-01"), trace)
}

/// A JSON answer from the proxy itself (refusals, dry-run), with the run id and `extra`
/// headers.
pub(crate) fn json_response(
    status: http::StatusCode,
    body: &serde_json::Value,
    run: &str,
    extra: &[(&str, &str)],
) -> http::Response<crate::body::ResBody> {
    let mut res = http::Response::new(crate::body::full(
        serde_json::to_vec(body).unwrap_or_default(),
    ));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(run) {
        h.insert(RUN_HEADER, v);
    }
    for (k, v) in extra {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.insert(k, v);
        }
    }
    res
}

/// Response headers for the agent: upstream headers minus hop-by-hop, plus the run id.
pub(crate) fn response_headers(h: &mut HeaderMap, run: &str) {
    strip_hop_by_hop(h);
    if let Ok(v) = HeaderValue::from_str(run) {
        h.insert(RUN_HEADER, v);
    }
}

/// The synthetic dry-run answer: what would have been sent, secrets removed.
pub(crate) fn dry_run_body(
    target: &Target,
    tool: &str,
    headers: &HeaderMap,
    body: &Bytes,
    decision: &str,
    reasons: &[String],
) -> serde_json::Value {
    let mut shown = serde_json::Map::new();
    for (k, v) in headers {
        let n = k.as_str();
        if crate::policy::SECRET_HEADERS.contains(&n) {
            shown.insert(n.into(), "[redacted]".into());
        } else {
            shown.insert(
                n.into(),
                String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
            );
        }
    }
    serde_json::json!({
        "dry_run": true,
        "tool": tool,
        "decision": decision,
        "reasons": reasons,
        "would_send": {
            "method": target.method.as_str(),
            "url": target.uri(),
            "headers": shown,
            "body": String::from_utf8_lossy(body),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn upgrades_are_refused_with_a_reason() {
        let (parts, _) = http::Request::get("/ws")
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .body(())
            .unwrap()
            .into_parts();
        let r = check_upgrade(&parts).unwrap_err();
        assert_eq!(r.code(), "upgrade_not_allowed");
        assert!(r.reasons()[0].contains("websocket"));
        let (parts, _) = http::Request::get("/").body(()).unwrap().into_parts();
        assert!(check_upgrade(&parts).is_ok());
    }

    #[test]
    fn traceparent_continues_valid_and_replaces_invalid() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        let (tp, trace) = traceparent(&h);
        assert_eq!(trace, "0af7651916cd43dd8448eb211c80319c");
        assert!(tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && tp.ends_with("-01"));
        assert_ne!(
            tp,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        h.insert("traceparent", "00-zz-b7ad6b7169203331-01".parse().unwrap());
        let (tp, trace) = traceparent(&h);
        assert_eq!(tp.len(), 55);
        assert_ne!(trace, "zz");
    }
}
