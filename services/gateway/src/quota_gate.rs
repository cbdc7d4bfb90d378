//! How a request's budget is held from its admission until it settles: against the budget slices
//! this replica leases from the quota service (`quota_leases = true`, the default: most requests
//! make no quota call), or by a reservation of its own (one `Quota.Reserve` per request, then a
//! `Commit` or `Release`). A [`Hold`] is settled once, with the usage served or with none
//! (released); one dropped unsettled (its request's future was cancelled) is released.

use std::time::Duration;

use meshgate_proto::common::v1::{Principal, Usage};
use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_proto::quota::v1::{CommitRequest, ReleaseRequest, ReserveRequest, ReserveResponse};
use meshgate_quota_lease::{AdmitError, Estimate, LeasePool, LeaseSettings, SettingsError};
use meshgate_runtime::{ApiError, ErrorCode, MeshChannel};

use crate::budget::{self, QuotaSnapshot};
use crate::metrics::GatewayMetrics;
use crate::peers::peer_call;

/// Retries of a reservation's commit or release while quota is unreachable.
const SETTLE_BACKOFF: [Duration; 3] = [Duration::from_millis(100), Duration::from_millis(500), Duration::from_secs(2)];

/// Admits requests against the callers' budgets. Cheap to clone.
#[derive(Clone)]
pub struct QuotaGate {
    quota: QuotaClient<MeshChannel>,
    /// Deadline of a `Reserve`, `Commit` or `Release` of the gateway's own.
    timeout: Duration,
    /// The replica's leases; `None` reserves every request.
    leases: Option<LeasePool>,
    metrics: GatewayMetrics,
}

impl QuotaGate {
    /// A gate calling `quota`, leasing with `leases` when given (starts the pool's flusher on
    /// the current Tokio runtime).
    pub fn new(
        quota: QuotaClient<MeshChannel>,
        timeout: Duration,
        leases: Option<LeaseSettings>,
        metrics: GatewayMetrics,
    ) -> Result<Self, SettingsError> {
        let leases = leases.map(|settings| LeasePool::new(quota.clone(), settings)).transpose()?;
        Ok(Self { quota, timeout, leases, metrics })
    }

    /// Holds `estimate` in every scope of `principal` for the request `request_id`, or the 429
    /// (counted) of the scope that refuses it.
    pub async fn hold(&self, request_id: &str, principal: &Principal, estimate: Estimate) -> Result<Hold, ApiError> {
        let hold = match &self.leases {
            Some(pool) => match pool.admit(request_id, principal, estimate).await {
                Ok(admission) => Hold::Pool(admission),
                Err(AdmitError::Refused(refused)) => return Err(self.refused(&refused)),
                Err(err @ AdmitError::Quota(_)) => return Err(unanswered(&err)),
            },
            None => {
                let response = self.reserve(request_id.to_owned(), principal, estimate, 0).await?;
                Hold::Reservation(Reservation {
                    response,
                    principal: principal.clone(),
                    request_id: request_id.to_owned(),
                    quota: self.quota.clone(),
                    timeout: self.timeout,
                    settled: false,
                })
            }
        };
        self.metrics.quota_admissions.with_label_values(&[hold.via()]).inc();
        Ok(hold)
    }

    /// Reserves `estimate` for `ttl_seconds` (0: the quota service's default) with a `Quota.Reserve`
    /// of its own, whatever `quota_leases` says: what a queued job holds, committed by the sync
    /// service when the job is delivered.
    pub async fn reserve(
        &self,
        request_id: String,
        principal: &Principal,
        estimate: Estimate,
        ttl_seconds: i64,
    ) -> Result<ReserveResponse, ApiError> {
        let reserve = ReserveRequest {
            request_id,
            principal: Some(principal.clone()),
            estimated_tokens: estimate.tokens,
            estimated_cost_micros: estimate.cost_micros,
            ttl_seconds,
        };
        let mut quota = self.quota.clone();
        let reserved = peer_call("quota", self.timeout, quota.reserve(reserve)).await?;
        if !reserved.admitted {
            return Err(self.refused(&reserved));
        }
        Ok(reserved)
    }

    /// A limit was changed through this replica: its next admissions lease under the new limits
    /// rather than spend slices carved under the old ones (other replicas' leases learn of it
    /// with their next lease call, within a flush interval while requests come).
    pub fn limits_changed(&self) {
        if let Some(pool) = &self.leases {
            pool.limits_changed();
        }
    }

    /// Stops leasing and gives every unused slice back (a replica shutting down): what it held
    /// is the other replicas' again at once rather than when the leases expire.
    pub async fn close(&self) {
        if let Some(pool) = &self.leases {
            pool.close().await;
        }
    }

    fn refused(&self, refused: &ReserveResponse) -> ApiError {
        self.metrics.quota_rejections.with_label_values(&[&refused.rejected_limit]).inc();
        budget::rejection(refused)
    }
}

/// The edge's error for a pool that could not get an answer from quota: 504 `timeout` when it
/// did not answer in time, 503 when it could not be reached.
fn unanswered(err: &AdmitError) -> ApiError {
    match err {
        AdmitError::Quota(status) if err.code() == ErrorCode::Timeout => {
            ApiError::new(ErrorCode::Timeout, status.message())
        }
        _ => ApiError::new(err.code(), err.to_string()),
    }
}

/// A request's admitted budget, until it settles.
pub enum Hold {
    /// Admitted by the lease pool: against a lease (no call), or by a reservation the pool made
    /// when a scope is nearly spent.
    Pool(meshgate_quota_lease::Admission),
    /// A reservation of its own (`quota_leases = false`).
    Reservation(Reservation),
}

impl Hold {
    /// The caller's budget with this request admitted, for the `x-meshgate-quota-*` headers.
    pub fn budget(&self) -> QuotaSnapshot {
        match self {
            Hold::Pool(admission) => QuotaSnapshot::from_reserve(admission.response()),
            Hold::Reservation(reservation) => QuotaSnapshot::from_reserve(&reservation.response),
        }
    }

    /// How the request was admitted: `lease` (no quota call of its own) or `reservation`.
    pub fn via(&self) -> &'static str {
        match self {
            Hold::Pool(admission) if admission.is_leased() => "lease",
            Hold::Pool(_) | Hold::Reservation(_) => "reservation",
        }
    }

    /// Charges `usage` (the usage served, its cost set), or releases the hold when nothing was
    /// served (`None`). Against a lease this is bookkeeping the pool reports with its next flush;
    /// a reservation is committed or released now, retried while quota is unreachable.
    pub async fn settle(self, usage: Option<Usage>) {
        match self {
            Hold::Pool(admission) => admission.settle(usage.as_ref()).await,
            Hold::Reservation(reservation) => reservation.settle(usage).await,
        }
    }
}

/// A request's own reservation. Dropped unsettled, it is released.
pub struct Reservation {
    response: ReserveResponse,
    principal: Principal,
    request_id: String,
    quota: QuotaClient<MeshChannel>,
    timeout: Duration,
    settled: bool,
}

impl Reservation {
    async fn settle(mut self, usage: Option<Usage>) {
        self.settled = true;
        settle_reservation(
            self.quota.clone(),
            self.timeout,
            std::mem::take(&mut self.response.reservation_id),
            usage.map(|usage| (usage, self.principal.clone())),
            &self.request_id,
        )
        .await;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (quota, timeout) = (self.quota.clone(), self.timeout);
        let reservation_id = std::mem::take(&mut self.response.reservation_id);
        let request_id = std::mem::take(&mut self.request_id);
        runtime.spawn(async move { settle_reservation(quota, timeout, reservation_id, None, &request_id).await });
    }
}

/// Commits `usage` (with the principal, which lets quota charge it even if its store lost the
/// reservation), or releases when there is none. Commit and release are idempotent, so failures
/// are retried while the reservation still lives: a lost commit would be usage nobody pays for.
async fn settle_reservation(
    mut quota: QuotaClient<MeshChannel>,
    timeout: Duration,
    reservation_id: String,
    usage: Option<(Usage, Principal)>,
    request_id: &str,
) {
    let mut attempt = 0;
    loop {
        let result = match &usage {
            Some((usage, principal)) => {
                let request = CommitRequest {
                    reservation_id: reservation_id.clone(),
                    usage: Some(*usage),
                    principal: Some(principal.clone()),
                };
                peer_call("quota", timeout, quota.commit(request)).await.map(drop)
            }
            None => {
                let request = ReleaseRequest { reservation_id: reservation_id.clone() };
                peer_call("quota", timeout, quota.release(request)).await.map(drop)
            }
        };
        let retryable = matches!(&result, Err(err) if matches!(err.code, ErrorCode::Unavailable | ErrorCode::Timeout));
        match result {
            Ok(()) => return,
            Err(err) if retryable && attempt < SETTLE_BACKOFF.len() => {
                tracing::debug!(%err, request_id, attempt, "settling the reservation failed; retrying");
                tokio::time::sleep(SETTLE_BACKOFF[attempt]).await;
                attempt += 1;
            }
            Err(err) => {
                tracing::warn!(%err, request_id, "settling the reservation failed; its TTL releases the hold");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_without_an_answer_is_a_timeout_or_unavailable() {
        let slow = AdmitError::Quota(tonic::Status::deadline_exceeded("quota service did not answer within 2000 ms"));
        let err = unanswered(&slow);
        assert_eq!(
            (err.code, err.message.as_str()),
            (ErrorCode::Timeout, "quota service did not answer within 2000 ms")
        );
        let down = unanswered(&AdmitError::Quota(tonic::Status::unavailable("connection refused")));
        assert_eq!(down.code, ErrorCode::Unavailable);
        assert!(down.message.contains("connection refused"), "{}", down.message);
    }
}
