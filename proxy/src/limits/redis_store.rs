//! The Redis backend: GCRA and budget reservations as Lua scripts, so every sidecar sharing
//! the Redis sees one set of limits. Scripts read the clock with `TIME` (the server's, not
//! the sidecars'), reservations carry an expiry in a sorted set per counter so a sidecar that
//! dies mid-call cannot hold budget forever, and every key carries one hash tag
//! (`limits.hashTag`, default `tg`) so all keys of a reservation live in one slot: Redis
//! Cluster runs the scripts atomically on one primary.
//!
//! Three topologies, all through the `redis` crate's own clients ([`RedisConn`]):
//! a single node (`limits.url`, a `ConnectionManager` that reconnects), Redis Sentinel
//! (`limits.sentinel`: the crate's `SentinelClient` asks the sentinels for the primary and
//! checks its `ROLE`), and Redis Cluster (`limits.cluster`: the crate's `ClusterClient`
//! follows `MOVED` and refreshes slots). After a connection error or a `READONLY` answer (a
//! primary demoted by a failover) the connection is dropped and the next command dials again,
//! which re-resolves the primary; until one answers, calls fail and `limits.onUnavailable`
//! decides.

use super::{Cap, Exceeded, RateCheck, Reservation, StoreError, Usage};
use crate::config::LimitsConfig;
use futures::future::BoxFuture;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, RedisFuture, RedisResult, Value};
use std::sync::Arc;
use std::time::Duration;

/// Connect and response timeout of every Redis command: a dead primary costs a call at most
/// this long before `limits.onUnavailable` applies.
const TIMEOUT: Duration = Duration::from_millis(500);

const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local ahead = new_tat - now
if ahead > burst * interval then
  return ahead - burst * interval
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil(ahead / 1000) + 1)
return -1
"#;

const RESERVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
local hold_ms = tonumber(ARGV[2])
for i = 1, #KEYS do
  local k = KEYS[i]
  local expired = redis.call('ZRANGEBYSCORE', k .. ':res', '-inf', now)
  for _, rid in ipairs(expired) do
    local amt = tonumber(redis.call('HGET', k .. ':amt', rid) or '0')
    redis.call('HINCRBY', k, 'reserved', -amt)
    redis.call('HDEL', k .. ':amt', rid)
    redis.call('ZREM', k .. ':res', rid)
  end
end
for i = 1, #KEYS do
  local k = KEYS[i]
  local cap = tonumber(ARGV[3 * i])
  local amt = tonumber(ARGV[3 * i + 1])
  local spent = tonumber(redis.call('HGET', k, 'spent') or '0')
  local reserved = tonumber(redis.call('HGET', k, 'reserved') or '0')
  if spent + reserved + amt > cap then
    return {0, i, spent, reserved}
  end
end
for i = 1, #KEYS do
  local k = KEYS[i]
  local amt = tonumber(ARGV[3 * i + 1])
  local ttl = tonumber(ARGV[3 * i + 2])
  redis.call('HINCRBY', k, 'reserved', amt)
  redis.call('HSET', k .. ':amt', id, amt)
  redis.call('ZADD', k .. ':res', now + hold_ms, id)
  redis.call('EXPIRE', k, ttl)
  redis.call('EXPIRE', k .. ':amt', ttl)
  redis.call('EXPIRE', k .. ':res', ttl)
end
return {1, 0, 0, 0}
"#;

const SETTLE: &str = r#"
local id = ARGV[1]
for i = 1, #KEYS do
  local k = KEYS[i]
  local amt = redis.call('HGET', k .. ':amt', id)
  if amt then
    redis.call('HINCRBY', k, 'reserved', -tonumber(amt))
    redis.call('HDEL', k .. ':amt', id)
    redis.call('ZREM', k .. ':res', id)
  end
  local actual = tonumber(ARGV[i + 1])
  if actual ~= 0 then
    redis.call('HINCRBY', k, 'spent', actual)
  end
end
return 1
"#;

/// A connection that is dialled on first use and dropped after an error that calls for a new
/// one, so the next command dials again (and, for Sentinel, asks for the primary again).
struct Redial<C> {
    slot: tokio::sync::Mutex<Option<C>>,
    dial: Box<dyn Fn() -> BoxFuture<'static, RedisResult<C>> + Send + Sync>,
}

impl<C: Clone> Redial<C> {
    async fn get(&self) -> RedisResult<C> {
        let mut slot = self.slot.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = match tokio::time::timeout(TIMEOUT * 2, (self.dial)()).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "dialling redis timed out",
                )))
            }
        };
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn after<T>(&self, r: &RedisResult<T>) {
        if let Err(e) = r {
            if redial(e) {
                *self.slot.lock().await = None;
            }
        }
    }
}

/// The connection to the limits Redis, whichever topology serves it.
#[derive(Clone)]
pub struct RedisConn(Topology);

#[derive(Clone)]
enum Topology {
    Single(ConnectionManager),
    Sentinel(Arc<Redial<redis::aio::MultiplexedConnection>>),
    Cluster(Arc<Redial<redis::cluster_async::ClusterConnection>>),
}

impl RedisConn {
    /// The topology `limits:` names: exactly one of `url`, `sentinel` and `cluster`.
    pub fn from_config(cfg: &LimitsConfig) -> Result<Self, String> {
        match (&cfg.url, &cfg.sentinel, &cfg.cluster) {
            (Some(url), None, None) => Self::single(url),
            (None, Some(s), None) => Self::sentinel(&s.urls, &s.master_name),
            (None, None, Some(c)) => Self::cluster(&c.urls),
            (None, None, None) => Err(
                "backend: redis needs one of limits.url, limits.sentinel, limits.cluster".into(),
            ),
            _ => Err(
                "limits.url, limits.sentinel and limits.cluster are alternatives; set exactly one"
                    .into(),
            ),
        }
    }

    fn single(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("limits.url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(TIMEOUT);
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("limits.url: {e}"))?;
        Ok(Self(Topology::Single(conn)))
    }

    fn sentinel(urls: &[String], master: &str) -> Result<Self, String> {
        if urls.is_empty() || master.is_empty() {
            return Err("limits.sentinel needs urls and masterName".into());
        }
        let client = redis::sentinel::SentinelClient::build(
            urls.to_vec(),
            master.to_string(),
            None,
            redis::sentinel::SentinelServerType::Master,
        )
        .map_err(|e| format!("limits.sentinel: {e}"))?;
        let client = Arc::new(tokio::sync::Mutex::new(client));
        let dial = move || -> BoxFuture<'static, RedisResult<_>> {
            let client = client.clone();
            Box::pin(async move {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(TIMEOUT))
                    .set_response_timeout(Some(TIMEOUT));
                // Asks a sentinel for the primary's address and checks its ROLE.
                client
                    .lock()
                    .await
                    .get_async_connection_with_config(&config)
                    .await
            })
        };
        Ok(Self(Topology::Sentinel(Arc::new(Redial {
            slot: Default::default(),
            dial: Box::new(dial),
        }))))
    }

    fn cluster(urls: &[String]) -> Result<Self, String> {
        if urls.is_empty() {
            return Err("limits.cluster needs urls (seed nodes)".into());
        }
        let client = redis::cluster::ClusterClientBuilder::new(urls.to_vec())
            .connection_timeout(TIMEOUT)
            .response_timeout(TIMEOUT)
            .retries(2)
            .min_retry_wait(50)
            .max_retry_wait(250)
            .build()
            .map_err(|e| format!("limits.cluster: {e}"))?;
        let client = Arc::new(client);
        let dial = move || -> BoxFuture<'static, RedisResult<_>> {
            let client = client.clone();
            Box::pin(async move { client.get_async_connection().await })
        };
        Ok(Self(Topology::Cluster(Arc::new(Redial {
            slot: Default::default(),
            dial: Box::new(dial),
        }))))
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Topology::Single(c) => c.req_packed_command(cmd),
            Topology::Sentinel(r) => Box::pin(async move {
                let mut c = r.get().await?;
                let out = c.req_packed_command(cmd).await;
                r.after(&out).await;
                out
            }),
            Topology::Cluster(r) => Box::pin(async move {
                let mut c = r.get().await?;
                let out = c.req_packed_command(cmd).await;
                r.after(&out).await;
                out
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Topology::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Topology::Sentinel(r) => Box::pin(async move {
                let mut c = r.get().await?;
                let out = c.req_packed_commands(pipeline, offset, count).await;
                r.after(&out).await;
                out
            }),
            Topology::Cluster(r) => Box::pin(async move {
                let mut c = r.get().await?;
                let out = c.req_packed_commands(pipeline, offset, count).await;
                r.after(&out).await;
                out
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Topology::Single(c) => c.get_db(),
            _ => 0,
        }
    }
}

/// Redis-backed limits.
pub struct RedisStore {
    conn: RedisConn,
    prefix: String,
    min_replicas: u32,
    gcra: redis::Script,
    reserve: redis::Script,
    settle: redis::Script,
}

/// Errors after which the connection is re-established, so one retry may succeed.
fn reconnectable(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
}

/// Errors after which a Sentinel or Cluster connection is dropped and dialled again: the node
/// is gone, or it is no longer the primary (a failover demoted it).
fn redial(e: &redis::RedisError) -> bool {
    reconnectable(e) || e.is_cluster_error()
}

fn err(e: redis::RedisError) -> StoreError {
    StoreError(format!("redis: {e}"))
}

/// The key prefix with its hash tag: `tollgate:{TAG}:`.
pub fn key_prefix(cfg: &LimitsConfig) -> Result<String, String> {
    let tag = cfg.hash_tag.as_deref().unwrap_or("tg");
    let ok = !tag.is_empty()
        && tag.len() <= 64
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        return Err(format!(
            "limits.hashTag {tag:?}: 1-64 characters of [A-Za-z0-9._-]"
        ));
    }
    Ok(format!("tollgate:{{{tag}}}:"))
}

impl RedisStore {
    /// Connect lazily to the topology `limits:` names.
    pub fn new(cfg: &LimitsConfig) -> Result<Self, String> {
        Ok(Self {
            conn: RedisConn::from_config(cfg)?,
            prefix: key_prefix(cfg)?,
            min_replicas: cfg.min_replicas,
            gcra: redis::Script::new(GCRA),
            reserve: redis::Script::new(RESERVE),
            settle: redis::Script::new(SETTLE),
        })
    }

    /// The shared connection (idempotency records use it too).
    pub fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    /// The key prefix (with the hash tag) every limits key starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Take one call; `Some(wait)` when limited.
    pub async fn gcra(&self, c: &RateCheck) -> Result<Option<Duration>, StoreError> {
        let interval_us = c.interval.as_micros().max(1) as u64;
        let mut attempt = 0;
        let wait: i64 = loop {
            let mut conn = self.conn.clone();
            let r = self
                .gcra
                .key(format!("{}{}", self.prefix, c.key))
                .arg(interval_us)
                .arg(c.burst)
                .invoke_async(&mut conn)
                .await;
            match r {
                Ok(w) => break w,
                // A dropped connection is re-established by the manager: one retry.
                Err(e) if attempt == 0 && reconnectable(&e) => attempt += 1,
                Err(e) => return Err(err(e)),
            }
        };
        Ok((wait >= 0).then(|| Duration::from_micros(wait as u64)))
    }

    /// Usage of each cap.
    pub async fn usage(&self, caps: &[Cap]) -> Result<Vec<Usage>, StoreError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for c in caps {
            pipe.cmd("HMGET")
                .arg(format!("{}{}", self.prefix, c.key))
                .arg("spent")
                .arg("reserved");
        }
        let rows: Vec<(Option<i64>, Option<i64>)> = match pipe.query_async(&mut conn).await {
            Ok(r) => r,
            Err(e) if reconnectable(&e) => {
                let mut conn = self.conn.clone();
                pipe.query_async(&mut conn).await.map_err(err)?
            }
            Err(e) => return Err(err(e)),
        };
        Ok(rows
            .into_iter()
            .map(|(s, r)| Usage {
                spent: s.unwrap_or(0),
                reserved: r.unwrap_or(0),
            })
            .collect())
    }

    /// Reserve all or nothing.
    pub async fn reserve(
        &self,
        id: &str,
        caps: &[Cap],
        amounts: &[i64],
        hold: Duration,
    ) -> Result<Result<(), Exceeded>, StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = self.reserve.prepare_invoke();
        inv.arg(id).arg(hold.as_millis() as u64);
        for (c, &a) in caps.iter().zip(amounts) {
            inv.key(format!("{}{}", self.prefix, c.key));
            inv.arg(c.cap).arg(a).arg(c.ttl.as_secs().max(1));
        }
        let (ok, i, spent, reserved): (i64, usize, i64, i64) =
            match inv.invoke_async(&mut conn).await {
                Ok(r) => r,
                Err(e) if reconnectable(&e) => {
                    let mut conn = self.conn.clone();
                    inv.invoke_async(&mut conn).await.map_err(err)?
                }
                Err(e) => return Err(err(e)),
            };
        if ok == 1 {
            if let Err(e) = self.replicated("reservation").await {
                // Not durable: a failover could lose it and let the cap be overspent.
                let entries = caps.iter().cloned().zip(amounts.iter().copied()).collect();
                let held = Reservation {
                    id: id.to_string(),
                    entries,
                    held: super::Held::Redis,
                };
                let _ = self.settle_only(&held, &vec![0; caps.len()]).await;
                return Err(e);
            }
            return Ok(Ok(()));
        }
        let idx = i.saturating_sub(1).min(caps.len().saturating_sub(1));
        Ok(Err(Exceeded {
            cap: caps[idx].clone(),
            usage: Usage { spent, reserved },
            amount: amounts[idx],
        }))
    }

    /// Wait until `limits.minReplicas` replicas hold every write so far (Redis `WAIT`; on a
    /// Cluster, every primary's replicas).
    async fn replicated(&self, what: &str) -> Result<(), StoreError> {
        if self.min_replicas == 0 {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let acked: i64 = redis::cmd("WAIT")
            .arg(self.min_replicas)
            .arg((TIMEOUT / 2).as_millis() as u64)
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        if acked < i64::from(self.min_replicas) {
            return Err(StoreError(format!(
                "redis: the {what} reached {acked} of limits.minReplicas {} replicas in time",
                self.min_replicas
            )));
        }
        Ok(())
    }

    /// Settle to the actual amounts, durably when `limits.minReplicas` is set.
    pub async fn settle(&self, r: &Reservation, actual: &[i64]) -> Result<(), StoreError> {
        self.settle_only(r, actual).await?;
        self.replicated("settlement").await
    }

    async fn settle_only(&self, r: &Reservation, actual: &[i64]) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = self.settle.prepare_invoke();
        inv.arg(&r.id);
        for ((c, _), a) in r.entries.iter().zip(actual) {
            inv.key(format!("{}{}", self.prefix, c.key));
            inv.arg(*a);
        }
        let _: i64 = inv.invoke_async(&mut conn).await.map_err(err)?;
        Ok(())
    }
}
