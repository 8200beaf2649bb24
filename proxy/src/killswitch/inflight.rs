//! Calls in flight, by kill-switch scope, so that a switch that engages stops what is already
//! running and not only what comes next.
//!
//! A call registers at the kill-switch gate (the first point where its tenant and tools are
//! known) and holds an [`InFlightGuard`] until it ends, streamed body included; dropping the
//! guard removes it. When a snapshot newly engages a switch, [`InFlight::kill`] fires the
//! [`KillSignal`] of every registered call it covers: the pipeline's wait (rate limit,
//! approval, upstream headers) is dropped and the call ends `killed`; a streaming body is cut
//! with a visible error (see [`crate::upstream::stream`]).
//!
//! The race with registration is closed by order: [`crate::state::ProxyState::install`]
//! stores the new snapshot before it scans, and the gate registers before it reads the live
//! snapshot. A call either is in the registry when the scan runs or sees the new snapshot.
//!
//! The map is sharded by call number, so registering costs one uncontended lock of one shard;
//! only a newly engaged switch walks every shard.

use crate::config::KillSwitchConfig;
use crate::refusal::Refusal;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio_util::sync::CancellationToken;

const SHARDS: usize = 16;

/// Which switch stopped a call, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Killed {
    /// Switch name.
    pub name: String,
    /// Its reason.
    pub reason: String,
}

impl Killed {
    /// The refusal the call ends with (503 `killed`).
    pub fn refusal(&self) -> Refusal {
        Refusal::Killed {
            name: self.name.clone(),
            reason: self.reason.clone(),
        }
    }
}

/// Fired once, when a switch covering the call engages; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct KillSignal {
    token: CancellationToken,
    why: Arc<OnceLock<Killed>>,
}

impl KillSignal {
    /// Fire (the first switch to fire is the one recorded).
    pub fn fire(&self, why: Killed) {
        let _ = self.why.set(why);
        self.token.cancel();
    }

    /// Which switch fired, once it has.
    pub fn killed(&self) -> Option<&Killed> {
        self.why.get()
    }

    /// Resolves when the signal fires.
    pub async fn fired(&self) -> Killed {
        self.token.cancelled().await;
        self.why.get().cloned().unwrap_or_else(|| Killed {
            name: String::new(),
            reason: String::new(),
        })
    }

    /// An owned future that resolves when the signal fires (for bodies that poll it).
    pub fn fired_owned(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.token.clone().cancelled_owned()
    }
}

/// What a registered call is, for matching against switches.
#[derive(Debug)]
struct Entry {
    namespace: String,
    agent: String,
    tenant: String,
    /// Tool names of the call's elements (`""` for a message no tool decides).
    tools: Vec<String>,
    signal: KillSignal,
}

/// The calls in flight in this sidecar.
#[derive(Debug, Default)]
pub struct InFlight {
    shards: [Mutex<HashMap<u64, Entry>>; SHARDS],
    next: AtomicU64,
}

/// Keeps a call registered; dropping it removes the call.
#[derive(Debug)]
pub struct InFlightGuard {
    registry: Arc<InFlight>,
    id: u64,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.registry.shard(self.id).remove(&self.id);
    }
}

/// The scope facts of one call.
pub struct Scope<'a> {
    /// Agent namespace.
    pub namespace: &'a str,
    /// Agent name.
    pub agent: &'a str,
    /// Tenant.
    pub tenant: &'a str,
    /// Tool names (`""` for a message no tool decides).
    pub tools: Vec<&'a str>,
}

impl InFlight {
    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.shards[(id as usize) % SHARDS]
            .lock()
            .expect("in-flight shard lock")
    }

    /// Register a call with its signal.
    pub fn register(self: &Arc<Self>, scope: Scope<'_>, signal: KillSignal) -> InFlightGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            namespace: scope.namespace.to_string(),
            agent: scope.agent.to_string(),
            tenant: scope.tenant.to_string(),
            tools: scope.tools.iter().map(|t| t.to_string()).collect(),
            signal,
        };
        self.shard(id).insert(id, entry);
        InFlightGuard {
            registry: self.clone(),
            id,
        }
    }

    /// Calls registered now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().expect("in-flight shard lock").len())
            .sum()
    }

    /// Whether no call is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fire the signal of every registered call one of `switches` covers; returns how many.
    pub fn kill(&self, switches: &[&KillSwitchConfig]) -> usize {
        if switches.is_empty() {
            return 0;
        }
        let mut fired = 0;
        for shard in &self.shards {
            let map = shard.lock().expect("in-flight shard lock");
            for e in map.values() {
                if e.signal.killed().is_some() {
                    continue;
                }
                let hit = switches.iter().find(|k| {
                    e.tools
                        .iter()
                        .any(|t| super::applies(k, &e.namespace, &e.agent, &e.tenant, t))
                });
                if let Some(k) = hit {
                    e.signal.fire(Killed {
                        name: k.name.clone(),
                        reason: k.reason.clone(),
                    });
                    fired += 1;
                }
            }
        }
        fired
    }
}

/// The switches engaged in `new` that were not engaged, with the same scope, in `old`.
pub(crate) fn newly_engaged<'a>(
    old: &[KillSwitchConfig],
    new: &'a [KillSwitchConfig],
) -> Vec<&'a KillSwitchConfig> {
    new.iter()
        .filter(|k| k.engaged)
        .filter(|k| {
            !old.iter()
                .any(|o| o.engaged && o.name == k.name && o.scope == k.scope)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KillScope;

    fn switch(name: &str, scope: KillScope) -> KillSwitchConfig {
        KillSwitchConfig {
            name: name.into(),
            scope,
            engaged: true,
            reason: "INC-1".into(),
        }
    }

    fn scope<'a>(tenant: &'a str, tool: &'a str) -> Scope<'a> {
        Scope {
            namespace: "ns",
            agent: "billing",
            tenant,
            tools: vec![tool],
        }
    }

    #[test]
    fn a_switch_fires_only_the_calls_it_covers_and_a_dropped_guard_leaves() {
        let reg = Arc::new(InFlight::default());
        let (a, b, c) = (
            KillSignal::default(),
            KillSignal::default(),
            KillSignal::default(),
        );
        let ga = reg.register(scope("acme", "llm.chat"), a.clone());
        let _gb = reg.register(scope("acme", "stripe.refund"), b.clone());
        let gc = reg.register(scope("globex", "llm.chat"), c.clone());
        assert_eq!(reg.len(), 3);
        drop(gc);
        assert_eq!(reg.len(), 2, "a finished call is no longer in flight");
        let k = switch(
            "stop-chat",
            KillScope {
                tool: Some("llm.chat".into()),
                ..Default::default()
            },
        );
        assert_eq!(reg.kill(&[&k]), 1);
        assert_eq!(a.killed().map(|k| k.name.as_str()), Some("stop-chat"));
        assert!(b.killed().is_none(), "another tool is not in scope");
        assert!(c.killed().is_none(), "a call that ended is not fired");
        assert_eq!(reg.kill(&[&k]), 0, "a call is fired once");
        drop(ga);
        assert_eq!(reg.len(), 1);
    }

    #[test]
    fn only_switches_that_were_not_engaged_are_new() {
        let all = switch(
            "all",
            KillScope {
                all: true,
                ..Default::default()
            },
        );
        let tenant = switch(
            "t",
            KillScope {
                tenant: Some("acme".into()),
                ..Default::default()
            },
        );
        let mut off = tenant.clone();
        off.engaged = false;
        let new = [all.clone(), tenant.clone()];
        assert_eq!(newly_engaged(&[], &new).len(), 2);
        assert_eq!(
            newly_engaged(std::slice::from_ref(&all), &new),
            vec![&tenant]
        );
        assert_eq!(newly_engaged(&[off], &new).len(), 2);
        assert!(newly_engaged(&new, &new).is_empty());
        let mut widened = tenant.clone();
        widened.scope.tenant = None;
        widened.scope.all = true;
        assert_eq!(
            newly_engaged(
                std::slice::from_ref(&tenant),
                std::slice::from_ref(&widened)
            )
            .len(),
            1,
            "a switch whose scope changed is new"
        );
    }

    #[tokio::test]
    async fn a_fired_signal_wakes_its_waiters_with_the_switch() {
        let s = KillSignal::default();
        let w = tokio::spawn({
            let s = s.clone();
            async move { s.fired().await }
        });
        s.fire(Killed {
            name: "k".into(),
            reason: "r".into(),
        });
        assert_eq!(w.await.unwrap().name, "k");
    }
}
