//! Hot counters behind reservations. Two implementations with the same semantics: Redis (shared by
//! every replica; atomic Lua scripts) and in-memory (standalone mode; one mutex).
//!
//! Semantics every store guarantees:
//! - A reservation is checked against every counter it names and either increments `reserved` in
//!   all of them or changes nothing. A counter admits it when `used + reserved < limit` and
//!   `used + reserved + amount <= limit` for both tokens and cost (a limit of 0 is unlimited).
//! - Reserving an id that exists returns it again (idempotency by request id) without charging.
//! - A reservation expires at `expires_at`; an expired one stops holding budget the next time its
//!   counters are touched, so a gateway that dies mid-request leaks nothing past the TTL.
//! - Commit moves the reservation out of `reserved` (if it has not expired yet) and charges the
//!   actual usage to `used` of the reservation's window, once. Release only frees it.
//! - Counters are per scope per window (the day in the org's time zone). A counter the store does
//!   not have (a new day, or lost data) must be seeded from the usage ledger before anything is
//!   reserved against it: reserve and status say which counters are unseeded, and
//!   [`QuotaStore::seed`] fills them once, whoever gets there first.
//! - Per-minute limits are leaky buckets per scope (GCRA in its continuous-state form): a
//!   reservation adds 1 request and its estimated tokens; commit corrects the tokens to the actual
//!   usage, release takes them back; both drain continuously at the limit per minute.
//! - A lease is a reservation of a slice for one holder, renewed by the holder: each call
//!   ([`QuotaStore::lease`]) takes its old hold out, charges the usage spent under it (to the
//!   lease's window, and to the per-minute buckets at that moment), holds again what the holder
//!   keeps (never more than it held, nothing once it expired) and carves a new slice of at most
//!   1/[`SLICE_DIVISOR`] of what each scope has free, or nothing when even the least slice asked
//!   for does not fit (the scope is nearly spent) or the lease's window is over. Its daily hold
//!   counts as reserved (and as leased); its hold on per-minute limits sits beside the buckets and
//!   does not drain, so requests admitted under it count from the moment it was carved until they
//!   are charged into the bucket: never later than a reservation would count them. A lease expires
//!   like a reservation, and a call whose sequence is not above the last applied one is a replay.

mod memory;
mod redis;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};

pub use self::memory::MemoryStore;
pub use self::redis::{RedisStore, RedisStoreSettings};
use crate::Error;
use crate::model::{CounterState, LimitName, MinuteState, Scope};

/// One counter a reservation is checked against: a scope's window with its daily limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterSpec {
    pub scope: Scope,
    pub day: NaiveDate,
    /// Daily token limit (0 = unlimited).
    pub tokens_limit: i64,
    /// Daily cost limit, micro-dollars (0 = unlimited).
    pub cost_limit_micros: i64,
    /// Per-minute limits of the scope (0 = unlimited).
    pub requests_per_minute: i64,
    pub tokens_per_minute: i64,
}

/// A lease's slice is at most this fraction (1/n) of what a scope has free, so a holder never
/// takes the last of a budget that other holders need: what remains after it is at least seven
/// times its slice.
pub const SLICE_DIVISOR: i64 = 8;

/// Store ids of leases start with this; the stores tell lease holds from reservations by it.
pub const LEASE_PREFIX: &str = "lse_";

/// A reservation to make.
#[derive(Debug, Clone)]
pub struct ReserveInput {
    pub reservation_id: String,
    pub counters: Vec<CounterSpec>,
    pub tokens: i64,
    pub cost_micros: i64,
    pub now: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// The limits generation the counters' limits were read under; the store refuses with
    /// [`ReserveOutcome::StaleLimits`] when limits changed since.
    pub limits_generation: Option<String>,
    /// The wait to tell a request refused only because leases hold the budget it needs (they
    /// give unused slices back soon, not at the window's reset).
    pub leased_retry_after_ms: i64,
}

/// Result of [`QuotaStore::reserve`]; `counters` are in the order of the input's counters, after
/// the operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    Admitted {
        existing: bool,
        counters: Vec<CounterState>,
        minute: Vec<MinuteState>,
    },
    Rejected {
        counter: usize,
        limit: LimitName,
        /// For per-minute limits: exactly when the same request would fit.
        retry_after_ms: Option<i64>,
        counters: Vec<CounterState>,
    },
    /// Limits changed since they were read: re-read them and try again.
    StaleLimits,
    /// These counters (indexes) must be seeded from the ledger first.
    Unseeded(Vec<usize>),
}

/// Amounts a lease holds or asks for, in each limit it can hold a slice of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseAmounts {
    /// Daily tokens.
    pub tokens: i64,
    /// Daily cost, micro-dollars.
    pub cost_micros: i64,
    /// Requests of the per-minute request limits.
    pub minute_requests: i64,
    /// Tokens of the per-minute token limits.
    pub minute_tokens: i64,
}

impl LeaseAmounts {
    pub(crate) fn to_array(self) -> [i64; 4] {
        [self.tokens, self.cost_micros, self.minute_requests, self.minute_tokens]
    }

    pub(crate) fn from_array([tokens, cost_micros, minute_requests, minute_tokens]: [i64; 4]) -> Self {
        Self { tokens, cost_micros, minute_requests, minute_tokens }
    }
}

/// Usage spent under a lease since the holder's previous call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseSpent {
    pub tokens: i64,
    pub cost_micros: i64,
    /// Requests admitted: charged to the per-minute request buckets.
    pub started_requests: i64,
    /// Requests settled with usage: the day's request count.
    pub settled_requests: i64,
}

/// A lease call to apply (see the store semantics above).
#[derive(Debug, Clone)]
pub struct LeaseInput {
    /// The store id (`lse_…`).
    pub lease_id: String,
    pub sequence: i64,
    /// The counters of the current window; a lease whose window is over keeps charging its own.
    pub counters: Vec<CounterSpec>,
    pub spent: LeaseSpent,
    pub keep: LeaseAmounts,
    pub want: LeaseAmounts,
    pub need: LeaseAmounts,
    pub now: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// How long the lease record outlives its hold, for replays.
    pub retention: Duration,
    pub limits_generation: Option<String>,
}

/// What a lease holds after a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHeld {
    /// The call was a replay; nothing changed.
    pub replay: bool,
    /// The lease's window is over: nothing was carved.
    pub window_ended: bool,
    /// The counter (index) and limit that could not spare the least slice: nothing was carved.
    pub low: Option<(usize, LimitName)>,
    /// What the lease holds now (0 in limits no counter sets).
    pub held: LeaseAmounts,
    pub expires_at: DateTime<Utc>,
    /// The current window's counters after the call, in the input's order.
    pub counters: Vec<CounterState>,
    /// Their per-minute levels, what leases hold of them included.
    pub minute: Vec<MinuteState>,
}

/// Result of [`QuotaStore::lease`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    Held(LeaseHeld),
    /// Limits changed since they were read: re-read them and try again.
    StaleLimits,
    /// These counters (indexes) must be seeded from the ledger first.
    Unseeded(Vec<usize>),
}

/// Usage [`QuotaStore::charge`] adds to every counter it names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChargeAmounts {
    pub tokens: i64,
    pub cost_micros: i64,
    /// Requests to add to the counters' daily request count.
    pub requests: i64,
}

/// Result of [`QuotaStore::charge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// Charged now; counters after it.
    Charged(Vec<CounterState>),
    /// The store has a record under this id (the reservation, or an earlier charge).
    Exists,
    /// These counters (indexes) must be seeded from the ledger first.
    Unseeded(Vec<usize>),
}

/// What [`QuotaStore::status`] reports of one counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterView {
    pub state: CounterState,
    /// Per-minute levels, what leases hold of them included.
    pub minute: MinuteState,
    /// What leases hold: of the reserved tokens and cost, and of the per-minute limits.
    pub leased: LeaseAmounts,
    /// Whether the counter was seeded from the ledger (else its usage may be incomplete).
    pub seeded: bool,
}

/// Ledger usage to seed one counter with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedRow {
    pub scope: Scope,
    pub day: NaiveDate,
    pub usage: CounterState,
}

/// Lifecycle of a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationState {
    Reserved,
    Committed,
    Released,
}

impl ReservationState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationState::Reserved => "reserved",
            ReservationState::Committed => "committed",
            ReservationState::Released => "released",
        }
    }
}

/// Result of [`QuotaStore::commit`] / [`QuotaStore::release`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleOutcome {
    /// Done now, or earlier by the same operation (`replay`); counters after it.
    Settled {
        replay: bool,
        counters: Vec<(Scope, NaiveDate, CounterState)>,
    },
    NotFound,
    /// The reservation was already settled the other way.
    Conflict(ReservationState),
}

/// Usage of a counter that changed since it was last written to the ledger. `version` identifies
/// the change so a later one is never acknowledged by mistake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyUsage {
    pub scope: Scope,
    pub day: NaiveDate,
    pub usage: CounterState,
    pub version: i64,
}

#[async_trait]
pub trait QuotaStore: Send + Sync {
    async fn reserve(&self, input: &ReserveInput) -> Result<ReserveOutcome, Error>;

    /// Charges `tokens` / `cost_micros` for the reservation instead of its estimate.
    async fn commit(
        &self,
        reservation_id: &str,
        tokens: i64,
        cost_micros: i64,
        now: DateTime<Utc>,
    ) -> Result<SettleOutcome, Error>;

    async fn release(&self, reservation_id: &str, now: DateTime<Utc>) -> Result<SettleOutcome, Error>;

    /// Carves, renews, settles or returns a lease (see the store semantics above).
    async fn lease(&self, input: &LeaseInput) -> Result<LeaseOutcome, Error>;

    /// Charges usage straight to `counters` under `record_id` when the store has no record of it
    /// (a lost reservation, or a charge made without one), once: the settled record written then
    /// is kept for `retention`, during which the same id answers [`ChargeOutcome::Exists`].
    async fn charge(
        &self,
        record_id: &str,
        counters: &[(Scope, NaiveDate)],
        amounts: ChargeAmounts,
        retention: Duration,
    ) -> Result<ChargeOutcome, Error>;

    /// Seeds counters that are not seeded yet with usage from the ledger.
    async fn seed(&self, rows: &[SeedRow]) -> Result<(), Error>;

    /// Current counters of `(scope, day)` pairs, expired reservations dropped, with the scopes'
    /// per-minute levels at `now`.
    async fn status(&self, counters: &[(Scope, NaiveDate)], now: DateTime<Utc>) -> Result<Vec<CounterView>, Error>;

    /// The current limits generation (changes whenever any limit changes).
    async fn limits_generation(&self) -> Result<Option<String>, Error>;

    /// Marks that limits changed, so every replica re-reads them on its next reservation.
    async fn bump_limits_generation(&self) -> Result<(), Error>;

    /// Up to `max` counters whose usage changed since the ledger last acknowledged them.
    async fn dirty_usage(&self, max: usize) -> Result<Vec<DirtyUsage>, Error>;

    /// Acknowledges written usage; entries changed again since they were read stay dirty.
    async fn clear_dirty(&self, written: &[DirtyUsage]) -> Result<(), Error>;

    /// Readiness: the store answers.
    async fn ping(&self) -> Result<(), Error>;

    /// "redis" or "memory", for logs.
    fn kind(&self) -> &'static str;
}

/// Day in counter keys and ledger rows: `YYYYMMDD`.
pub(crate) fn day_key(day: NaiveDate) -> String {
    day.format("%Y%m%d").to_string()
}

pub(crate) fn parse_day_key(s: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(s, "%Y%m%d").ok()
}
