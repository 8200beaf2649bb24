//! The one place a refusal becomes a status code, a JSON body, a metric label and an audit
//! decision. Every stage that ends a call returns a [`Refusal`].

use crate::config::LlmProvider;
use crate::snapshot::Snapshot;
use crate::target::Target;
use crate::upstream::ResBody;
use http::StatusCode;
use serde_json::{json, Value};

/// Audit/metric decision of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Forwarded (or answered by dry-run).
    Allow,
    /// Refused by identity or policy.
    Deny,
    /// Held for approval.
    ApprovalRequired,
    /// Rate limited.
    RateLimited,
    /// Over a budget cap.
    OverBudget,
    /// Kill switch engaged.
    Killed,
    /// Invalid input, stale config, upstream or internal failure.
    Error,
    /// Shadow mode: would have been refused, forwarded anyway.
    ShadowDeny,
}

impl Decision {
    /// Label used in metrics and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::ApprovalRequired => "approval_required",
            Decision::RateLimited => "rate_limited",
            Decision::OverBudget => "over_budget",
            Decision::Killed => "killed",
            Decision::Error => "error",
            Decision::ShadowDeny => "shadow_deny",
        }
    }
}

/// Why a call was refused. The `error` code in the JSON body is [`Refusal::code`].
#[derive(Clone, Debug, PartialEq)]
pub enum Refusal {
    /// Malformed request, host or path.
    BadRequest(String),
    /// Body exceeds the buffer limit.
    PayloadTooLarge(usize),
    /// Body does not parse as its content type says.
    UnparsableBody(String),
    /// The request has more than one reading (see [`crate::canonical`]): refused, not guessed.
    Ambiguous {
        /// The canonical builder's code, e.g. `repeated_header`, `method_override`.
        code: &'static str,
        /// Reason.
        reason: String,
    },
    /// Input fails the tool's JSON Schema.
    InvalidInput(Vec<String>),
    /// Tenant missing or not one of the agent's.
    TenantNotAllowed(String),
    /// The run's outcome was reported: it takes no more calls.
    RunEnded(String),
    /// No tool matches.
    UnknownTool(String),
    /// A `CONNECT` to a host or port no tool uses.
    ConnectNotAllowed(String),
    /// A request inside a tunnel names a different host than the tunnel was opened for.
    Misdirected(String),
    /// Rego denied.
    PolicyDenied(Vec<String>),
    /// Rego failed; fail closed.
    PolicyError(String),
    /// Approval needed.
    ApprovalRequired {
        /// Reasons from policy.
        reasons: Vec<String>,
        /// Approval request id.
        approval: String,
        /// Suggested retry delay.
        retry_after_s: u64,
    },
    /// Approval was denied or expired.
    ApprovalRejected(String),
    /// Kill switch.
    Killed {
        /// Switch name.
        name: String,
        /// Why it was engaged.
        reason: String,
    },
    /// Rate limit hit.
    RateLimited {
        /// Which limit.
        limit: String,
        /// Seconds until a retry can pass.
        retry_after_s: u64,
    },
    /// A budget cap would be exceeded.
    OverBudget {
        /// Human-readable reason.
        reason: String,
        /// Details (cap, spent, reserved, remaining).
        details: serde_json::Value,
    },
    /// Idempotency key reused with a different request.
    IdempotencyConflict(String),
    /// Idempotency key required but missing.
    IdempotencyKeyRequired,
    /// Snapshot too old, no config, or limits backend unavailable.
    Unavailable {
        /// Machine code, e.g. `config_stale`.
        code: &'static str,
        /// Reason.
        reason: String,
    },
    /// The audit record could not be made durable.
    AuditUnavailable(String),
    /// Upstream connect/protocol failure.
    UpstreamFailed(String),
    /// Upstream timed out.
    UpstreamTimeout(String),
    /// A protocol upgrade (WebSocket, h2c) that is not forwarded.
    UpgradeRefused(String),
    /// A pinned MCP tool whose server advertises another definition
    /// (`tool_definition_changed`), or whose definition this sidecar has not seen advertised
    /// yet (`tool_definition_unverified`); see [`crate::pins`].
    ToolDefinition {
        /// `tool_definition_changed` or `tool_definition_unverified`.
        code: &'static str,
        /// Reason (both hashes, or what to do first).
        reason: String,
    },
}

impl Refusal {
    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        use Refusal::*;
        match self {
            BadRequest(_)
            | UnparsableBody(_)
            | Ambiguous { .. }
            | InvalidInput(_)
            | IdempotencyKeyRequired => StatusCode::BAD_REQUEST,
            PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            TenantNotAllowed(_) | UnknownTool(_) | ConnectNotAllowed(_) | PolicyDenied(_)
            | PolicyError(_) | UpgradeRefused(_) => StatusCode::FORBIDDEN,
            ToolDefinition { .. } | RunEnded(_) => StatusCode::CONFLICT,
            ApprovalRequired { .. } | ApprovalRejected(_) => StatusCode::FORBIDDEN,
            Killed { .. } | Unavailable { .. } | AuditUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            OverBudget { .. } => StatusCode::PAYMENT_REQUIRED,
            IdempotencyConflict(_) => StatusCode::UNPROCESSABLE_ENTITY,
            UpstreamFailed(_) => StatusCode::BAD_GATEWAY,
            UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Machine-readable `error` code.
    pub fn code(&self) -> &'static str {
        use Refusal::*;
        match self {
            BadRequest(_) => "bad_request",
            PayloadTooLarge(_) => "payload_too_large",
            UnparsableBody(_) => "unparsable_body",
            Ambiguous { code, .. } => code,
            InvalidInput(_) => "invalid_input",
            TenantNotAllowed(_) => "tenant_not_allowed",
            RunEnded(_) => "run_ended",
            UnknownTool(_) => "unknown_tool",
            ConnectNotAllowed(_) => "connect_not_allowed",
            Misdirected(_) => "misdirected_request",
            PolicyDenied(_) => "policy_denied",
            PolicyError(_) => "policy_error",
            ApprovalRequired { .. } => "approval_required",
            ApprovalRejected(_) => "approval_rejected",
            Killed { .. } => "killed",
            RateLimited { .. } => "rate_limited",
            OverBudget { .. } => "over_budget",
            IdempotencyConflict(_) => "idempotency_conflict",
            IdempotencyKeyRequired => "idempotency_key_required",
            Unavailable { code, .. } => code,
            AuditUnavailable(_) => "audit_unavailable",
            UpstreamFailed(_) => "upstream_failed",
            UpstreamTimeout(_) => "upstream_timeout",
            UpgradeRefused(_) => "upgrade_not_allowed",
            ToolDefinition { code, .. } => code,
        }
    }

    /// Decision recorded in audit and metrics.
    pub fn decision(&self) -> Decision {
        use Refusal::*;
        match self {
            TenantNotAllowed(_)
            | RunEnded(_)
            | UnknownTool(_)
            | ConnectNotAllowed(_)
            | Misdirected(_)
            | PolicyDenied(_)
            | PolicyError(_)
            | ApprovalRejected(_)
            | UpgradeRefused(_)
            | ToolDefinition { .. } => Decision::Deny,
            ApprovalRequired { .. } => Decision::ApprovalRequired,
            Killed { .. } => Decision::Killed,
            RateLimited { .. } => Decision::RateLimited,
            OverBudget { .. } => Decision::OverBudget,
            _ => Decision::Error,
        }
    }

    /// The reasons, as recorded and returned.
    pub fn reasons(&self) -> Vec<String> {
        use Refusal::*;
        match self {
            BadRequest(r)
            | UnparsableBody(r)
            | TenantNotAllowed(r)
            | RunEnded(r)
            | UnknownTool(r)
            | ConnectNotAllowed(r)
            | Misdirected(r)
            | PolicyError(r)
            | ApprovalRejected(r)
            | IdempotencyConflict(r)
            | AuditUnavailable(r)
            | UpstreamFailed(r)
            | UpstreamTimeout(r)
            | UpgradeRefused(r) => vec![r.clone()],
            PayloadTooLarge(n) => vec![format!("request body exceeds the {n}-byte limit")],
            InvalidInput(errs) => errs.clone(),
            PolicyDenied(r) => r.clone(),
            ApprovalRequired { reasons, .. } => reasons.clone(),
            Killed { name, reason } => vec![format!("kill switch {name} is engaged: {reason}")],
            RateLimited {
                limit,
                retry_after_s,
            } => vec![format!(
                "rate limit {limit} exceeded; retry after {retry_after_s}s"
            )],
            OverBudget { reason, .. } => vec![reason.clone()],
            IdempotencyKeyRequired => vec!["this tool requires an Idempotency-Key header".into()],
            Unavailable { reason, .. }
            | Ambiguous { reason, .. }
            | ToolDefinition { reason, .. } => vec![reason.clone()],
        }
    }

    /// What the agent should do next: short, for an LLM.
    fn hint(&self) -> &'static str {
        use Refusal::*;
        match self {
            BadRequest(_) | UnparsableBody(_) => "fix the request; it was not forwarded",
            Ambiguous { .. } => {
                "the request could be read more than one way; send it in one plain form (see reason); it was not forwarded"
            }
            PayloadTooLarge(_) => "send a smaller body",
            Misdirected(_) => "open a new connection for each host",
            InvalidInput(_) => "fix the listed input errors and retry",
            TenantNotAllowed(_) => "set X-Tollgate-Tenant to one of this agent's tenants",
            RunEnded(_) => "this run has ended; start a new run for more calls",
            UnknownTool(_) | ConnectNotAllowed(_) => {
                "this call is not one of the agent's tools; do not retry"
            }
            PolicyDenied(_) => "this action is not permitted by policy; do not retry it as is",
            PolicyError(_) => {
                "policy could not be evaluated; the call was refused, escalate to a human"
            }
            ApprovalRequired { .. } => "wait for a human to approve, then retry the identical call",
            ApprovalRejected(_) => {
                "the approval was denied or expired; do not retry without a new approval"
            }
            Killed { .. } => "this action is switched off by an operator; do not retry",
            RateLimited { .. } => "retry after the given delay",
            OverBudget { .. } => "the budget is exhausted; stop or escalate",
            IdempotencyConflict(_) => "use a new Idempotency-Key for a different request",
            IdempotencyKeyRequired => "add an Idempotency-Key header and retry",
            Unavailable { .. } | AuditUnavailable(_) => "retry later",
            UpstreamFailed(_) | UpstreamTimeout(_) => {
                "the upstream failed; retry later if the call is idempotent"
            }
            UpgradeRefused(_) => "use the plain HTTP API of this service; do not retry the upgrade",
            ToolDefinition { code, .. } if *code == "tool_definition_unverified" => {
                "list the server's tools (tools/list), then retry if the tool is still listed"
            }
            ToolDefinition { .. } => {
                "this tool's definition changed since it was reviewed and it is withheld; do not retry, tell a human"
            }
        }
    }

    /// Seconds the agent should wait before retrying, if any.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Refusal::RateLimited { retry_after_s, .. }
            | Refusal::ApprovalRequired { retry_after_s, .. } => Some(*retry_after_s),
            Refusal::Unavailable { .. } | Refusal::AuditUnavailable(_) => Some(5),
            _ => None,
        }
    }

    /// The JSON error body.
    pub fn body(&self, tool: Option<&str>, run: &str) -> serde_json::Value {
        let reasons = self.reasons();
        let mut b = json!({
            "error": self.code(),
            "reason": reasons.join("; "),
            "reasons": reasons,
            "tool": tool,
            "run": run,
            "hint": self.hint(),
        });
        let o = b.as_object_mut().expect("object");
        if let Some(s) = self.retry_after() {
            o.insert("retry_after_s".into(), s.into());
        }
        match self {
            Refusal::ApprovalRequired { approval, .. } => {
                o.insert("approval".into(), approval.clone().into());
            }
            Refusal::OverBudget { details, .. } => {
                o.insert("budget".into(), details.clone());
            }
            Refusal::InvalidInput(errs) => {
                o.insert("schema_errors".into(), errs.clone().into());
            }
            _ => {}
        }
        b
    }
}

/// The error envelope a refusal is answered in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Envelope<'a> {
    /// Tollgate's documented body (`error` is the machine code).
    Tollgate,
    /// The declared LLM provider's own error shape, Tollgate's body inside it, so the
    /// provider's SDK raises an exception whose text carries the reason.
    Provider(LlmProvider),
    /// A JSON-RPC error answering these id(s) (MCP).
    JsonRpc(&'a Value),
}

impl Refusal {
    /// The one sentence an SDK puts in its exception text (and an LLM reads).
    pub fn message(&self) -> String {
        format!(
            "Tollgate refused this call ({}): {}. Next: {}.",
            self.code(),
            self.reasons().join("; "),
            self.hint()
        )
    }

    /// The body of this refusal in `envelope`, and its HTTP status.
    pub fn in_envelope(
        &self,
        tool: Option<&str>,
        run: &str,
        envelope: Envelope<'_>,
    ) -> (StatusCode, Value) {
        let body = self.body(tool, run);
        let status = self.status();
        match envelope {
            Envelope::Tollgate => (status, body),
            Envelope::JsonRpc(id) => {
                // MCP clients read JSON-RPC errors; the same reason text, the full body as
                // data. A batch (ids as an array; JSON-RPC ids are never arrays) gets one
                // error per element.
                let error = |id: &Value| json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32001, "message": format!("{}: {}", self.code(), body["reason"].as_str().unwrap_or("")), "data": body}});
                let rpc = match id {
                    Value::Array(ids) => Value::Array(ids.iter().map(error).collect()),
                    id => error(id),
                };
                (StatusCode::OK, rpc)
            }
            Envelope::Provider(LlmProvider::Anthropic) => (
                status,
                // https://docs.anthropic.com/en/api/errors
                json!({"type": "error", "error": {"type": anthropic_type(status), "message": self.message(), "tollgate": body}}),
            ),
            Envelope::Provider(LlmProvider::Gemini) => (
                status,
                // google.rpc.Status as the Gemini API returns it.
                json!({"error": {"code": status.as_u16(), "message": self.message(), "status": grpc_status(status), "tollgate": body}}),
            ),
            Envelope::Provider(LlmProvider::Openai | LlmProvider::OpenaiCompatible) => (
                status,
                json!({"error": {"message": self.message(), "type": openai_type(status), "code": self.code(), "param": null, "tollgate": body}}),
            ),
        }
    }
}

fn openai_type(s: StatusCode) -> &'static str {
    match s.as_u16() {
        429 => "rate_limit_exceeded",
        402 => "insufficient_quota",
        400 | 413 | 422 => "invalid_request_error",
        403 => "permission_error",
        _ => "server_error",
    }
}

fn anthropic_type(s: StatusCode) -> &'static str {
    match s.as_u16() {
        400 | 402 | 422 => "invalid_request_error",
        403 => "permission_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        _ => "api_error",
    }
}

fn grpc_status(s: StatusCode) -> &'static str {
    match s.as_u16() {
        400 | 413 | 422 => "INVALID_ARGUMENT",
        402 | 429 => "RESOURCE_EXHAUSTED",
        403 => "PERMISSION_DENIED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

/// The provider whose envelope a refusal uses: the matched tool's, else that of an LLM tool
/// on the same host (a call to an endpoint no tool covers still comes from that SDK).
pub(crate) fn provider_for(
    snap: &Snapshot,
    tool: Option<usize>,
    target: Option<&Target>,
) -> Option<LlmProvider> {
    if let Some(i) = tool {
        return snap.tools[i].provider;
    }
    let t = target?;
    snap.catalog
        .tools_on(&t.host, t.port, t.scheme)
        .into_iter()
        .find_map(|i| snap.tools[i].provider)
}

/// The one rendering of a refusal: the JSON error body with its status, or for MCP calls a
/// JSON-RPC error (one per element of a batch) with the same reason and the body as `data`.
/// `run` is echoed in `X-Tollgate-Run`.
pub(crate) fn render(
    r: &Refusal,
    tool: Option<&str>,
    run: &str,
    mcp_id: Option<&Value>,
) -> http::Response<ResBody> {
    let envelope = match mcp_id {
        Some(id) => Envelope::JsonRpc(id),
        None => Envelope::Tollgate,
    };
    render_as(r, tool, run, envelope)
}

/// [`render`] in any envelope (an LLM provider's, for calls to a declared `llm` tool):
/// status, JSON body, `Retry-After`, and the run id.
pub(crate) fn render_as(
    r: &Refusal,
    tool: Option<&str>,
    run: &str,
    envelope: Envelope<'_>,
) -> http::Response<ResBody> {
    let (status, body) = r.in_envelope(tool, run, envelope);
    let retry = r.retry_after().map(|s| s.to_string());
    let extra: Vec<(&str, &str)> = retry
        .as_deref()
        .map(|s| ("retry-after", s))
        .into_iter()
        .collect();
    crate::upstream::forward::json_response(status, &body, run, &extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_design() {
        assert_eq!(Refusal::InvalidInput(vec![]).status(), 400);
        assert_eq!(Refusal::PolicyDenied(vec![]).status(), 403);
        assert_eq!(
            Refusal::ApprovalRequired {
                reasons: vec![],
                approval: "a".into(),
                retry_after_s: 30
            }
            .status(),
            403
        );
        assert_eq!(
            Refusal::OverBudget {
                reason: "x".into(),
                details: json!({})
            }
            .status(),
            402
        );
        assert_eq!(
            Refusal::RateLimited {
                limit: "t".into(),
                retry_after_s: 1
            }
            .status(),
            429
        );
        assert_eq!(
            Refusal::Killed {
                name: "k".into(),
                reason: "r".into()
            }
            .status(),
            503
        );
        assert_eq!(
            Refusal::Unavailable {
                code: "config_stale",
                reason: "r".into()
            }
            .status(),
            503
        );
        assert_eq!(Refusal::UpstreamFailed("x".into()).status(), 502);
        assert_eq!(Refusal::UpstreamTimeout("x".into()).status(), 504);
        assert_eq!(Refusal::PayloadTooLarge(1).status(), 413);
    }

    #[test]
    fn body_carries_what_an_agent_needs() {
        let r = Refusal::ApprovalRequired {
            reasons: vec!["refund 1200 over 500".into()],
            approval: "apr-1".into(),
            retry_after_s: 30,
        };
        let b = r.body(Some("stripe.create_refund"), "run_1");
        assert_eq!(b["error"], "approval_required");
        assert_eq!(b["approval"], "apr-1");
        assert_eq!(b["retry_after_s"], 30);
        assert_eq!(b["tool"], "stripe.create_refund");
        assert_eq!(b["run"], "run_1");
        assert_eq!(b["reason"], "refund 1200 over 500");
        assert_eq!(r.decision(), Decision::ApprovalRequired);
    }

    #[test]
    fn provider_envelopes_carry_the_reason_where_each_sdk_reads_it() {
        let r = Refusal::PolicyDenied(vec!["gpt-4o is not allowed for this tenant".into()]);
        let (s, b) = r.in_envelope(
            Some("openai.chat"),
            "run_1",
            Envelope::Provider(LlmProvider::Openai),
        );
        assert_eq!(s, 403);
        let m = b["error"]["message"].as_str().unwrap();
        assert!(
            m.contains("gpt-4o is not allowed") && m.contains("policy_denied"),
            "{m}"
        );
        assert_eq!(b["error"]["code"], "policy_denied");
        assert_eq!(b["error"]["tollgate"]["run"], "run_1");
        let (_, b) = r.in_envelope(None, "r", Envelope::Provider(LlmProvider::Anthropic));
        assert_eq!(b["type"], "error");
        assert_eq!(b["error"]["type"], "permission_error");
        assert!(b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not allowed"));
        let (_, b) = r.in_envelope(None, "r", Envelope::Provider(LlmProvider::Gemini));
        assert_eq!(b["error"]["status"], "PERMISSION_DENIED");
        assert_eq!(b["error"]["code"], 403);
        let (s, b) = r.in_envelope(None, "r", Envelope::JsonRpc(&json!(7)));
        assert_eq!((s.as_u16(), &b["id"]), (200, &json!(7)));
        let (_, b) = r.in_envelope(None, "r", Envelope::Tollgate);
        assert_eq!(b["error"], "policy_denied");
    }
}
