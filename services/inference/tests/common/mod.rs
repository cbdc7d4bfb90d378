//! Shared setup of the inference tests: the tiny models built by `scripts/make-test-models.py`,
//! their Python onnxruntime references, and the ONNX Runtime library from the project venv.
#![allow(dead_code, unused_imports)] // each test binary uses a part of it

use std::path::{Path, PathBuf};

use meshgate_inference::Config;
use serde::Deserialize;

pub use meshgate_test_support::{models_dir, ort_dylib, real_models_dir};

/// The models directory holding tiny-smollm2, the tiny model `scripts/make-test-models.py` serves
/// exactly as `scripts/fetch-models.sh` serves SmolLM2-135M-Instruct.
pub fn smollm2_shaped_dir() -> PathBuf {
    models_dir().join("smollm2-shaped")
}

/// The models directory holding tiny-encoder and the cascades over it (tiny-guard, tiny-topic),
/// built as `scripts/fetch-models.sh` builds the real classifiers.
pub fn cascade_dir() -> PathBuf {
    models_dir().join("cascade")
}

/// A configuration over `dir`, one intra-op thread (the machine is shared).
pub fn config(dir: &Path) -> Config {
    Config {
        models_dir: dir.to_path_buf(),
        ort_dylib_path: Some(ort_dylib()),
        intra_op_threads: 1,
        ..Config::default()
    }
}

/// A copy of the test models that a test may damage.
pub fn copy_models() -> tempfile::TempDir {
    let src = models_dir();
    let dst = tempfile::tempdir().unwrap();
    for entry in walk(&src) {
        let rel = entry.strip_prefix(&src).unwrap();
        let target = dst.path().join(rel);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &target).unwrap();
    }
    dst
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GreedyCase {
    pub messages: Vec<Message>,
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub completion_ids: Vec<u32>,
    pub finish_reason: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingCase {
    pub text: String,
    pub input_ids: Vec<u32>,
    pub vector: Vec<f32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClassificationCase {
    pub text: String,
    pub probabilities: Vec<f32>,
}

/// A cascade's expected result for one text: both stages' probabilities (in label order), the
/// stage that settles it, and the probabilities it answers with.
#[derive(Debug, Clone, Deserialize)]
pub struct CascadeCase {
    pub text: String,
    pub first_stage: Vec<f32>,
    pub head: Vec<f32>,
    pub stage: String,
    pub probabilities: Vec<f32>,
}

/// Everything the build script recorded with Python onnxruntime.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Reference {
    #[serde(default)]
    pub greedy: Vec<GreedyCase>,
    #[serde(default)]
    pub embeddings: Vec<EmbeddingCase>,
    #[serde(default)]
    pub classifications: Vec<ClassificationCase>,
    #[serde(default)]
    pub cascade: Vec<CascadeCase>,
}

/// The reference of model `name`, and its manifest entry.
pub fn reference(name: &str) -> (Reference, meshgate_inference::manifest::ModelEntry) {
    let dir = models_dir();
    let manifest = meshgate_inference::manifest::Manifest::load(&dir.join("manifest.json")).unwrap();
    let entry = manifest.models.into_iter().find(|m| m.name == name).unwrap();
    let path = dir.join(entry.reference.as_ref().unwrap());
    (serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap(), entry)
}

/// The tokenizer of model `name`, for decoding reference ids.
pub fn tokenizer(name: &str) -> tokenizers::Tokenizer {
    let (_, entry) = reference(name);
    tokenizers::Tokenizer::from_file(models_dir().join(entry.tokenizer)).unwrap()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// The reference file of a manifest entry of `dir`, if it has one.
pub fn reference_in(dir: &Path, entry: &meshgate_inference::manifest::ModelEntry) -> Option<Reference> {
    let path = dir.join(entry.reference.as_ref()?);
    Some(serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap())
}
