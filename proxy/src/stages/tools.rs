//! Match the tool(s) a request calls and validate their input: the routed tool with the whole
//! input for an HTTP call, or one element per `tools/call` of an MCP message (a JSON-RPC
//! batch is decided element by element).

use crate::input::{self, BodyKind};

use crate::canonical::{CanonicalBody, CanonicalCall};
use crate::refusal::Refusal;
use crate::route::RouteMatch;
use crate::snapshot::{Snapshot, Tool};
use crate::target::Target;
use serde_json::Value;

/// The tool calls of one request.
#[derive(Debug, Default)]
pub(crate) struct ToolCalls {
    /// `(tool index, input)` per element.
    pub calls: Vec<(usize, Value)>,
    /// MCP: the message lists tools.
    pub lists_tools: bool,
    /// MCP: the whole message, when no tool decides it (session methods only).
    pub message: Option<Value>,
}

/// Decide which tools a request calls. `mcp_id` is set as soon as the body is known to be
/// JSON-RPC, so even a refused MCP message is answered in JSON-RPC.
pub(crate) fn match_calls(
    snap: &Snapshot,
    target: &Target,
    route: RouteMatch,
    canonical: &CanonicalCall,
    mcp_id: &mut Option<Value>,
) -> Result<ToolCalls, Refusal> {
    match route {
        RouteMatch::Tool(i) => Ok(ToolCalls {
            calls: vec![(i, canonical.tool_input())],
            ..Default::default()
        }),
        RouteMatch::Mcp => {
            let msg = match &canonical.body {
                CanonicalBody::Json(msg) => msg.clone(),
                // A bodiless session GET or DELETE, admitted by `mcp::check_request`.
                CanonicalBody::Empty => Value::Null,
                _ => {
                    return Err(Refusal::UnparsableBody(
                        "MCP endpoint expects a JSON-RPC body".into(),
                    ))
                }
            };
            *mcp_id = crate::mcp::reply_id(&msg);
            let m = crate::mcp::classify(&msg, snap, target)?;
            let message = m.tool_calls.is_empty().then_some(msg);
            Ok(ToolCalls {
                calls: m.tool_calls,
                lists_tools: m.lists_tools,
                message,
            })
        }
        RouteMatch::None => Err(Refusal::UnknownTool(format!(
            "{} {}://{}{} matches none of this agent's tools",
            target.method,
            target.scheme.as_str(),
            target.authority(),
            target.path
        ))),
    }
}

/// Validate one element's input against its tool: opaque bodies cannot meet a schema.
pub(crate) fn validate(
    tool: &Tool,
    kind: BodyKind,
    content_type: Option<&str>,
    input: &Value,
) -> Result<(), Refusal> {
    if kind == BodyKind::Opaque && tool.schema.is_some() {
        return Err(Refusal::UnparsableBody(format!(
            "tool {} takes JSON or form input, not {:?}",
            tool.name(),
            content_type.unwrap_or("")
        )));
    }
    if let Some(schema) = &tool.schema {
        input::validate(schema, input).map_err(Refusal::InvalidInput)?;
    }
    Ok(())
}
