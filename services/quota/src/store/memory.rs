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
    ChargeAmounts, ChargeOutcome, CounterView, DirtyUsage, LEASE_PREFIX, LeaseAmounts, LeaseHeld, LeaseInput,
    LeaseOutcome, QuotaStore, ReservationState, ReserveInput, ReserveOutcome, SLICE_DIVISOR, SeedRow, SettleOutcome,
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
    /// The part of the reserved amounts that leases hold.
    leased_tokens: i64,
    leased_cost_micros: i64,
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
        let expired: Vec<String> =
            self.holds.iter().filter(|(_, hold)| hold.expires_at <= now).map(|(id, _)| id.clone()).collect();
        for id in expired {
            self.remove_hold(&id);
        }
    }

    fn add_hold(&mut self, id: &str, hold: Hold) {
        self.reserved_tokens += hold.tokens;
        self.reserved_cost_micros += hold.cost_micros;
        if id.starts_with(LEASE_PREFIX) {
            self.leased_tokens += hold.tokens;
            self.leased_cost_micros += hold.cost_micros;
        }
        self.holds.insert(id.to_owned(), hold);
    }

    /// Releases what `id` holds, if it still holds anything.
    fn remove_hold(&mut self, id: &str) -> Option<Hold> {
        let hold = self.holds.remove(id)?;
        self.reserved_tokens -= hold.tokens;
        self.reserved_cost_micros -= hold.cost_micros;
        if id.starts_with(LEASE_PREFIX) {
            self.leased_tokens -= hold.tokens;
            self.leased_cost_micros -= hold.cost_micros;
        }
        Some(hold)
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

/// What leases hold of one scope's per-minute limits (beside its bucket; it does not drain).
#[derive(Debug, Default)]
struct MinuteHolds {
    requests: i64,
    tokens: i64,
    /// By lease id: requests, tokens, expiry.
    holds: HashMap<String, (i64, i64, DateTime<Utc>)>,
}

impl MinuteHolds {
    fn prune(&mut self, now: DateTime<Utc>) {
        let (requests, tokens) = (&mut self.requests, &mut self.tokens);
        self.holds.retain(|_, (r, k, expires_at)| {
            let live = *expires_at > now;
            if !live {
                *requests -= *r;
                *tokens -= *k;
            }
            live
        });
    }

    fn remove(&mut self, id: &str) {
        if let Some((r, k, _)) = self.holds.remove(id) {
            self.requests -= r;
            self.tokens -= k;
        }
    }

    fn add(&mut self, id: &str, requests: i64, tokens: i64, expires_at: DateTime<Utc>) {
        self.requests += requests;
        self.tokens += tokens;
        self.holds.insert(id.to_owned(), (requests, tokens, expires_at));
    }

    fn levels(holds: Option<&Self>) -> (i64, i64) {
        holds.map(|h| (h.requests, h.tokens)).unwrap_or_default()
    }
}

/// The per-minute levels of a scope, what leases hold of them included.
fn minute_state(bucket: Option<&Bucket>, holds: Option<&MinuteHolds>, now: DateTime<Utc>) -> MinuteState {
    let (requests, tokens) = bucket.map(|b| b.drained(now)).unwrap_or_default();
    let (held_requests, held_tokens) = MinuteHolds::levels(holds);
    MinuteState { requests: requests.ceil() as i64 + held_requests, tokens: tokens.ceil() as i64 + held_tokens }
}

/// Milliseconds until `amount` more fits under `limit` in a bucket at `level` (draining at the
/// limit per minute) beside `held`, what leases hold (which does not drain); when draining alone
/// cannot make room, until the leases give their slices back (`held_wait`).
fn wait_ms(level: f64, held: i64, amount: i64, limit: i64, held_wait: i64) -> i64 {
    if amount > limit {
        return 60_000;
    }
    let excess = level + (held + amount - limit) as f64;
    if excess <= level {
        (excess * 60_000.0 / limit as f64).ceil() as i64
    } else {
        ((level * 60_000.0 / limit as f64).ceil() as i64).max(held_wait)
    }
}

/// A lease as the store keeps it.
#[derive(Debug, Clone)]
struct LeaseRecord {
    sequence: i64,
    /// The counters of its window.
    counters: Vec<CounterKey>,
    hold: LeaseAmounts,
    expires_at: DateTime<Utc>,
    retain_until: DateTime<Utc>,
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
    minute_holds: HashMap<Scope, MinuteHolds>,
    records: HashMap<String, Record>,
    leases: HashMap<String, LeaseRecord>,
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
        self.leases.retain(|_, r| r.retain_until > now);
        for holds in self.minute_holds.values_mut() {
            holds.prune(now);
        }
        self.minute_holds.retain(|_, h| !h.holds.is_empty());
        let oldest = now.date_naive().checked_sub_days(Days::new(KEEP_DAYS)).unwrap_or(NaiveDate::MIN);
        let dirty = &self.dirty;
        self.counters.retain(|key, _| key.1 >= oldest || dirty.contains_key(key));
        self.buckets.retain(|_, b| b.drained(now) != (0.0, 0.0));
    }

    fn unseeded(&self, keys: &[CounterKey]) -> Vec<usize> {
        (0..keys.len()).filter(|&i| !self.counters.get(&keys[i]).is_some_and(|c| c.seeded)).collect()
    }

    /// Drops the expired reservations and leases of these counters and their scopes.
    fn prune(&mut self, keys: &[CounterKey], now: DateTime<Utc>) {
        for key in keys {
            if let Some(counter) = self.counters.get_mut(key) {
                counter.prune(now);
            }
            if let Some(holds) = self.minute_holds.get_mut(&key.0) {
                holds.prune(now);
            }
        }
    }

    fn minute(&self, scope: &Scope, now: DateTime<Utc>) -> MinuteState {
        minute_state(self.buckets.get(scope), self.minute_holds.get(scope), now)
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
            counter.remove_hold(reservation_id);
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

/// The limits a lease holds slices of, in the order of [`LeaseAmounts`].
const LIMITS: [LimitName; 4] =
    [LimitName::TokensPerDay, LimitName::CostMicrosPerDay, LimitName::RequestsPerMinute, LimitName::TokensPerMinute];

/// The slice counter `key` can spare of `limit` in dimension `j` (see [`LeaseAmounts`]) beside
/// `keep`: 1/[`SLICE_DIVISOR`] of what is free.
fn spare(state: &State, key: &CounterKey, limit: i64, j: usize, keep: i64, now: DateTime<Utc>) -> i64 {
    let free = if j < 2 {
        let c = state.counters.get(key).map(Counter::state).unwrap_or_default();
        let used = if j == 0 { c.used_tokens + c.reserved_tokens } else { c.used_cost_micros + c.reserved_cost_micros };
        (limit - used - keep) as f64
    } else {
        let (requests, tokens) = state.buckets.get(&key.0).map(|b| b.drained(now)).unwrap_or_default();
        let (held_requests, held_tokens) = MinuteHolds::levels(state.minute_holds.get(&key.0));
        let level = if j == 2 { requests + held_requests as f64 } else { tokens + held_tokens as f64 };
        limit as f64 - level - keep as f64
    };
    (free.max(0.0) / SLICE_DIVISOR as f64).floor() as i64
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
        state.prune(&keys, input.now);
        let minute_of = |state: &State| input.counters.iter().map(|c| state.minute(&c.scope, input.now)).collect();
        if state.records.get(&input.reservation_id).is_some_and(|r| r.retain_until > input.now) {
            let minute = minute_of(state);
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
        let held_wait = input.leased_retry_after_ms.max(1);
        for (i, (spec, s)) in input.counters.iter().zip(&current).enumerate() {
            if let Some(limit) = refuses(s, spec.tokens_limit, spec.cost_limit_micros, input.tokens, input.cost_micros)
            {
                // Only what leases hold stands in the way: they give unused slices back soon.
                let counter = state.counters.get(&keys[i]);
                let (leased, held, amount, daily_limit) = match limit {
                    LimitName::TokensPerDay => (
                        counter.map_or(0, |c| c.leased_tokens),
                        s.used_tokens + s.reserved_tokens,
                        input.tokens,
                        spec.tokens_limit,
                    ),
                    _ => (
                        counter.map_or(0, |c| c.leased_cost_micros),
                        s.used_cost_micros + s.reserved_cost_micros,
                        input.cost_micros,
                        spec.cost_limit_micros,
                    ),
                };
                let retry_after_ms = (leased > 0 && held - leased + amount <= daily_limit).then_some(held_wait);
                return Ok(ReserveOutcome::Rejected { counter: i, limit, retry_after_ms, counters: current });
            }
            let (requests, tokens) = levels[i];
            let (held_requests, held_tokens) = MinuteHolds::levels(state.minute_holds.get(&spec.scope));
            let (rpm, tpm) = (spec.requests_per_minute, spec.tokens_per_minute);
            let refused = if rpm > 0 && requests + (held_requests + 1) as f64 > rpm as f64 {
                Some((LimitName::RequestsPerMinute, wait_ms(requests, held_requests, 1, rpm, held_wait)))
            } else if tpm > 0 && tokens + (held_tokens + input.tokens) as f64 > tpm as f64 {
                Some((LimitName::TokensPerMinute, wait_ms(tokens, held_tokens, input.tokens, tpm, held_wait)))
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
            counter.add_hold(&input.reservation_id, hold);
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
        let minute = minute_of(state);
        Ok(ReserveOutcome::Admitted { existing: false, counters: state.states(&keys), minute })
    }

    async fn lease(&self, input: &LeaseInput) -> Result<LeaseOutcome, Error> {
        let now = input.now;
        let mut guard = self.state.lock();
        let state = &mut *guard;
        state.sweep(now);
        let keys: Vec<CounterKey> = input.counters.iter().map(|c| (c.scope.clone(), c.day)).collect();
        let record = state.leases.get(&input.lease_id).filter(|r| r.retain_until > now).cloned();
        let window = record.as_ref().map_or_else(|| keys.clone(), |r| r.counters.clone());
        let same_window = window == keys;
        let answer = |state: &State, replay, low, held, expires_at| {
            LeaseOutcome::Held(LeaseHeld {
                replay,
                window_ended: !same_window,
                low,
                held,
                expires_at,
                counters: state.states(&keys),
                minute: input.counters.iter().map(|c| state.minute(&c.scope, now)).collect(),
            })
        };
        if let Some(record) = record.as_ref().filter(|r| r.sequence >= input.sequence) {
            let held = if record.expires_at > now { record.hold } else { LeaseAmounts::default() };
            return Ok(answer(state, true, None, held, record.expires_at));
        }
        if state.generation != input.limits_generation {
            return Ok(LeaseOutcome::StaleLimits);
        }
        if same_window {
            let unseeded = state.unseeded(&keys);
            if !unseeded.is_empty() {
                return Ok(LeaseOutcome::Unseeded(unseeded));
            }
        }
        if window.len() != keys.len() {
            return Err(Error::StoreReply(format!("lease {} names other scopes than its principal", input.lease_id)));
        }
        state.prune(&keys, now);

        // Take the old hold out (nothing is kept of an expired lease), then charge what was spent.
        let mut old = [0; 4];
        if let Some(record) = &record {
            for key in &window {
                if let Some(counter) = state.counters.get_mut(key) {
                    counter.remove_hold(&input.lease_id);
                }
            }
            for spec in &input.counters {
                if let Some(holds) = state.minute_holds.get_mut(&spec.scope) {
                    holds.remove(&input.lease_id);
                }
            }
            if record.expires_at > now {
                old = record.hold.to_array();
            }
        }
        let spent = input.spent;
        for (key, spec) in window.iter().zip(&input.counters) {
            if spent.tokens != 0 || spent.cost_micros != 0 || spent.settled_requests != 0 {
                let counter = state.counters.entry(key.clone()).or_default();
                counter.used_tokens += spent.tokens;
                counter.used_cost_micros += spent.cost_micros;
                counter.requests += spent.settled_requests;
                if self.track_dirty {
                    *state.dirty.entry(key.clone()).or_default() += 1;
                }
            }
            let (rpm, tpm) = (spec.requests_per_minute, spec.tokens_per_minute);
            if (rpm > 0 || tpm > 0) && (spent.started_requests != 0 || spent.tokens != 0) {
                let (requests, tokens) = state.buckets.get(&spec.scope).map(|b| b.drained(now)).unwrap_or_default();
                let bucket = Bucket {
                    requests: if rpm > 0 { requests + spent.started_requests as f64 } else { 0.0 },
                    tokens: if tpm > 0 { tokens + spent.tokens as f64 } else { 0.0 },
                    requests_limit: rpm,
                    tokens_limit: tpm,
                    updated_at: now,
                };
                state.buckets.insert(spec.scope.clone(), bucket);
            }
        }

        let limits = |spec: &super::CounterSpec| {
            [spec.tokens_limit, spec.cost_limit_micros, spec.requests_per_minute, spec.tokens_per_minute]
        };
        let limited: [bool; 4] = std::array::from_fn(|j| input.counters.iter().any(|c| limits(c)[j] > 0));
        let keep: [i64; 4] = std::array::from_fn(|j| if limited[j] { input.keep.to_array()[j].min(old[j]) } else { 0 });
        let mut grant = [0; 4];
        let mut low = None;
        if same_window {
            let (want, need) = (input.want.to_array(), input.need.to_array());
            for j in 0..4 {
                if !limited[j] {
                    continue;
                }
                let mut g = want[j];
                for (i, spec) in input.counters.iter().enumerate() {
                    let limit = limits(spec)[j];
                    if limit <= 0 {
                        continue;
                    }
                    let spare = spare(state, &keys[i], limit, j, keep[j], now);
                    if spare < need[j] && low.is_none() {
                        low = Some((i, LIMITS[j]));
                    }
                    g = g.min(spare);
                }
                grant[j] = g;
            }
            if low.is_some() {
                grant = [0; 4];
            }
        }

        let hold = LeaseAmounts::from_array(std::array::from_fn(|j| keep[j] + grant[j]));
        if hold.tokens > 0 || hold.cost_micros > 0 {
            let daily = Hold { tokens: hold.tokens, cost_micros: hold.cost_micros, expires_at: input.expires_at };
            for key in &window {
                state.counters.entry(key.clone()).or_default().add_hold(&input.lease_id, daily);
            }
        }
        if hold.minute_requests > 0 || hold.minute_tokens > 0 {
            for spec in &input.counters {
                state.minute_holds.entry(spec.scope.clone()).or_default().add(
                    &input.lease_id,
                    hold.minute_requests,
                    hold.minute_tokens,
                    input.expires_at,
                );
            }
        }
        let retention = TimeDelta::from_std(input.retention).unwrap_or(TimeDelta::MAX);
        let retain_until = input.expires_at.checked_add_signed(retention).unwrap_or(DateTime::<Utc>::MAX_UTC);
        state.leases.insert(
            input.lease_id.clone(),
            LeaseRecord {
                sequence: input.sequence,
                counters: window,
                hold,
                expires_at: input.expires_at,
                retain_until,
            },
        );
        Ok(answer(state, false, low, hold, input.expires_at))
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
        state.prune(counters, now);
        Ok(counters
            .iter()
            .map(|key| {
                let counter = state.counters.get(key);
                let (held_requests, held_tokens) = MinuteHolds::levels(state.minute_holds.get(&key.0));
                CounterView {
                    state: counter.map(Counter::state).unwrap_or_default(),
                    seeded: counter.is_some_and(|c| c.seeded),
                    minute: state.minute(&key.0, now),
                    leased: LeaseAmounts {
                        tokens: counter.map_or(0, |c| c.leased_tokens),
                        cost_micros: counter.map_or(0, |c| c.leased_cost_micros),
                        minute_requests: held_requests,
                        minute_tokens: held_tokens,
                    },
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
