//! Live state per target: latency EWMA, a sliding window of recent outcomes, planned calls in
//! flight, and a circuit breaker that opens on consecutive failures or on an error ratio.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// When a target is taken out of rotation, for how long, and what brings it back.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit.
    pub failure_threshold: u32,
    /// Share of failures in the recent window (0..1] that opens the circuit.
    pub error_ratio: f64,
    /// Outcomes the error ratio is computed over (the most recent ones).
    pub window: u32,
    /// Outcomes the window must hold before the ratio may open the circuit, so that one early
    /// failure is not a 100 % error rate.
    pub min_calls: u32,
    /// How long an open circuit stays open before probes are let through (half-open).
    pub open_ms: u64,
    /// Successful probes, one at a time, that close a half-open circuit.
    pub probes_to_close: u32,
    /// A planned call whose outcome never comes back stops counting as in flight after this.
    pub in_flight_ttl_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            error_ratio: 0.5,
            window: 20,
            min_calls: 10,
            open_ms: 30_000,
            probes_to_close: 1,
            in_flight_ttl_ms: 120_000,
        }
    }
}

impl BreakerConfig {
    /// Rejects settings that would make the breaker never open or never close.
    pub fn validate(&self) -> Result<(), String> {
        if self.failure_threshold == 0 {
            return Err("breaker.failure_threshold must be at least 1".into());
        }
        if !(self.error_ratio > 0.0 && self.error_ratio <= 1.0) {
            return Err(format!("breaker.error_ratio must be in (0, 1], not {}", self.error_ratio));
        }
        if self.window == 0 || self.min_calls > self.window {
            return Err("breaker.window must be at least 1 and at least breaker.min_calls".into());
        }
        if self.probes_to_close == 0 {
            return Err("breaker.probes_to_close must be at least 1".into());
        }
        Ok(())
    }
}

/// The breaker's state as reported by `ListTargets`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    /// The open period is over: probes decide whether it closes or opens again.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// What the router knows about one target.
#[derive(Debug, Clone, Default)]
pub struct TargetHealth {
    /// 0 until the first outcome (`samples` says whether it is known).
    pub ewma_latency_us: f64,
    pub successes: u64,
    pub failures: u64,
    pub consecutive_failures: u32,
    /// Most recent outcomes, newest last (true = failure), at most `window` long.
    recent: VecDeque<bool>,
    /// Set while the circuit is open or half-open: open before it, half-open after it.
    open_until: Option<Instant>,
    /// When the probe of a half-open circuit was let through (until its outcome arrives).
    probing_since: Option<Instant>,
    /// Successful probes since the circuit became half-open.
    probe_successes: u32,
    /// Deadlines of planned calls without an outcome yet, oldest first.
    in_flight: VecDeque<Instant>,
}

impl TargetHealth {
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.open_until {
            None => BreakerState::Closed,
            Some(until) if now < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Whether the circuit is open now (half-open does not count: it admits probes).
    pub fn is_open(&self, now: Instant) -> bool {
        self.state(now) == BreakerState::Open
    }

    /// Failures among the recent outcomes, 0..1 (0 without outcomes).
    pub fn error_rate(&self) -> f64 {
        if self.recent.is_empty() {
            return 0.0;
        }
        self.recent.iter().filter(|failed| **failed).count() as f64 / self.recent.len() as f64
    }

    /// Whether any latency sample arrived.
    pub fn has_latency(&self) -> bool {
        self.successes + self.failures > 0
    }

    /// Planned calls still waiting for their outcome at `now`. Deadlines are pushed in time
    /// order, so the expired ones are a prefix.
    pub fn in_flight(&self, now: Instant) -> usize {
        self.in_flight.len() - self.in_flight.partition_point(|deadline| *deadline <= now)
    }

    /// What the power-of-two-choices comparison reads.
    pub fn load(&self, now: Instant) -> Load {
        Load {
            in_flight: self.in_flight(now),
            ewma_latency_us: self.ewma_latency_us,
            measured: self.has_latency(),
            error_rate: self.error_rate(),
        }
    }
}

/// A target's load at one moment, read without copying its history.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    pub in_flight: usize,
    pub ewma_latency_us: f64,
    /// Whether any latency sample arrived.
    pub measured: bool,
    pub error_rate: f64,
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

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    pub fn get(&self, target_id: &str) -> TargetHealth {
        self.targets.lock().get(target_id).cloned().unwrap_or_default()
    }

    /// The target's load at `now` (zero for a target never seen).
    pub fn load(&self, target_id: &str, now: Instant) -> Load {
        self.targets.lock().get(target_id).map(|h| h.load(now)).unwrap_or_default()
    }

    /// Whether a request may go to the target now. A half-open target admits one probe at a
    /// time (a probe whose outcome never arrives is replaced after `open_ms`).
    pub fn admit(&self, target_id: &str, now: Instant) -> bool {
        let mut targets = self.targets.lock();
        let Some(health) = targets.get_mut(target_id) else {
            return true;
        };
        match health.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => {
                let probe_lapsed =
                    health.probing_since.is_none_or(|since| now >= since + Duration::from_millis(self.config.open_ms));
                if probe_lapsed {
                    health.probing_since = Some(now);
                }
                probe_lapsed
            }
        }
    }

    /// Counts a planned call to the target as in flight until its outcome (or the TTL).
    pub fn start(&self, target_id: &str, now: Instant) {
        let mut targets = self.targets.lock();
        let health = targets.entry(target_id.to_owned()).or_default();
        while health.in_flight.front().is_some_and(|deadline| *deadline <= now) {
            health.in_flight.pop_front();
        }
        health.in_flight.push_back(now + Duration::from_millis(self.config.in_flight_ttl_ms));
    }

    /// Ends the oldest in-flight call of the target (judging it is [`HealthBook::record`]'s).
    pub fn finish(&self, target_id: &str) {
        if let Some(health) = self.targets.lock().get_mut(target_id) {
            health.in_flight.pop_front();
        }
    }

    /// The target's breaker state at `now` (closed for a target never seen).
    pub fn state(&self, target_id: &str, now: Instant) -> BreakerState {
        self.targets.lock().get(target_id).map_or(BreakerState::Closed, |h| h.state(now))
    }

    /// Records one call's outcome at time `now`; true when it opened or closed the breaker.
    pub fn record(&self, target_id: &str, ok: bool, latency: Duration, now: Instant) -> bool {
        let config = self.config;
        let mut targets = self.targets.lock();
        let health = targets.entry(target_id.to_owned()).or_default();
        health.probing_since = None;
        let sample = latency.as_secs_f64() * 1e6;
        health.ewma_latency_us = if health.has_latency() {
            EWMA_ALPHA * sample + (1.0 - EWMA_ALPHA) * health.ewma_latency_us
        } else {
            sample
        };
        health.recent.push_back(!ok);
        while health.recent.len() > config.window as usize {
            health.recent.pop_front();
        }
        let state = health.state(now);
        if ok {
            health.successes += 1;
            health.consecutive_failures = 0;
            if state == BreakerState::HalfOpen {
                health.probe_successes += 1;
                if health.probe_successes >= config.probes_to_close {
                    // Closed again: the failures that opened it must not re-open it by ratio.
                    health.open_until = None;
                    health.probe_successes = 0;
                    health.recent.clear();
                    return true;
                }
            }
            return false;
        }
        health.failures += 1;
        health.consecutive_failures = health.consecutive_failures.saturating_add(1);
        let ratio_trips =
            health.recent.len() >= config.min_calls.max(1) as usize && health.error_rate() >= config.error_ratio;
        let trips = match state {
            // A failed probe re-opens at once.
            BreakerState::HalfOpen => true,
            // Calls already under way when it opened do not extend the open period.
            BreakerState::Open => false,
            BreakerState::Closed => health.consecutive_failures >= config.failure_threshold || ratio_trips,
        };
        if trips {
            health.open_until = Some(now + Duration::from_millis(config.open_ms));
            health.probe_successes = 0;
        }
        trips
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 3,
            error_ratio: 0.5,
            window: 10,
            min_calls: 4,
            open_ms: 1000,
            probes_to_close: 1,
            in_flight_ttl_ms: 500,
        }
    }

    #[test]
    fn opens_after_consecutive_failures_probes_after_timeout_and_closes_on_success() {
        let book = HealthBook::new(config());
        let t0 = Instant::now();
        for _ in 0..2 {
            book.record("p/m", false, MS, t0);
        }
        assert_eq!(book.get("p/m").state(t0), BreakerState::Closed, "two failures stay closed");
        book.record("p/m", false, MS, t0);
        assert_eq!(book.get("p/m").state(t0 + 999 * MS), BreakerState::Open);
        assert!(!book.admit("p/m", t0 + 999 * MS), "an open circuit admits nothing");
        let half_open = t0 + 1000 * MS;
        assert_eq!(book.get("p/m").state(half_open), BreakerState::HalfOpen);
        assert!(book.admit("p/m", half_open), "the first request after the open period probes");
        assert!(!book.admit("p/m", half_open), "one probe at a time");
        book.record("p/m", false, MS, half_open);
        assert_eq!(book.get("p/m").state(half_open + 500 * MS), BreakerState::Open, "a failed probe re-opens");
        let later = half_open + 1000 * MS;
        assert!(book.admit("p/m", later));
        book.record("p/m", true, MS, later);
        let health = book.get("p/m");
        assert_eq!(health.state(later), BreakerState::Closed);
        assert_eq!((health.successes, health.failures, health.consecutive_failures), (1, 4, 0));
        assert_eq!(health.error_rate(), 0.0, "closing forgets the window that opened it");
    }

    #[test]
    fn error_ratio_opens_without_consecutive_failures() {
        let book = HealthBook::new(config());
        let now = Instant::now();
        // Alternating outcomes never reach three failures in a row, but half of them fail.
        for ok in [true, false, true] {
            book.record("t", ok, MS, now);
        }
        assert_eq!(book.get("t").state(now), BreakerState::Closed, "three calls are under min_calls");
        book.record("t", false, MS, now);
        let health = book.get("t");
        assert_eq!(health.consecutive_failures, 1);
        assert_eq!(health.error_rate(), 0.5);
        assert_eq!(health.state(now), BreakerState::Open);
    }

    #[test]
    fn ratio_is_over_the_recent_window_only() {
        let book = HealthBook::new(BreakerConfig { window: 4, min_calls: 4, ..config() });
        let now = Instant::now();
        for ok in [false, false, true, true, true, true] {
            book.record("t", ok, MS, now);
        }
        assert_eq!(book.get("t").error_rate(), 0.0, "the two early failures left the window");
        book.record("t", false, MS, now);
        assert_eq!(book.get("t").error_rate(), 0.25);
        assert_eq!(book.get("t").state(now), BreakerState::Closed);
    }

    #[test]
    fn several_probes_may_be_needed_to_close() {
        let book = HealthBook::new(BreakerConfig { probes_to_close: 2, ..config() });
        let t0 = Instant::now();
        for _ in 0..3 {
            book.record("t", false, MS, t0);
        }
        let half_open = t0 + 1000 * MS;
        assert!(book.admit("t", half_open));
        book.record("t", true, MS, half_open);
        assert_eq!(book.get("t").state(half_open), BreakerState::HalfOpen, "one good probe is not enough");
        assert!(book.admit("t", half_open), "the next probe is let through once the first answered");
        book.record("t", true, MS, half_open);
        assert_eq!(book.get("t").state(half_open), BreakerState::Closed);
    }

    #[test]
    fn a_lost_probe_is_replaced_after_the_open_period() {
        let book = HealthBook::new(config());
        let t0 = Instant::now();
        for _ in 0..3 {
            book.record("t", false, MS, t0);
        }
        let half_open = t0 + 1000 * MS;
        assert!(book.admit("t", half_open));
        assert!(!book.admit("t", half_open + 999 * MS));
        assert!(book.admit("t", half_open + 1000 * MS), "the probe never reported: another may go");
    }

    #[test]
    fn in_flight_counts_until_outcome_or_ttl() {
        let book = HealthBook::new(config());
        let now = Instant::now();
        book.start("t", now);
        book.start("t", now);
        assert_eq!(book.get("t").in_flight(now), 2);
        book.record("t", true, MS, now);
        assert_eq!(book.get("t").in_flight(now), 2, "an outcome alone does not say which call it ends");
        book.finish("t");
        assert_eq!(book.get("t").in_flight(now), 1);
        book.finish("t");
        assert_eq!(book.get("t").in_flight(now), 0);
        book.start("t", now);
        assert_eq!(book.get("t").in_flight(now + 500 * MS), 0, "an outcome that never came expires");
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

    #[test]
    fn invalid_settings_are_refused() {
        assert!(BreakerConfig::default().validate().is_ok());
        assert!(BreakerConfig { failure_threshold: 0, ..config() }.validate().is_err());
        assert!(BreakerConfig { error_ratio: 0.0, ..config() }.validate().is_err());
        assert!(BreakerConfig { min_calls: 11, ..config() }.validate().is_err());
        assert!(BreakerConfig { probes_to_close: 0, ..config() }.validate().is_err());
    }
}
