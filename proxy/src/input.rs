//! What the stages read from a decided body: the body kind, MCP JSON-RPC calls, and schema
//! validation. Parsing itself is strict and lives in [`crate::canonical`] (one parser for
//! everything schema, policy and the upstream see).

use serde_json::{Map, Value};

/// The body kind, decided by `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// No body.
    Empty,
    /// `application/json` or `+json`.
    Json,
    /// `application/x-www-form-urlencoded`.
    Form,
    /// Anything else: forwarded opaque, not visible to schema or policy.
    Opaque,
}

/// A JSON-RPC request that MCP servers accept.
#[derive(Clone, Debug, PartialEq)]
pub enum McpCall {
    /// `tools/call` with its tool name, arguments and id.
    ToolsCall {
        /// MCP tool name.
        name: String,
        /// `params.arguments` (the tool input).
        arguments: Value,
        /// JSON-RPC id (absent for notifications).
        id: Value,
    },
    /// `tools/list`.
    ToolsList {
        /// JSON-RPC id.
        id: Value,
    },
    /// Any other method (initialize, ping, notifications…): host-level policy only.
    Other {
        /// Method name.
        method: String,
        /// JSON-RPC id.
        id: Value,
    },
}

/// Read a single JSON-RPC message as an MCP call, if it is one.
pub fn mcp_call(v: &Value) -> Result<Option<McpCall>, String> {
    let Some(o) = v.as_object() else {
        return Ok(None);
    };
    if o.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Ok(None);
    }
    let method = o
        .get("method")
        .and_then(Value::as_str)
        .ok_or("JSON-RPC message without a method")?;
    let id = o.get("id").cloned().unwrap_or(Value::Null);
    Ok(Some(match method {
        "tools/call" => {
            let params = o
                .get("params")
                .and_then(Value::as_object)
                .ok_or("tools/call without params")?;
            let name = params
                .get("name")
                .and_then(Value::as_str)
                .ok_or("tools/call without params.name")?;
            let arguments = params
                .get("arguments")
                .cloned()
                .unwrap_or_else(|| Value::Object(Map::new()));
            McpCall::ToolsCall {
                name: name.to_owned(),
                arguments,
                id,
            }
        }
        "tools/list" => McpCall::ToolsList { id },
        m => McpCall::Other {
            method: m.to_owned(),
            id,
        },
    }))
}

/// Validate an input against a compiled schema; errors are `path: message` lines.
pub fn validate(schema: &jsonschema::Validator, input: &Value) -> Result<(), Vec<String>> {
    let errors: Vec<String> = schema
        .iter_errors(input)
        .take(20)
        .map(|e| {
            let path = e.instance_path().to_string();
            if path.is_empty() {
                e.to_string()
            } else {
                format!("{path}: {e}")
            }
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn mcp_calls_are_recognised() {
        let v = json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"send_macro","arguments":{"body":"hi"}}});
        assert_eq!(
            mcp_call(&v).unwrap(),
            Some(McpCall::ToolsCall {
                name: "send_macro".into(),
                arguments: json!({"body":"hi"}),
                id: json!(3)
            })
        );
        assert_eq!(mcp_call(&json!({"a":1})).unwrap(), None);
        assert!(mcp_call(&json!({"jsonrpc":"2.0","method":"tools/call"})).is_err());
    }

    #[test]
    fn schema_errors_are_listed() {
        let schema = jsonschema::validator_for(&json!({"type":"object","required":["charge","amount"],"properties":{"amount":{"type":"integer"}}})).unwrap();
        assert!(validate(&schema, &json!({"charge":"c","amount":5})).is_ok());
        let errs = validate(&schema, &json!({"amount":"5"})).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("/amount")), "{errs:?}");
    }
}
