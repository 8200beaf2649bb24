//! `audit runs`: one summary per run, in the shape of the seed article's run record —
//! `run_id`, `agent`, `tenant_id`, `tool_calls`, `approvals`, `outcome`, `cost`.

use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// One tool call in a run summary.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ToolCall {
    /// Tool.
    pub tool: String,
    /// sha256 of the canonical input.
    pub input_hash: String,
    /// `ok`, `error`, or the refusal decision.
    pub status: String,
    /// Decision.
    pub decision: String,
    /// HTTP status returned.
    pub http_status: u64,
    /// Latency as the proxy saw it.
    pub latency_ms: f64,
}

/// An approval in a run summary.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Approval {
    /// Approval id.
    pub id: String,
    /// Tool.
    pub tool: String,
    /// Always true: it was asked for.
    pub required: bool,
    /// Whether it was granted and used.
    pub approved: bool,
    /// Who approved.
    pub approver: Option<String>,
}

/// Run outcome.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Outcome {
    /// `completed`, `escalated` (waiting on approval), `blocked` (refused), `failed`.
    pub status: String,
    /// Why.
    pub reason: Option<String>,
}

/// Cost of a run.
#[derive(Clone, Debug, Serialize, PartialEq, Default)]
pub struct Cost {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// USD.
    pub usd: f64,
}

/// A run summary.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RunSummary {
    /// Run id.
    pub run_id: String,
    /// Agent.
    pub agent: String,
    /// Tenant.
    pub tenant_id: String,
    /// Calls in order.
    pub tool_calls: Vec<ToolCall>,
    /// Approvals asked for.
    pub approvals: Vec<Approval>,
    /// Outcome.
    pub outcome: Outcome,
    /// Cost.
    pub cost: Cost,
}

/// Summarise records (already parsed, in file order) per run.
pub fn summarise(records: &[Value]) -> Vec<RunSummary> {
    // Pair a call's decision record with its outcome record by `call` id.
    let mut outcomes: BTreeMap<&str, &Value> = BTreeMap::new();
    for r in records {
        if r["phase"] == "outcome" {
            if let Some(c) = r["call"].as_str() {
                outcomes.insert(c, r);
            }
        }
    }
    let mut runs: Vec<RunSummary> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for r in records.iter().filter(|r| r["phase"] != "outcome") {
        let run = r["run"].as_str().unwrap_or("").to_string();
        let i = *index.entry(run.clone()).or_insert_with(|| {
            runs.push(RunSummary {
                run_id: run.clone(),
                agent: r["agent"].as_str().unwrap_or("").into(),
                tenant_id: r["tenant"].as_str().unwrap_or("").into(),
                tool_calls: Vec::new(),
                approvals: Vec::new(),
                outcome: Outcome {
                    status: "completed".into(),
                    reason: None,
                },
                cost: Cost::default(),
            });
            runs.len() - 1
        });
        let s = &mut runs[i];
        if s.tenant_id.is_empty() {
            s.tenant_id = r["tenant"].as_str().unwrap_or("").into();
        }
        let decision = r["decision"].as_str().unwrap_or("").to_string();
        let out = r["call"].as_str().and_then(|c| outcomes.get(c)).copied();
        let final_rec = out.unwrap_or(r);
        let http_status = final_rec["status"].as_u64().unwrap_or(0);
        let status = match (decision.as_str(), out) {
            ("allow" | "shadow_deny", Some(o)) if o["decision"] == "error" => "error".to_string(),
            ("allow" | "shadow_deny", Some(o))
                if o["status"].as_u64().is_some_and(|s| s >= 400) =>
            {
                "error".to_string()
            }
            ("allow" | "shadow_deny", _) => "ok".to_string(),
            (d, _) => d.to_string(),
        };
        let latency = final_rec["latency_us"]["total"].as_u64().unwrap_or(0) as f64 / 1000.0;
        s.tool_calls.push(ToolCall {
            tool: r["tool"].as_str().unwrap_or("").into(),
            input_hash: r["input_hash"].as_str().unwrap_or("").into(),
            status: status.clone(),
            decision: decision.clone(),
            http_status,
            latency_ms: (latency * 1000.0).round() / 1000.0,
        });
        let mut add = |c: &Value| {
            s.cost.usd += c["cost"]["usd"].as_f64().unwrap_or(0.0);
            s.cost.prompt_tokens += c["cost"]["prompt_tokens"].as_u64().unwrap_or(0);
            s.cost.completion_tokens += c["cost"]["completion_tokens"].as_u64().unwrap_or(0);
        };
        add(r);
        if let Some(o) = out {
            add(o);
        }
        if let Some(id) = r["approval"]["id"].as_str() {
            let approved = decision == "allow" || decision == "shadow_deny";
            let approver = r["approval"]["approver"]
                .as_str()
                .filter(|a| !a.is_empty())
                .map(str::to_owned);
            match s.approvals.iter_mut().find(|a| a.id == id) {
                Some(a) => {
                    a.approved |= approved;
                    if approver.is_some() {
                        a.approver = approver;
                    }
                }
                None => s.approvals.push(Approval {
                    id: id.into(),
                    tool: r["tool"].as_str().unwrap_or("").into(),
                    required: true,
                    approved,
                    approver,
                }),
            }
        }
        // The outcome is the state the run was left in by its latest call.
        s.outcome = match status.as_str() {
            "ok" => Outcome {
                status: "completed".into(),
                reason: None,
            },
            "approval_required" => Outcome {
                status: "escalated".into(),
                reason: r["reasons"][0].as_str().map(str::to_owned),
            },
            "error" => Outcome {
                status: "failed".into(),
                reason: final_rec["reasons"][0].as_str().map(str::to_owned),
            },
            other => Outcome {
                status: "blocked".into(),
                reason: Some(format!(
                    "{other}: {}",
                    r["reasons"][0].as_str().unwrap_or("")
                )),
            },
        };
    }
    for s in &mut runs {
        s.cost.usd = (s.cost.usd * 1e6).round() / 1e6;
    }
    runs
}

/// Human-readable rendering.
pub fn render_text(runs: &[RunSummary]) -> String {
    let mut out = String::new();
    for r in runs {
        out.push_str(&format!(
            "run {}  agent={}  tenant={}  outcome={}{}  cost=${:.6} ({} prompt / {} completion tokens)\n",
            r.run_id,
            r.agent,
            r.tenant_id,
            r.outcome.status,
            r.outcome.reason.as_deref().map(|x| format!(" ({x})")).unwrap_or_default(),
            r.cost.usd,
            r.cost.prompt_tokens,
            r.cost.completion_tokens
        ));
        for c in &r.tool_calls {
            out.push_str(&format!(
                "  {:<28} {:<18} {:>4} {:>9.3}ms  {}\n",
                c.tool,
                c.status,
                c.http_status,
                c.latency_ms,
                &c.input_hash.get(..12).unwrap_or("")
            ));
        }
        for a in &r.approvals {
            out.push_str(&format!(
                "  approval {} for {}: {}\n",
                a.id,
                a.tool,
                if a.approved {
                    format!("approved by {}", a.approver.as_deref().unwrap_or("?"))
                } else {
                    "pending".into()
                }
            ));
        }
    }
    out
}
