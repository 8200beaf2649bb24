//! The snapshot hub: the latest built config per agent, versioned, with a wake-up for
//! long-polling sidecars. Versions come from one counter, so they only ever grow.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
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

#[derive(Default)]
struct State {
    next: u64,
    agents: HashMap<String, Served>,
}

/// Latest snapshots.
pub struct Hub {
    state: Mutex<State>,
    tx: watch::Sender<u64>,
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
                agents: HashMap::new(),
            }),
            tx: watch::channel(0).0,
        }
    }
}

impl Hub {
    /// Publish an agent's config; returns the new version if it changed.
    pub fn publish(
        &self,
        agent: &str,
        namespace: &str,
        service_account: &str,
        config: &Config,
    ) -> Option<u64> {
        use sha2::Digest;
        let json = serde_json::to_value(config).expect("config serialises");
        let hash = hex::encode(sha2::Sha256::digest(json.to_string().as_bytes()));
        let mut st = self.state.lock().expect("hub lock");
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
        drop(st);
        self.tx.send_replace(version);
        Some(version)
    }

    /// Forget an agent whose identity is gone (or no longer builds).
    pub fn remove(&self, agent: &str) {
        let removed = self
            .state
            .lock()
            .expect("hub lock")
            .agents
            .remove(agent)
            .is_some();
        if removed {
            let v = *self.tx.borrow();
            self.tx.send_replace(v + 1);
        }
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
}
