//! Encoder models: embeddings with the sentence-transformers ONNX interface (`input_ids`,
//! `attention_mask`, optional `token_type_ids` -> `last_hidden_state`, pooled and L2-normalised
//! here) and classifiers (the same inputs -> `probabilities` or `logits` over labels).

use std::path::Path;

use ort::session::{Session, SessionOutputs};
use ort::value::Tensor;
use parking_lot::Mutex;
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::batcher::BatchModel;
use crate::error::Error;
use crate::manifest::{ModelEntry, Pooling};
use crate::onnx;

/// Names of the token-vector output: transformers/optimum exports, sentence-transformers exports.
const HIDDEN_OUTPUT: &str = "last_hidden_state";
const TOKEN_EMBEDDINGS_OUTPUT: &str = "token_embeddings";
/// Output names a classifier graph may use: probabilities as they are, or logits to soft-max.
const PROBABILITIES_OUTPUT: &str = "probabilities";
const LOGITS_OUTPUT: &str = "logits";

/// A tokenizer and an encoder graph taking `input_ids`, `attention_mask` and optionally
/// `token_type_ids`: the front of embedding and classification models.
struct TextEncoder {
    /// `run` needs exclusive access; requests take turns per call.
    session: Mutex<Session>,
    tokenizer: Tokenizer,
    has_token_type_ids: bool,
}

/// A tokenized batch: `[batch, seq]` row-major, padded to the longest input.
struct Batch {
    batch: usize,
    seq: usize,
    mask: Vec<i64>,
}

impl Batch {
    /// Tokens read per input (special tokens included, padding excluded).
    fn tokens(&self) -> Vec<u64> {
        self.mask.chunks_exact(self.seq.max(1)).map(|row| row.iter().map(|&m| m as u64).sum()).collect()
    }
}

impl TextEncoder {
    fn new(entry: &ModelEntry, session: Session, tokenizer_path: &Path) -> Result<Self, Error> {
        let mut tokenizer = crate::text::load_tokenizer(tokenizer_path)?;
        // Published tokenizer.json files often pad every input to a fixed length (MiniLM: 128);
        // padding to the longest input of the batch gives the same vectors far faster.
        let (pad_id, pad_token, pad_type_id) = match tokenizer.get_padding() {
            Some(p) => (p.pad_id, p.pad_token.clone(), p.pad_type_id),
            None => guess_pad(&tokenizer),
        };
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id,
            pad_token,
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: entry.context_length as usize,
                ..TruncationParams::default()
            }))
            .map_err(|e| Error::Load(format!("tokenizer truncation: {e}")))?;

        let input_names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        for required in ["input_ids", "attention_mask"] {
            if !input_names.contains(&required) {
                return Err(Error::Load(format!("the graph has no `{required}` input (inputs: {input_names:?})")));
            }
        }
        let has_token_type_ids = input_names.contains(&"token_type_ids");
        Ok(Self { session: Mutex::new(session), tokenizer, has_token_type_ids })
    }

    /// The first graph output of `names` that exists, with its declared shape.
    fn output(&self, names: &[&str]) -> Result<(String, Vec<i64>), Error> {
        let session = self.session.lock();
        let output = names
            .iter()
            .find_map(|n| session.outputs().iter().find(|o| o.name() == *n))
            .ok_or_else(|| Error::Load(format!("the graph has none of the outputs {names:?}")))?;
        let shape = onnx::tensor_shape(output.dtype())
            .ok_or_else(|| Error::Load(format!("output `{}` is not a tensor", output.name())))?;
        Ok((output.name().to_owned(), shape))
    }

    /// Tokenizes `texts` (truncated to the context) and runs the graph; `read` gets the outputs.
    fn run<R>(
        &self,
        texts: &[impl AsRef<str>],
        read: impl FnOnce(&SessionOutputs<'_>, &Batch) -> Result<R, Error>,
    ) -> Result<R, Error> {
        // One text at a time on this thread: `encode_batch` would hand a few short texts to
        // rayon's pool, whose threads then compete with ONNX Runtime's for the same cores.
        let mut encodings = texts
            .iter()
            .map(|t| self.tokenizer.encode(t.as_ref(), true))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        if let Some(padding) = self.tokenizer.get_padding() {
            tokenizers::utils::padding::pad_encodings(&mut encodings, padding)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
        }
        let batch = encodings.len();
        let seq = encodings.first().map_or(0, |e| e.len());
        let mut ids = Vec::with_capacity(batch * seq);
        let mut mask = Vec::with_capacity(batch * seq);
        let mut types = Vec::with_capacity(batch * seq);
        for enc in &encodings {
            ids.extend(enc.get_ids().iter().map(|&v| i64::from(v)));
            mask.extend(enc.get_attention_mask().iter().map(|&v| i64::from(v)));
            types.extend(enc.get_type_ids().iter().map(|&v| i64::from(v)));
        }
        let shape = [batch, seq];
        let mut inputs = vec![
            ("input_ids", Tensor::from_array((shape, ids))?.into_dyn()),
            ("attention_mask", Tensor::from_array((shape, mask.clone()))?.into_dyn()),
        ];
        if self.has_token_type_ids {
            inputs.push(("token_type_ids", Tensor::from_array((shape, types))?.into_dyn()));
        }
        let mut session = self.session.lock();
        let outputs = session.run(inputs)?;
        read(&outputs, &Batch { batch, seq, mask })
    }
}

/// A loaded embedding model.
pub struct EmbedModel {
    encoder: TextEncoder,
    output: String,
    dims: usize,
    pooling: Pooling,
    normalize: bool,
}

/// Vectors for a batch of texts.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// One vector per input, in input order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens the model read per input (special tokens included, padding excluded).
    pub tokens: Vec<u64>,
}

impl EmbedModel {
    pub fn load(entry: &ModelEntry, session: Session, tokenizer_path: &Path) -> Result<Self, Error> {
        let encoder = TextEncoder::new(entry, session, tokenizer_path)?;
        let (output, shape) = encoder.output(&[HIDDEN_OUTPUT, TOKEN_EMBEDDINGS_OUTPUT])?;
        if shape.len() != 3 {
            return Err(Error::Load(format!(
                "output `{output}` has shape {shape:?}, expected [batch, sequence, hidden]"
            )));
        }
        let dims = match (shape[2], entry.dims) {
            (d, Some(m)) if d > 0 && d != i64::from(m) => {
                return Err(Error::Load(format!("the graph gives {d} dims, the manifest says {m}")));
            }
            (d, _) if d > 0 => d as usize,
            (_, Some(m)) => m as usize,
            _ => return Err(Error::Load("the graph's hidden size is dynamic and the manifest gives no dims".into())),
        };
        Ok(Self { encoder, output, dims, pooling: entry.pooling, normalize: entry.normalize })
    }

    /// Vector length.
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Embeds `texts` in one batch (blocking: call from a blocking thread). Inputs longer than
    /// the context are truncated.
    pub fn embed(&self, texts: &[impl AsRef<str>]) -> Result<Embeddings, Error> {
        self.encoder.run(texts, |outputs, b| {
            let (shape, hidden) = outputs[self.output.as_str()].try_extract_tensor::<f32>()?;
            if **shape != [b.batch as i64, b.seq as i64, self.dims as i64] {
                return Err(Error::Runtime(format!(
                    "output `{}` has shape {shape:?}, expected [{}, {}, {}]",
                    self.output, b.batch, b.seq, self.dims
                )));
            }
            let vectors = (0..b.batch)
                .map(|i| {
                    let rows = &hidden[i * b.seq * self.dims..(i + 1) * b.seq * self.dims];
                    let mut v = pool(rows, &b.mask[i * b.seq..(i + 1) * b.seq], self.dims, self.pooling);
                    if self.normalize {
                        l2_normalize(&mut v);
                    }
                    v
                })
                .collect();
            Ok(Embeddings { vectors, tokens: b.tokens() })
        })
    }
}

/// A loaded classifier: an encoder graph whose `probabilities` (or `logits`) output scores
/// the manifest's labels.
pub struct ClassifyModel {
    encoder: TextEncoder,
    output: String,
    softmax: bool,
    labels: Vec<String>,
}

/// Label scores for a batch of texts.
#[derive(Debug, Clone, PartialEq)]
pub struct Classifications {
    /// Per input, every label with its probability, most likely first.
    pub results: Vec<Vec<(String, f32)>>,
    /// Tokens the model read per input.
    pub tokens: Vec<u64>,
}

impl ClassifyModel {
    pub fn load(entry: &ModelEntry, session: Session, tokenizer_path: &Path) -> Result<Self, Error> {
        let encoder = TextEncoder::new(entry, session, tokenizer_path)?;
        let (output, shape) = encoder.output(&[PROBABILITIES_OUTPUT, LOGITS_OUTPUT])?;
        match shape.as_slice() {
            [_, n] if *n < 0 || *n as usize == entry.labels.len() => {}
            _ => {
                return Err(Error::Load(format!(
                    "output `{output}` has shape {shape:?}, expected [batch, {}] for the manifest's labels",
                    entry.labels.len()
                )));
            }
        }
        let softmax = output == LOGITS_OUTPUT;
        Ok(Self { encoder, output, softmax, labels: entry.labels.clone() })
    }

    /// Scores `texts` in one batch (blocking). Inputs longer than the context are truncated.
    pub fn classify(&self, texts: &[impl AsRef<str>]) -> Result<Classifications, Error> {
        let n = self.labels.len();
        self.encoder.run(texts, |outputs, b| {
            let (shape, scores) = outputs[self.output.as_str()].try_extract_tensor::<f32>()?;
            if **shape != [b.batch as i64, n as i64] {
                return Err(Error::Runtime(format!(
                    "output `{}` has shape {shape:?}, expected [{}, {n}]",
                    self.output, b.batch
                )));
            }
            let results = scores
                .chunks_exact(n)
                .map(|row| {
                    let probs = if self.softmax { softmax(row) } else { row.to_vec() };
                    let mut scored: Vec<(String, f32)> = self.labels.iter().cloned().zip(probs).collect();
                    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
                    scored
                })
                .collect();
            Ok(Classifications { results, tokens: b.tokens() })
        })
    }
}

impl BatchModel for EmbedModel {
    /// The vector of one text and the tokens it took.
    type Item = (Vec<f32>, u64);

    fn run_batch(&self, texts: &[&str]) -> Result<Vec<Self::Item>, Error> {
        let out = self.embed(texts)?;
        Ok(out.vectors.into_iter().zip(out.tokens).collect())
    }
}

impl BatchModel for ClassifyModel {
    /// The label scores of one text and the tokens it took.
    type Item = (Vec<(String, f32)>, u64);

    fn run_batch(&self, texts: &[&str]) -> Result<Vec<Self::Item>, Error> {
        let out = self.classify(texts)?;
        Ok(out.results.into_iter().zip(out.tokens).collect())
    }
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / total).collect()
}

/// A pad token for tokenizers that declare no padding: the usual names, else id 0 (the attention
/// mask hides padded positions, so the id only has to exist).
fn guess_pad(tokenizer: &Tokenizer) -> (u32, String, u32) {
    ["[PAD]", "<pad>", "<|endoftext|>", "</s>"]
        .into_iter()
        .find_map(|t| tokenizer.token_to_id(t).map(|id| (id, t.to_owned(), 0)))
        .unwrap_or((0, String::new(), 0))
}

/// Pools `rows` ([seq, dims], row-major) over the positions `mask` keeps.
fn pool(rows: &[f32], mask: &[i64], dims: usize, pooling: Pooling) -> Vec<f32> {
    match pooling {
        Pooling::Cls => rows[..dims].to_vec(),
        Pooling::Mean => {
            let mut sum = vec![0f32; dims];
            let mut count = 0f32;
            for (row, &m) in rows.chunks_exact(dims).zip(mask) {
                if m != 0 {
                    sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
                    count += 1.0;
                }
            }
            // sentence-transformers clamps the count to avoid dividing by zero.
            let count = count.max(1e-9);
            sum.iter_mut().for_each(|s| *s /= count);
            sum
        }
    }
}

fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pooling_ignores_masked_rows() {
        let rows = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0];
        assert_eq!(pool(&rows, &[1, 1, 0], 2, Pooling::Mean), vec![2.0, 3.0]);
        assert_eq!(pool(&rows, &[1, 1, 0], 2, Pooling::Cls), vec![1.0, 2.0]);
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let p = softmax(&[1.0, 3.0, 2.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[1] > p[2] && p[2] > p[0]);
    }

    #[test]
    fn l2_normalisation_gives_unit_length() {
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
    }
}
