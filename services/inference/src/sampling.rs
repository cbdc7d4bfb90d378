//! Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with a
//! seeded generator so a seed reproduces its output.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::Error;

/// Validated sampling controls.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    /// Seed of the generator; `None` draws one.
    pub seed: Option<u64>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: None }
    }
}

impl SamplingConfig {
    /// Builds the controls from optional request fields, rejecting out-of-range values.
    pub fn from_request(
        temperature: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<i32>,
        seed: Option<u64>,
    ) -> Result<Self, Error> {
        let temperature = temperature.unwrap_or(0.0);
        if !temperature.is_finite() || !(0.0..=100.0).contains(&temperature) {
            return Err(Error::InvalidRequest(format!("temperature must be between 0 and 100, got {temperature}")));
        }
        let top_p = top_p.unwrap_or(1.0);
        if !top_p.is_finite() || top_p <= 0.0 || top_p > 1.0 {
            return Err(Error::InvalidRequest(format!("top_p must be in (0, 1], got {top_p}")));
        }
        let top_k = match top_k {
            None => 0,
            Some(k) => {
                usize::try_from(k).map_err(|_| Error::InvalidRequest(format!("top_k must not be negative, got {k}")))?
            }
        };
        Ok(Self { temperature, top_k, top_p, seed })
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Picks tokens for one generation.
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Self {
        let rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_rng(&mut rand::rng()),
        };
        Self { config, rng }
    }

    /// The next token for `logits` (one score per vocabulary entry).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.config.is_greedy() {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.config.temperature;
        let mut candidates: Vec<(u32, f32)> =
            logits.iter().enumerate().filter(|(_, l)| !l.is_nan()).map(|(i, &l)| (i as u32, l * inv_t)).collect();
        if candidates.is_empty() {
            return 0;
        }
        // Highest first; ties by lower id so the order (and thus a seeded draw) is deterministic.
        let by_score = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if self.config.top_k > 0 && self.config.top_k < candidates.len() {
            candidates.select_nth_unstable_by(self.config.top_k - 1, by_score);
            candidates.truncate(self.config.top_k);
        }
        candidates.sort_unstable_by(by_score);

        let max = candidates[0].1;
        let mut total = 0.0f64;
        let mut probs: Vec<f64> = candidates
            .iter()
            .map(|&(_, l)| {
                let p = f64::from(l - max).exp();
                total += p;
                p
            })
            .collect();
        for p in &mut probs {
            *p /= total;
        }
        if self.config.top_p < 1.0 {
            let mut mass = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    mass += p;
                    mass >= f64::from(self.config.top_p)
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            mass = probs.iter().sum();
            for p in &mut probs {
                *p /= mass;
            }
        }

        let mut draw: f64 = self.rng.random();
        for (i, p) in probs.iter().enumerate() {
            if draw < *p {
                return candidates[i].0;
            }
            draw -= p;
        }
        // Rounding left a sliver of mass: the last kept candidate takes it.
        candidates[probs.len() - 1].0
    }
}

/// Index of the largest logit, the first one on ties (as numpy's argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
        Sampler::new(SamplingConfig { temperature, top_k, top_p, seed: Some(seed) })
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingConfig::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.5]), 1);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.5, 2.0, 1.9, -3.0];
        for seed in 0..20 {
            assert_eq!(sampler(1.0, 1, 1.0, seed).sample(&logits), 1);
            assert_eq!(sampler(1.0, 0, 0.01, seed).sample(&logits), 1);
        }
    }

    #[test]
    fn top_k_limits_the_candidates() {
        let logits = [1.0, 1.1, 1.2, 1.3, 5.0];
        let mut s = sampler(10.0, 2, 1.0, 7);
        for _ in 0..200 {
            assert!(matches!(s.sample(&logits), 3 | 4));
        }
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        // p = softmax([ln 1, ln 3]) = [0.25, 0.75]
        let logits = [0.0, 3f32.ln()];
        let mut s = sampler(1.0, 0, 1.0, 42);
        let ones = (0..4000).filter(|_| s.sample(&logits) == 1).count();
        assert!((2850..3150).contains(&ones), "{ones}");
    }

    #[test]
    fn the_same_seed_repeats_and_another_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = sampler(1.0, 0, 0.95, seed);
            (0..30).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn out_of_range_controls_are_rejected() {
        assert!(SamplingConfig::from_request(Some(-0.1), None, None, None).is_err());
        assert!(SamplingConfig::from_request(Some(f32::NAN), None, None, None).is_err());
        assert!(SamplingConfig::from_request(None, Some(0.0), None, None).is_err());
        assert!(SamplingConfig::from_request(None, Some(1.5), None, None).is_err());
        assert!(SamplingConfig::from_request(None, None, Some(-1), None).is_err());
        let ok = SamplingConfig::from_request(Some(0.7), Some(0.9), Some(40), Some(3)).unwrap();
        assert_eq!(ok, SamplingConfig { temperature: 0.7, top_k: 40, top_p: 0.9, seed: Some(3) });
    }
}
