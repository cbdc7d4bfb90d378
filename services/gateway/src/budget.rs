//! The caller's budget as the edge reports it: the `x-meshgate-quota-*` headers of every usage
//! response and the 429 of a refused reservation.

use chrono::{DateTime, SecondsFormat, Utc};
use meshgate_proto::quota::v1::{self as pb, ReserveResponse};
use meshgate_runtime::{ApiError, ErrorCode};

/// Daily tokens left in the tightest scope, with this request's estimate held.
pub const REMAINING_TOKENS: &str = "x-meshgate-quota-remaining-tokens";
/// Daily cost left in the tightest scope, micro-dollars, with this request's estimate held.
pub const REMAINING_COST: &str = "x-meshgate-quota-remaining-cost-micros";
/// Requests that may still start this minute in the tightest scope.
pub const REMAINING_REQUESTS: &str = "x-meshgate-quota-remaining-requests";
/// RFC 3339 time when the daily window resets (on a 429: when a retry can succeed).
pub const RESET: &str = "x-meshgate-quota-reset";
/// On a 429: the scope whose limit refused the request, `<kind>:<id>`.
pub const SCOPE: &str = "x-meshgate-quota-scope";
/// On a 429: the limit that refused it (`tokens_per_day`, `requests_per_minute`, ...).
pub const LIMIT: &str = "x-meshgate-quota-limit";
/// On a 429: the exact wait in milliseconds (`Retry-After` is rounded up to whole seconds). The
/// OpenAI SDKs honour it.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// The caller's budget as its reservation left it, reported on every usage response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaSnapshot {
    /// -1 when no scope limits it, like the other two.
    pub remaining_tokens: i64,
    pub remaining_cost_micros: i64,
    pub remaining_requests: i64,
    pub reset_at: Option<DateTime<Utc>>,
}

impl QuotaSnapshot {
    pub fn from_reserve(response: &ReserveResponse) -> Self {
        Self {
            remaining_tokens: response.remaining_tokens,
            remaining_cost_micros: response.remaining_cost_micros,
            remaining_requests: response.remaining_requests_this_minute,
            reset_at: response.reset_at.as_ref().and_then(datetime),
        }
    }

    /// The `x-meshgate-quota-*` headers; unlimited amounts are left out.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::with_capacity(4);
        for (name, value) in [
            (REMAINING_TOKENS, self.remaining_tokens),
            (REMAINING_COST, self.remaining_cost_micros),
            (REMAINING_REQUESTS, self.remaining_requests),
        ] {
            if value >= 0 {
                headers.push((name, value.to_string()));
            }
        }
        if let Some(reset) = self.reset_at {
            headers.push((RESET, rfc3339(reset)));
        }
        headers
    }
}

/// The 429 of a refused reservation: which scope and limit, when to retry (exactly).
pub fn rejection(response: &ReserveResponse) -> ApiError {
    let scope = response.rejected_scope.as_ref().map(|s| format!("{}:{}", scope_kind(s.kind), s.id));
    let reset = response.reset_at.as_ref().and_then(datetime);
    let mut message = format!("quota exceeded: {}", response.rejected_limit);
    if let Some(scope) = &scope {
        message.push_str(&format!(" of {scope}"));
    }
    if let Some(reset) = reset {
        message.push_str(&format!("; resets at {}", rfc3339(reset)));
    }
    message.push_str(&format!("; retry after {} s", response.retry_after_seconds.max(1)));
    let mut err = ApiError::new(ErrorCode::QuotaExceeded, message)
        .with_retry_after(u64::try_from(response.retry_after_seconds.max(1)).unwrap_or(1))
        .with_header(LIMIT, response.rejected_limit.clone())
        .with_header(RETRY_AFTER_MS, response.retry_after_ms.max(0).to_string());
    if let Some(scope) = scope {
        err = err.with_header(SCOPE, scope);
    }
    if let Some(reset) = reset {
        err = err.with_header(RESET, rfc3339(reset));
    }
    err
}

pub(crate) fn datetime(ts: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}

pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(crate) fn scope_kind(kind: i32) -> &'static str {
    match pb::ScopeKind::try_from(kind) {
        Ok(pb::ScopeKind::Org) => "org",
        Ok(pb::ScopeKind::Project) => "project",
        Ok(pb::ScopeKind::User) => "user",
        Ok(pb::ScopeKind::Key) => "key",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_name_the_scope_the_limit_and_the_exact_wait() {
        let response = ReserveResponse {
            admitted: false,
            rejected_scope: Some(pb::Scope { kind: pb::ScopeKind::User as i32, id: "u_1".into() }),
            rejected_limit: "requests_per_minute".into(),
            reset_at: Some(prost_types::Timestamp { seconds: 1_900_000_000, nanos: 600_000_000 }),
            retry_after_seconds: 1,
            retry_after_ms: 600,
            ..Default::default()
        };
        let err = rejection(&response);
        assert_eq!((err.code, err.retry_after), (ErrorCode::QuotaExceeded, Some(1)));
        assert!(err.message.contains("requests_per_minute of user:u_1"), "{}", err.message);
        let header = |name: &str| err.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str());
        assert_eq!(header(RETRY_AFTER_MS), Some("600"));
        assert_eq!(header(SCOPE), Some("user:u_1"));
        assert_eq!(header(LIMIT), Some("requests_per_minute"));
        assert_eq!(header(RESET), Some("2030-03-17T17:46:40.600Z"));
    }

    #[test]
    fn unlimited_amounts_are_left_out_of_the_headers() {
        let snapshot =
            QuotaSnapshot { remaining_tokens: 10, remaining_cost_micros: -1, remaining_requests: 0, reset_at: None };
        let headers = snapshot.headers();
        assert_eq!(headers, vec![(REMAINING_TOKENS, "10".to_owned()), (REMAINING_REQUESTS, "0".to_owned())]);
    }
}
