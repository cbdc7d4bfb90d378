//! Classifiers that cost microseconds where they can. A cascade classifier is a head over a
//! shared encoder's sentence embedding, with an optional first stage in front of it:
//!
//! 1. the first stage (hashed n-grams of the token ids, [`crate::first_stage`]) scores every text
//!    in pure Rust and settles the ones it is confident about;
//! 2. the texts left go to the encoder once, whatever the number of classifiers asking: the
//!    embedding comes from the encoder's cache (by content digest) or from one batched pass, and
//!    every head that needs it reads the same vector ([`crate::head`]).
//!
//! A classifier's result never depends on which other classifiers a request names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokenizers::{Tokenizer, TruncationParams};

use crate::batcher::Batcher;
use crate::embedding_cache::{EmbeddingCache, digest};
use crate::encoder::EmbedModel;
use crate::error::Error;
use crate::first_stage::FirstStage;
use crate::head::Head;
use crate::manifest::ModelEntry;

/// A loaded embeddings model: its batching queue, and the cache its classifiers read.
pub struct EncoderModel {
    pub batcher: Batcher<EmbedModel>,
    /// Embeddings of recently classified texts (user `Embed` calls bypass it).
    pub cache: EmbeddingCache,
}

/// Which part of a classifier settled a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The cascade's first stage was confident.
    FirstStage,
    /// The encoder: a graph with its own head, or a head over the shared encoder's embedding.
    Encoder,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::FirstStage => "first_stage",
            Stage::Encoder => "encoder",
        }
    }
}

/// The result of one classifier on one text.
#[derive(Debug, Clone, PartialEq)]
pub struct Classified {
    /// Every label with its probability, most likely first.
    pub scores: Vec<(String, f32)>,
    pub stage: Stage,
    /// The encoder's embedding came from the cache.
    pub cached: bool,
}

/// A classifier head over a shared encoder, with its first stage when it has one.
pub struct CascadeClassifier {
    labels: Vec<String>,
    /// The manifest's tokenizer, truncated as the encoder truncates: the first stage's input.
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    first_stage: Option<FirstStage>,
    head: Head,
    encoder: Arc<EncoderModel>,
    encoder_name: String,
}

impl CascadeClassifier {
    /// Loads the head (`entry.file`), the tokenizer and the first stage of `entry` over `encoder`.
    pub fn load(
        entry: &ModelEntry,
        models_dir: &Path,
        encoder_name: &str,
        encoder: Arc<EncoderModel>,
    ) -> Result<Self, Error> {
        let tokenizer_path = models_dir.join(&entry.tokenizer);
        let mut tokenizer = crate::text::load_tokenizer(&tokenizer_path)?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: entry.context_length as usize,
                ..TruncationParams::default()
            }))
            .map_err(|e| Error::Load(format!("tokenizer truncation: {e}")))?;
        let head = Head::load(&models_dir.join(&entry.file), encoder.batcher.model().dims(), entry.labels.len())?;
        let first_stage = entry
            .first_stage
            .as_ref()
            .map(|spec| FirstStage::load(&models_dir.join(&spec.file), spec, entry.labels.len()))
            .transpose()?;
        if head.reads_first_stage() && first_stage.is_none() {
            return Err(Error::Load(format!(
                "{}: the head reads a first stage the manifest does not give",
                entry.name
            )));
        }
        Ok(Self {
            labels: entry.labels.clone(),
            tokenizer,
            tokenizer_path,
            first_stage,
            head,
            encoder,
            encoder_name: encoder_name.to_owned(),
        })
    }

    /// The registry name of the encoder this classifier reads.
    pub fn encoder_name(&self) -> &str {
        &self.encoder_name
    }

    fn scored(&self, probabilities: &[f32]) -> Vec<(String, f32)> {
        let mut scored: Vec<(String, f32)> = self.labels.iter().cloned().zip(probabilities.iter().copied()).collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1));
        scored
    }
}

/// A text's embedding and whether it came from the cache.
type Embedded = (Arc<[f32]>, bool);

/// One classifier's work on a request: its first-stage results and what it leaves the encoder.
struct Pending {
    classifier: Arc<CascadeClassifier>,
    /// Per text: the settled result, or `None` until the encoder decides.
    results: Vec<Option<Classified>>,
    /// Per text: the first stage's probabilities (empty without a first stage), which a stacked
    /// head reads.
    first_stage: Vec<Vec<f32>>,
    tokens: Vec<u64>,
}

/// Input bytes up to which tokenization and the first stages run on the request's own task;
/// beyond, on a blocking thread (tokenizing a long text takes a while).
const INLINE_BYTES: usize = 16 * 1024;

/// Classifies `texts` with each of `classifiers`; per classifier, one result per text and the
/// tokens read per text.
pub async fn classify(
    classifiers: &[Arc<CascadeClassifier>],
    texts: &[String],
) -> Result<Vec<(Vec<Classified>, Vec<u64>)>, Error> {
    let mut pending = if texts.iter().map(String::len).sum::<usize>() <= INLINE_BYTES {
        first_stages(classifiers, texts)?
    } else {
        let (classifiers, texts) = (classifiers.to_vec(), texts.to_vec());
        tokio::task::spawn_blocking(move || first_stages(&classifiers, &texts))
            .await
            .map_err(|e| Error::Internal(format!("the first stage stopped abnormally: {e}")))??
    };

    // Encoders by name, with the texts any of their classifiers still needs.
    let mut wanted: HashMap<String, (Arc<EncoderModel>, Vec<usize>)> = HashMap::new();
    for p in &pending {
        let (_, indices) = wanted
            .entry(p.classifier.encoder_name.clone())
            .or_insert_with(|| (p.classifier.encoder.clone(), Vec::new()));
        indices.extend(p.results.iter().enumerate().filter(|(_, r)| r.is_none()).map(|(i, _)| i));
    }
    let mut embeddings: HashMap<(String, usize), Embedded> = HashMap::new();
    for (name, (encoder, mut indices)) in wanted {
        indices.sort_unstable();
        indices.dedup();
        for (i, embedding) in embed(&encoder, texts, &indices).await? {
            embeddings.insert((name.clone(), i), embedding);
        }
    }

    Ok(pending
        .iter_mut()
        .map(|p| {
            let classifier = &p.classifier;
            let results = p
                .results
                .iter_mut()
                .enumerate()
                .map(|(i, settled)| {
                    settled.take().unwrap_or_else(|| {
                        let (embedding, cached) = &embeddings[&(classifier.encoder_name.clone(), i)];
                        Classified {
                            scores: classifier.scored(&classifier.head.probabilities(embedding, &p.first_stage[i])),
                            stage: Stage::Encoder,
                            cached: *cached,
                        }
                    })
                })
                .collect();
            (results, std::mem::take(&mut p.tokens))
        })
        .collect())
}

/// Tokenizes each text once per tokenizer file and runs every classifier's first stage.
fn first_stages(classifiers: &[Arc<CascadeClassifier>], texts: &[String]) -> Result<Vec<Pending>, Error> {
    let mut tokenized: HashMap<&Path, Vec<Vec<u32>>> = HashMap::new();
    let mut pending = Vec::with_capacity(classifiers.len());
    for classifier in classifiers {
        if !tokenized.contains_key(classifier.tokenizer_path.as_path()) {
            let ids = texts
                .iter()
                .map(|t| classifier.tokenizer.encode(t.as_str(), true).map(|e| e.get_ids().to_vec()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            tokenized.insert(classifier.tokenizer_path.as_path(), ids);
        }
        let ids = &tokenized[classifier.tokenizer_path.as_path()];
        let first_stage: Vec<Vec<f32>> = ids
            .iter()
            .map(|ids| classifier.first_stage.as_ref().map(|stage| stage.scores(ids)).unwrap_or_default())
            .collect();
        let results = first_stage
            .iter()
            .map(|probabilities| {
                let stage = classifier.first_stage.as_ref()?;
                stage.settles(probabilities).then(|| Classified {
                    scores: classifier.scored(probabilities),
                    stage: Stage::FirstStage,
                    cached: false,
                })
            })
            .collect();
        let tokens = ids.iter().map(|ids| ids.len() as u64).collect();
        pending.push(Pending { classifier: classifier.clone(), results, first_stage, tokens });
    }
    Ok(pending)
}

/// Embeddings of `texts[indices]`: from the cache, else from one batched pass whose vectors are
/// then cached.
async fn embed(encoder: &EncoderModel, texts: &[String], indices: &[usize]) -> Result<Vec<(usize, Embedded)>, Error> {
    let mut out = Vec::with_capacity(indices.len());
    let mut misses = Vec::new();
    for &i in indices {
        let key = digest(&texts[i]);
        match encoder.cache.get(&key) {
            Some(hit) => out.push((i, (hit, true))),
            None => misses.push((i, key)),
        }
    }
    if !misses.is_empty() {
        let computed = encoder.batcher.submit(misses.iter().map(|&(i, _)| texts[i].clone()).collect()).await?;
        for ((i, key), (vector, _tokens)) in misses.into_iter().zip(computed) {
            let vector: Arc<[f32]> = Arc::from(vector);
            encoder.cache.insert(key, vector.clone());
            out.push((i, (vector, false)));
        }
    }
    Ok(out)
}
