//! The Redis backend: GCRA and budget reservations as Lua scripts, so every sidecar sharing
//! the Redis sees one set of limits. Scripts read the clock with `TIME` (the server's, not
//! the sidecars'), reservations carry an expiry in a sorted set per counter so a sidecar that
//! dies mid-call cannot hold budget forever, and every key shares one hash tag so a call's
//! keys live in one slot (Redis Cluster runs the scripts too).

use super::{Cap, Exceeded, RateCheck, Reservation, StoreError, Usage};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::Duration;

const PREFIX: &str = "tollgate:{tg}:";

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

/// Redis-backed limits.
pub struct RedisStore {
    conn: ConnectionManager,
    gcra: redis::Script,
    reserve: redis::Script,
    settle: redis::Script,
}

/// Errors after which the connection manager reconnects, so one retry may succeed.
fn reconnectable(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal()
}

fn err(e: redis::RedisError) -> StoreError {
    StoreError(format!("redis: {e}"))
}

impl RedisStore {
    /// Connect lazily to `url` (`redis://`, `rediss://`; Sentinel and Cluster URLs as the
    /// redis crate supports them).
    pub fn new(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("limits.url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("limits.url: {e}"))?;
        Ok(Self {
            conn,
            gcra: redis::Script::new(GCRA),
            reserve: redis::Script::new(RESERVE),
            settle: redis::Script::new(SETTLE),
        })
    }

    /// The shared connection (idempotency records use it too).
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Take one call; `Some(wait)` when limited.
    pub async fn gcra(&self, c: &RateCheck) -> Result<Option<Duration>, StoreError> {
        let interval_us = c.interval.as_micros().max(1) as u64;
        let mut attempt = 0;
        let wait: i64 = loop {
            let mut conn = self.conn.clone();
            let r = self
                .gcra
                .key(format!("{PREFIX}{}", c.key))
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
                .arg(format!("{PREFIX}{}", c.key))
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
            inv.key(format!("{PREFIX}{}", c.key));
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
            return Ok(Ok(()));
        }
        let idx = i.saturating_sub(1).min(caps.len().saturating_sub(1));
        Ok(Err(Exceeded {
            cap: caps[idx].clone(),
            usage: Usage { spent, reserved },
            amount: amounts[idx],
        }))
    }

    /// Settle to the actual amounts.
    pub async fn settle(&self, r: &Reservation, actual: &[i64]) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = self.settle.prepare_invoke();
        inv.arg(&r.id);
        for ((c, _), a) in r.entries.iter().zip(actual) {
            inv.key(format!("{PREFIX}{}", c.key));
            inv.arg(*a);
        }
        let _: i64 = inv.invoke_async(&mut conn).await.map_err(err)?;
        Ok(())
    }
}
