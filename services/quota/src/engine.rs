//! The quota engine: limits resolution, reservations, commits and status over a [`QuotaStore`].
//! The gRPC service is a thin adapter over it; tests drive it directly too.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use meshgate_proto::common::v1::Principal;
use meshgate_proto::quota::v1 as pb;
use meshgate_storage::SharedClock;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tracing::{error, info, warn};

use crate::Error;
use crate::limits::{DefaultLimits, LimitsCache, LimitsRepo};
use crate::metrics::QuotaMetrics;
use crate::model::{
    CounterState, Limits, MAX_COST_MICROS, MAX_TOKENS, Scope, check_amount, retry_after_seconds, validate_id,
    window_day, window_reset_at,
};
use crate::store::{CounterSpec, QuotaStore, ReserveInput, ReserveOutcome, SettleOutcome};

/// Reservation ids handed out while failing open; they are not in any store.
const FAIL_OPEN_PREFIX: &str = "open_";
/// Limits changing under a reservation more often than this in a row is treated as an error.
const STALE_RETRIES: usize = 3;

/// Behaviour knobs of the engine.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub defaults: DefaultLimits,
    /// How long a reservation holds budget without a commit or release.
    pub reservation_ttl: Duration,
    /// Safety-net lifetime of cached limits (changes normally propagate immediately).
    pub limits_cache_ttl: Duration,
    /// Admit reservations unchecked while the store is unreachable (default: refuse).
    pub fail_open: bool,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            defaults: DefaultLimits::default(),
            reservation_ttl: Duration::from_secs(300),
            limits_cache_ttl: Duration::from_secs(30),
            fail_open: false,
        }
    }
}

/// Budgets over a store; one per replica.
pub struct QuotaEngine {
    store: Arc<dyn QuotaStore>,
    limits: Arc<dyn LimitsRepo>,
    cache: Mutex<LimitsCache>,
    clock: SharedClock,
    settings: EngineSettings,
    metrics: QuotaMetrics,
    /// Whether the store is currently failing, so an outage is logged once, not per request.
    incident: AtomicBool,
}

/// The reservation id of a request: derived from the principal and the request id, so reserving
/// twice yields the same reservation and two tenants' equal request ids never collide.
pub fn reservation_id(principal: &Principal, request_id: &str) -> String {
    let mut hasher = Sha256::new();
    for part in [&principal.org_id, &principal.project_id, &principal.user_id, &principal.key_id] {
        hasher.update(part.as_bytes());
        hasher.update([0x1f]);
    }
    hasher.update(request_id.as_bytes());
    let digest = hasher.finalize();
    format!("rsv_{}", hex::encode(&digest[..16]))
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0) }
}

/// Remaining daily tokens of the tightest scope, or -1 when no scope has a token limit.
fn tightest_remaining(limits: &[Limits], counters: &[CounterState]) -> i64 {
    limits.iter().zip(counters).filter_map(|(l, c)| c.remaining_tokens(l.tokens_per_day)).min().unwrap_or(-1)
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
            cache: Mutex::new(LimitsCache::default()),
            clock,
            settings,
            metrics,
            incident: AtomicBool::new(false),
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
        let scopes = Scope::of_principal(req.principal.as_ref())?;
        let principal = req.principal.clone().unwrap_or_default();
        let id = reservation_id(&principal, &req.request_id);

        let started = Instant::now();
        let result = self.try_reserve(&scopes, id, req).await;
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

    async fn try_reserve(
        &self,
        scopes: &[Scope],
        reservation_id: String,
        req: &pb::ReserveRequest,
    ) -> Result<pb::ReserveResponse, Error> {
        let now = self.clock.now();
        let day = window_day(now);
        let ttl = TimeDelta::from_std(self.settings.reservation_ttl).unwrap_or(TimeDelta::MAX);
        let expires_at = now.checked_add_signed(ttl).unwrap_or(DateTime::<Utc>::MAX_UTC);
        for _ in 0..STALE_RETRIES {
            let (limits, generation) = self.resolve_limits(scopes).await?;
            let input = ReserveInput {
                reservation_id: reservation_id.clone(),
                counters: scopes
                    .iter()
                    .zip(&limits)
                    .map(|(scope, l)| CounterSpec {
                        scope: scope.clone(),
                        day,
                        tokens_limit: l.tokens_per_day,
                        cost_limit_micros: l.cost_micros_per_day,
                    })
                    .collect(),
                tokens: req.estimated_tokens,
                cost_micros: req.estimated_cost_micros,
                now,
                expires_at,
                limits_generation: generation,
            };
            match self.store.reserve(&input).await? {
                ReserveOutcome::StaleLimits => self.cache.lock().invalidate(),
                ReserveOutcome::Admitted { counters, .. } => {
                    return Ok(pb::ReserveResponse {
                        admitted: true,
                        reservation_id,
                        remaining_tokens: tightest_remaining(&limits, &counters),
                        ..Default::default()
                    });
                }
                ReserveOutcome::Rejected { counter, limit, counters } => {
                    let reset_at = window_reset_at(now);
                    return Ok(pb::ReserveResponse {
                        admitted: false,
                        reservation_id: String::new(),
                        rejected_scope: scopes.get(counter).map(Scope::to_proto),
                        rejected_limit: limit.as_str().to_owned(),
                        reset_at: Some(timestamp(reset_at)),
                        retry_after_seconds: retry_after_seconds(now, reset_at),
                        remaining_tokens: tightest_remaining(&limits, &counters),
                    });
                }
            }
        }
        Err(Error::StoreReply("limits changed during every attempt of this reservation; retry".into()))
    }

    /// Charges the actual usage of a reservation (once; replays answer the same).
    pub async fn commit(&self, req: &pb::CommitRequest) -> Result<pb::CommitResponse, Error> {
        validate_id("reservation_id", &req.reservation_id)?;
        let usage = req.usage.as_ref().ok_or_else(|| Error::InvalidArgument("usage is required".into()))?;
        check_amount("usage.prompt_tokens", usage.prompt_tokens, MAX_TOKENS)?;
        check_amount("usage.completion_tokens", usage.completion_tokens, MAX_TOKENS)?;
        check_amount("usage.total_tokens", usage.total_tokens, MAX_TOKENS)?;
        check_amount("usage.cost_micros", usage.cost_micros, MAX_COST_MICROS)?;
        let tokens =
            if usage.total_tokens > 0 { usage.total_tokens } else { usage.prompt_tokens + usage.completion_tokens };
        if req.reservation_id.starts_with(FAIL_OPEN_PREFIX) {
            self.metrics.commits.with_label_values(&["fail_open"]).inc();
            return Ok(pb::CommitResponse { remaining_tokens: -1 });
        }
        let outcome = match self.store.commit(&req.reservation_id, tokens, usage.cost_micros).await {
            Ok(outcome) => {
                self.store_ok();
                outcome
            }
            Err(err) => return Err(self.fail("commit", err)),
        };
        let (counters, replay) = self.settled(&req.reservation_id, outcome)?;
        self.metrics.commits.with_label_values(&[if replay { "replay" } else { "committed" }]).inc();
        if !replay {
            self.metrics.committed_tokens.inc_by(u64::try_from(tokens).unwrap_or(0));
        }
        Ok(pb::CommitResponse { remaining_tokens: self.remaining_after(counters).await? })
    }

    /// Frees a reservation without charging it.
    pub async fn release(&self, req: &pb::ReleaseRequest) -> Result<pb::ReleaseResponse, Error> {
        validate_id("reservation_id", &req.reservation_id)?;
        if req.reservation_id.starts_with(FAIL_OPEN_PREFIX) {
            return Ok(pb::ReleaseResponse {});
        }
        let outcome = match self.store.release(&req.reservation_id).await {
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

    async fn remaining_after(&self, counters: Vec<(Scope, CounterState)>) -> Result<i64, Error> {
        let (scopes, states): (Vec<Scope>, Vec<CounterState>) = counters.into_iter().unzip();
        let (limits, _) = self.resolve_limits(&scopes).await?;
        Ok(tightest_remaining(&limits, &states))
    }

    /// Limits, usage and remaining budget of the principal's scopes in the current window.
    pub async fn status(&self, req: &pb::StatusRequest) -> Result<pb::StatusResponse, Error> {
        let scopes = Scope::of_principal(req.principal.as_ref())?;
        let now = self.clock.now();
        let day = window_day(now);
        let reset_at = timestamp(window_reset_at(now));
        let result = async {
            let (limits, _) = self.resolve_limits(&scopes).await?;
            let keys: Vec<_> = scopes.iter().map(|s| (s.clone(), day)).collect();
            let counters = self.store.status(&keys, now).await?;
            Ok::<_, Error>((limits, counters))
        }
        .await;
        let (limits, counters) = match result {
            Ok(found) => {
                self.store_ok();
                found
            }
            Err(err) => return Err(self.fail("status", err)),
        };
        let scopes = scopes
            .iter()
            .zip(limits.iter().zip(&counters))
            .map(|(scope, (l, c))| pb::ScopeStatus {
                scope: Some(scope.to_proto()),
                tokens_per_day: l.tokens_per_day,
                used_tokens: c.used_tokens,
                reserved_tokens: c.reserved_tokens,
                remaining_tokens: c.remaining_tokens(l.tokens_per_day).unwrap_or(-1),
                reset_at: Some(reset_at),
                cost_micros_per_day: l.cost_micros_per_day,
                used_cost_micros: c.used_cost_micros,
            })
            .collect();
        Ok(pb::StatusResponse { scopes })
    }

    /// Sets the limits of one scope. Validated fully before anything is written; the change
    /// reaches every replica's next reservation through the limits generation.
    pub async fn set_limits(&self, req: &pb::SetLimitsRequest) -> Result<pb::SetLimitsResponse, Error> {
        let scope = Scope::from_proto(req.scope.as_ref())?;
        let limits = Limits::from_proto(req.limits.as_ref())?;
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
            Error::InvalidArgument(_)
            | Error::NotSupported(_)
            | Error::ReservationNotFound(_)
            | Error::ReservationSettled { .. } => err,
            err => {
                self.store_failed(op, &err);
                if err.is_unavailable() { Error::Unavailable(err.to_string()) } else { err }
            }
        }
    }
}
