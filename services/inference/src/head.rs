//! A classification head over a sentence embedding: dense layers with a ReLU between them and a
//! softmax at the end, read from the `head.json` that `scripts/models/train_classifiers.py` writes:
//! `{"input_dims": 384, "first_stage_inputs": true, "layers": [{"rows": 386, "cols": 2,
//! "weights": [row-major], "bias": [..]}]}`. With `first_stage_inputs`, the cascade's first-stage
//! log-probabilities follow the embedding in the input (the head learns how far to trust them).
//! Several heads read one embedding, so classifiers sharing an encoder share its pass.

use std::path::Path;

use serde::Deserialize;

use crate::error::Error;
use crate::first_stage::softmax;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadFile {
    input_dims: usize,
    #[serde(default)]
    first_stage_inputs: bool,
    layers: Vec<Dense>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Dense {
    rows: usize,
    cols: usize,
    weights: Vec<f32>,
    bias: Vec<f32>,
}

/// A loaded head.
#[derive(Debug, Clone)]
pub struct Head {
    input_dims: usize,
    first_stage_inputs: bool,
    layers: Vec<Dense>,
}

impl Head {
    /// Reads and checks `path` against the encoder's `dims` and the manifest's `labels`.
    pub fn load(path: &Path, dims: usize, labels: usize) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Load(format!("{}: {e}", path.display())))?;
        let file: HeadFile =
            serde_json::from_str(&text).map_err(|e| Error::Load(format!("{}: {e}", path.display())))?;
        let head =
            Self { input_dims: file.input_dims, first_stage_inputs: file.first_stage_inputs, layers: file.layers };
        head.check(dims, labels).map_err(|e| Error::Load(format!("{}: {e}", path.display())))?;
        Ok(head)
    }

    fn check(&self, dims: usize, labels: usize) -> Result<(), String> {
        if self.input_dims != dims {
            return Err(format!("the head reads {} dims, the encoder gives {dims}", self.input_dims));
        }
        let mut width = dims + if self.first_stage_inputs { labels } else { 0 };
        for (i, layer) in self.layers.iter().enumerate() {
            if layer.rows != width || layer.weights.len() != layer.rows * layer.cols || layer.bias.len() != layer.cols {
                return Err(format!(
                    "layer {i} does not fit: {} rows, {} cols after width {width}",
                    layer.rows, layer.cols
                ));
            }
            if layer.weights.iter().chain(&layer.bias).any(|v| !v.is_finite()) {
                return Err(format!("layer {i} has a value that is not finite"));
            }
            width = layer.cols;
        }
        if self.layers.is_empty() || width != labels {
            return Err(format!("the head gives {width} outputs for {labels} labels"));
        }
        Ok(())
    }

    /// Whether the head reads the first stage's probabilities beside the embedding.
    pub fn reads_first_stage(&self) -> bool {
        self.first_stage_inputs
    }

    /// Label probabilities of one embedding (of the encoder's dims) and, for a head that reads
    /// them, the first stage's probabilities of the same text.
    pub fn probabilities(&self, embedding: &[f32], first_stage: &[f32]) -> Vec<f32> {
        let mut x = embedding.to_vec();
        if self.first_stage_inputs {
            x.extend(first_stage.iter().map(|p| p.clamp(1e-7, 1.0).ln()));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let mut out = layer.bias.clone();
            for (xi, row) in x.iter().zip(layer.weights.chunks_exact(layer.cols)) {
                for (o, w) in out.iter_mut().zip(row) {
                    *o += xi * w;
                }
            }
            if i + 1 < self.layers.len() {
                out.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            x = out;
        }
        softmax(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(json: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("head.json");
        std::fs::write(&path, json).unwrap();
        (dir, path)
    }

    #[test]
    fn layers_multiply_with_a_relu_between_them() {
        // 2 -> 2 (identity, then ReLU) -> 2 (swap).
        let (_dir, path) = write(
            r#"{"input_dims": 2, "layers": [
                {"rows": 2, "cols": 2, "weights": [1, 0, 0, 1], "bias": [0, 0]},
                {"rows": 2, "cols": 2, "weights": [0, 1, 1, 0], "bias": [0, 0]}]}"#,
        );
        let head = Head::load(&path, 2, 2).unwrap();
        // [3, -1] -> ReLU [3, 0] -> swapped [0, 3].
        let p = head.probabilities(&[3.0, -1.0], &[]);
        let expected = softmax(&[0.0, 3.0]);
        assert!((p[0] - expected[0]).abs() < 1e-6 && (p[1] - expected[1]).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn heads_that_do_not_fit_the_encoder_or_the_labels_are_refused() {
        let (_dir, path) = write(
            r#"{"input_dims": 2, "layers": [{"rows": 2, "cols": 3, "weights": [0,0,0,0,0,0], "bias": [0,0,0]}]}"#,
        );
        assert!(Head::load(&path, 4, 3).unwrap_err().to_string().contains("encoder gives 4"));
        assert!(Head::load(&path, 2, 2).unwrap_err().to_string().contains("3 outputs for 2 labels"));
        Head::load(&path, 2, 3).unwrap();
        let (_dir, path) =
            write(r#"{"input_dims": 2, "layers": [{"rows": 2, "cols": 2, "weights": [0,0,0], "bias": [0,0]}]}"#);
        assert!(Head::load(&path, 2, 2).unwrap_err().to_string().contains("does not fit"));
    }

    #[test]
    fn a_stacked_head_reads_the_first_stage_log_probabilities_after_the_embedding() {
        // Input [e0, ln p0, ln p1]; the output copies ln p1 into logit 1.
        let (_dir, path) = write(
            r#"{"input_dims": 1, "first_stage_inputs": true, "layers": [
                {"rows": 3, "cols": 2, "weights": [0, 0, 0, 0, 0, 1], "bias": [0, 0]}]}"#,
        );
        let head = Head::load(&path, 1, 2).unwrap();
        assert!(head.reads_first_stage());
        let p = head.probabilities(&[5.0], &[0.5, 0.25]);
        let expected = softmax(&[0.0, 0.25f32.ln()]);
        assert!((p[1] - expected[1]).abs() < 1e-6, "{p:?}");
        // An encoder of other dims does not fit.
        assert!(Head::load(&path, 3, 2).unwrap_err().to_string().contains("reads 1 dims"));
    }
}
