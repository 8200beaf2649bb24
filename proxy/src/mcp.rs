//! MCP over streamable HTTP: JSON-RPC messages posted to a host that serves `mcpTool` tools,
//! in the current revision (2026-07-28: `server/discover`, a per-request envelope, routing
//! headers) and the previous ones (2025-11-25 and older: the `initialize` handshake and a
//! session id).
//!
//! `tools/call` is matched to a tool by name and its `params.arguments` are the input for
//! schema and policy. Session methods of both revisions (`server/discover`, `initialize`,
//! `ping`, `tools/list`, `subscriptions/listen`, notifications, and the client's replies to
//! requests the server sent on its stream) pass with agent-level checks only, unchanged, so
//! version negotiation ends where it would without Tollgate. So do the bodiless requests of a
//! session: `GET` (the server's stream of requests and notifications) and `DELETE` (end the
//! session), both with `Mcp-Session-Id`. Every other method (resources, prompts, completion)
//! is refused, so an MCP server cannot be used around the tool catalog. A batch is decided
//! element by element and one refused element refuses the whole batch. `tools/list` answers,
//! JSON or SSE, compressed or not, are filtered to the tools this agent may call.
//!
//! The current revision's routing headers (`Mcp-Method`, `Mcp-Name`) must agree with the body
//! Tollgate decides: a server that routes by header must not run a different tool.

use crate::canonical::CanonicalBody;
use crate::input::{mcp_call, McpCall};
use crate::refusal::Refusal;
use crate::snapshot::Snapshot;
use crate::target::Target;
use crate::upstream::stream::BodyTimeouts;
use serde_json::Value;

/// Most messages in one JSON-RPC batch.
pub(crate) const MAX_BATCH: usize = 32;

/// What a posted MCP message asks for.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct McpMessage {
    /// `(tool index, arguments)` of each `tools/call`, in order.
    pub tool_calls: Vec<(usize, Value)>,
    /// The message includes `tools/list`.
    pub lists_tools: bool,
}

/// Is this a session method that needs no tool?
fn session_method(m: &str) -> bool {
    matches!(
        m,
        "initialize" | "ping" | "tools/list" | "server/discover" | "subscriptions/listen"
    ) || m.starts_with("notifications/")
}

/// Header carrying the session id (every revision that has sessions).
pub(crate) const SESSION_HEADER: &str = "mcp-session-id";

/// Check an MCP request before its message is classified: a bodiless request is a session
/// `GET` (the server's stream) or a `DELETE` that ends a session (with its `Mcp-Session-Id`),
/// and the current revision's routing headers agree with the body. A bodiless request that
/// passes is classified as the message `null` (see [`classify`]).
pub(crate) fn check_request(
    method: &http::Method,
    headers: &http::HeaderMap,
    body: &CanonicalBody,
) -> Result<(), Refusal> {
    match body {
        CanonicalBody::Json(msg) => check_routing_headers(headers, msg),
        CanonicalBody::Empty => match *method {
            http::Method::GET => Ok(()),
            http::Method::DELETE if headers.contains_key(SESSION_HEADER) => Ok(()),
            http::Method::DELETE => Err(Refusal::BadRequest(
                "an MCP DELETE ends a session and needs its Mcp-Session-Id header".into(),
            )),
            _ => Err(Refusal::UnparsableBody(
                "MCP endpoint expects a JSON-RPC body".into(),
            )),
        },
        _ => Err(Refusal::UnparsableBody(
            "MCP endpoint expects a JSON-RPC body".into(),
        )),
    }
}

/// `Mcp-Method` and `Mcp-Name` (2026-07-28) must name what the body does.
fn check_routing_headers(headers: &http::HeaderMap, msg: &Value) -> Result<(), Refusal> {
    let one = |name: &str| -> Result<Option<String>, Refusal> {
        let mut all = headers.get_all(name).iter();
        let first = all.next();
        if all.next().is_some() {
            return Err(Refusal::BadRequest(format!("more than one {name} header")));
        }
        Ok(first.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()))
    };
    let (method, name) = (one("mcp-method")?, one("mcp-name")?);
    if method.is_none() && name.is_none() {
        return Ok(());
    }
    let body_method = msg.get("method").and_then(Value::as_str);
    if method.is_some() && method.as_deref() != body_method {
        return Err(Refusal::BadRequest(format!(
            "Mcp-Method header {method:?} does not match the body's method {body_method:?}"
        )));
    }
    if let Some(name) = name {
        let body_name = msg
            .pointer("/params/name")
            .or_else(|| msg.pointer("/params/uri"))
            .and_then(Value::as_str);
        if decode_header_value(&name).as_deref() != body_name {
            return Err(Refusal::BadRequest(format!(
                "Mcp-Name header {name:?} does not match the body's {body_name:?}"
            )));
        }
    }
    Ok(())
}

/// The MCP SDKs' header encoding: verbatim, or `=?base64?<payload>?=` for non-ASCII.
fn decode_header_value(v: &str) -> Option<String> {
    use base64::Engine;
    match v
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        None => Some(v.to_string()),
        Some(p) => base64::engine::general_purpose::STANDARD
            .decode(p)
            .ok()
            .and_then(|b| String::from_utf8(b).ok()),
    }
}

/// Is this message the client's reply to a request the server sent on its stream
/// (`roots/list`, `sampling/createMessage`, `elicitation/create`)?
fn is_reply(m: &Value) -> bool {
    m.as_object().is_some_and(|o| {
        o.get("jsonrpc").and_then(Value::as_str) == Some("2.0")
            && !o.contains_key("method")
            && o.contains_key("id")
            && (o.contains_key("result") || o.contains_key("error"))
    })
}

/// Does `target` go to an MCP host (a host whose tools are decided by the JSON-RPC body)?
pub(crate) fn is_mcp(snap: &Snapshot, target: &Target) -> bool {
    snap.catalog.match_target(target) == crate::route::RouteMatch::Mcp
}

/// Timeouts of a response body: the tool's, or for MCP session traffic no tool decides (the
/// server's `GET` stream, `subscriptions/listen`) ones that let a quiet session stream live.
pub(crate) fn body_timeouts(tool: Option<&crate::snapshot::Tool>, target: &Target) -> BodyTimeouts {
    let session_stream =
        tool.is_none() && matches!(target.method, http::Method::GET | http::Method::POST);
    match tool {
        Some(_) => BodyTimeouts::of(tool),
        None if session_stream => BodyTimeouts {
            total: std::time::Duration::from_secs(24 * 3600),
            idle: std::time::Duration::from_secs(30 * 60),
        },
        None => BodyTimeouts::of(None),
    }
}

/// Most bytes of a `tools/list` answer read (coded and decoded).
pub(crate) const MAX_LIST_BYTES: usize = 8 * 1024 * 1024;

/// A buffered MCP answer decoded for reading, under codec.rs's bounds; on success the headers
/// no longer claim an encoding, since the decoded body is what is served.
pub(crate) fn decoded_body(headers: &mut http::HeaderMap, body: &[u8]) -> Result<Vec<u8>, String> {
    let limits = crate::codec::DecodeLimits::for_body(MAX_LIST_BYTES);
    let decoded = crate::codec::decode_by_headers(headers, body, &limits)
        .map_err(|e| format!("the upstream's tools/list answer cannot be decoded: {e}"))?;
    let Some(decoded) = decoded else {
        return Ok(body.to_vec());
    };
    headers.remove(http::header::CONTENT_ENCODING);
    headers.remove(http::header::CONTENT_LENGTH);
    Ok(decoded)
}

/// The id(s) a refusal of this message answers, read before anything is checked so even a
/// malformed or refused message gets a JSON-RPC error: the message's id, or an array of ids for
/// a batch. `None` when the body is not JSON-RPC at all.
pub(crate) fn reply_id(msg: &Value) -> Option<Value> {
    let id_of = |m: &Value| {
        m.as_object()
            .filter(|o| o.get("jsonrpc").and_then(Value::as_str) == Some("2.0"))
            .map(|o| o.get("id").cloned().unwrap_or(Value::Null))
    };
    match msg {
        Value::Array(items) => Some(Value::Array(
            items
                .iter()
                .map(|m| id_of(m).unwrap_or(Value::Null))
                .collect(),
        )),
        m => id_of(m),
    }
}

/// Classify a posted JSON-RPC message (or batch) against the agent's MCP tools on `target`.
pub(crate) fn classify(
    msg: &Value,
    snap: &Snapshot,
    target: &Target,
) -> Result<McpMessage, Refusal> {
    let (items, batch): (Vec<&Value>, bool) = match msg {
        // A bodiless session GET or DELETE (see `check_request`).
        Value::Null => return Ok(McpMessage::default()),
        Value::Array(a) => (a.iter().collect(), true),
        v => (vec![v], false),
    };
    if items.is_empty() {
        return Err(Refusal::UnparsableBody("empty JSON-RPC batch".into()));
    }
    if items.len() > MAX_BATCH {
        return Err(Refusal::UnparsableBody(format!(
            "JSON-RPC batch of {} messages exceeds the limit of {MAX_BATCH}",
            items.len()
        )));
    }
    let mut out = McpMessage {
        tool_calls: Vec::new(),
        lists_tools: false,
    };
    for item in items {
        if is_reply(item) {
            continue;
        }
        let call = mcp_call(item)
            .map_err(Refusal::UnparsableBody)?
            .ok_or_else(|| {
                Refusal::UnparsableBody("MCP endpoint expects JSON-RPC 2.0 requests".into())
            })?;
        match call {
            McpCall::ToolsCall {
                name,
                arguments,
                id: _,
            } => {
                let i = snap.catalog.match_mcp(target, &name).ok_or_else(|| {
                    Refusal::UnknownTool(format!(
                        "MCP tool {name:?} is not one of this agent's tools"
                    ))
                })?;
                if batch && out.tool_calls.iter().any(|(t, _)| *t == i) {
                    // Same tool twice in one batch would share one approval and one budget
                    // reservation; make the agent send them separately.
                    return Err(Refusal::BadRequest(format!(
                        "MCP tool {name:?} appears twice in one batch; send the calls separately"
                    )));
                }
                out.tool_calls.push((i, arguments));
            }
            McpCall::ToolsList { .. } => {
                out.lists_tools = true;
            }
            McpCall::Other { method, .. } => {
                if !session_method(&method) {
                    return Err(Refusal::UnknownTool(format!(
                        "MCP method {method:?} is not forwarded: only tools/call and session methods (server/discover, initialize, ping, tools/list, subscriptions/listen, notifications, replies to the server's requests) are"
                    )));
                }
            }
        }
    }
    Ok(out)
}

/// Filter `result.tools` of every JSON-RPC response in a `tools/list` answer (a JSON body or an
/// SSE stream of them) to the `allowed` names. Returns the new body and how many were removed.
#[cfg(test)]
fn filter_tools_list(body: &[u8], sse: bool, allowed: &[&str]) -> (Vec<u8>, usize) {
    filter_tools_list_by(body, sse, |t| {
        t.get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| allowed.contains(&n))
    })
}

/// Filter a `tools/list` answer with any rule: `keep` sees each advertised tool (as sent) and says
/// whether it stays in the list (pins withhold a tool whose definition changed).
pub(crate) fn filter_tools_list_by(
    body: &[u8],
    sse: bool,
    mut keep: impl FnMut(&Value) -> bool,
) -> (Vec<u8>, usize) {
    let mut removed = 0;
    let mut filter_value = |v: &mut Value| {
        let mut each = |m: &mut Value| {
            if let Some(tools) = m
                .get_mut("result")
                .and_then(|r| r.get_mut("tools"))
                .and_then(Value::as_array_mut)
            {
                let before = tools.len();
                tools.retain(&mut keep);
                removed += before - tools.len();
            }
        };
        match v {
            Value::Array(a) => a.iter_mut().for_each(&mut each),
            m => each(m),
        }
    };
    if !sse {
        return match serde_json::from_slice::<Value>(body) {
            Ok(mut v) => {
                filter_value(&mut v);
                (serde_json::to_vec(&v).unwrap_or_default(), removed)
            }
            // Not JSON: nothing we can read is forwarded as a tool list.
            Err(_) => (Vec::new(), 0),
        };
    }
    let text = String::from_utf8_lossy(body);
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let (content, nl) = match line.strip_suffix('\n') {
            Some(c) => (c.strip_suffix('\r').unwrap_or(c), "\n"),
            None => (line, ""),
        };
        if let Some(data) = content.strip_prefix("data:") {
            if let Ok(mut v) = serde_json::from_str::<Value>(data.trim_start()) {
                filter_value(&mut v);
                out.push_str("data: ");
                out.push_str(&serde_json::to_string(&v).unwrap_or_default());
                out.push_str(nl);
                continue;
            }
        }
        out.push_str(content);
        out.push_str(nl);
    }
    (out.into_bytes(), removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bodiless_session_requests_and_routing_headers() {
        let h = |pairs: &[(&'static str, &str)]| {
            let mut m = http::HeaderMap::new();
            for (k, v) in pairs {
                m.append(*k, v.parse().unwrap());
            }
            m
        };
        let empty = CanonicalBody::Empty;
        assert!(check_request(&http::Method::GET, &h(&[]), &empty).is_ok());
        assert!(
            check_request(&http::Method::DELETE, &h(&[(SESSION_HEADER, "s1")]), &empty).is_ok()
        );
        assert!(check_request(&http::Method::DELETE, &h(&[]), &empty).is_err());
        assert!(check_request(&http::Method::POST, &h(&[]), &empty).is_err());
        let call = CanonicalBody::Json(
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search", "arguments": {}}}),
        );
        let post = |hs| check_request(&http::Method::POST, &hs, &call);
        assert!(post(h(&[("mcp-method", "tools/call"), ("mcp-name", "search")])).is_ok());
        // A server routing by header must not run a tool other than the one decided.
        assert!(post(h(&[
            ("mcp-method", "tools/call"),
            ("mcp-name", "delete_all")
        ]))
        .is_err());
        assert!(post(h(&[("mcp-name", "=?base64?c2VhcmNo?=")])).is_ok());
        assert!(post(h(&[
            ("mcp-method", "tools/call"),
            ("mcp-method", "tools/call")
        ]))
        .is_err());
        // A client's reply to a server request is told apart from a request.
        assert!(is_reply(
            &json!({"jsonrpc": "2.0", "id": 7, "result": {"roots": []}})
        ));
        assert!(!is_reply(
            &json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "result": {}})
        ));
        assert!(session_method("server/discover") && session_method("subscriptions/listen"));
        assert!(!session_method("resources/read"));
    }

    #[test]
    fn tool_lists_are_filtered_in_json_and_sse() {
        let list = json!({"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"delete_all"},{"name":"create_ticket"}]}});
        let (b, n) = filter_tools_list(
            &serde_json::to_vec(&list).unwrap(),
            false,
            &["search", "create_ticket"],
        );
        assert_eq!(n, 1);
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            v["result"]["tools"],
            json!([{"name":"search"},{"name":"create_ticket"}])
        );
        let sse = format!(
            "event: message\r\ndata: {}\r\n\r\n",
            serde_json::to_string(&list).unwrap()
        );
        let (b, n) = filter_tools_list(sse.as_bytes(), true, &["search"]);
        assert_eq!(n, 2);
        let text = String::from_utf8(b).unwrap();
        assert!(text.starts_with("event: message\n"), "{text}");
        assert!(
            text.contains("\"search\"") && !text.contains("delete_all"),
            "{text}"
        );
        assert!(text.ends_with("\n\n"));
        assert_eq!(
            filter_tools_list(b"<html>", false, &["search"]).0,
            Vec::<u8>::new()
        );
    }
}
