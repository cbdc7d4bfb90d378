//! The gateway's side of quota leases (see the README's Quota section): a [`LeasePool`] holds, per
//! principal, a slice of each of its scopes' budgets carved by the quota service (`Quota.Lease`),
//! admits requests against it without a call, reports their usage in batches, and gives back what
//! it does not use. When a scope is nearly spent, or a request does not fit what the pool can
//! hold, the pool reserves that request with `Quota.Reserve` as the gateway always did, so the
//! last tokens of a budget are admitted exactly and refusals carry the same answer.
//!
//! ```text
//! let admission = pool.admit(&request_id, &principal, Estimate { tokens, cost_micros }).await?;
//! // ... the reply, with QuotaSnapshot::from_reserve(admission.response()) in its headers ...
//! admission.settle(Some(&usage)).await;   // or settle(None), or drop it: nothing was served
//! ```

mod backend;
mod book;
mod pool;

use std::time::Duration;

use meshgate_proto::quota::v1 as pb;
use meshgate_runtime::ErrorCode;
use serde::{Deserialize, Serialize};

pub use backend::QuotaBackend;
pub use pool::{Admission, LeasePool, PoolStats};

/// What a request is expected to cost: what a reservation would hold for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Estimate {
    /// Prompt tokens plus the completion's limit.
    pub tokens: i64,
    /// The cost of that at the dearest target the request may be served by, micro-dollars.
    pub cost_micros: i64,
}

/// Why a request was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// A limit refuses it: the refused reservation, which names the scope, the limit and when a
    /// retry can succeed (the gateway's 429).
    #[error("quota exceeded: {} of scope {:?}", .0.rejected_limit, .0.rejected_scope)]
    Refused(Box<pb::ReserveResponse>),
    /// The quota service did not answer in time, or failed.
    #[error("quota service: {}", .0.message())]
    Quota(tonic::Status),
}

impl AdmitError {
    /// The shared error code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            AdmitError::Refused(_) => ErrorCode::QuotaExceeded,
            AdmitError::Quota(status) => match status.code() {
                tonic::Code::Unknown | tonic::Code::Internal => ErrorCode::Unavailable,
                code => ErrorCode::from_grpc(code),
            },
        }
    }
}

/// How a pool leases (`[gateway.leases]` when the gateway embeds it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseSettings {
    /// How long the quota service holds a slice without a call from this replica: what a replica
    /// that dies keeps from the others (capped by the service's `max_lease_ttl_ms`).
    pub ttl_ms: u64,
    /// How often slices are renewed (and usage reported) while requests come.
    pub flush_interval_ms: u64,
    /// A settled request's usage is reported within this delay, not at the next flush: what a
    /// replica killed without a drain (SIGKILL, OOM) leaves uncharged. Requests settled within
    /// one delay share one call.
    pub report_delay_ms: u64,
    /// How much of a principal's traffic a slice is sized to cover: the admission rate measured
    /// on this replica times this (at least four requests like the last one).
    pub horizon_ms: u64,
    /// A principal's unused slice is given back after this long without a request.
    pub idle_return_ms: u64,
    /// After a scope answered that it is nearly spent, the principal's requests are reserved one
    /// by one for this long before leasing is tried again.
    pub fallback_ms: u64,
    /// Deadline of one call to the quota service.
    pub call_timeout_ms: u64,
    /// Most principals holding leases at once; beyond, requests are reserved one by one.
    pub max_principals: usize,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        Self {
            ttl_ms: 10_000,
            flush_interval_ms: 200,
            report_delay_ms: 20,
            horizon_ms: 2_000,
            idle_return_ms: 1_000,
            fallback_ms: 1_000,
            call_timeout_ms: 2_000,
            max_principals: 100_000,
        }
    }
}

/// A [`LeaseSettings`] value out of range.
#[derive(Debug, thiserror::Error)]
#[error("invalid lease settings: {0}")]
pub struct SettingsError(String);

impl LeaseSettings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |m: &str| Err(SettingsError(m.into()));
        if !(100..=3_600_000).contains(&self.ttl_ms) {
            return invalid("ttl_ms must be between 100 and 3600000");
        }
        // Renewals come at least twice per lifetime, so a live lease never lapses between them.
        if self.flush_interval_ms == 0 || self.flush_interval_ms.saturating_mul(4) > self.ttl_ms {
            return invalid("flush_interval_ms must be at least 1 and at most a quarter of ttl_ms");
        }
        if self.report_delay_ms == 0 || self.report_delay_ms > self.flush_interval_ms {
            return invalid("report_delay_ms must be at least 1 and at most flush_interval_ms");
        }
        if self.horizon_ms == 0 || self.idle_return_ms == 0 || self.fallback_ms == 0 {
            return invalid("horizon_ms, idle_return_ms and fallback_ms must be at least 1");
        }
        if self.call_timeout_ms == 0 || self.call_timeout_ms.saturating_mul(2) > self.ttl_ms {
            return invalid("call_timeout_ms must be at least 1 and at most half of ttl_ms");
        }
        if self.max_principals == 0 {
            return invalid("max_principals must be at least 1");
        }
        Ok(())
    }

    pub(crate) fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }

    pub(crate) fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.flush_interval_ms)
    }

    pub(crate) fn report_delay(&self) -> Duration {
        Duration::from_millis(self.report_delay_ms)
    }

    pub(crate) fn horizon(&self) -> Duration {
        Duration::from_millis(self.horizon_ms)
    }

    pub(crate) fn idle_return(&self) -> Duration {
        Duration::from_millis(self.idle_return_ms)
    }

    pub(crate) fn fallback(&self) -> Duration {
        Duration::from_millis(self.fallback_ms)
    }

    pub(crate) fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        LeaseSettings::default().validate().unwrap();
        let bad = LeaseSettings { flush_interval_ms: 5_000, ..LeaseSettings::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("flush_interval_ms"));
        let bad = LeaseSettings { report_delay_ms: 0, ..LeaseSettings::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("report_delay_ms"));
        let bad = LeaseSettings { call_timeout_ms: 6_000, ..LeaseSettings::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("call_timeout_ms"));
        let bad = LeaseSettings { max_principals: 0, ..LeaseSettings::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("max_principals"));
        let parsed: Result<LeaseSettings, _> = serde_json::from_str(r#"{"ttl_secs": 5}"#);
        assert!(parsed.unwrap_err().to_string().contains("ttl_secs"));
    }

    #[test]
    fn errors_map_to_the_shared_codes() {
        assert_eq!(AdmitError::Refused(Box::default()).code(), ErrorCode::QuotaExceeded);
        assert_eq!(AdmitError::Quota(tonic::Status::deadline_exceeded("slow")).code(), ErrorCode::Timeout);
        assert_eq!(AdmitError::Quota(tonic::Status::unavailable("down")).code(), ErrorCode::Unavailable);
        assert_eq!(AdmitError::Quota(tonic::Status::internal("bug")).code(), ErrorCode::Unavailable);
        assert_eq!(AdmitError::Quota(tonic::Status::invalid_argument("bad")).code(), ErrorCode::InvalidRequest);
    }
}
