//! In-memory store for standalone mode: the same semantics as the Redis store behind one mutex.
//! Clones share state (one process, several engines).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Days, NaiveDate, TimeDelta, Utc};
use meshgate_storage::SharedClock;
use parking_lot::Mutex;

use super::{
    ChargeAmounts, ChargeOutcome, CounterView, DirtyUsage, QuotaStore, ReservationState, ReserveInput, ReserveOutcome,
    SeedRow, SettleOutcome,
};
use crate::Error;
use crate::model::{CounterState, LimitName, MinuteState, Scope};

/// Counters of days older than this (relative to the clock) are dropped once flushed.
const KEEP_DAYS: u64 = 2;
const SWEEP_EVERY: TimeDelta = TimeDelta::minutes(1);

type CounterKey = (Scope, NaiveDate);

#[derive(Debug, Default)]
struct Counter {
    used_tokens: i64,
    used_cost_micros: i64,
    requests: i64,
    reserved_tokens: i64,
    reserved_cost_micros: i64,
    holds: HashMap<String, Hold>,
    /// Seeded from the ledger (see the store semantics in `store`).
    seeded: bool,
}

#[derive(Debug, Clone, Copy)]
struct Hold {
    tokens: i64,
    cost_micros: i64,
    expires_at: DateTime<Utc>,
}

impl Counter {
    fn prune(&mut self, now: DateTime<Utc>) {
        let (tokens, cost) = (&mut self.reserved_tokens, &mut self.reserved_cost_micros);
        self.holds.retain(|_, hold| {
            let live = hold.expires_at > now;
            if !live {
                *tokens -= hold.tokens;
                *cost -= hold.cost_micros;
            }
            live
        });
    }

    fn state(&self) -> CounterState {
        CounterState {
            used_tokens: self.used_tokens,
            reserved_tokens: self.reserved_tokens,
            used_cost_micros: self.used_cost_micros,
            reserved_cost_micros: self.reserved_cost_micros,
            requests: self.requests,
        }
    }
}

/// Per-minute leaky buckets of one scope, as in the Redis store's bucket hash.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    requests: f64,
    tokens: f64,
    requests_limit: i64,
    tokens_limit: i64,
    updated_at: DateTime<Utc>,
}

impl Bucket {
    /// The levels drained to `now`.
    fn drained(&self, now: DateTime<Utc>) -> (f64, f64) {
        let elapsed = (now - self.updated_at).num_milliseconds().max(0) as f64;
        let drain = |level: f64, limit: i64| {
            if limit > 0 { (level - elapsed * limit as f64 / 60_000.0).max(0.0) } else { 0.0 }
        };
        (drain(self.requests, self.requests_limit), drain(self.tokens, self.tokens_limit))
    }
}

fn minute_state(bucket: Option<&Bucket>, now: DateTime<Utc>) -> MinuteState {
    let (requests, tokens) = bucket.map(|b| b.drained(now)).unwrap_or_default();
    MinuteState { requests: requests.ceil() as i64, tokens: tokens.ceil() as i64 }
}

/// Milliseconds until `level + amount` fits under `limit`, draining at `limit` per minute.
fn wait_ms(level: f64, amount: i64, limit: i64) -> i64 {
    if amount > limit {
        return 60_000;
    }
    ((level + amount as f64 - limit as f64) * 60_000.0 / limit as f64).ceil() as i64
}

#[derive(Debug)]
struct Record {
    state: ReservationState,
    counters: Vec<CounterKey>,
    estimate_tokens: i64,
    retain_until: DateTime<Utc>,
}

#[derive(Debug, Default)]
struct State {
    generation: Option<String>,
    counters: HashMap<CounterKey, Counter>,
    buckets: HashMap<Scope, Bucket>,
    records: HashMap<String, Record>,
    dirty: BTreeMap<CounterKey, i64>,
    next_sweep: Option<DateTime<Utc>>,
}

impl State {
    fn states(&self, keys: &[CounterKey]) -> Vec<CounterState> {
        keys.iter().map(|k| self.counters.get(k).map(Counter::state).unwrap_or_default()).collect()
    }

    /// Bounds memory: forgets records past retention and old days' counters once written out.
    fn sweep(&mut self, now: DateTime<Utc>) {
        if self.next_sweep.is_some_and(|at| now < at) {
            return;
        }
        self.next_sweep = Some(now + SWEEP_EVERY);
        self.records.retain(|_, r| r.retain_until > now);
        let oldest = now.date_naive().checked_sub_days(Days::new(KEEP_DAYS)).unwrap_or(NaiveDate::MIN);
        let dirty = &self.dirty;
        self.counters.retain(|key, _| key.1 >= oldest || dirty.contains_key(key));
        self.buckets.retain(|_, b| b.drained(now) != (0.0, 0.0));
    }

    fn unseeded(&self, keys: &[CounterKey]) -> Vec<usize> {
        (0..keys.len()).filter(|&i| !self.counters.get(&keys[i]).is_some_and(|c| c.seeded)).collect()
    }
}

/// The in-memory quota store; clones share one state.
#[derive(Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    clock: SharedClock,
    settled_retention: Duration,
    track_dirty: bool,
}

impl MemoryStore {
    /// A reservation's record is kept `settled_retention` past its expiry; `track_dirty` makes
    /// commits visible to the ledger flusher.
    pub fn new(clock: SharedClock, settled_retention: Duration, track_dirty: bool) -> Self {
        Self { state: Arc::default(), clock, settled_retention, track_dirty }
    }

    fn retention(&self) -> TimeDelta {
        TimeDelta::from_std(self.settled_retention).unwrap_or(TimeDelta::MAX)
    }

    fn settle(&self, reservation_id: &str, commit: Option<(i64, i64)>, now: DateTime<Utc>) -> SettleOutcome {
        let wanted = if commit.is_some() { ReservationState::Committed } else { ReservationState::Released };
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let Some(record) = state.records.get_mut(reservation_id).filter(|r| r.retain_until > now) else {
            return SettleOutcome::NotFound;
        };
        let keys = record.counters.clone();
        if record.state == wanted {
            let states = state.states(&keys);
            return SettleOutcome::Settled { replay: true, counters: zip(keys, states) };
        }
        if record.state != ReservationState::Reserved {
            return SettleOutcome::Conflict(record.state);
        }
        record.state = wanted;
        record.retain_until = now.checked_add_signed(self.retention()).unwrap_or(DateTime::<Utc>::MAX_UTC);
        let correction = (commit.map_or(0, |(tokens, _)| tokens) - record.estimate_tokens) as f64;
        for key in &keys {
            if let Some(bucket) = state.buckets.get_mut(&key.0).filter(|b| b.tokens_limit > 0) {
                let (requests, tokens) = bucket.drained(now);
                *bucket = Bucket { requests, tokens: (tokens + correction).max(0.0), updated_at: now, ..*bucket };
            }
            let counter = state.counters.entry(key.clone()).or_default();
            if let Some(hold) = counter.holds.remove(reservation_id) {
                counter.reserved_tokens -= hold.tokens;
                counter.reserved_cost_micros -= hold.cost_micros;
            }
            if let Some((tokens, cost)) = commit {
                counter.used_tokens += tokens;
                counter.used_cost_micros += cost;
                counter.requests += 1;
                if self.track_dirty {
                    *state.dirty.entry(key.clone()).or_default() += 1;
                }
            }
        }
        let states = state.states(&keys);
        SettleOutcome::Settled { replay: false, counters: zip(keys, states) }
    }
}

fn zip(keys: Vec<CounterKey>, states: Vec<CounterState>) -> Vec<(Scope, NaiveDate, CounterState)> {
    keys.into_iter().zip(states).map(|((scope, day), s)| (scope, day, s)).collect()
}

fn refuses(state: &CounterState, tokens_limit: i64, cost_limit: i64, tokens: i64, cost: i64) -> Option<LimitName> {
    let held_tokens = state.used_tokens + state.reserved_tokens;
    let held_cost = state.used_cost_micros + state.reserved_cost_micros;
    if tokens_limit > 0 && (held_tokens >= tokens_limit || held_tokens + tokens > tokens_limit) {
        return Some(LimitName::TokensPerDay);
    }
    if cost_limit > 0 && (held_cost >= cost_limit || held_cost + cost > cost_limit) {
        return Some(LimitName::CostMicrosPerDay);
    }
    None
}

#[async_trait]
impl QuotaStore for MemoryStore {
    async fn reserve(&self, input: &ReserveInput) -> Result<ReserveOutcome, Error> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        if state.generation != input.limits_generation {
            return Ok(ReserveOutcome::StaleLimits);
        }
        state.sweep(input.now);
        let keys: Vec<CounterKey> = input.counters.iter().map(|c| (c.scope.clone(), c.day)).collect();
        for key in &keys {
            if let Some(counter) = state.counters.get_mut(key) {
                counter.prune(input.now);
            }
        }
        if state.records.get(&input.reservation_id).is_some_and(|r| r.retain_until > input.now) {
            let minute = input.counters.iter().map(|c| minute_state(state.buckets.get(&c.scope), input.now)).collect();
            return Ok(ReserveOutcome::Admitted { existing: true, counters: state.states(&keys), minute });
        }
        let unseeded = state.unseeded(&keys);
        if !unseeded.is_empty() {
            return Ok(ReserveOutcome::Unseeded(unseeded));
        }
        let current = state.states(&keys);
        let levels: Vec<(f64, f64)> = input
            .counters
            .iter()
            .map(|c| state.buckets.get(&c.scope).map(|b| b.drained(input.now)).unwrap_or_default())
            .collect();
        for (i, (spec, s)) in input.counters.iter().zip(&current).enumerate() {
            if let Some(limit) = refuses(s, spec.tokens_limit, spec.cost_limit_micros, input.tokens, input.cost_micros)
            {
                return Ok(ReserveOutcome::Rejected { counter: i, limit, retry_after_ms: None, counters: current });
            }
            let (requests, tokens) = levels[i];
            let refused = if spec.requests_per_minute > 0 && requests + 1.0 > spec.requests_per_minute as f64 {
                Some((LimitName::RequestsPerMinute, wait_ms(requests, 1, spec.requests_per_minute)))
            } else if spec.tokens_per_minute > 0 && tokens + input.tokens as f64 > spec.tokens_per_minute as f64 {
                Some((LimitName::TokensPerMinute, wait_ms(tokens, input.tokens, spec.tokens_per_minute)))
            } else {
                None
            };
            if let Some((limit, wait)) = refused {
                return Ok(ReserveOutcome::Rejected {
                    counter: i,
                    limit,
                    retry_after_ms: Some(wait),
                    counters: current,
                });
            }
        }
        let hold = Hold { tokens: input.tokens, cost_micros: input.cost_micros, expires_at: input.expires_at };
        for (spec, (requests, tokens)) in input.counters.iter().zip(levels) {
            let counter = state.counters.entry((spec.scope.clone(), spec.day)).or_default();
            counter.reserved_tokens += hold.tokens;
            counter.reserved_cost_micros += hold.cost_micros;
            counter.holds.insert(input.reservation_id.clone(), hold);
            if spec.requests_per_minute > 0 || spec.tokens_per_minute > 0 {
                let bucket = Bucket {
                    requests: if spec.requests_per_minute > 0 { requests + 1.0 } else { 0.0 },
                    tokens: if spec.tokens_per_minute > 0 { tokens + input.tokens as f64 } else { 0.0 },
                    requests_limit: spec.requests_per_minute,
                    tokens_limit: spec.tokens_per_minute,
                    updated_at: input.now,
                };
                state.buckets.insert(spec.scope.clone(), bucket);
            }
        }
        let retain_until = input.expires_at.checked_add_signed(self.retention()).unwrap_or(DateTime::<Utc>::MAX_UTC);
        state.records.insert(
            input.reservation_id.clone(),
            Record {
                state: ReservationState::Reserved,
                counters: keys.clone(),
                estimate_tokens: input.tokens,
                retain_until,
            },
        );
        let minute = input.counters.iter().map(|c| minute_state(state.buckets.get(&c.scope), input.now)).collect();
        Ok(ReserveOutcome::Admitted { existing: false, counters: state.states(&keys), minute })
    }

    async fn commit(
        &self,
        reservation_id: &str,
        tokens: i64,
        cost_micros: i64,
        now: DateTime<Utc>,
    ) -> Result<SettleOutcome, Error> {
        Ok(self.settle(reservation_id, Some((tokens, cost_micros)), now))
    }

    async fn release(&self, reservation_id: &str, now: DateTime<Utc>) -> Result<SettleOutcome, Error> {
        Ok(self.settle(reservation_id, None, now))
    }

    async fn charge(
        &self,
        record_id: &str,
        counters: &[(Scope, NaiveDate)],
        amounts: ChargeAmounts,
        retention: Duration,
    ) -> Result<ChargeOutcome, Error> {
        let now = self.clock.now();
        let mut guard = self.state.lock();
        let state = &mut *guard;
        if state.records.get(record_id).is_some_and(|r| r.retain_until > now) {
            return Ok(ChargeOutcome::Exists);
        }
        let unseeded = state.unseeded(counters);
        if !unseeded.is_empty() {
            return Ok(ChargeOutcome::Unseeded(unseeded));
        }
        for key in counters {
            let counter = state.counters.entry(key.clone()).or_default();
            counter.used_tokens += amounts.tokens;
            counter.used_cost_micros += amounts.cost_micros;
            counter.requests += amounts.requests;
            if self.track_dirty {
                *state.dirty.entry(key.clone()).or_default() += 1;
            }
        }
        let retention = TimeDelta::from_std(retention).unwrap_or(TimeDelta::MAX);
        let retain_until = now.checked_add_signed(retention).unwrap_or(DateTime::<Utc>::MAX_UTC);
        state.records.insert(
            record_id.to_owned(),
            Record {
                state: ReservationState::Committed,
                counters: counters.to_vec(),
                estimate_tokens: 0,
                retain_until,
            },
        );
        Ok(ChargeOutcome::Charged(state.states(counters)))
    }

    async fn seed(&self, rows: &[SeedRow]) -> Result<(), Error> {
        let mut state = self.state.lock();
        for row in rows {
            let counter = state.counters.entry((row.scope.clone(), row.day)).or_default();
            if !counter.seeded {
                counter.used_tokens += row.usage.used_tokens;
                counter.used_cost_micros += row.usage.used_cost_micros;
                counter.requests += row.usage.requests;
                counter.seeded = true;
            }
        }
        Ok(())
    }

    async fn status(&self, counters: &[(Scope, NaiveDate)], now: DateTime<Utc>) -> Result<Vec<CounterView>, Error> {
        let mut state = self.state.lock();
        for key in counters {
            if let Some(counter) = state.counters.get_mut(key) {
                counter.prune(now);
            }
        }
        Ok(counters
            .iter()
            .map(|key| {
                let counter = state.counters.get(key);
                CounterView {
                    state: counter.map(Counter::state).unwrap_or_default(),
                    seeded: counter.is_some_and(|c| c.seeded),
                    minute: minute_state(state.buckets.get(&key.0), now),
                }
            })
            .collect())
    }

    async fn limits_generation(&self) -> Result<Option<String>, Error> {
        Ok(self.state.lock().generation.clone())
    }

    async fn bump_limits_generation(&self) -> Result<(), Error> {
        self.state.lock().generation = Some(uuid::Uuid::new_v4().simple().to_string());
        Ok(())
    }

    async fn dirty_usage(&self, max: usize) -> Result<Vec<DirtyUsage>, Error> {
        let state = self.state.lock();
        Ok(state
            .dirty
            .iter()
            .take(max.max(1))
            .map(|(key, version)| {
                let s = state.counters.get(key).map(Counter::state).unwrap_or_default();
                DirtyUsage {
                    scope: key.0.clone(),
                    day: key.1,
                    usage: CounterState {
                        used_tokens: s.used_tokens,
                        used_cost_micros: s.used_cost_micros,
                        requests: s.requests,
                        ..CounterState::default()
                    },
                    version: *version,
                }
            })
            .collect())
    }

    async fn clear_dirty(&self, written: &[DirtyUsage]) -> Result<(), Error> {
        let mut state = self.state.lock();
        for d in written {
            let key = (d.scope.clone(), d.day);
            if state.dirty.get(&key) == Some(&d.version) {
                state.dirty.remove(&key);
            }
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), Error> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
