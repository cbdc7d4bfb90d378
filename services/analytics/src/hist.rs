//! Latency histograms with fixed log buckets, so percentiles can be added up across rollup rows.
//!
//! Bucket 0 holds latencies under 100 µs; bucket `i` (1..=92) holds `[T[i-1], T[i])` where
//! `T[k] = round(100 · 2^(k/4))` µs, and bucket 93 everything from ~839 s. A bucket spans a factor
//! of about 1.19, which bounds the error of a percentile estimate. `analytics_latency_bucket` in
//! migration 0002 holds the same thresholds.

use meshgate_proto::analytics::v1 as pb;

/// Number of buckets.
pub const BUCKETS: usize = THRESHOLDS.len() + 1;

/// Lower bounds of buckets 1..=93, microseconds.
pub const THRESHOLDS: [i64; 93] = [
    100, 119, 141, 168, 200, 238, 283, 336, 400, 476, 566, 673, 800, 951, 1131, 1345, 1600, 1903, 2263, 2691, 3200,
    3805, 4525, 5382, 6400, 7611, 9051, 10763, 12800, 15222, 18102, 21527, 25600, 30444, 36204, 43054, 51200, 60887,
    72408, 86108, 102400, 121775, 144815, 172216, 204800, 243550, 289631, 344431, 409600, 487099, 579262, 688862,
    819200, 974198, 1158524, 1377725, 1638400, 1948397, 2317048, 2755449, 3276800, 3896794, 4634095, 5510899, 6553600,
    7793588, 9268190, 11021797, 13107200, 15587175, 18536380, 22043595, 26214400, 31174351, 37072760, 44087190,
    52428800, 62348702, 74145520, 88174380, 104857600, 124697404, 148291040, 176348760, 209715200, 249394808,
    296582080, 352697520, 419430400, 498789616, 593164160, 705395040, 838860800,
];

/// The bucket of a latency (negative latencies never reach here: ingest refuses them).
pub fn bucket(latency_us: i64) -> usize {
    THRESHOLDS.partition_point(|t| *t <= latency_us)
}

/// What one trace spent: its tokens by class and its cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spend {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Of the prompt, tokens read from the provider's prompt cache.
    pub cached_prompt_tokens: i64,
    /// Of the prompt, tokens written to the provider's prompt cache.
    pub cache_write_tokens: i64,
    /// Of the completion, tokens spent reasoning.
    pub reasoning_tokens: i64,
    pub cost_micros: i64,
}

/// Sums over a group of traces: what a rollup row holds, and what answers are made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acc {
    pub requests: i64,
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_prompt_tokens: i64,
    pub cache_write_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_micros: i64,
    pub latency_sum_us: i64,
    pub latency_min_us: i64,
    pub latency_max_us: i64,
    pub hist: [i64; BUCKETS],
}

impl Default for Acc {
    fn default() -> Self {
        Self {
            requests: 0,
            errors: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_prompt_tokens: 0,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
            cost_micros: 0,
            latency_sum_us: 0,
            latency_min_us: i64::MAX,
            latency_max_us: 0,
            hist: [0; BUCKETS],
        }
    }
}

impl Acc {
    /// Counts one trace.
    pub fn add(&mut self, is_error: bool, spend: &Spend, latency_us: i64) {
        self.requests += 1;
        self.errors += i64::from(is_error);
        self.prompt_tokens = self.prompt_tokens.saturating_add(spend.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(spend.completion_tokens);
        self.cached_prompt_tokens = self.cached_prompt_tokens.saturating_add(spend.cached_prompt_tokens);
        self.cache_write_tokens = self.cache_write_tokens.saturating_add(spend.cache_write_tokens);
        self.reasoning_tokens = self.reasoning_tokens.saturating_add(spend.reasoning_tokens);
        self.cost_micros = self.cost_micros.saturating_add(spend.cost_micros);
        self.latency_sum_us = self.latency_sum_us.saturating_add(latency_us);
        self.latency_min_us = self.latency_min_us.min(latency_us);
        self.latency_max_us = self.latency_max_us.max(latency_us);
        self.hist[bucket(latency_us)] += 1;
    }

    /// Adds another group's sums.
    pub fn merge(&mut self, other: &Acc) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(other.completion_tokens);
        self.cached_prompt_tokens = self.cached_prompt_tokens.saturating_add(other.cached_prompt_tokens);
        self.cache_write_tokens = self.cache_write_tokens.saturating_add(other.cache_write_tokens);
        self.reasoning_tokens = self.reasoning_tokens.saturating_add(other.reasoning_tokens);
        self.cost_micros = self.cost_micros.saturating_add(other.cost_micros);
        self.latency_sum_us = self.latency_sum_us.saturating_add(other.latency_sum_us);
        self.latency_min_us = self.latency_min_us.min(other.latency_min_us);
        self.latency_max_us = self.latency_max_us.max(other.latency_max_us);
        for (mine, theirs) in self.hist.iter_mut().zip(other.hist.iter()) {
            *mine += theirs;
        }
    }

    /// Estimated `p` quantile (nearest rank) in µs: the rank's bucket, interpolated linearly
    /// inside it and clamped to the observed minimum and maximum, so it always lies in the bucket
    /// of the exact value. 0 for no requests.
    pub fn percentile(&self, p: f64) -> i64 {
        let n: i64 = self.hist.iter().sum();
        if n == 0 {
            return 0;
        }
        let rank = ((p * n as f64).ceil() as i64).clamp(1, n);
        let mut before = 0;
        for (b, &count) in self.hist.iter().enumerate() {
            if count == 0 || before + count < rank {
                before += count;
                continue;
            }
            let low = if b == 0 { 0 } else { THRESHOLDS[b - 1] }.max(self.latency_min_us);
            let high = THRESHOLDS.get(b).copied().unwrap_or(i64::MAX).min(self.latency_max_us.saturating_add(1));
            let fraction = ((rank - before) as f64 - 0.5) / count as f64;
            let estimate = low as f64 + (high - low) as f64 * fraction;
            return (estimate.floor() as i64).clamp(low, (high - 1).max(low));
        }
        self.latency_max_us
    }

    pub fn avg_latency_us(&self) -> i64 {
        if self.requests == 0 { 0 } else { self.latency_sum_us / self.requests }
    }

    /// The answer row of this group.
    pub fn row(&self, key: String) -> pb::AggregateRow {
        pb::AggregateRow {
            key,
            requests: self.requests,
            errors: self.errors,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cost_micros: self.cost_micros,
            p50_latency_us: self.percentile(0.5),
            p95_latency_us: self.percentile(0.95),
            p99_latency_us: self.percentile(0.99),
            avg_latency_us: self.avg_latency_us(),
            cached_prompt_tokens: self.cached_prompt_tokens,
            cache_write_tokens: self.cache_write_tokens,
            reasoning_tokens: self.reasoning_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_grow_by_the_fourth_root_of_two() {
        for (k, t) in THRESHOLDS.iter().enumerate() {
            assert_eq!(*t, (100.0 * 2f64.powf(k as f64 / 4.0)).round() as i64);
        }
        assert_eq!((bucket(0), bucket(99), bucket(100), bucket(118), bucket(119)), (0, 0, 1, 1, 2));
        assert_eq!(bucket(i64::MAX), BUCKETS - 1);
    }

    /// Exact nearest-rank quantile of sorted values.
    fn exact(sorted: &[i64], p: f64) -> i64 {
        let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    #[test]
    fn percentiles_fall_in_the_bucket_of_the_exact_value() {
        let mut acc = Acc::default();
        assert_eq!(acc.percentile(0.5), 0);
        let mut values: Vec<i64> = (0..5_000).map(|i: i64| (i * i * 7919) % 3_000_000 + 50).collect();
        for v in &values {
            acc.add(false, &Spend::default(), *v);
        }
        values.sort_unstable();
        for p in [0.01, 0.5, 0.95, 0.99, 1.0] {
            let (estimate, truth) = (acc.percentile(p), exact(&values, p));
            assert_eq!(bucket(estimate), bucket(truth), "p{p}: {estimate} vs {truth}");
            assert!((estimate - truth).abs() as f64 <= truth as f64 * 0.19 + 1.0, "p{p}: {estimate} vs {truth}");
        }
        let mut single = Acc::default();
        let spend = Spend {
            prompt_tokens: 10,
            completion_tokens: 20,
            cached_prompt_tokens: 4,
            cache_write_tokens: 3,
            reasoning_tokens: 5,
            cost_micros: 7,
        };
        single.add(true, &spend, 12_345);
        assert_eq!((single.percentile(0.5), single.percentile(0.99)), (12_345, 12_345));
        let mut merged = Acc::default();
        merged.merge(&single);
        merged.merge(&acc);
        assert_eq!((merged.requests, merged.errors, merged.latency_min_us), (5_001, 1, 50));
        let row = merged.row(String::new());
        assert_eq!(
            (row.prompt_tokens, row.completion_tokens, row.cost_micros),
            (10, 20, 7),
            "only the one trace spent anything"
        );
        assert_eq!((row.cached_prompt_tokens, row.cache_write_tokens, row.reasoning_tokens), (4, 3, 5));
    }
}
