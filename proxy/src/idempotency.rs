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
pub(crate) const MAX_STORED_BODY: usize = 1024 * 1024;

/// A stored response: status, the end-to-end headers that describe the body and the result
/// (`Content-Type`, `Content-Encoding`, `Location`, ...), and the body exactly as the upstream
/// sent it, so a replay is labelled as the original was.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    /// Status code.
    pub status: u16,
    /// Content type, if any (kept apart for records written before `headers`).
    pub content_type: Option<String>,
    /// Replayed headers, in order.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Body (base64 in Redis).
    #[serde(with = "b64")]
    pub body: Vec<u8>,
}

/// Response headers not replayed: hop-by-hop ones, framing (recomputed), per-response ones
/// (`Date`, cookies, the original run id) and the proxy's own.
fn replayed(name: &str) -> bool {
    !(matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
            | "date"
            | "set-cookie"
            | "age"
    ) || name.starts_with("x-tollgate-"))
}

mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};
    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
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
pub(crate) fn key(agent: &str, tenant: &str, tool: &str, header: &str) -> String {
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

/// A response stored for replay.
pub(crate) fn stored(status: u16, headers: &http::HeaderMap, body: &Bytes) -> Stored {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let headers = headers
        .iter()
        .filter(|(k, _)| replayed(k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    Stored {
        status,
        content_type,
        headers,
        body: body.to_vec(),
    }
}

/// The answer to a retry of a completed call: the stored response, marked
/// `x-tollgate-idempotent-replay: true`.
pub(crate) fn replay_response(stored: Stored, run: &str) -> http::Response<crate::body::ResBody> {
    use http::{HeaderName, HeaderValue};
    let mut res = http::Response::new(crate::body::full(Bytes::from(stored.body)));
    *res.status_mut() = http::StatusCode::from_u16(stored.status).unwrap_or(http::StatusCode::OK);
    let h = res.headers_mut();
    for (k, v) in &stored.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            if replayed(k.as_str()) {
                h.append(k, v);
            }
        }
    }
    if let Some(ct) = stored
        .content_type
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        h.insert(http::header::CONTENT_TYPE, ct);
    }
    h.insert(
        "x-tollgate-idempotent-replay",
        HeaderValue::from_static("true"),
    );
    crate::upstream::forward::response_headers(h, run);
    res
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
        let mut h = http::HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        h.insert("content-encoding", "gzip".parse().unwrap());
        h.insert("location", "/v1/refunds/re_1".parse().unwrap());
        h.insert("set-cookie", "s=1".parse().unwrap());
        h.insert("x-tollgate-run", "run_old".parse().unwrap());
        let st = stored(201, &h, &Bytes::from_static(b"\x1f\x8b"));
        let res = replay_response(st.clone(), "run_new");
        assert_eq!(res.status(), 201);
        let rh = res.headers();
        assert_eq!(rh["content-encoding"], "gzip", "the body keeps its label");
        assert_eq!(rh["location"], "/v1/refunds/re_1");
        assert_eq!(rh["x-tollgate-run"], "run_new");
        assert_eq!(rh["x-tollgate-idempotent-replay"], "true");
        assert!(!rh.contains_key("set-cookie"));
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
