//! The first stage of a classifier cascade: a linear model over hashed n-grams of the encoder's
//! token ids, trained by `scripts/models/ngram.py`, which computes exactly these features.
//!
//! Every window of `order` consecutive ids (for each configured order) is hashed with 64-bit
//! FNV-1a over `[order, id0 as u32 LE, id1 as u32 LE, ...]` into one of `buckets` rows; each window
//! counts `1/sqrt(windows)`. The scores are `softmax(bias + Σ value · weights[row])`. The text is
//! settled here when its top label's probability reaches that label's `min_confidence`; otherwise
//! the encoder decides. Scoring a short text is a few hundred multiply-adds: no session, no queue.

use std::path::Path;

use crate::error::Error;
use crate::manifest::FirstStageSpec;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// A loaded first stage.
#[derive(Debug, Clone)]
pub struct FirstStage {
    /// `[buckets, labels]` row-major.
    weights: Vec<f32>,
    bias: Vec<f32>,
    labels: usize,
    buckets: u64,
    orders: Vec<u8>,
    /// Per label: the probability from which that label is settled here (`None`: never).
    min_confidence: Vec<Option<f32>>,
}

impl FirstStage {
    /// Reads the weights file of `spec` (little-endian f32: weights, then bias).
    pub fn load(path: &Path, spec: &FirstStageSpec, labels: usize) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|e| Error::Load(format!("{}: {e}", path.display())))?;
        let buckets = spec.buckets as usize;
        let expected = (buckets + 1) * labels * 4;
        if bytes.len() != expected {
            return Err(Error::Load(format!(
                "{}: {} bytes, expected {expected} for {buckets} buckets and {labels} labels",
                path.display(),
                bytes.len()
            )));
        }
        let mut values: Vec<f32> =
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::Load(format!("{}: value {i} is not finite", path.display())));
        }
        let bias = values.split_off(buckets * labels);
        Self::new(values, bias, spec)
    }

    /// A first stage from its parts (`weights` `[buckets, labels]` row-major).
    pub fn new(weights: Vec<f32>, bias: Vec<f32>, spec: &FirstStageSpec) -> Result<Self, Error> {
        let labels = bias.len();
        if labels == 0 || spec.buckets == 0 || weights.len() != spec.buckets as usize * labels {
            return Err(Error::Load(format!(
                "first stage: {} weights and {labels} biases do not fit {} buckets",
                weights.len(),
                spec.buckets
            )));
        }
        if spec.min_confidence.len() != labels {
            return Err(Error::Load(format!(
                "first stage: {} min_confidence values for {labels} labels",
                spec.min_confidence.len()
            )));
        }
        Ok(Self {
            weights,
            bias,
            labels,
            buckets: u64::from(spec.buckets),
            orders: spec.orders.clone(),
            min_confidence: spec.min_confidence.clone(),
        })
    }

    /// Probabilities of each label for a text's token ids.
    pub fn scores(&self, ids: &[u32]) -> Vec<f32> {
        let windows: usize = self.orders.iter().map(|&o| ids.len().saturating_sub(usize::from(o) - 1)).sum();
        let mut logits = self.bias.clone();
        if windows > 0 {
            let value = 1.0 / (windows as f32).sqrt();
            for &order in &self.orders {
                for window in ids.windows(usize::from(order)) {
                    let row = (bucket_hash(order, window) % self.buckets) as usize * self.labels;
                    for (logit, w) in logits.iter_mut().zip(&self.weights[row..row + self.labels]) {
                        *logit += value * w;
                    }
                }
            }
        }
        softmax(&logits)
    }

    /// Whether `probabilities` (from [`FirstStage::scores`]) settle the text here.
    pub fn settles(&self, probabilities: &[f32]) -> bool {
        let (top, p) = probabilities.iter().copied().enumerate().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or((0, 0.0));
        self.min_confidence.get(top).copied().flatten().is_some_and(|limit| p >= limit)
    }
}

/// FNV-1a over the order byte and the window's ids as little-endian u32s.
fn bucket_hash(order: u8, window: &[u32]) -> u64 {
    let mut h = FNV_OFFSET;
    let mut eat = |byte: u8| {
        h ^= u64::from(byte);
        h = h.wrapping_mul(FNV_PRIME);
    };
    eat(order);
    for id in window {
        id.to_le_bytes().into_iter().for_each(&mut eat);
    }
    h
}

pub(crate) fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / total).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(buckets: u32, orders: &[u8], min_confidence: Vec<Option<f32>>) -> FirstStageSpec {
        FirstStageSpec { file: "f.bin".into(), sha256: None, buckets, orders: orders.to_vec(), min_confidence }
    }

    #[test]
    fn the_hash_is_fnv1a_over_the_order_and_little_endian_ids() {
        // FNV-1a 64 of the bytes [1, 0x2a, 0, 0, 0], computed by hand from the definition.
        let mut h = FNV_OFFSET;
        for b in [1u8, 0x2a, 0, 0, 0] {
            h = (h ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
        assert_eq!(bucket_hash(1, &[42]), h);
        assert_ne!(bucket_hash(2, &[1, 2]), bucket_hash(2, &[2, 1]));
    }

    #[test]
    fn scores_add_the_weights_of_each_window_scaled_by_their_count() {
        let buckets = 8u32;
        // Label 1 gains 1.0 in every bucket: with n windows of value 1/sqrt(n), its logit is sqrt(n).
        let weights: Vec<f32> = (0..buckets).flat_map(|_| [0.0, 1.0]).collect();
        let stage = FirstStage::new(weights, vec![0.0, 0.0], &spec(buckets, &[1, 2], vec![None, None])).unwrap();
        let p = stage.scores(&[5, 6, 7]);
        // 3 unigrams + 2 bigrams = 5 windows.
        let expected = softmax(&[0.0, 5f32.sqrt()]);
        assert!((p[1] - expected[1]).abs() < 1e-6, "{p:?} vs {expected:?}");
        // No window at all: the bias alone.
        assert_eq!(stage.scores(&[]), vec![0.5, 0.5]);
    }

    #[test]
    fn a_text_is_settled_only_when_its_top_label_reaches_its_threshold() {
        let stage = FirstStage::new(vec![0.0; 4], vec![0.0, 0.0], &spec(2, &[1], vec![Some(0.9), None])).unwrap();
        assert!(stage.settles(&[0.95, 0.05]));
        assert!(!stage.settles(&[0.85, 0.15]));
        // Label 1 is never settled here, however confident.
        assert!(!stage.settles(&[0.01, 0.99]));
    }

    #[test]
    fn files_of_the_wrong_size_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, [0u8; 12]).unwrap();
        let err = FirstStage::load(&path, &spec(2, &[1], vec![None, None]), 2).unwrap_err();
        assert!(err.to_string().contains("expected 24"), "{err}");
        std::fs::write(&path, [0u8; 24]).unwrap();
        FirstStage::load(&path, &spec(2, &[1], vec![None, None]), 2).unwrap();
        let err = FirstStage::load(&path, &spec(2, &[1], vec![None]), 2).unwrap_err();
        assert!(err.to_string().contains("min_confidence"), "{err}");
    }
}
