//! Kill switches: an engaged switch whose every set scope field matches the call refuses it
//! with 503 `killed`. `all: true` matches everything. A switch that engages while calls in
//! its scope are in flight stops them too (see [`inflight`]).

pub(crate) mod inflight;

use crate::config::KillSwitchConfig;
use crate::refusal::Refusal;
use crate::snapshot::Snapshot;

/// Check the call against every engaged switch.
pub(crate) fn check(snap: &Snapshot, tenant: &str, tool: &str) -> Result<(), Refusal> {
    match snap
        .kill_switches
        .iter()
        .find(|k| applies(k, &snap.agent.namespace, &snap.agent.name, tenant, tool))
    {
        Some(k) => Err(Refusal::Killed {
            name: k.name.clone(),
            reason: k.reason.clone(),
        }),
        None => Ok(()),
    }
}

/// Does this switch cover the call?
pub(crate) fn applies(
    k: &KillSwitchConfig,
    namespace: &str,
    agent: &str,
    tenant: &str,
    tool: &str,
) -> bool {
    if !k.engaged {
        return false;
    }
    let s = &k.scope;
    if s.all {
        return true;
    }
    let eq = |want: &Option<String>, got: &str| want.as_deref().is_none_or(|w| w == got);
    eq(&s.namespace, namespace) && eq(&s.tenant, tenant) && eq(&s.agent, agent) && eq(&s.tool, tool)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KillScope;

    fn ks(scope: KillScope) -> KillSwitchConfig {
        KillSwitchConfig {
            name: "k".into(),
            scope,
            engaged: true,
            reason: "r".into(),
        }
    }

    #[test]
    fn scopes_combine_with_and() {
        let all = ks(KillScope {
            all: true,
            ..Default::default()
        });
        assert!(applies(&all, "ns", "a", "t", "x"));
        let tool = ks(KillScope {
            tool: Some("stripe.create_refund".into()),
            ..Default::default()
        });
        assert!(applies(&tool, "ns", "a", "t", "stripe.create_refund"));
        assert!(!applies(&tool, "ns", "a", "t", "stripe.get_charge"));
        let both = ks(KillScope {
            tenant: Some("acme".into()),
            tool: Some("x".into()),
            ..Default::default()
        });
        assert!(applies(&both, "ns", "a", "acme", "x"));
        assert!(!applies(&both, "ns", "a", "globex", "x"));
        assert!(!applies(&both, "ns", "a", "acme", "y"));
        let ns = ks(KillScope {
            namespace: Some("prod".into()),
            ..Default::default()
        });
        assert!(!applies(&ns, "dev", "a", "t", "x"));
        let off = KillSwitchConfig {
            engaged: false,
            ..all
        };
        assert!(!applies(&off, "ns", "a", "t", "x"));
    }
}
