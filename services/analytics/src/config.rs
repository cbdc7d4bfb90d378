use std::time::Duration;

use meshgate_storage::PostgresConfig;
use serde::{Deserialize, Serialize};

use crate::Error;

/// Configuration of the analytics service (`[analytics]`, `MESHGATE_ANALYTICS__*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Postgres holding the traces; without it they are kept in memory (bounded).
    pub database_url: Option<String>,
    pub postgres: PostgresConfig,
    /// Traces the in-memory store keeps; past it the oldest are dropped.
    pub memory_max_traces: usize,
    /// Day partitions kept ready on each side of today.
    pub partitions_ahead_days: u32,
    /// Traces that started longer ago than this are refused (at most `retention_days`).
    pub max_trace_age_days: u32,
    /// Day partitions (traces, model calls, findings, hourly rollups) older than this many days
    /// are dropped; the daily rollups are kept.
    pub retention_days: u32,
    /// Traces that start further than this in the future are refused (clock skew allowance).
    pub max_future_skew_secs: u64,
    /// Traces per RecordBatch at most.
    pub max_batch_traces: usize,
    /// Largest gRPC message accepted, bytes.
    pub max_message_bytes: usize,
    /// Apply this service's migrations once Postgres answers (safe with many replicas).
    pub migrate_on_start: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: None,
            postgres: PostgresConfig::default(),
            memory_max_traces: 100_000,
            partitions_ahead_days: 3,
            max_trace_age_days: 90,
            retention_days: 90,
            max_future_skew_secs: 86_400,
            max_batch_traces: 10_000,
            max_message_bytes: 16 * 1024 * 1024,
            migrate_on_start: true,
        }
    }
}

impl Config {
    /// Fills `database_url` from `DATABASE_URL` when not configured.
    pub fn with_env_urls(mut self) -> Self {
        if self.database_url.is_none() {
            self.database_url = meshgate_storage::url_from_env("DATABASE_URL");
        }
        self
    }

    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |m: &str| Err(Error::Config(m.into()));
        if self.memory_max_traces == 0 {
            return invalid("memory_max_traces must be at least 1");
        }
        if self.max_trace_age_days == 0 {
            return invalid("max_trace_age_days must be at least 1");
        }
        if self.retention_days < self.max_trace_age_days {
            // Otherwise a late trace would recreate a partition retention has just dropped.
            return invalid("retention_days must be at least max_trace_age_days");
        }
        if self.partitions_ahead_days > 366 {
            return invalid("partitions_ahead_days must be at most 366");
        }
        if self.max_batch_traces == 0 {
            return invalid("max_batch_traces must be at least 1");
        }
        if self.max_message_bytes < 64 * 1024 {
            return invalid("max_message_bytes must be at least 65536");
        }
        Ok(())
    }

    pub fn max_trace_age(&self) -> Duration {
        Duration::from_secs(u64::from(self.max_trace_age_days) * 86_400)
    }

    pub fn max_future_skew(&self) -> Duration {
        Duration::from_secs(self.max_future_skew_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_load_through_the_runtime_loader() {
        Config::default().validate().unwrap();
        let config: Config =
            meshgate_runtime::config::load_with_defaults("analytics-test", None, Config::default()).unwrap();
        assert_eq!(config, Config::default());
        let parsed: Result<Config, _> = serde_json::from_str(r#"{"memory_max_trace": 5}"#);
        assert!(parsed.unwrap_err().to_string().contains("memory_max_trace"));
        let short = Config { retention_days: 30, max_trace_age_days: 31, ..Config::default() };
        assert!(short.validate().unwrap_err().to_string().contains("retention_days"));
    }
}
