//! Redis store. Key layout under the configured prefix `P` (default `meshgate:quota:`):
//!
//! | key | type | content |
//! |---|---|---|
//! | `P gen` | string | limits generation, replaced on every limit change |
//! | `P c:<YYYYMMDD>:<kind>:<id>` | hash | `ut`/`uc` used tokens/cost, `rt`/`rc` reserved, `lt`/`lc` the leased part of reserved, `n` commits; TTL 3 days after last touch |
//! | `P z:<YYYYMMDD>:<kind>:<id>` | zset | open reservations `<rid>\|<tokens>\|<cost>` scored by expiry (ms) |
//! | `P r:<rid>` | hash | reservation (or charge, `chg_…`) record: `st` (r/c/x), `t`, `c`, `m` (zset member), `s` (counter suffixes), `b` (token buckets charged); or lease (`lse_…`) record: `st` l, `q` last sequence, `s`, `ht`/`hc`/`hr`/`hk` its hold, `e` expiry, `m`/`mm` its members |
//! | `P m:<kind>:<id>` | hash | per-minute leaky buckets: levels `r`/`k`, limits `rl`/`kl`, last update `t` (ms) |
//! | `P mh:<kind>:<id>` | hash | what leases hold of the per-minute limits: requests `r`, tokens `k` |
//! | `P mz:<kind>:<id>` | zset | those holds, `<lease id>\|<requests>\|<tokens>` scored by expiry (ms) |
//! | `P dirty` | hash | counter suffix -> change version, for the ledger flusher |
//!
//! A counter hash carries `s` once it was seeded from the usage ledger; one without it (a new
//! day, or Redis lost its data) is seeded before anything is reserved against it.
//!
//! A reservation's hold lives in its counters' zsets, with the amounts in the member itself, so
//! an expired hold is released by whichever script next touches the counter — no key expiry
//! notifications, no background sweeper, nothing lost when a gateway dies.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use meshgate_storage::{RedisConnection, ping_redis};
use redis::{Script, Value};

use super::{
    ChargeAmounts, ChargeOutcome, CounterSpec, CounterView, DirtyUsage, LeaseAmounts, LeaseHeld, LeaseInput,
    LeaseOutcome, QuotaStore, ReservationState, ReserveInput, ReserveOutcome, SLICE_DIVISOR, SeedRow, SettleOutcome,
    day_key, parse_day_key,
};
use crate::Error;
use crate::model::{CounterState, LimitName, MinuteState, Scope, ScopeKind};

/// Counters outlive their day by long enough for late commits and the ledger flusher.
const COUNTER_TTL: Duration = Duration::from_secs(3 * 86_400);

const RESERVE: &str = concat!(include_str!("lua/common.lua"), include_str!("lua/reserve.lua"));
const SETTLE: &str = concat!(include_str!("lua/common.lua"), include_str!("lua/settle.lua"));
const STATUS: &str = concat!(include_str!("lua/common.lua"), include_str!("lua/status.lua"));
const LEASE: &str = concat!(include_str!("lua/common.lua"), include_str!("lua/lease.lua"));
const CHARGE: &str = concat!(include_str!("lua/common.lua"), include_str!("lua/charge.lua"));
const SEED: &str = include_str!("lua/seed.lua");
const CLEAR_DIRTY: &str = include_str!("lua/clear_dirty.lua");

/// Settings of a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisStoreSettings {
    /// Prefix of every key (tests use a unique one each).
    pub key_prefix: String,
    /// How long a reservation record outlives its reservation's expiry or settlement, so replays
    /// of Reserve/Commit/Release are answered consistently.
    pub settled_retention: Duration,
    /// Whether commits mark counters dirty for the ledger (only when a ledger is written).
    pub track_dirty: bool,
    /// A reservation script Redis runs this long after it was sent holds nothing: its caller has
    /// given up by then (the connection's response timeout), as when a stalled Redis runs the
    /// scripts queued while it was stopped. Without this the hold would outlive everyone until its
    /// TTL. Measured on Redis's clock: this host's is mapped onto it (see `clock_offset_ms`).
    pub late_after: Duration,
}

/// How long a measured offset between this host's clock and Redis's is used.
const CLOCK_OFFSET_TTL: Duration = Duration::from_secs(30);

/// The quota store shared by every replica.
pub struct RedisStore {
    conn: RedisConnection,
    settings: RedisStoreSettings,
    /// Redis's clock minus this host's (ms) and when that was measured: a reservation's deadline
    /// is set on Redis's clock, so the two hosts' clocks need not agree.
    clock_offset: parking_lot::Mutex<Option<(i64, std::time::Instant)>>,
    reserve: Script,
    settle: Script,
    status: Script,
    lease: Script,
    charge: Script,
    seed: Script,
    clear_dirty: Script,
}

impl RedisStore {
    pub fn new(conn: RedisConnection, settings: RedisStoreSettings) -> Self {
        Self {
            conn,
            settings,
            clock_offset: parking_lot::Mutex::new(None),
            reserve: Script::new(RESERVE),
            settle: Script::new(SETTLE),
            status: Script::new(STATUS),
            lease: Script::new(LEASE),
            charge: Script::new(CHARGE),
            seed: Script::new(SEED),
            clear_dirty: Script::new(CLEAR_DIRTY),
        }
    }

    /// Redis's clock minus this host's in ms, measured with `TIME` at most every
    /// [`CLOCK_OFFSET_TTL`]. Taken against the end of the round trip, it errs by at most the round
    /// trip towards a deadline that comes early, never late.
    async fn clock_offset_ms(&self) -> Result<i64, Error> {
        if let Some((offset, at)) = *self.clock_offset.lock()
            && at.elapsed() < CLOCK_OFFSET_TTL
        {
            return Ok(offset);
        }
        let mut conn = self.conn.clone();
        let (seconds, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let offset = seconds * 1_000 + micros / 1_000 - epoch_ms(Utc::now());
        *self.clock_offset.lock() = Some((offset, std::time::Instant::now()));
        Ok(offset)
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.settings.key_prefix)
    }

    fn counter_keys(&self, scope: &Scope, day: NaiveDate) -> (String, String) {
        let suffix = suffix(scope, day);
        (self.key(&format!("c:{suffix}")), self.key(&format!("z:{suffix}")))
    }

    /// The per-minute bucket of a scope, and the hash and zset of what leases hold of it.
    fn minute_keys(&self, scope: &Scope) -> [String; 3] {
        let scope = format!("{}:{}", scope.kind.as_str(), scope.id);
        [self.key(&format!("m:{scope}")), self.key(&format!("mh:{scope}")), self.key(&format!("mz:{scope}"))]
    }

    fn record_key(&self, reservation_id: &str) -> String {
        self.key(&format!("r:{reservation_id}"))
    }

    async fn settle(
        &self,
        reservation_id: &str,
        mode: &str,
        tokens: i64,
        cost: i64,
        now: DateTime<Utc>,
    ) -> Result<SettleOutcome, Error> {
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self
            .settle
            .key(self.record_key(reservation_id))
            .key(self.key("dirty"))
            .arg(&self.settings.key_prefix)
            .arg(mode)
            .arg(tokens)
            .arg(cost)
            .arg(ms(self.settings.settled_retention))
            .arg(ms(COUNTER_TTL))
            .arg(if self.settings.track_dirty { "1" } else { "0" })
            .arg(epoch_ms(now))
            .invoke_async(&mut conn)
            .await?;
        let status = reply.first().map(text).transpose()?.unwrap_or_default();
        match status.as_str() {
            "missing" => Ok(SettleOutcome::NotFound),
            "conflict" => {
                let state = reply.get(1).map(text).transpose()?.unwrap_or_default();
                Ok(SettleOutcome::Conflict(parse_state(&state)?))
            }
            "ok" | "replay" => {
                let suffixes = reply.get(1).map(text).transpose()?.unwrap_or_default();
                let scopes =
                    suffixes.split('\n').filter(|s| !s.is_empty()).map(parse_suffix).collect::<Result<Vec<_>, _>>()?;
                let values = integers(&reply[2.min(reply.len())..])?;
                let states = counter_states(&values, scopes.len())?;
                Ok(SettleOutcome::Settled {
                    replay: status == "replay",
                    counters: scopes.into_iter().zip(states).map(|((scope, day), s)| (scope, day, s)).collect(),
                })
            }
            other => Err(Error::StoreReply(format!("settle script answered {other:?}"))),
        }
    }
}

/// `<YYYYMMDD>:<kind>:<id>`; the id comes last so it may contain ':'.
fn suffix(scope: &Scope, day: NaiveDate) -> String {
    format!("{}:{}:{}", day_key(day), scope.kind.as_str(), scope.id)
}

fn parse_suffix(s: &str) -> Result<(Scope, NaiveDate), Error> {
    let bad = || Error::StoreReply(format!("malformed counter key suffix {s:?}"));
    let mut parts = s.splitn(3, ':');
    let day = parts.next().and_then(parse_day_key).ok_or_else(bad)?;
    let kind = parts.next().and_then(ScopeKind::parse).ok_or_else(bad)?;
    let id = parts.next().filter(|id| !id.is_empty()).ok_or_else(bad)?;
    Ok((Scope { kind, id: id.to_owned() }, day))
}

fn parse_state(s: &str) -> Result<ReservationState, Error> {
    match s {
        "r" => Ok(ReservationState::Reserved),
        "c" => Ok(ReservationState::Committed),
        "x" => Ok(ReservationState::Released),
        other => Err(Error::StoreReply(format!("unknown reservation state {other:?}"))),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn epoch_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn text(v: &Value) -> Result<String, Error> {
    match v {
        Value::BulkString(bytes) => Ok(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Ok(s.clone()),
        other => Err(Error::StoreReply(format!("expected a string, got {other:?}"))),
    }
}

fn integers(values: &[Value]) -> Result<Vec<i64>, Error> {
    values
        .iter()
        .map(|v| match v {
            Value::Int(i) => Ok(*i),
            other => Err(Error::StoreReply(format!("expected an integer, got {other:?}"))),
        })
        .collect()
}

/// Splits `n` counters of `width` integers each, after checking the reply's length.
fn chunks(values: &[i64], n: usize, width: usize) -> Result<std::slice::ChunksExact<'_, i64>, Error> {
    if values.len() != n * width {
        return Err(Error::StoreReply(format!("expected {} counter values, got {}", n * width, values.len())));
    }
    Ok(values.chunks_exact(width))
}

fn counter_state(c: &[i64]) -> CounterState {
    CounterState {
        used_tokens: c[0],
        reserved_tokens: c[1],
        used_cost_micros: c[2],
        reserved_cost_micros: c[3],
        requests: c[4],
    }
}

fn counter_states(values: &[i64], n: usize) -> Result<Vec<CounterState>, Error> {
    Ok(chunks(values, n, 5)?.map(counter_state).collect())
}

/// Counter indexes (1-based in scripts) turned into positions, each checked against `n`.
fn unseeded_positions(values: &[i64], n: usize) -> Result<Vec<usize>, Error> {
    values
        .iter()
        .map(|&i| {
            usize::try_from(i - 1)
                .ok()
                .filter(|i| *i < n)
                .ok_or_else(|| Error::StoreReply(format!("script named unknown counter {i}")))
        })
        .collect()
}

#[async_trait]
impl QuotaStore for RedisStore {
    async fn reserve(&self, input: &ReserveInput) -> Result<ReserveOutcome, Error> {
        let n = input.counters.len();
        let member = format!("{}|{}|{}", input.reservation_id, input.tokens, input.cost_micros);
        let suffixes: Vec<String> = input.counters.iter().map(|c| suffix(&c.scope, c.day)).collect();
        let mut invocation = self.reserve.key(self.key("gen"));
        invocation.key(self.record_key(&input.reservation_id));
        for CounterSpec { scope, day, .. } in &input.counters {
            let (counter, zset) = self.counter_keys(scope, *day);
            invocation.key(counter).key(zset).key(&self.minute_keys(scope)[..]);
        }
        invocation
            .arg(input.limits_generation.as_deref().unwrap_or(""))
            .arg(epoch_ms(input.now))
            .arg(epoch_ms(input.expires_at))
            .arg(input.tokens)
            .arg(input.cost_micros)
            .arg(member)
            .arg(ms((input.expires_at - input.now).to_std().unwrap_or_default() + self.settings.settled_retention))
            .arg(ms(COUNTER_TTL))
            .arg(suffixes.join("\n"))
            .arg(input.leased_retry_after_ms.max(1))
            .arg(
                (epoch_ms(Utc::now()) + self.clock_offset_ms().await?)
                    .saturating_add(i64::try_from(self.settings.late_after.as_millis()).unwrap_or(i64::MAX)),
            );
        for c in &input.counters {
            invocation.arg(c.tokens_limit).arg(c.cost_limit_micros).arg(c.requests_per_minute).arg(c.tokens_per_minute);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = invocation.invoke_async(&mut conn).await?;
        let values = integers(&reply)?;
        match values.first() {
            Some(4) => Err(Error::Unavailable(format!(
                "the quota store ran the reservation more than {} ms after it was sent",
                self.settings.late_after.as_millis()
            ))),
            Some(2) => Ok(ReserveOutcome::StaleLimits),
            Some(3) => Ok(ReserveOutcome::Unseeded(unseeded_positions(&values[1..], n)?)),
            Some(0) if values.len() >= 2 => {
                let (counters, minute) = chunks(&values[2..], n, 7)?
                    .map(|c| (counter_state(c), MinuteState { requests: c[5], tokens: c[6] }))
                    .unzip();
                Ok(ReserveOutcome::Admitted { existing: values[1] == 1, counters, minute })
            }
            Some(1) if values.len() >= 4 => {
                let counter = unseeded_positions(&values[1..2], n)?[0];
                let limit = LimitName::from_code(values[2])
                    .ok_or_else(|| Error::StoreReply(format!("reserve refused by unknown limit {}", values[2])))?;
                // A daily refusal waits for the window's reset (0) unless only leases hold its budget.
                let retry_after_ms = (matches!(limit, LimitName::RequestsPerMinute | LimitName::TokensPerMinute)
                    || values[3] > 0)
                    .then_some(values[3]);
                let counters = chunks(&values[4..], n, 7)?.map(counter_state).collect();
                Ok(ReserveOutcome::Rejected { counter, limit, retry_after_ms, counters })
            }
            _ => Err(Error::StoreReply(format!("reserve script answered {values:?}"))),
        }
    }

    async fn commit(
        &self,
        reservation_id: &str,
        tokens: i64,
        cost_micros: i64,
        now: DateTime<Utc>,
    ) -> Result<SettleOutcome, Error> {
        self.settle(reservation_id, "c", tokens, cost_micros, now).await
    }

    async fn release(&self, reservation_id: &str, now: DateTime<Utc>) -> Result<SettleOutcome, Error> {
        self.settle(reservation_id, "x", 0, 0, now).await
    }

    async fn lease(&self, input: &LeaseInput) -> Result<LeaseOutcome, Error> {
        let n = input.counters.len();
        let suffixes: Vec<String> = input.counters.iter().map(|c| suffix(&c.scope, c.day)).collect();
        let mut invocation = self.lease.key(self.key("gen"));
        invocation.key(self.record_key(&input.lease_id)).key(self.key("dirty"));
        for CounterSpec { scope, day, .. } in &input.counters {
            let (counter, zset) = self.counter_keys(scope, *day);
            invocation.key(counter).key(zset).key(&self.minute_keys(scope)[..]);
        }
        let lifetime = (input.expires_at - input.now).to_std().unwrap_or_default();
        invocation
            .arg(input.limits_generation.as_deref().unwrap_or(""))
            .arg(epoch_ms(input.now))
            .arg(epoch_ms(input.expires_at))
            .arg(input.sequence)
            .arg(ms(lifetime + input.retention))
            .arg(ms(COUNTER_TTL))
            .arg(if self.settings.track_dirty { "1" } else { "0" })
            .arg(suffixes.join("\n"))
            .arg(&self.settings.key_prefix)
            .arg(&input.lease_id);
        let spent = input.spent;
        invocation.arg(spent.tokens).arg(spent.cost_micros).arg(spent.started_requests).arg(spent.settled_requests);
        for amounts in [input.keep, input.want, input.need] {
            invocation.arg(&amounts.to_array()[..]);
        }
        invocation.arg(SLICE_DIVISOR);
        for c in &input.counters {
            invocation.arg(c.tokens_limit).arg(c.cost_limit_micros).arg(c.requests_per_minute).arg(c.tokens_per_minute);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = invocation.invoke_async(&mut conn).await?;
        let values = integers(&reply)?;
        match values.first() {
            Some(2) => Ok(LeaseOutcome::StaleLimits),
            Some(3) => Ok(LeaseOutcome::Unseeded(unseeded_positions(&values[1..], n)?)),
            Some(0) if values.len() >= 10 => {
                let low = match values[3] {
                    0 => None,
                    counter => {
                        let counter = unseeded_positions(&[counter], n)?[0];
                        let limit = LimitName::from_code(values[4])
                            .ok_or_else(|| Error::StoreReply(format!("lease names unknown limit {}", values[4])))?;
                        Some((counter, limit))
                    }
                };
                let expires_at = DateTime::from_timestamp_millis(values[9])
                    .ok_or_else(|| Error::StoreReply(format!("lease expiry {} is out of range", values[9])))?;
                let (counters, minute) = chunks(&values[10..], n, 7)?
                    .map(|c| (counter_state(c), MinuteState { requests: c[5], tokens: c[6] }))
                    .unzip();
                Ok(LeaseOutcome::Held(LeaseHeld {
                    replay: values[1] == 1,
                    window_ended: values[2] == 1,
                    low,
                    held: LeaseAmounts::from_array([values[5], values[6], values[7], values[8]]),
                    expires_at,
                    counters,
                    minute,
                }))
            }
            _ => Err(Error::StoreReply(format!("lease script answered {values:?}"))),
        }
    }

    async fn charge(
        &self,
        record_id: &str,
        counters: &[(Scope, NaiveDate)],
        amounts: ChargeAmounts,
        retention: Duration,
    ) -> Result<ChargeOutcome, Error> {
        let suffixes: Vec<String> = counters.iter().map(|(scope, day)| suffix(scope, *day)).collect();
        let mut invocation = self.charge.key(self.record_key(record_id));
        invocation.key(self.key("dirty"));
        for (scope, day) in counters {
            invocation.key(self.counter_keys(scope, *day).0);
        }
        invocation
            .arg(amounts.tokens)
            .arg(amounts.cost_micros)
            .arg(amounts.requests)
            .arg(ms(retention))
            .arg(ms(COUNTER_TTL))
            .arg(if self.settings.track_dirty { "1" } else { "0" })
            .arg(suffixes.join("\n"));
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = invocation.invoke_async(&mut conn).await?;
        let status = reply.first().map(text).transpose()?.unwrap_or_default();
        let rest = integers(&reply[1.min(reply.len())..])?;
        match status.as_str() {
            "exists" => Ok(ChargeOutcome::Exists),
            "seed" => Ok(ChargeOutcome::Unseeded(unseeded_positions(&rest, counters.len())?)),
            "ok" => Ok(ChargeOutcome::Charged(counter_states(&rest, counters.len())?)),
            other => Err(Error::StoreReply(format!("charge script answered {other:?}"))),
        }
    }

    async fn seed(&self, rows: &[SeedRow]) -> Result<(), Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut invocation = self.seed.prepare_invoke();
        invocation.arg(ms(COUNTER_TTL));
        for row in rows {
            invocation.key(self.counter_keys(&row.scope, row.day).0);
            invocation.arg(row.usage.used_tokens).arg(row.usage.used_cost_micros).arg(row.usage.requests);
        }
        let mut conn = self.conn.clone();
        let _: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }

    async fn status(&self, counters: &[(Scope, NaiveDate)], now: DateTime<Utc>) -> Result<Vec<CounterView>, Error> {
        if counters.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.status.prepare_invoke();
        for (scope, day) in counters {
            let (counter, zset) = self.counter_keys(scope, *day);
            invocation.key(counter).key(zset).key(&self.minute_keys(scope)[..]);
        }
        invocation.arg(epoch_ms(now));
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = invocation.invoke_async(&mut conn).await?;
        Ok(chunks(&integers(&reply)?, counters.len(), 12)?
            .map(|c| CounterView {
                state: counter_state(c),
                seeded: c[5] == 1,
                minute: MinuteState { requests: c[6], tokens: c[7] },
                leased: LeaseAmounts::from_array([c[8], c[9], c[10], c[11]]),
            })
            .collect())
    }

    async fn limits_generation(&self) -> Result<Option<String>, Error> {
        let mut conn = self.conn.clone();
        let generation: Option<String> = redis::cmd("GET").arg(self.key("gen")).query_async(&mut conn).await?;
        Ok(generation)
    }

    async fn bump_limits_generation(&self) -> Result<(), Error> {
        // A fresh random value rather than INCR: after Redis loses its data a counter could
        // restart at a value some replica still caches.
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(self.key("gen"))
            .arg(uuid::Uuid::new_v4().simple().to_string())
            .exec_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn dirty_usage(&self, max: usize) -> Result<Vec<DirtyUsage>, Error> {
        let mut conn = self.conn.clone();
        // Versions first, values second: a change in between leaves a newer version behind, so the
        // entry stays dirty and is written again.
        let flat: Vec<String> = redis::cmd("HRANDFIELD")
            .arg(self.key("dirty"))
            .arg(max.max(1))
            .arg("WITHVALUES")
            .query_async(&mut conn)
            .await?;
        if flat.is_empty() {
            return Ok(Vec::new());
        }
        let mut entries = Vec::with_capacity(flat.len() / 2);
        let mut pipe = redis::pipe();
        for pair in flat.chunks_exact(2) {
            let (scope, day) = parse_suffix(&pair[0])?;
            let version: i64 = pair[1]
                .parse()
                .map_err(|_| Error::StoreReply(format!("dirty version {:?} is not an integer", pair[1])))?;
            pipe.cmd("HMGET").arg(self.key(&format!("c:{}", pair[0]))).arg("ut").arg("uc").arg("n");
            entries.push((scope, day, version));
        }
        let values: Vec<(Option<i64>, Option<i64>, Option<i64>)> = pipe.query_async(&mut conn).await?;
        Ok(entries
            .into_iter()
            .zip(values)
            .map(|((scope, day, version), (tokens, cost, requests))| DirtyUsage {
                scope,
                day,
                usage: CounterState {
                    used_tokens: tokens.unwrap_or(0),
                    used_cost_micros: cost.unwrap_or(0),
                    requests: requests.unwrap_or(0),
                    ..CounterState::default()
                },
                version,
            })
            .collect())
    }

    async fn clear_dirty(&self, written: &[DirtyUsage]) -> Result<(), Error> {
        if written.is_empty() {
            return Ok(());
        }
        let mut invocation = self.clear_dirty.key(self.key("dirty"));
        for d in written {
            invocation.arg(suffix(&d.scope, d.day)).arg(d.version);
        }
        let mut conn = self.conn.clone();
        let _: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), Error> {
        Ok(ping_redis(&self.conn).await?)
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_round_trip_even_with_colons_in_ids() {
        let scope = Scope { kind: ScopeKind::User, id: "auth0:123:x".into() };
        let day = NaiveDate::from_ymd_opt(2031, 1, 2).unwrap();
        let s = suffix(&scope, day);
        assert_eq!(s, "20310102:user:auth0:123:x");
        assert_eq!(parse_suffix(&s).unwrap(), (scope, day));
        assert!(parse_suffix("2031:user:x").is_err());
        assert!(parse_suffix("20310102:team:x").is_err());
        assert!(parse_suffix("20310102:user:").is_err());
    }
}
