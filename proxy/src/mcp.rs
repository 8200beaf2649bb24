//! MCP over streamable HTTP: JSON-RPC messages posted to a host that serves `mcpTool` tools.
//!
//! `tools/call` is matched to a tool by name and its `params.arguments` are the input for
//! schema and policy. Session methods (`initialize`, `ping`, `tools/list`, notifications) pass
//! with agent-level checks only; every other method (resources, prompts, sampling replies) is
//! refused, so an MCP server cannot be used around the tool catalog. A batch is decided
//! element by element and one refused element refuses the whole batch. `tools/list` answers,
//! JSON or SSE, are filtered to the tools this agent may call.

use crate::input::{mcp_call, McpCall};
use crate::refusal::Refusal;
use crate::snapshot::Snapshot;
use crate::target::Target;
use serde_json::Value;

/// Most messages in one JSON-RPC batch.
pub const MAX_BATCH: usize = 32;

/// What a posted MCP message asks for.
#[derive(Debug, PartialEq)]
pub struct McpMessage {
    /// `(tool index, arguments)` of each `tools/call`, in order.
    pub tool_calls: Vec<(usize, Value)>,
    /// The message includes `tools/list`.
    pub lists_tools: bool,
}

/// Is this a session method that needs no tool?
fn session_method(m: &str) -> bool {
    matches!(m, "initialize" | "ping" | "tools/list") || m.starts_with("notifications/")
}

/// The id(s) a refusal of this message answers, read before anything is checked so even a
/// malformed or refused message gets a JSON-RPC error: the message's id, or an array of ids for
/// a batch. `None` when the body is not JSON-RPC at all.
pub fn reply_id(msg: &Value) -> Option<Value> {
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
pub fn classify(msg: &Value, snap: &Snapshot, target: &Target) -> Result<McpMessage, Refusal> {
    let (items, batch): (Vec<&Value>, bool) = match msg {
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
                        "MCP method {method:?} is not forwarded: only tools/call and session methods (initialize, ping, tools/list, notifications) are"
                    )));
                }
            }
        }
    }
    Ok(out)
}

/// Filter `result.tools` of every JSON-RPC response in a `tools/list` answer (a JSON body or an
/// SSE stream of them) to the `allowed` names. Returns the new body and how many were removed.
pub fn filter_tools_list(body: &[u8], sse: bool, allowed: &[&str]) -> (Vec<u8>, usize) {
    let mut removed = 0;
    let mut filter_value = |v: &mut Value| {
        let mut each = |m: &mut Value| {
            if let Some(tools) = m
                .get_mut("result")
                .and_then(|r| r.get_mut("tools"))
                .and_then(Value::as_array_mut)
            {
                let before = tools.len();
                tools.retain(|t| {
                    t.get("name")
                        .and_then(Value::as_str)
                        .is_some_and(|n| allowed.contains(&n))
                });
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
