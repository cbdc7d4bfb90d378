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
//! - Counters are per scope per window (UTC day); a new day starts from zero.

mod memory;
mod redis;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};

pub use self::memory::MemoryStore;
pub use self::redis::{RedisStore, RedisStoreSettings};
use crate::Error;
use crate::model::{CounterState, LimitName, Scope};

/// One counter a reservation is checked against: a scope's window with its daily limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterSpec {
    pub scope: Scope,
    pub day: NaiveDate,
    /// Daily token limit (0 = unlimited).
    pub tokens_limit: i64,
    /// Daily cost limit, micro-dollars (0 = unlimited).
    pub cost_limit_micros: i64,
}

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
}

/// Result of [`QuotaStore::reserve`]; `counters` are in the order of the input's counters, after
/// the operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    Admitted {
        existing: bool,
        counters: Vec<CounterState>,
    },
    Rejected {
        counter: usize,
        limit: LimitName,
        counters: Vec<CounterState>,
    },
    /// Limits changed since they were read: re-read them and try again.
    StaleLimits,
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
    async fn commit(&self, reservation_id: &str, tokens: i64, cost_micros: i64) -> Result<SettleOutcome, Error>;

    async fn release(&self, reservation_id: &str) -> Result<SettleOutcome, Error>;

    /// Current counters of `(scope, day)` pairs, expired reservations dropped.
    async fn status(&self, counters: &[(Scope, NaiveDate)], now: DateTime<Utc>) -> Result<Vec<CounterState>, Error>;

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
