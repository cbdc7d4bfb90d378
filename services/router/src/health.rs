//! Live state per target: latency EWMA, counts and a consecutive-failure circuit breaker.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// When a target is taken out of rotation and for how long.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit.
    pub failure_threshold: u32,
    /// How long an open circuit stays open before one probe request is let through.
    pub open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { failure_threshold: 5, open_ms: 30_000 }
    }
}

/// What the router knows about one target.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TargetHealth {
    pub ewma_latency_us: f64,
    pub successes: u64,
    pub failures: u64,
    pub consecutive_failures: u32,
    /// Set while the circuit is open.
    pub open_until: Option<Instant>,
    /// When the one probe of a half-open circuit was let through (until its outcome arrives).
    pub probing_since: Option<Instant>,
}

impl TargetHealth {
    /// Open circuits are skipped until `open_until`; after it the target is half-open: one probe
    /// request is let through, and one more failure re-opens it at once.
    pub fn is_open(&self, now: Instant) -> bool {
        self.open_until.is_some_and(|until| now < until)
    }
}

/// Weight of the newest latency sample in the moving average.
const EWMA_ALPHA: f64 = 0.2;

/// Health of every target, keyed by target id.
#[derive(Debug, Default)]
pub struct HealthBook {
    config: BreakerConfig,
    targets: Mutex<HashMap<String, TargetHealth>>,
}

impl HealthBook {
    pub fn new(config: BreakerConfig) -> Self {
        Self { config, targets: Mutex::default() }
    }

    pub fn get(&self, target_id: &str) -> TargetHealth {
        self.targets.lock().get(target_id).copied().unwrap_or_default()
    }

    /// Whether a request may go to the target now. A half-open target admits one probe at a
    /// time (a probe whose outcome never arrives is replaced after `open_ms`).
    pub fn admit(&self, target_id: &str, now: Instant) -> bool {
        let mut targets = self.targets.lock();
        let Some(health) = targets.get_mut(target_id) else {
            return true;
        };
        match health.open_until {
            None => true,
            Some(until) if now < until => false,
            Some(_) => {
                let probe_lapsed =
                    health.probing_since.is_none_or(|since| now >= since + Duration::from_millis(self.config.open_ms));
                if probe_lapsed {
                    health.probing_since = Some(now);
                }
                probe_lapsed
            }
        }
    }

    /// Records one call's outcome at time `now`.
    pub fn record(&self, target_id: &str, ok: bool, latency: Duration, now: Instant) {
        let mut targets = self.targets.lock();
        if !targets.contains_key(target_id) {
            targets.insert(target_id.to_owned(), TargetHealth::default());
        }
        let Some(health) = targets.get_mut(target_id) else {
            return;
        };
        health.probing_since = None;
        let sample = latency.as_secs_f64() * 1e6;
        health.ewma_latency_us = if health.successes + health.failures == 0 {
            sample
        } else {
            EWMA_ALPHA * sample + (1.0 - EWMA_ALPHA) * health.ewma_latency_us
        };
        if ok {
            health.successes += 1;
            health.consecutive_failures = 0;
            health.open_until = None;
        } else {
            health.failures += 1;
            health.consecutive_failures = health.consecutive_failures.saturating_add(1);
            let half_open = health.open_until.is_some_and(|until| now >= until);
            if half_open || health.consecutive_failures >= self.config.failure_threshold {
                health.open_until = Some(now + Duration::from_millis(self.config.open_ms));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_probes_after_timeout_and_closes_on_success() {
        let book = HealthBook::new(BreakerConfig { failure_threshold: 3, open_ms: 1000 });
        let t0 = Instant::now();
        for _ in 0..2 {
            book.record("p/m", false, Duration::from_millis(1), t0);
        }
        assert!(!book.get("p/m").is_open(t0), "two failures stay closed");
        book.record("p/m", false, Duration::from_millis(1), t0);
        assert!(book.get("p/m").is_open(t0 + Duration::from_millis(999)));
        let half_open = t0 + Duration::from_millis(1000);
        assert!(!book.get("p/m").is_open(half_open));
        assert!(book.admit("p/m", half_open), "the first request after the open period probes");
        assert!(!book.admit("p/m", half_open), "one probe at a time");
        book.record("p/m", false, Duration::from_millis(1), half_open);
        assert!(book.get("p/m").is_open(half_open + Duration::from_millis(500)), "a failed probe re-opens");
        let later = half_open + Duration::from_millis(1000);
        book.record("p/m", true, Duration::from_millis(1), later);
        let health = book.get("p/m");
        assert!(!health.is_open(later));
        assert_eq!((health.successes, health.failures, health.consecutive_failures), (1, 4, 0));
    }

    #[test]
    fn ewma_starts_at_first_sample_and_moves_by_alpha() {
        let book = HealthBook::new(BreakerConfig::default());
        let now = Instant::now();
        book.record("t", true, Duration::from_micros(1000), now);
        assert_eq!(book.get("t").ewma_latency_us, 1000.0);
        book.record("t", true, Duration::from_micros(2000), now);
        assert!((book.get("t").ewma_latency_us - 1200.0).abs() < 1e-6);
    }
}
