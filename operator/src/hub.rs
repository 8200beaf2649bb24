//! The snapshot hub: the latest built config per agent, versioned, with a wake-up for
//! long-polling sidecars. Versions come from one counter, so they only ever grow.
//!
//! The hub also measures propagation: a snapshot published for a change first seen at `since`
//! is acknowledged by a sidecar when that sidecar comes back holding it (its next long-poll
//! carries the new hash); when the last of the sidecars that were waiting at publish time has
//! done so, `tollgate_operator_propagation_lag_seconds` observes `since.elapsed()`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tollgate_proxy::config::Config;

/// What one agent's sidecars are served.
#[derive(Clone, Debug)]
pub struct Served {
    /// Snapshot version.
    pub version: u64,
    /// sha256 of the config JSON.
    pub hash: String,
    /// The config, as JSON.
    pub config: Arc<serde_json::Value>,
    /// Namespace of the identity.
    pub namespace: String,
    /// ServiceAccount allowed to fetch it.
    pub service_account: String,
}

/// A published snapshot not yet held by every sidecar that was waiting for it.
struct Propagation {
    hash: String,
    since: Instant,
    remaining: usize,
}

#[derive(Default)]
struct State {
    next: u64,
    agents: HashMap<String, Served>,
    /// Long-polls held open per agent.
    waiting: HashMap<String, usize>,
    propagating: HashMap<String, Propagation>,
    /// Mixed into every hash: material delivered with every snapshot (the interception CA's
    /// fingerprint), so a change to it reaches every sidecar.
    epoch: String,
}

fn hash_of(json: &serde_json::Value, epoch: &str) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(json.to_string().as_bytes());
    h.update(epoch.as_bytes());
    hex::encode(h.finalize())
}

/// Latest snapshots.
pub struct Hub {
    state: Mutex<State>,
    tx: watch::Sender<u64>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Default for Hub {
    fn default() -> Self {
        // Versions start at the wall clock (ms), so they keep growing across restarts.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self {
            state: Mutex::new(State {
                next: start,
                ..Default::default()
            }),
            tx: watch::channel(0).0,
            metrics: None,
        }
    }
}

/// Counts a long-poll as waiting while alive.
struct Waiting<'a> {
    hub: &'a Hub,
    agent: &'a str,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut st = self.hub.state.lock().expect("hub lock");
        if let Some(n) = st.waiting.get_mut(self.agent) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.waiting.remove(self.agent);
            }
        }
    }
}

impl Hub {
    /// A hub that records snapshot versions and propagation lag in `metrics`.
    pub fn with_metrics(metrics: Arc<crate::metrics::Metrics>) -> Self {
        Self {
            metrics: Some(metrics),
            ..Self::default()
        }
    }

    /// Publish an agent's config; returns the new version if it changed.
    pub fn publish(
        &self,
        agent: &str,
        namespace: &str,
        service_account: &str,
        config: &Config,
    ) -> Option<u64> {
        self.publish_since(agent, namespace, service_account, config, Instant::now())
    }

    /// [`Hub::publish`] for a change the operator first saw at `since` (propagation lag is
    /// measured from there).
    pub fn publish_since(
        &self,
        agent: &str,
        namespace: &str,
        service_account: &str,
        config: &Config,
        since: Instant,
    ) -> Option<u64> {
        let json = serde_json::to_value(config).expect("config serialises");
        let mut st = self.state.lock().expect("hub lock");
        let hash = hash_of(&json, &st.epoch);
        if let Some(cur) = st.agents.get(agent) {
            if cur.hash == hash && cur.service_account == service_account {
                return None;
            }
        }
        st.next += 1;
        let version = st.next;
        st.agents.insert(
            agent.to_owned(),
            Served {
                version,
                hash,
                config: Arc::new(json),
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
            },
        );
        let waiting = st.waiting.get(agent).copied().unwrap_or(0);
        if waiting > 0 {
            let hash = st.agents[agent].hash.clone();
            st.propagating.insert(
                agent.to_owned(),
                Propagation {
                    hash,
                    since,
                    remaining: waiting,
                },
            );
        } else {
            st.propagating.remove(agent);
        }
        drop(st);
        if let Some(m) = &self.metrics {
            m.snapshot_version
                .with_label_values(&[agent])
                .set(version as i64);
        }
        self.tx.send_replace(version);
        Some(version)
    }

    /// Change the material delivered with every snapshot: every agent gets a new version and
    /// hash (same config), which wakes every long-poll.
    pub fn set_epoch(&self, epoch: &str) {
        let mut st = self.state.lock().expect("hub lock");
        if st.epoch == epoch {
            return;
        }
        st.epoch = epoch.to_owned();
        let mut next = st.next;
        let epoch = st.epoch.clone();
        let mut versions = Vec::new();
        for (agent, s) in st.agents.iter_mut() {
            next += 1;
            s.version = next;
            s.hash = hash_of(&s.config, &epoch);
            versions.push((agent.clone(), next));
        }
        st.next = next;
        st.propagating.clear();
        drop(st);
        if let Some(m) = &self.metrics {
            for (agent, v) in versions {
                m.snapshot_version
                    .with_label_values(&[&agent])
                    .set(v as i64);
            }
        }
        self.tx.send_replace(next);
    }

    /// Forget an agent whose identity is gone (or no longer builds).
    pub fn remove(&self, agent: &str) {
        let removed = {
            let mut st = self.state.lock().expect("hub lock");
            st.propagating.remove(agent);
            st.agents.remove(agent).is_some()
        };
        if removed {
            if let Some(m) = &self.metrics {
                let _ = m.snapshot_version.remove_label_values(&[agent]);
            }
            let v = *self.tx.borrow();
            self.tx.send_replace(v + 1);
        }
    }

    /// A long-poll from a sidecar holding `hash` arrives: it acknowledges a propagating
    /// snapshot with that hash, and counts as waiting until dropped.
    fn arrive<'a>(&'a self, agent: &'a str, hash: &str) -> Waiting<'a> {
        let mut st = self.state.lock().expect("hub lock");
        let mut done = None;
        if let Some(p) = st.propagating.get_mut(agent) {
            if p.hash == hash {
                p.remaining = p.remaining.saturating_sub(1);
                if p.remaining == 0 {
                    done = Some(p.since.elapsed());
                }
            }
        }
        if done.is_some() {
            st.propagating.remove(agent);
        }
        *st.waiting.entry(agent.to_owned()).or_insert(0) += 1;
        drop(st);
        if let (Some(lag), Some(m)) = (done, &self.metrics) {
            m.propagation_lag.observe(lag.as_secs_f64());
        }
        Waiting { hub: self, agent }
    }

    /// The current snapshot of an agent.
    pub fn get(&self, agent: &str) -> Option<Served> {
        self.state
            .lock()
            .expect("hub lock")
            .agents
            .get(agent)
            .cloned()
    }

    /// Agents served.
    pub fn agents(&self) -> Vec<(String, u64)> {
        let st = self.state.lock().expect("hub lock");
        let mut v: Vec<_> = st
            .agents
            .iter()
            .map(|(k, s)| (k.clone(), s.version))
            .collect();
        v.sort();
        v
    }

    /// Wait until the agent's snapshot differs from the one with `hash` (a sidecar's current
    /// one), or `timeout` passes. Comparing hashes, not versions, keeps this right across
    /// operator restarts and between replicas, whose version counters differ.
    pub async fn wait_changed(&self, agent: &str, hash: &str, timeout: Duration) -> Option<Served> {
        let mut rx = self.tx.subscribe();
        let _waiting = self.arrive(agent, hash);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.get(agent).filter(|s| s.hash != hash) {
                return Some(s);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str) -> Config {
        serde_json::from_value(serde_json::json!({"agent": {"name": name, "tenants": ["t"]}}))
            .unwrap()
    }

    #[tokio::test]
    async fn versions_grow_and_waiters_wake() {
        let hub = Arc::new(Hub::default());
        assert!(hub.publish("ns/a", "ns", "sa", &cfg("a")).is_some());
        assert_eq!(
            hub.publish("ns/a", "ns", "sa", &cfg("a")),
            None,
            "unchanged config, same version"
        );
        let first = hub
            .wait_changed("ns/a", "", Duration::from_millis(1))
            .await
            .unwrap();
        let h2 = hub.clone();
        let hash = first.hash.clone();
        let waiter = tokio::spawn(async move {
            h2.wait_changed("ns/a", &hash, Duration::from_secs(30))
                .await
        });
        tokio::task::yield_now().await;
        let v2 = hub.publish("ns/a", "ns", "sa", &cfg("a2")).unwrap();
        assert!(v2 > first.version);
        let got = waiter.await.unwrap().unwrap();
        assert_eq!(got.version, v2);
        assert!(
            hub.wait_changed("ns/a", &got.hash, Duration::from_millis(5))
                .await
                .is_none(),
            "times out without a change"
        );
    }

    #[tokio::test]
    async fn propagation_lag_is_observed_when_the_last_waiting_sidecar_holds_the_new_snapshot() {
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let hub = Arc::new(Hub::with_metrics(metrics.clone()));
        hub.publish("ns/a", "ns", "sa", &cfg("a"));
        let old = hub.get("ns/a").unwrap().hash;
        let mut waiters = Vec::new();
        for _ in 0..2 {
            let (h, old) = (hub.clone(), old.clone());
            waiters.push(tokio::spawn(async move {
                h.wait_changed("ns/a", &old, Duration::from_secs(30)).await
            }));
        }
        while hub.state.lock().unwrap().waiting.get("ns/a").copied() != Some(2) {
            tokio::task::yield_now().await;
        }
        let since = Instant::now() - Duration::from_millis(40);
        let v = hub
            .publish_since("ns/a", "ns", "sa", &cfg("a2"), since)
            .unwrap();
        assert_eq!(
            metrics.snapshot_version.with_label_values(&["ns/a"]).get(),
            v as i64
        );
        let new = hub.get("ns/a").unwrap().hash;
        for w in waiters {
            assert_eq!(w.await.unwrap().unwrap().hash, new);
        }
        // The first sidecar comes back holding it: one of two, nothing observed yet.
        let quick = |h: Arc<Hub>, hash: String| async move {
            h.wait_changed("ns/a", &hash, Duration::from_millis(1))
                .await
        };
        quick(hub.clone(), new.clone()).await;
        assert_eq!(metrics.propagation_lag.get_sample_count(), 0);
        // A sidecar still on the old snapshot is not an acknowledgement.
        quick(hub.clone(), old.clone()).await;
        assert_eq!(metrics.propagation_lag.get_sample_count(), 0);
        quick(hub.clone(), new.clone()).await;
        assert_eq!(metrics.propagation_lag.get_sample_count(), 1);
        assert!(metrics.propagation_lag.get_sample_sum() >= 0.04);
        hub.remove("ns/a");
        assert!(!metrics.render().contains("agent=\"ns/a\""));
    }
}
