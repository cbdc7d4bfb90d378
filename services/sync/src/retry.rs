//! When to try again: the exponential backoff of the queue's deliveries and of the cloud uplink's
//! uploads, and the wait a server asks for (`Retry-After`) on provider calls and uploads alike.
//! Kept apart so that those modules share it without importing one another.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

/// Backoff and attempt budget of the queue's jobs; the cloud uplink uses the backoff alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts before a job becomes a dead letter.
    pub max_attempts: i32,
    /// The first retry's wait; doubles per attempt.
    pub base: Duration,
    /// The longest wait.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: 8, base: Duration::from_secs(1), cap: Duration::from_secs(30) }
    }
}

impl RetryPolicy {
    /// The wait after the `attempts`-th failed attempt: `base · 2^(attempts − 1)`, capped.
    pub fn backoff(&self, attempts: i32) -> Duration {
        let exponent = attempts.saturating_sub(1).clamp(0, 30) as u32;
        self.base.saturating_mul(1u32 << exponent).min(self.cap)
    }
}

/// `Retry-After` (seconds or an HTTP date) or `retry-after-ms`, in whole seconds rounded up.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<u64> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(value) = header("retry-after") {
        if let Ok(seconds) = value.parse::<u64>() {
            return Some(seconds);
        }
        if let Ok(when) = httpdate::parse_http_date(value) {
            let wait = when.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
            return Some(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
        }
    }
    let millis = header("retry-after-ms")?.parse::<f64>().ok().filter(|ms| ms.is_finite() && *ms >= 0.0)?;
    Some((millis / 1000.0).ceil() as u64)
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_and_caps_at_thirty() {
        let policy = RetryPolicy::default();
        let waits: Vec<u64> = (1..=8).map(|n| policy.backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(policy.backoff(i32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn retry_after_forms() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&headers), Some(2));
        headers.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(7));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        headers.insert("retry-after", HeaderValue::try_from(later).unwrap());
        assert!((29..=31).contains(&retry_after(&headers).unwrap()));
    }
}
