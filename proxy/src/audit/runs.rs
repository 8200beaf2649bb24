//! `audit runs`: one summary per run, in the shape of the seed article's run record —
//! `run_id`, `agent`, `tenant_id`, `tool_calls`, `approvals`, `outcome`, `cost` — and, with
//! `--by-outcome`, cost per reported outcome per agent over a period ([`by_outcome`]). The
//! `outcome` is inferred from the run's last call; `reported` is what its orchestrator said
//! (the run's `run` record, see [`crate::outcome`]).

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
    /// Outcome, as inferred from the run's last call.
    pub outcome: Outcome,
    /// The outcome its orchestrator reported, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reported: Option<Reported>,
    /// Cost: every call of the run, retries and refused calls included.
    pub cost: Cost,
    /// Calls refused (not forwarded).
    pub refused: u64,
    /// Calls repeating an earlier call of the run (same tool, same input).
    pub retries: u64,
    /// Time of the run's first record (RFC 3339).
    pub started: String,
    /// Time of the run's last record.
    pub ended: String,
}

/// A reported run outcome.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Reported {
    /// `resolved`, `escalated`, `abandoned`, `failed`.
    pub outcome: String,
    /// The reporter's label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// `header` or `endpoint`.
    pub via: String,
    /// Time spent waiting on approvals, as the sidecar measured it (ms).
    pub approval_wait_ms: u64,
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
    let mut seen_inputs: BTreeMap<(String, String, String), ()> = BTreeMap::new();
    let mut reports: BTreeMap<&str, &Value> = BTreeMap::new();
    for r in records.iter().filter(|r| r["phase"] == "run") {
        if let Some(run) = r["run"].as_str() {
            reports.entry(run).or_insert(r);
        }
    }
    for r in records
        .iter()
        .filter(|r| r["phase"] != "outcome" && r["phase"] != "run")
    {
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
                reported: None,
                cost: Cost::default(),
                refused: 0,
                retries: 0,
                started: r["ts"].as_str().unwrap_or("").into(),
                ended: String::new(),
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
        s.ended = final_rec["ts"].as_str().unwrap_or("").into();
        if !matches!(decision.as_str(), "allow" | "shadow_deny") {
            s.refused += 1;
        }
        let key = (
            run.clone(),
            r["tool"].as_str().unwrap_or("").to_string(),
            r["input_hash"].as_str().unwrap_or("").to_string(),
        );
        if seen_inputs.insert(key, ()).is_some() {
            s.retries += 1;
        }
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
        if let Some(r) = reports.get(s.run_id.as_str()) {
            let o = &r["run_outcome"];
            s.reported = Some(Reported {
                outcome: o["outcome"].as_str().unwrap_or("").into(),
                label: o["label"].as_str().map(str::to_owned),
                via: o["reported_via"].as_str().unwrap_or("").into(),
                approval_wait_ms: o["approval_wait_ms"].as_u64().unwrap_or(0),
            });
            if let Some(ts) = r["ts"].as_str() {
                s.ended = ts.into();
            }
        }
    }
    runs
}

/// Cost per outcome for one agent and one reported outcome (`unreported` for runs without).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct OutcomeRow {
    /// Agent.
    pub agent: String,
    /// Reported outcome, or `unreported`.
    pub outcome: String,
    /// Runs.
    pub runs: u64,
    /// Their total cost, USD.
    pub cost_usd: f64,
    /// Mean cost per run, USD.
    pub cost_per_run_usd: f64,
    /// Calls in those runs (refused included).
    pub calls: u64,
    /// Retries among them.
    pub retries: u64,
    /// Refused calls among them.
    pub refused: u64,
    /// Approvals asked for.
    pub approvals: u64,
}

/// Per agent: what every run cost, divided by the runs that were `resolved` — the cost of a
/// successful run, paying for the failed, abandoned and escalated ones too.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AgentOutcomes {
    /// Agent.
    pub agent: String,
    /// One row per outcome, `resolved` first.
    pub outcomes: Vec<OutcomeRow>,
    /// All runs' cost.
    pub cost_usd: f64,
    /// Resolved runs.
    pub resolved: u64,
    /// `cost_usd / resolved`, when any run was resolved.
    pub cost_per_resolved_run_usd: Option<f64>,
}

/// Group runs that ended at or after `since` (all when `None`) by agent and reported outcome.
pub fn by_outcome(runs: &[RunSummary], since: Option<time::OffsetDateTime>) -> Vec<AgentOutcomes> {
    let parse = |ts: &str| {
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).ok()
    };
    let mut agents: BTreeMap<&str, BTreeMap<String, OutcomeRow>> = BTreeMap::new();
    for r in runs {
        if let Some(since) = since {
            if parse(&r.ended).is_none_or(|t| t < since) {
                continue;
            }
        }
        let outcome = r
            .reported
            .as_ref()
            .map_or("unreported", |o| o.outcome.as_str())
            .to_string();
        let row = agents
            .entry(r.agent.as_str())
            .or_default()
            .entry(outcome.clone())
            .or_insert_with(|| OutcomeRow {
                agent: r.agent.clone(),
                outcome,
                runs: 0,
                cost_usd: 0.0,
                cost_per_run_usd: 0.0,
                calls: 0,
                retries: 0,
                refused: 0,
                approvals: 0,
            });
        row.runs += 1;
        row.cost_usd += r.cost.usd;
        row.calls += r.tool_calls.len() as u64;
        row.retries += r.retries;
        row.refused += r.refused;
        row.approvals += r.approvals.len() as u64;
    }
    let round = |x: f64| (x * 1e6).round() / 1e6;
    let order = |o: &str| {
        crate::outcome::RunOutcome::ALL
            .iter()
            .position(|x| x.as_str() == o)
            .unwrap_or(usize::MAX)
    };
    agents
        .into_iter()
        .map(|(agent, rows)| {
            let mut outcomes: Vec<OutcomeRow> = rows.into_values().collect();
            outcomes.sort_by_key(|r| order(&r.outcome));
            for r in &mut outcomes {
                r.cost_usd = round(r.cost_usd);
                r.cost_per_run_usd = round(r.cost_usd / r.runs as f64);
            }
            let cost_usd = round(outcomes.iter().map(|r| r.cost_usd).sum());
            let resolved = outcomes
                .iter()
                .find(|r| r.outcome == "resolved")
                .map_or(0, |r| r.runs);
            AgentOutcomes {
                agent: agent.to_string(),
                outcomes,
                cost_usd,
                resolved,
                cost_per_resolved_run_usd: (resolved > 0)
                    .then(|| round(cost_usd / resolved as f64)),
            }
        })
        .collect()
}

/// Human-readable cost per outcome.
pub fn render_outcomes(agents: &[AgentOutcomes]) -> String {
    let mut out = String::new();
    for a in agents {
        out.push_str(&format!(
            "agent {}  runs={}  cost=${:.6}  cost per resolved run={}\n",
            a.agent,
            a.outcomes.iter().map(|r| r.runs).sum::<u64>(),
            a.cost_usd,
            a.cost_per_resolved_run_usd
                .map_or("n/a (no resolved run)".to_string(), |c| format!("${c:.6}"))
        ));
        out.push_str(&format!(
            "  {:<11} {:>6} {:>14} {:>14} {:>7} {:>8} {:>8} {:>10}\n",
            "outcome", "runs", "cost", "cost/run", "calls", "retries", "refused", "approvals"
        ));
        for r in &a.outcomes {
            out.push_str(&format!(
                "  {:<11} {:>6} {:>14} {:>14} {:>7} {:>8} {:>8} {:>10}\n",
                r.outcome,
                r.runs,
                format!("${:.6}", r.cost_usd),
                format!("${:.6}", r.cost_per_run_usd),
                r.calls,
                r.retries,
                r.refused,
                r.approvals
            ));
        }
    }
    out
}

/// Human-readable rendering.
pub fn render_text(runs: &[RunSummary]) -> String {
    let mut out = String::new();
    for r in runs {
        out.push_str(&format!(
            "run {}  agent={}  tenant={}  outcome={}{}{}  cost=${:.6} ({} prompt / {} completion tokens)\n",
            r.run_id,
            r.agent,
            r.tenant_id,
            r.outcome.status,
            r.outcome.reason.as_deref().map(|x| format!(" ({x})")).unwrap_or_default(),
            r.reported
                .as_ref()
                .map(|o| format!(
                    "  reported={}{}",
                    o.outcome,
                    o.label.as_deref().map(|l| format!(" ({l})")).unwrap_or_default()
                ))
                .unwrap_or_default(),
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
