use std::time::Duration;

use meshgate_storage::{PostgresConfig, RedisConfig};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::limits::DefaultLimits;

/// The longest reservation lifetime configurable: counters outlive their day by three days, and a
/// hold must end before its counter does.
pub const MAX_RESERVATION_TTL_SECS: u64 = 2 * 86_400;

/// The longest lease lifetime configurable: a replica that dies holding slices gives them back
/// within it.
pub const MAX_LEASE_TTL_MS: u64 = 3_600_000;

/// Configuration of the quota service (`[quota]`, `MESHGATE_QUOTA__*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Postgres holding limit overrides and the usage ledger; without it both stay in memory
    /// and no ledger is written.
    pub database_url: Option<String>,
    /// Redis holding the hot counters shared by replicas; without it counters are in memory
    /// (one replica only).
    pub redis_url: Option<String>,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// Limits of scopes without an override.
    pub defaults: DefaultLimits,
    /// How long a reservation holds budget without a commit or release, unless its request asks
    /// for another lifetime (`ttl_seconds`).
    pub reservation_ttl_secs: u64,
    /// The longest lifetime a request may ask for (a queued job's reservation); longer requests
    /// are capped here. At most two days, so a hold never outlives its day's counters.
    pub max_reservation_ttl_secs: u64,
    /// How long a settled or expired reservation is remembered for idempotent replays.
    pub settled_retention_secs: u64,
    /// How long a Charge id is remembered: a replay within it changes nothing.
    pub charge_retention_secs: u64,
    /// Safety-net lifetime of cached limits; changes normally apply on the next request.
    pub limits_cache_ttl_ms: u64,
    /// Admit reservations unchecked while the store is unreachable (default: refuse, 503).
    pub fail_open: bool,
    /// Period of the usage ledger flusher, which writes what charges could not write through.
    pub ledger_flush_interval_ms: u64,
    /// How long a charge waits for the usage ledger to record it before it is answered anyway.
    pub ledger_write_timeout_ms: u64,
    /// Counters written per ledger statement.
    pub ledger_batch_size: usize,
    /// Apply this service's migrations once Postgres answers (safe with many replicas).
    pub migrate_on_start: bool,
    /// How long a lease holds its slices without a call from its holder, unless the holder asks
    /// for another lifetime: what a replica that dies holding slices keeps from others.
    pub lease_ttl_ms: u64,
    /// The longest lifetime a holder may ask for; longer requests are capped here.
    pub max_lease_ttl_ms: u64,
    /// The wait told to a request refused only because leases hold the budget it needs (their
    /// holders give unused slices back when idle or when the scope runs low).
    pub leased_retry_after_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: None,
            redis_url: None,
            postgres: PostgresConfig::default(),
            redis: RedisConfig::default(),
            key_prefix: "meshgate:quota:".into(),
            defaults: DefaultLimits::default(),
            reservation_ttl_secs: 300,
            max_reservation_ttl_secs: 86_400,
            settled_retention_secs: 600,
            charge_retention_secs: 7 * 86_400,
            limits_cache_ttl_ms: 30_000,
            fail_open: false,
            ledger_flush_interval_ms: 1_000,
            ledger_write_timeout_ms: 500,
            ledger_batch_size: 500,
            migrate_on_start: true,
            lease_ttl_ms: 10_000,
            max_lease_ttl_ms: 60_000,
            leased_retry_after_ms: 1_000,
        }
    }
}

impl Config {
    /// Fills `database_url` / `redis_url` from `DATABASE_URL` / `REDIS_URL` when not configured.
    pub fn with_env_urls(mut self) -> Self {
        if self.database_url.is_none() {
            self.database_url = meshgate_storage::url_from_env("DATABASE_URL");
        }
        if self.redis_url.is_none() {
            self.redis_url = meshgate_storage::url_from_env("REDIS_URL");
        }
        self
    }

    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |m: &str| Err(Error::Config(m.into()));
        if self.key_prefix.is_empty() {
            return invalid("key_prefix must not be empty");
        }
        if !(1..=86_400).contains(&self.reservation_ttl_secs) {
            return invalid("reservation_ttl_secs must be between 1 and 86400");
        }
        if !(self.reservation_ttl_secs..=MAX_RESERVATION_TTL_SECS).contains(&self.max_reservation_ttl_secs) {
            return invalid(&format!(
                "max_reservation_ttl_secs must be between reservation_ttl_secs and {MAX_RESERVATION_TTL_SECS}"
            ));
        }
        if self.settled_retention_secs == 0 {
            return invalid("settled_retention_secs must be at least 1");
        }
        if self.charge_retention_secs == 0 {
            return invalid("charge_retention_secs must be at least 1");
        }
        if self.ledger_batch_size == 0 {
            return invalid("ledger_batch_size must be at least 1");
        }
        if self.ledger_flush_interval_ms < 100 {
            return invalid("ledger_flush_interval_ms must be at least 100");
        }
        if !(1..=10_000).contains(&self.ledger_write_timeout_ms) {
            return invalid("ledger_write_timeout_ms must be between 1 and 10000");
        }
        if !(100..=MAX_LEASE_TTL_MS).contains(&self.max_lease_ttl_ms) {
            return invalid(&format!("max_lease_ttl_ms must be between 100 and {MAX_LEASE_TTL_MS}"));
        }
        if !(100..=self.max_lease_ttl_ms).contains(&self.lease_ttl_ms) {
            return invalid("lease_ttl_ms must be between 100 and max_lease_ttl_ms");
        }
        if !(1..=self.max_lease_ttl_ms).contains(&self.leased_retry_after_ms) {
            return invalid("leased_retry_after_ms must be between 1 and max_lease_ttl_ms");
        }
        self.defaults.validate()
    }

    pub fn reservation_ttl(&self) -> Duration {
        Duration::from_secs(self.reservation_ttl_secs)
    }

    pub fn max_reservation_ttl(&self) -> Duration {
        Duration::from_secs(self.max_reservation_ttl_secs)
    }

    pub fn settled_retention(&self) -> Duration {
        Duration::from_secs(self.settled_retention_secs)
    }

    pub fn charge_retention(&self) -> Duration {
        Duration::from_secs(self.charge_retention_secs)
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }

    pub fn max_lease_ttl(&self) -> Duration {
        Duration::from_millis(self.max_lease_ttl_ms)
    }

    pub fn leased_retry_after(&self) -> Duration {
        Duration::from_millis(self.leased_retry_after_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_limit_users_per_day_and_minute() {
        let config = Config::default();
        config.validate().unwrap();
        let user = config.defaults.user;
        assert_eq!(
            (user.tokens_per_day, user.cost_micros_per_day, user.requests_per_minute),
            (1_000_000, 10_000_000, 100)
        );
        assert_eq!(config.defaults.org.tokens_per_day, 0);
        assert_eq!(config.defaults.key.tokens_per_day, 0);
        assert_eq!(config.charge_retention(), Duration::from_secs(604_800));
    }

    #[test]
    fn loads_through_the_runtime_loader_and_rejects_unknown_keys() {
        let config: Config =
            meshgate_runtime::config::load_with_defaults("quota-test", None, Config::default()).unwrap();
        assert_eq!(config, Config::default());
        let parsed: Result<Config, _> = serde_json::from_str(r#"{"defaults": {"key": {"tokens_per_dya": 5}}}"#);
        assert!(parsed.unwrap_err().to_string().contains("tokens_per_dya"));
        let parsed: Config =
            serde_json::from_str(r#"{"redis_url": "redis://r:6379/0", "defaults": {"user": {"tokens_per_day": 5}}}"#)
                .unwrap();
        assert_eq!(parsed.redis_url.as_deref(), Some("redis://r:6379/0"));
        assert_eq!((parsed.defaults.user.tokens_per_day, parsed.defaults.user.requests_per_minute), (5, 0));
        let zoned: Config = serde_json::from_str(r#"{"defaults": {"org": {"time_zone": "Asia/Tokyo"}}}"#).unwrap();
        zoned.validate().unwrap();
        assert_eq!(zoned.defaults.org.zone().name(), "Asia/Tokyo");
        let misplaced: Config = serde_json::from_str(r#"{"defaults": {"user": {"time_zone": "Asia/Tokyo"}}}"#).unwrap();
        assert!(misplaced.validate().unwrap_err().to_string().contains("defaults.user"));
    }

    #[test]
    fn invalid_settings_are_refused() {
        let bad = Config { reservation_ttl_secs: 0, ..Config::default() };
        assert!(bad.validate().is_err());
        let bad = Config { max_reservation_ttl_secs: 60, ..Config::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("max_reservation_ttl_secs"), "below the default ttl");
        let bad = Config { max_reservation_ttl_secs: MAX_RESERVATION_TTL_SECS + 1, ..Config::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("max_reservation_ttl_secs"));
        let bad = Config { charge_retention_secs: 0, ..Config::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("charge_retention_secs"));
        let bad = Config { lease_ttl_ms: 70_000, ..Config::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("lease_ttl_ms"), "above the max lease ttl");
        let bad = Config { max_lease_ttl_ms: MAX_LEASE_TTL_MS + 1, ..Config::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("max_lease_ttl_ms"));
        let bad = Config { leased_retry_after_ms: 0, ..Config::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("leased_retry_after_ms"));
        let mut bad = Config::default();
        bad.defaults.key.tokens_per_day = -5;
        assert!(bad.validate().unwrap_err().to_string().contains("defaults.key"));
    }
}
