//! The quota engine: limits resolution, reservations, commits and status over a [`QuotaStore`].
//! The gRPC service is a thin adapter over it; tests drive it directly too.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use meshgate_proto::common::v1::{Principal, Usage};
use meshgate_proto::quota::v1 as pb;
use meshgate_storage::SharedClock;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tracing::{error, info, warn};

use crate::Error;
use crate::ledger::{Ledger, WriteThrough};
use crate::limits::{DefaultLimits, LimitsCache, LimitsRepo};
use crate::metrics::QuotaMetrics;
use crate::model::{
    CounterState, Limits, MAX_COST_MICROS, MAX_PER_MINUTE, MAX_TOKENS, MinuteState, Scope, check_amount,
    retry_after_seconds_ms, validate_id, window_day, window_reset_at,
};
use crate::store::{
    ChargeAmounts, ChargeOutcome, CounterSpec, LEASE_PREFIX, LeaseAmounts, LeaseHeld, LeaseInput, LeaseOutcome,
    LeaseSpent, QuotaStore, ReserveInput, ReserveOutcome, SeedRow, SettleOutcome,
};

/// Reservation ids handed out while failing open; they are not in any store.
const FAIL_OPEN_PREFIX: &str = "open_";
/// Store round trips one operation may take: limits changing under it or counters needing a
/// seed from the ledger more often than this in a row is treated as an error.
const ATTEMPTS: usize = 4;
/// Most requests one Charge may add, or one lease call settle.
const MAX_CHARGE_REQUESTS: i64 = 1_000_000;

/// Behaviour knobs of the engine.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub defaults: DefaultLimits,
    /// How long a reservation holds budget without a commit or release, unless it asks otherwise.
    pub reservation_ttl: Duration,
    /// The longest lifetime a reservation may ask for.
    pub max_reservation_ttl: Duration,
    /// How long the record of a lost reservation's charge is kept (the store's settled retention).
    pub settled_retention: Duration,
    /// How long a Charge id is remembered: a replay within it changes nothing.
    pub charge_retention: Duration,
    /// Safety-net lifetime of cached limits (changes normally propagate immediately).
    pub limits_cache_ttl: Duration,
    /// Admit reservations unchecked while the store is unreachable (default: refuse).
    pub fail_open: bool,
    /// How long a lease holds its slices without a call, unless its holder asks otherwise.
    pub lease_ttl: Duration,
    /// The longest lifetime a lease may ask for.
    pub max_lease_ttl: Duration,
    /// The wait told to a request refused only because leases hold the budget it needs.
    pub leased_retry_after: Duration,
    /// How long a charge waits for the ledger to record it before it is answered anyway (its
    /// counters stay dirty for the ledger flusher).
    pub ledger_write_timeout: Duration,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            defaults: DefaultLimits::default(),
            reservation_ttl: Duration::from_secs(300),
            max_reservation_ttl: Duration::from_secs(86_400),
            settled_retention: Duration::from_secs(600),
            charge_retention: Duration::from_secs(7 * 86_400),
            limits_cache_ttl: Duration::from_secs(30),
            fail_open: false,
            lease_ttl: Duration::from_secs(10),
            max_lease_ttl: Duration::from_secs(60),
            leased_retry_after: Duration::from_secs(1),
            ledger_write_timeout: Duration::from_millis(500),
        }
    }
}

/// Budgets over a store; one per replica.
pub struct QuotaEngine {
    store: Arc<dyn QuotaStore>,
    limits: Arc<dyn LimitsRepo>,
    /// Where unseeded counters are rebuilt from; without one they start at zero.
    ledger: Option<Ledger>,
    /// Records charged counters in the ledger before the charge is answered.
    write_through: Option<WriteThrough>,
    cache: Mutex<LimitsCache>,
    clock: SharedClock,
    settings: EngineSettings,
    metrics: QuotaMetrics,
    /// Whether the store is currently failing, so an outage is logged once, not per request.
    incident: AtomicBool,
    /// Serializes seeding from the ledger (see [`QuotaEngine::seed`]).
    seeding: tokio::sync::Mutex<()>,
}

/// The reservation id of a request: derived from the principal and the request id, so reserving
/// twice yields the same reservation and two tenants' equal request ids never collide.
pub fn reservation_id(principal: &Principal, request_id: &str) -> String {
    principal_scoped_id("rsv_", principal, request_id)
}

/// The store record of a Charge: its own prefix keeps it apart from reservations (a charge id can
/// never settle a reservation), and the principal keeps tenants' equal charge ids apart.
fn charge_record_id(principal: &Principal, charge_id: &str) -> String {
    principal_scoped_id("chg_", principal, charge_id)
}

fn principal_scoped_id(prefix: &str, principal: &Principal, id: &str) -> String {
    let mut hasher = Sha256::new();
    for part in [&principal.org_id, &principal.project_id, &principal.user_id, &principal.key_id] {
        hasher.update(part.as_bytes());
        hasher.update([0x1f]);
    }
    hasher.update(id.as_bytes());
    let digest = hasher.finalize();
    format!("{prefix}{}", hex::encode(&digest[..16]))
}

/// The tokens and cost of a reported usage, validated; tokens are the total, else prompt plus
/// completion.
fn usage_amounts(usage: Option<&Usage>) -> Result<(i64, i64), Error> {
    let usage = usage.ok_or_else(|| Error::InvalidArgument("usage is required".into()))?;
    check_amount("usage.prompt_tokens", usage.prompt_tokens, MAX_TOKENS)?;
    check_amount("usage.completion_tokens", usage.completion_tokens, MAX_TOKENS)?;
    check_amount("usage.total_tokens", usage.total_tokens, MAX_TOKENS)?;
    check_amount("usage.cost_micros", usage.cost_micros, MAX_COST_MICROS)?;
    Ok((usage.tokens(), usage.cost_micros))
}

/// A lease is settled by its holder's next Lease call, never by Commit or Release.
fn refuse_lease_id(id: &str) -> Result<(), Error> {
    if id.starts_with(LEASE_PREFIX) {
        return Err(Error::InvalidArgument(format!(
            "reservation_id {id} names a lease; a lease is settled and returned with Lease"
        )));
    }
    Ok(())
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0) }
}

/// The smallest of the scopes' remaining amounts, or -1 when no scope limits it.
fn tightest<T>(items: impl Iterator<Item = T>, remaining: impl Fn(T) -> Option<i64>) -> i64 {
    items.filter_map(remaining).min().unwrap_or(-1)
}

/// Remaining daily tokens and cost of the tightest scopes.
fn tightest_daily(limits: &[Limits], counters: &[CounterState]) -> (i64, i64) {
    (
        tightest(limits.iter().zip(counters), |(l, c)| c.remaining_tokens(l.tokens_per_day)),
        tightest(limits.iter().zip(counters), |(l, c)| c.remaining_cost_micros(l.cost_micros_per_day)),
    )
}

/// The counters of `keys` with their limits.
fn counter_specs(keys: &[(Scope, NaiveDate)], limits: &[Limits]) -> Vec<CounterSpec> {
    keys.iter()
        .zip(limits)
        .map(|((scope, day), l)| CounterSpec {
            scope: scope.clone(),
            day: *day,
            tokens_limit: l.tokens_per_day,
            cost_limit_micros: l.cost_micros_per_day,
            requests_per_minute: l.requests_per_minute,
            tokens_per_minute: l.tokens_per_minute,
        })
        .collect()
}

/// Lease amounts from the wire, each checked and named (`keep.minute_requests`).
fn lease_amounts(what: &str, amounts: Option<&pb::LeaseAmounts>) -> Result<LeaseAmounts, Error> {
    let a = amounts.cloned().unwrap_or_default();
    check_amount(&format!("{what}.tokens"), a.tokens, MAX_TOKENS)?;
    check_amount(&format!("{what}.cost_micros"), a.cost_micros, MAX_COST_MICROS)?;
    check_amount(&format!("{what}.minute_requests"), a.minute_requests, MAX_PER_MINUTE)?;
    check_amount(&format!("{what}.minute_tokens"), a.minute_tokens, MAX_PER_MINUTE)?;
    Ok(LeaseAmounts {
        tokens: a.tokens,
        cost_micros: a.cost_micros,
        minute_requests: a.minute_requests,
        minute_tokens: a.minute_tokens,
    })
}

fn lease_spent(spent: Option<&pb::LeaseSpent>) -> Result<LeaseSpent, Error> {
    let s = spent.cloned().unwrap_or_default();
    check_amount("spent.tokens", s.tokens, MAX_TOKENS)?;
    check_amount("spent.cost_micros", s.cost_micros, MAX_COST_MICROS)?;
    check_amount("spent.started_requests", s.started_requests, MAX_CHARGE_REQUESTS)?;
    check_amount("spent.settled_requests", s.settled_requests, MAX_CHARGE_REQUESTS)?;
    Ok(LeaseSpent {
        tokens: s.tokens,
        cost_micros: s.cost_micros,
        started_requests: s.started_requests,
        settled_requests: s.settled_requests,
    })
}

fn lease_amounts_to_proto(a: LeaseAmounts) -> pb::LeaseAmounts {
    pb::LeaseAmounts {
        tokens: a.tokens,
        cost_micros: a.cost_micros,
        minute_requests: a.minute_requests,
        minute_tokens: a.minute_tokens,
    }
}

/// The counters of `scopes` in the daily window containing `now`, which is the day in the org's
/// time zone (the org scope comes first and its limits carry the zone).
fn window(scopes: &[Scope], limits: &[Limits], now: DateTime<Utc>) -> (Vec<(Scope, NaiveDate)>, DateTime<Utc>) {
    let zone = limits.first().map(Limits::zone).unwrap_or(chrono_tz::Tz::UTC);
    let day = window_day(now, zone);
    (scopes.iter().map(|s| (s.clone(), day)).collect(), window_reset_at(now, zone))
}

/// The answer to a lease call: what it holds (-1 in limits no scope sets), and the budget left.
fn lease_response(
    scopes: &[Scope],
    limits: &[Limits],
    held: LeaseHeld,
    now: DateTime<Utc>,
    window_reset: DateTime<Utc>,
) -> pb::LeaseResponse {
    let limited = |limit: fn(&Limits) -> i64| limits.iter().any(|l| limit(l) > 0);
    let or_unlimited = |amount: i64, limit: fn(&Limits) -> i64| if limited(limit) { amount } else { -1 };
    let amounts = LeaseAmounts {
        tokens: or_unlimited(held.held.tokens, |l| l.tokens_per_day),
        cost_micros: or_unlimited(held.held.cost_micros, |l| l.cost_micros_per_day),
        minute_requests: or_unlimited(held.held.minute_requests, |l| l.requests_per_minute),
        minute_tokens: or_unlimited(held.held.minute_tokens, |l| l.tokens_per_minute),
    };
    let (remaining_tokens, remaining_cost_micros) = tightest_daily(limits, &held.counters);
    let (low_scope, low_limit) = match held.low {
        Some((i, limit)) => (scopes.get(i).map(Scope::to_proto), limit.as_str().to_owned()),
        None => (None, String::new()),
    };
    pb::LeaseResponse {
        replay: held.replay,
        held: Some(lease_amounts_to_proto(amounts)),
        expires_at: Some(timestamp(held.expires_at)),
        ttl_ms: (held.expires_at - now).num_milliseconds().max(0),
        low_scope,
        low_limit,
        window_ended: held.window_ended,
        reset_at: Some(timestamp(window_reset)),
        remaining_tokens,
        remaining_cost_micros,
        remaining_requests_this_minute: tightest(limits.iter().zip(&held.minute), |(l, m)| {
            m.remaining_requests(l.requests_per_minute)
        }),
    }
}

impl QuotaEngine {
    pub fn new(
        store: Arc<dyn QuotaStore>,
        limits: Arc<dyn LimitsRepo>,
        clock: SharedClock,
        settings: EngineSettings,
        metrics: QuotaMetrics,
    ) -> Self {
        Self {
            store,
            limits,
            ledger: None,
            write_through: None,
            cache: Mutex::new(LimitsCache::default()),
            clock,
            settings,
            metrics,
            incident: AtomicBool::new(false),
            seeding: tokio::sync::Mutex::new(()),
        }
    }

    /// Records every charge in this ledger before answering it, and rebuilds counters the store
    /// lacks from it (else they start at zero). Spawns the ledger writer: call within a runtime.
    pub fn with_ledger(mut self, ledger: Ledger) -> Self {
        self.write_through = Some(WriteThrough::spawn(ledger.clone(), self.settings.ledger_write_timeout));
        self.ledger = Some(ledger);
        self
    }

    /// Writes counters a charge changed to the ledger, so losing the store loses no answered
    /// charge. A failed write is logged and left to the flusher: the charge itself stands.
    async fn record_usage(&self, op: &'static str, rows: Vec<(Scope, NaiveDate, CounterState)>) {
        let Some(write_through) = &self.write_through else { return };
        let started = Instant::now();
        let result = write_through.record(rows).await;
        self.metrics.ledger_write_duration.observe(started.elapsed().as_secs_f64());
        if let Err(err) = result {
            self.metrics.ledger_write_through_errors.inc();
            warn!(op, error = %err, "charge not yet in the usage ledger; the flusher writes it");
        }
    }

    pub fn store(&self) -> &Arc<dyn QuotaStore> {
        &self.store
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// Holds the estimate against every scope of the principal, or says which limit refuses it.
    pub async fn reserve(&self, req: &pb::ReserveRequest) -> Result<pb::ReserveResponse, Error> {
        validate_id("request_id", &req.request_id)?;
        check_amount("estimated_tokens", req.estimated_tokens, MAX_TOKENS)?;
        check_amount("estimated_cost_micros", req.estimated_cost_micros, MAX_COST_MICROS)?;
        let ttl = self.reservation_lifetime(req.ttl_seconds)?;
        let scopes = Scope::of_principal(req.principal.as_ref())?;
        let principal = req.principal.clone().unwrap_or_default();
        let id = reservation_id(&principal, &req.request_id);

        let started = Instant::now();
        let result = self.try_reserve(&scopes, id, req, ttl).await;
        self.metrics.reserve_duration.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(response) => {
                self.store_ok();
                let (result, limit) = if response.admitted {
                    ("admitted", "none")
                } else {
                    ("rejected", response.rejected_limit.as_str())
                };
                self.metrics.reservations.with_label_values(&[result, limit]).inc();
                Ok(response)
            }
            Err(err) if err.is_unavailable() && self.settings.fail_open => {
                self.store_failed("reserve", &err);
                self.metrics.reservations.with_label_values(&["fail_open", "none"]).inc();
                Ok(pb::ReserveResponse {
                    admitted: true,
                    reservation_id: format!("{FAIL_OPEN_PREFIX}{}", uuid::Uuid::new_v4().simple()),
                    remaining_tokens: -1,
                    ..Default::default()
                })
            }
            Err(err) => Err(self.fail("reserve", err)),
        }
    }

    /// The lifetime a reservation asked for (`0`: the default), capped at the longest allowed.
    fn reservation_lifetime(&self, ttl_seconds: i64) -> Result<Duration, Error> {
        match u64::try_from(ttl_seconds) {
            Ok(0) => Ok(self.settings.reservation_ttl),
            Ok(secs) => Ok(Duration::from_secs(secs).min(self.settings.max_reservation_ttl)),
            Err(_) => Err(Error::InvalidArgument(format!("ttl_seconds must not be negative (got {ttl_seconds})"))),
        }
    }

    async fn try_reserve(
        &self,
        scopes: &[Scope],
        reservation_id: String,
        req: &pb::ReserveRequest,
        ttl: Duration,
    ) -> Result<pb::ReserveResponse, Error> {
        let now = self.clock.now();
        let ttl = TimeDelta::from_std(ttl).unwrap_or(TimeDelta::MAX);
        let expires_at = now.checked_add_signed(ttl).unwrap_or(DateTime::<Utc>::MAX_UTC);
        for _ in 0..ATTEMPTS {
            let (limits, generation) = self.resolve_limits(scopes).await?;
            let (keys, window_reset) = window(scopes, &limits, now);
            let input = ReserveInput {
                reservation_id: reservation_id.clone(),
                counters: counter_specs(&keys, &limits),
                tokens: req.estimated_tokens,
                cost_micros: req.estimated_cost_micros,
                now,
                expires_at,
                limits_generation: generation,
                leased_retry_after_ms: i64::try_from(self.settings.leased_retry_after.as_millis()).unwrap_or(i64::MAX),
            };
            match self.store.reserve(&input).await? {
                ReserveOutcome::StaleLimits => self.cache.lock().invalidate(),
                ReserveOutcome::Unseeded(positions) => {
                    self.seed(positions.into_iter().map(|i| keys[i].clone()).collect()).await?;
                }
                ReserveOutcome::Admitted { counters, minute, .. } => {
                    let (remaining_tokens, remaining_cost_micros) = tightest_daily(&limits, &counters);
                    return Ok(pb::ReserveResponse {
                        admitted: true,
                        reservation_id,
                        reset_at: Some(timestamp(window_reset)),
                        remaining_tokens,
                        remaining_cost_micros,
                        remaining_requests_this_minute: tightest(limits.iter().zip(&minute), |(l, m)| {
                            m.remaining_requests(l.requests_per_minute)
                        }),
                        ..Default::default()
                    });
                }
                ReserveOutcome::Rejected { counter, limit, retry_after_ms, counters } => {
                    let retry_after_ms = retry_after_ms.unwrap_or_else(|| (window_reset - now).num_milliseconds());
                    let reset_at = now + TimeDelta::milliseconds(retry_after_ms);
                    let (remaining_tokens, remaining_cost_micros) = tightest_daily(&limits, &counters);
                    return Ok(pb::ReserveResponse {
                        admitted: false,
                        reservation_id: String::new(),
                        rejected_scope: scopes.get(counter).map(Scope::to_proto),
                        rejected_limit: limit.as_str().to_owned(),
                        reset_at: Some(timestamp(reset_at)),
                        retry_after_seconds: retry_after_seconds_ms(retry_after_ms),
                        retry_after_ms,
                        remaining_tokens,
                        remaining_cost_micros,
                        remaining_requests_this_minute: -1,
                    });
                }
            }
        }
        Err(Error::StoreReply("limits changed or counters vanished during every attempt of this reservation".into()))
    }

    /// Carves, renews, settles or returns a lease (see the `Lease` RPC and the store semantics).
    pub async fn lease(&self, req: &pb::LeaseRequest) -> Result<pb::LeaseResponse, Error> {
        validate_id("lease_id", &req.lease_id)?;
        if req.sequence < 1 {
            return Err(Error::InvalidArgument(format!("sequence must be at least 1 (got {})", req.sequence)));
        }
        let spent = lease_spent(req.spent.as_ref())?;
        let keep = lease_amounts("keep", req.keep.as_ref())?;
        let want = lease_amounts("want", req.want.as_ref())?;
        let need = lease_amounts("need", req.need.as_ref())?;
        let ttl = match u64::try_from(req.ttl_ms) {
            Ok(0) => self.settings.lease_ttl,
            Ok(ms) => Duration::from_millis(ms).min(self.settings.max_lease_ttl),
            Err(_) => return Err(Error::InvalidArgument(format!("ttl_ms must not be negative (got {})", req.ttl_ms))),
        };
        let scopes = Scope::of_principal(req.principal.as_ref())?;
        let principal = req.principal.clone().unwrap_or_default();
        let now = self.clock.now();
        let expires_at = now.checked_add_signed(TimeDelta::from_std(ttl).unwrap_or(TimeDelta::MAX)).unwrap_or(now);
        let input = LeaseInput {
            lease_id: principal_scoped_id(LEASE_PREFIX, &principal, &req.lease_id),
            sequence: req.sequence,
            counters: Vec::new(),
            spent,
            keep,
            want,
            need,
            now,
            expires_at,
            retention: self.settings.settled_retention,
            limits_generation: None,
        };
        match self.try_lease(&scopes, input).await {
            Ok(response) => {
                self.store_ok();
                let outcome = if response.replay {
                    "replay"
                } else if response.window_ended {
                    "window_ended"
                } else if response.low_scope.is_some() {
                    "low"
                } else {
                    "held"
                };
                self.metrics.leases.with_label_values(&[outcome]).inc();
                Ok(response)
            }
            Err(err) if err.is_unavailable() && self.settings.fail_open => {
                // As with reservations: admitted unchecked, and the usage reported is not charged.
                self.store_failed("lease", &err);
                self.metrics.leases.with_label_values(&["fail_open"]).inc();
                let unlimited =
                    pb::LeaseAmounts { tokens: -1, cost_micros: -1, minute_requests: -1, minute_tokens: -1 };
                Ok(pb::LeaseResponse {
                    held: Some(unlimited),
                    expires_at: Some(timestamp(expires_at)),
                    ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
                    remaining_tokens: -1,
                    remaining_cost_micros: -1,
                    remaining_requests_this_minute: -1,
                    ..Default::default()
                })
            }
            Err(err) => Err(self.fail("lease", err)),
        }
    }

    async fn try_lease(&self, scopes: &[Scope], mut input: LeaseInput) -> Result<pb::LeaseResponse, Error> {
        for _ in 0..ATTEMPTS {
            let (limits, generation) = self.resolve_limits(scopes).await?;
            let (keys, window_reset) = window(scopes, &limits, input.now);
            input.counters = counter_specs(&keys, &limits);
            input.limits_generation = generation;
            match self.store.lease(&input).await? {
                LeaseOutcome::StaleLimits => self.cache.lock().invalidate(),
                LeaseOutcome::Unseeded(positions) => {
                    self.seed(positions.into_iter().map(|i| keys[i].clone()).collect()).await?;
                }
                LeaseOutcome::Held(held) => {
                    if !held.replay && input.spent != LeaseSpent::default() {
                        let rows = input.counters.iter().zip(&held.counters);
                        self.record_usage("lease", rows.map(|(c, u)| (c.scope.clone(), c.day, *u)).collect()).await;
                    }
                    return Ok(lease_response(scopes, &limits, held, input.now, window_reset));
                }
            }
        }
        Err(Error::StoreReply("limits changed or counters vanished during every attempt of this lease".into()))
    }

    /// Seeds counters the store lacks with their usage in the ledger (zero without one).
    async fn seed(&self, keys: Vec<(Scope, NaiveDate)>) -> Result<(), Error> {
        // One seeding at a time per replica: a burst of first requests of the day must not all
        // read the ledger for the same counters. Whoever waited re-checks what is still unseeded.
        let _seeding = self.seeding.lock().await;
        let views = self.store.status(&keys, self.clock.now()).await?;
        let keys: Vec<(Scope, NaiveDate)> =
            keys.into_iter().zip(views).filter(|(_, view)| !view.seeded).map(|(key, _)| key).collect();
        if keys.is_empty() {
            return Ok(());
        }
        let usage = match &self.ledger {
            Some(ledger) => ledger.read(&keys).await?,
            None => vec![CounterState::default(); keys.len()],
        };
        let rows: Vec<SeedRow> =
            keys.into_iter().zip(usage).map(|((scope, day), usage)| SeedRow { scope, day, usage }).collect();
        self.store.seed(&rows).await?;
        let recovered = rows.iter().filter(|r| r.usage != CounterState::default()).count();
        if recovered > 0 {
            warn!(counters = recovered, "quota counters rebuilt from the usage ledger (the store had lost them)");
        }
        self.metrics.counters_seeded.inc_by(u64::try_from(rows.len()).unwrap_or(0));
        Ok(())
    }

    /// Charges the actual usage of a reservation (once; replays answer the same).
    pub async fn commit(&self, req: &pb::CommitRequest) -> Result<pb::CommitResponse, Error> {
        validate_id("reservation_id", &req.reservation_id)?;
        refuse_lease_id(&req.reservation_id)?;
        let (tokens, cost_micros) = usage_amounts(req.usage.as_ref())?;
        if req.reservation_id.starts_with(FAIL_OPEN_PREFIX) {
            self.metrics.commits.with_label_values(&["fail_open"]).inc();
            return Ok(pb::CommitResponse { remaining_tokens: -1, remaining_cost_micros: -1 });
        }
        let now = self.clock.now();
        let outcome = match self.store.commit(&req.reservation_id, tokens, cost_micros, now).await {
            Ok(outcome) => {
                self.store_ok();
                outcome
            }
            Err(err) => return Err(self.fail("commit", err)),
        };
        let (counters, replay) = match (outcome, req.principal.as_ref()) {
            (SettleOutcome::NotFound, Some(principal)) => {
                // The store lost the reservation (it restarted without its data): charge the usage
                // straight to the principal's counters of the current window, once.
                let scopes = Scope::of_principal(Some(principal))?;
                let amounts = ChargeAmounts { tokens, cost_micros, requests: 1 };
                let retention = self.settings.settled_retention;
                match self.charge_once(&req.reservation_id, &scopes, amounts, retention, now).await {
                    Ok(charged) => {
                        self.store_ok();
                        if !charged.1 {
                            warn!(
                                reservation_id = req.reservation_id,
                                tokens, "committed usage of a reservation the quota store had lost"
                            );
                            self.metrics.commits.with_label_values(&["lost_reservation"]).inc();
                        }
                        charged
                    }
                    Err(err) => return Err(self.fail("commit", err)),
                }
            }
            (outcome, _) => self.settled_recorded("commit", &req.reservation_id, outcome).await?,
        };
        self.metrics.commits.with_label_values(&[if replay { "replay" } else { "committed" }]).inc();
        if !replay {
            self.metrics.committed_tokens.inc_by(u64::try_from(tokens).unwrap_or(0));
        }
        let (remaining_tokens, remaining_cost_micros) = self.remaining_after(counters).await?;
        Ok(pb::CommitResponse { remaining_tokens, remaining_cost_micros })
    }

    /// Charges usage made without a reservation (an edge's traffic uploaded later, a delivered
    /// async job) to the principal's counters of the current window, once per charge id within
    /// `charge_retention`. Limits are not checked: the usage already happened, so a charge over
    /// the budget is recorded and the next reservation is refused.
    pub async fn charge(&self, req: &pb::ChargeRequest) -> Result<pb::ChargeResponse, Error> {
        validate_id("charge_id", &req.charge_id)?;
        let scopes = Scope::of_principal(req.principal.as_ref())?;
        let (tokens, cost_micros) = usage_amounts(req.usage.as_ref())?;
        check_amount("requests", req.requests, MAX_CHARGE_REQUESTS)?;
        let amounts = ChargeAmounts { tokens, cost_micros, requests: req.requests.max(1) };
        let principal = req.principal.clone().unwrap_or_default();
        let record_id = charge_record_id(&principal, &req.charge_id);
        let retention = self.settings.charge_retention;
        let (counters, replay) = match self.charge_once(&record_id, &scopes, amounts, retention, self.clock.now()).await
        {
            Ok(charged) => {
                self.store_ok();
                charged
            }
            // Refused even when failing open: fail-open only admits new reservations unchecked. A
            // charge that did not reach the store is not done, and the caller must retry it.
            Err(err) => return Err(self.fail("charge", err)),
        };
        self.metrics.charges.with_label_values(&[if replay { "replay" } else { "charged" }]).inc();
        let (remaining_tokens, remaining_cost_micros) = self.remaining_after(counters).await?;
        Ok(pb::ChargeResponse { replay, remaining_tokens, remaining_cost_micros })
    }

    /// Charges usage straight to the counters of `scopes` in the window containing `now` under
    /// `record_id`, once: the record is kept for `retention`, and an id already recorded answers
    /// like a replayed commit (`true`) without changing anything.
    async fn charge_once(
        &self,
        record_id: &str,
        scopes: &[Scope],
        amounts: ChargeAmounts,
        retention: Duration,
        now: DateTime<Utc>,
    ) -> Result<(Vec<(Scope, CounterState)>, bool), Error> {
        let (limits, _) = self.resolve_limits(scopes).await?;
        let (keys, _) = window(scopes, &limits, now);
        for _ in 0..ATTEMPTS {
            match self.store.charge(record_id, &keys, amounts, retention).await? {
                ChargeOutcome::Charged(states) => {
                    let rows = keys.iter().cloned().zip(states.iter().copied()).map(|((s, d), u)| (s, d, u)).collect();
                    self.record_usage("charge", rows).await;
                    return Ok((scopes.iter().cloned().zip(states).collect(), false));
                }
                ChargeOutcome::Exists => {
                    match self.store.commit(record_id, amounts.tokens, amounts.cost_micros, now).await? {
                        // The record expired in between: charge again.
                        SettleOutcome::NotFound => {}
                        outcome => return self.settled_recorded("charge", record_id, outcome).await,
                    }
                }
                ChargeOutcome::Unseeded(positions) => {
                    self.seed(positions.into_iter().map(|i| keys[i].clone()).collect()).await?;
                }
            }
        }
        Err(Error::StoreReply("counters vanished during every attempt of this charge".into()))
    }

    /// Frees a reservation without charging it.
    pub async fn release(&self, req: &pb::ReleaseRequest) -> Result<pb::ReleaseResponse, Error> {
        validate_id("reservation_id", &req.reservation_id)?;
        refuse_lease_id(&req.reservation_id)?;
        if req.reservation_id.starts_with(FAIL_OPEN_PREFIX) {
            return Ok(pb::ReleaseResponse {});
        }
        let outcome = match self.store.release(&req.reservation_id, self.clock.now()).await {
            Ok(outcome) => {
                self.store_ok();
                outcome
            }
            Err(err) => return Err(self.fail("release", err)),
        };
        let (_, replay) = self.settled(&req.reservation_id, outcome)?;
        if !replay {
            self.metrics.releases.inc();
        }
        Ok(pb::ReleaseResponse {})
    }

    /// [`Self::settled`], after recording a commit that charged now in the ledger.
    async fn settled_recorded(
        &self,
        op: &'static str,
        id: &str,
        outcome: SettleOutcome,
    ) -> Result<(Vec<(Scope, CounterState)>, bool), Error> {
        if let SettleOutcome::Settled { replay: false, counters } = &outcome {
            self.record_usage(op, counters.clone()).await;
        }
        self.settled(id, outcome)
    }

    fn settled(&self, id: &str, outcome: SettleOutcome) -> Result<(Vec<(Scope, CounterState)>, bool), Error> {
        match outcome {
            SettleOutcome::Settled { replay, counters } => {
                Ok((counters.into_iter().map(|(scope, _, state)| (scope, state)).collect(), replay))
            }
            SettleOutcome::NotFound => Err(Error::ReservationNotFound(id.to_owned())),
            SettleOutcome::Conflict(state) => {
                Err(Error::ReservationSettled { id: id.to_owned(), state: state.as_str() })
            }
        }
    }

    async fn remaining_after(&self, counters: Vec<(Scope, CounterState)>) -> Result<(i64, i64), Error> {
        let (scopes, states): (Vec<Scope>, Vec<CounterState>) = counters.into_iter().unzip();
        let (limits, _) = self.resolve_limits(&scopes).await?;
        Ok(tightest_daily(&limits, &states))
    }

    /// Limits, usage and remaining budget of the principal's scopes in the current window.
    pub async fn status(&self, req: &pb::StatusRequest) -> Result<pb::StatusResponse, Error> {
        let scopes = Scope::of_principal(req.principal.as_ref())?;
        let now = self.clock.now();
        let result = async {
            let (limits, _) = self.resolve_limits(&scopes).await?;
            let (keys, window_reset) = window(&scopes, &limits, now);
            let mut views = self.store.status(&keys, now).await?;
            let unseeded: Vec<(Scope, NaiveDate)> =
                keys.iter().zip(&views).filter(|(_, v)| !v.seeded).map(|(k, _)| k.clone()).collect();
            if !unseeded.is_empty() {
                self.seed(unseeded).await?;
                views = self.store.status(&keys, now).await?;
            }
            Ok::<_, Error>((limits, views, window_reset))
        }
        .await;
        let (limits, views, window_reset) = match result {
            Ok(found) => {
                self.store_ok();
                found
            }
            Err(err) => return Err(self.fail("status", err)),
        };
        let reset_at = timestamp(window_reset);
        let zone = limits.first().map(Limits::zone).unwrap_or(chrono_tz::Tz::UTC);
        let scopes = scopes
            .iter()
            .zip(limits.iter().zip(&views))
            .map(|(scope, (l, v))| {
                let (c, m): (&CounterState, &MinuteState) = (&v.state, &v.minute);
                pb::ScopeStatus {
                    scope: Some(scope.to_proto()),
                    tokens_per_day: l.tokens_per_day,
                    used_tokens: c.used_tokens,
                    reserved_tokens: c.reserved_tokens,
                    remaining_tokens: c.remaining_tokens(l.tokens_per_day).unwrap_or(-1),
                    reset_at: Some(reset_at),
                    cost_micros_per_day: l.cost_micros_per_day,
                    used_cost_micros: c.used_cost_micros,
                    reserved_cost_micros: c.reserved_cost_micros,
                    remaining_cost_micros: c.remaining_cost_micros(l.cost_micros_per_day).unwrap_or(-1),
                    requests_today: c.requests,
                    requests_per_minute: l.requests_per_minute,
                    tokens_per_minute: l.tokens_per_minute,
                    remaining_requests_this_minute: m.remaining_requests(l.requests_per_minute).unwrap_or(-1),
                    remaining_tokens_this_minute: m.remaining_tokens(l.tokens_per_minute).unwrap_or(-1),
                    time_zone: zone.name().to_owned(),
                    leased_tokens: v.leased.tokens,
                    leased_cost_micros: v.leased.cost_micros,
                    leased_minute_requests: v.leased.minute_requests,
                    leased_minute_tokens: v.leased.minute_tokens,
                }
            })
            .collect();
        Ok(pb::StatusResponse { scopes })
    }

    /// Sets the limits of one scope. Validated fully before anything is written; the change
    /// reaches every replica's next reservation through the limits generation.
    pub async fn set_limits(&self, req: &pb::SetLimitsRequest) -> Result<pb::SetLimitsResponse, Error> {
        let scope = Scope::from_proto(req.scope.as_ref())?;
        let limits = Limits::from_proto(req.limits.as_ref(), scope.kind)?;
        if let Err(err) = self.limits.set(&scope, &limits).await {
            return Err(self.fail("set_limits", err));
        }
        self.cache.lock().invalidate();
        if let Err(err) = self.store.bump_limits_generation().await {
            // The write is durable and idempotent; failing makes the caller retry, which is what
            // propagates it to the other replicas right away.
            return Err(self.fail("set_limits", err));
        }
        info!(scope = %scope, ?limits, "quota limits set");
        Ok(pb::SetLimitsResponse { scope: Some(scope.to_proto()), limits: Some(limits.to_proto()) })
    }

    /// The limits in force for `scopes` (override or default) and the generation they belong to.
    async fn resolve_limits(&self, scopes: &[Scope]) -> Result<(Vec<Limits>, Option<String>), Error> {
        let ttl = self.settings.limits_cache_ttl;
        let effective = |overrides: Vec<Option<Limits>>| -> Vec<Limits> {
            scopes
                .iter()
                .zip(overrides)
                .map(|(s, o)| o.unwrap_or_else(|| self.settings.defaults.for_kind(s.kind)))
                .collect()
        };
        let cached = {
            let cache = self.cache.lock();
            cache.lookup(scopes, ttl).ok().map(|found| (found, cache.generation()))
        };
        if let Some((found, generation)) = cached {
            return Ok((effective(found), generation));
        }
        // Read the generation before the limits: a change landing in between bumps it again
        // after its write, so the next reservation sees a mismatch and re-reads.
        let generation = self.store.limits_generation().await?;
        let read: HashMap<Scope, Limits> = match self.limits.get(scopes).await {
            Ok(read) => read,
            Err(err) if err.is_unavailable() => {
                let stale = {
                    let cache = self.cache.lock();
                    (cache.generation() == generation).then(|| cache.stale(scopes)).flatten()
                };
                self.metrics.store_errors.with_label_values(&["limits"]).inc();
                return match stale {
                    Some(found) => {
                        warn!(error = %err, "limits store unavailable; using cached limits");
                        Ok((effective(found), generation))
                    }
                    None => Err(err),
                };
            }
            Err(err) => return Err(err),
        };
        self.cache.lock().fill(generation.clone(), scopes, &read);
        Ok((effective(scopes.iter().map(|s| read.get(s).copied()).collect()), generation))
    }

    fn store_ok(&self) {
        if self.incident.load(Ordering::Relaxed) && self.incident.swap(false, Ordering::Relaxed) {
            info!(store = self.store.kind(), "quota store answers again; incident over");
        }
    }

    fn store_failed(&self, op: &'static str, err: &Error) {
        self.metrics.store_errors.with_label_values(&[op]).inc();
        if !err.is_unavailable() {
            warn!(op, error = %err, "quota store error");
        } else if !self.incident.swap(true, Ordering::Relaxed) {
            let mode = if self.settings.fail_open {
                "admitting reservations unchecked (fail-open)"
            } else {
                "refusing reservations (fail-closed)"
            };
            error!(op, store = self.store.kind(), error = %err, "quota store unreachable; {mode} until it answers");
        }
    }

    /// Records a failed operation and turns unreachability into the fail-closed error.
    fn fail(&self, op: &'static str, err: Error) -> Error {
        match err {
            Error::InvalidArgument(_) | Error::ReservationNotFound(_) | Error::ReservationSettled { .. } => err,
            err => {
                self.store_failed(op, &err);
                if err.is_unavailable() { Error::Unavailable(err.to_string()) } else { err }
            }
        }
    }
}
