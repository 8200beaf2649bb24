//! Idempotent writes: a mutating call carrying an `Idempotency-Key` is deduplicated per
//! (agent, tenant, tool, key) for `limits.idempotencyTtl` (default 24 h). The first call claims
//! the key and is forwarded; a retry while it is in flight waits for it; a retry after it
//! completed gets the stored response, marked `x-tollgate-idempotent-replay: true`; neither is
//! forwarded twice. The same key with a different input gets 422 `idempotency_conflict`. A call
//! that failed upstream releases its claim, so the retry is forwarded. Records live with the
//! limits: in memory (local) or in Redis (shared by every sidecar).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most response bytes stored for a replay.
pub const MAX_STORED_BODY: usize = 1024 * 1024;

/// A stored response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    /// Status code.
    pub status: u16,
    /// Content type, if any.
    pub content_type: Option<String>,
    /// Body (base64 in Redis).
    #[serde(with = "b64")]
    pub body: Vec<u8>,
}

mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

/// What a claim found.
#[derive(Debug, PartialEq)]
pub enum Claim {
    /// This call owns the key: forward it, then [`Idempotency::complete`] or
    /// [`Idempotency::release`].
    Owned,
    /// An identical call already completed: replay its response.
    Replay(Stored),
    /// The key was used with a different input.
    Conflict,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    hash: String,
    done: Option<Stored>,
}

/// The idempotency store.
pub struct Idempotency {
    local: Mutex<HashMap<String, (Record, Instant)>>,
    redis: Option<crate::limits::redis_store::RedisConn>,
    ttl: Duration,
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency").finish_non_exhaustive()
    }
}

/// The store key of a call.
pub fn key(agent: &str, tenant: &str, tool: &str, header: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("{agent}\0{tenant}\0{tool}\0{header}").as_bytes());
    format!("tollgate:{{tg}}:idem:{}", hex::encode(h))
}

impl Idempotency {
    /// A store; with `redis`, records are shared through it.
    pub fn new(redis: Option<crate::limits::redis_store::RedisConn>, ttl: Duration) -> Self {
        Self {
            local: Mutex::default(),
            redis,
            ttl,
        }
    }

    /// Claim `key` for an input with `hash`, waiting up to `wait` for an in-flight twin.
    pub async fn claim(&self, key: &str, hash: &str, wait: Duration) -> Result<Claim, String> {
        let deadline = Instant::now() + wait;
        loop {
            match self.try_claim(key, hash).await? {
                Some(c) => return Ok(c),
                None if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(25)).await
                }
                None => {
                    return Err(
                        "an identical call with this Idempotency-Key is still in flight".into(),
                    )
                }
            }
        }
    }

    /// `None` while an identical call is in flight.
    async fn try_claim(&self, key: &str, hash: &str) -> Result<Option<Claim>, String> {
        let fresh = Record {
            hash: hash.to_owned(),
            done: None,
        };
        let existing = match &self.redis {
            Some(conn) => {
                let mut c = conn.clone();
                let body = serde_json::to_string(&fresh).map_err(|e| e.to_string())?;
                let set: Option<String> = redis::cmd("SET")
                    .arg(key)
                    .arg(&body)
                    .arg("NX")
                    .arg("PX")
                    .arg(self.ttl.as_millis() as u64)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| format!("redis: {e}"))?;
                if set.is_some() {
                    return Ok(Some(Claim::Owned));
                }
                let cur: Option<String> = redis::cmd("GET")
                    .arg(key)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| format!("redis: {e}"))?;
                match cur {
                    // Expired between the two commands: try again.
                    None => return Ok(None),
                    Some(s) => serde_json::from_str::<Record>(&s).map_err(|e| e.to_string())?,
                }
            }
            None => {
                let mut m = self.local.lock().expect("idempotency lock");
                let now = Instant::now();
                if m.len() > 100_000 {
                    m.retain(|_, (_, exp)| *exp > now);
                }
                match m.get(key) {
                    Some((r, exp)) if *exp > now => r.clone(),
                    _ => {
                        m.insert(key.to_owned(), (fresh, now + self.ttl));
                        return Ok(Some(Claim::Owned));
                    }
                }
            }
        };
        if existing.hash != hash {
            return Ok(Some(Claim::Conflict));
        }
        Ok(existing.done.map(Claim::Replay))
    }

    /// Store the response of an owned call.
    pub async fn complete(&self, key: &str, hash: &str, stored: Stored) {
        let rec = Record {
            hash: hash.to_owned(),
            done: Some(stored),
        };
        match &self.redis {
            Some(conn) => {
                let mut c = conn.clone();
                let body = serde_json::to_string(&rec).unwrap_or_default();
                let r: Result<(), _> = redis::cmd("SET")
                    .arg(key)
                    .arg(body)
                    .arg("PX")
                    .arg(self.ttl.as_millis() as u64)
                    .query_async(&mut c)
                    .await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "idempotency record not stored");
                }
            }
            None => {
                let mut m = self.local.lock().expect("idempotency lock");
                m.insert(key.to_owned(), (rec, Instant::now() + self.ttl));
            }
        }
    }

    /// Give up an owned claim (the call failed before a response): a retry is forwarded.
    pub async fn release(&self, key: &str) {
        match &self.redis {
            Some(conn) => {
                let mut c = conn.clone();
                let _: Result<(), _> = redis::cmd("DEL").arg(key).query_async(&mut c).await;
            }
            None => {
                self.local.lock().expect("idempotency lock").remove(key);
            }
        }
    }
}

/// A response body stored for replay.
pub fn stored(status: u16, content_type: Option<String>, body: &Bytes) -> Stored {
    Stored {
        status,
        content_type,
        body: body.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn claims_replays_and_conflicts() {
        let s = Idempotency::new(None, Duration::from_secs(60));
        let k = key("a", "t", "tool", "k1");
        assert_eq!(
            s.claim(&k, "h1", Duration::ZERO).await.unwrap(),
            Claim::Owned
        );
        // In flight: a twin waits and gives up at its deadline.
        assert!(s.claim(&k, "h1", Duration::from_millis(30)).await.is_err());
        assert_eq!(
            s.claim(&k, "h2", Duration::ZERO).await.unwrap(),
            Claim::Conflict
        );
        let st = stored(
            201,
            Some("application/json".into()),
            &Bytes::from_static(b"{}"),
        );
        s.complete(&k, "h1", st.clone()).await;
        assert_eq!(
            s.claim(&k, "h1", Duration::ZERO).await.unwrap(),
            Claim::Replay(st)
        );
        let k2 = key("a", "t", "tool", "k2");
        assert_eq!(
            s.claim(&k2, "h", Duration::ZERO).await.unwrap(),
            Claim::Owned
        );
        s.release(&k2).await;
        assert_eq!(
            s.claim(&k2, "h", Duration::ZERO).await.unwrap(),
            Claim::Owned,
            "released claims can be retried"
        );
    }
}
