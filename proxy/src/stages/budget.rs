//! Budget: each element's estimated cost, and what a call (a whole JSON-RPC batch at once)
//! asks of every cap that applies. The reservation is made against the sum, all or nothing,
//! so a batch that would exceed a cap as a whole is refused as a whole.

use crate::limits::{Cap, CapKind, Exceeded, Usage};
use crate::meter::Estimate;
use crate::policy::input::BudgetFacts;
use crate::refusal::Refusal;
use crate::snapshot::Tool;
use serde_json::Value;

/// The estimated cost of one tool call (`path` names the model of a Gemini call).
pub(crate) fn estimate(
    tool: &Tool,
    input: &Value,
    body_len: usize,
    path: &str,
) -> Result<Estimate, Refusal> {
    match &tool.config.cost {
        Some(cost) => crate::meter::estimate_call(cost, input, body_len, Some(path))
            .map_err(|m| Refusal::InvalidInput(vec![m])),
        None => Ok(Estimate::default()),
    }
}

/// The caps a call adds to, with its total amount for each: the sum over its elements of the
/// spend (spend caps) or exposure (exposure caps). Caps it adds nothing to are left out.
pub(crate) fn amounts<'e>(
    caps: Vec<Cap>,
    estimates: impl Iterator<Item = &'e Estimate> + Clone,
) -> (Vec<Cap>, Vec<i64>) {
    let spend: i64 = estimates.clone().map(|e| e.spend).sum();
    let exposure: i64 = estimates.map(|e| e.exposure).sum();
    caps.into_iter()
        .map(|c| {
            let a = match c.kind {
                CapKind::Spend => spend,
                CapKind::Exposure => exposure,
            };
            (c, a)
        })
        .filter(|(_, a)| *a > 0)
        .unzip()
}

/// What shadow mode notes instead of reserving: every cap the call would exceed.
pub(crate) fn would_exceed(caps: &[Cap], amounts: &[i64], usage: &[Usage]) -> Vec<String> {
    caps.iter()
        .zip(amounts)
        .zip(usage)
        .filter(|((c, a), u)| u.spent + u.reserved + **a > c.cap)
        .flat_map(|((c, a), u)| {
            crate::limits::over_budget(&Exceeded {
                cap: c.clone(),
                usage: *u,
                amount: *a,
            })
            .reasons()
        })
        .collect()
}

/// Budget facts for the policy input from the caps that apply and their usage.
pub(crate) fn facts(caps: &[Cap], usage: &[Usage], run_calls: u64) -> BudgetFacts {
    let mut f = BudgetFacts {
        run_calls,
        ..Default::default()
    };
    for (c, u) in caps.iter().zip(usage) {
        let spent = crate::limits::to_usd(u.spent);
        match c.scope {
            "run" => {
                f.run_spent_usd = spent;
                f.run_budget_usd =
                    (c.cap < crate::limits::UNCAPPED).then(|| crate::limits::to_usd(c.cap));
            }
            "tenant_day" => {
                f.tenant_spent_today_usd = spent;
                f.tenant_budget_today_usd = Some(crate::limits::to_usd(c.cap));
            }
            _ => {}
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cap(kind: CapKind) -> Cap {
        Cap {
            name: "c".into(),
            scope: "tenant_day",
            key: "k".into(),
            cap: 100,
            kind,
            ttl: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_batch_asks_each_cap_for_the_sum_of_its_elements() {
        let e = [
            Estimate {
                spend: 70,
                exposure: 5,
                ..Default::default()
            },
            Estimate {
                spend: 0,
                exposure: 0,
                ..Default::default()
            },
            Estimate {
                spend: 40,
                exposure: 0,
                ..Default::default()
            },
        ];
        let (caps, amounts) = amounts(vec![cap(CapKind::Spend), cap(CapKind::Exposure)], e.iter());
        assert_eq!(caps.len(), 2);
        assert_eq!(amounts, vec![110, 5]);
        let usage = [Usage::default(), Usage::default()];
        assert_eq!(
            would_exceed(&caps, &amounts, &usage).len(),
            1,
            "110 > 100 as a whole"
        );
    }
}
