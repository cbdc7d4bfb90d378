//! Test models and references for in-crate tests (built by `scripts/make-test-models.py`).
//!
//! It hands out the test models' files, references and tokenizer, never a loaded model: the
//! modules whose tests use it (`text`, `chat`) stay above it, and each loads its own model.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::manifest::{Manifest, ModelEntry, Task};

/// One greedy reference run recorded by the build script with Python onnxruntime.
#[derive(Debug, Clone, Deserialize)]
pub struct GreedyCase {
    pub prompt_ids: Vec<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatReference {
    pub greedy: Vec<GreedyCase>,
}

pub use meshgate_test_support::{models_dir, ort_dylib};

/// The tiny chat model's manifest entry, with the models directory its paths are relative to.
pub fn chat_entry() -> (PathBuf, ModelEntry) {
    let dir = models_dir();
    let manifest = Manifest::load(&dir.join("manifest.json")).unwrap();
    let entry = manifest.models.into_iter().find(|m| m.task == Task::Chat).unwrap();
    (dir, entry)
}

/// The reference runs of the chat model `entry` of `dir`.
pub fn chat_reference(dir: &Path, entry: &ModelEntry) -> ChatReference {
    let reference_path = dir.join(entry.reference.as_ref().unwrap());
    serde_json::from_str(&std::fs::read_to_string(reference_path).unwrap()).unwrap()
}

/// The tiny chat model's tokenizer, set up as `ChatModel::load` sets it up (no padding, no
/// truncation).
pub fn chat_tokenizer() -> Tokenizer {
    let (dir, entry) = chat_entry();
    let mut tokenizer = Tokenizer::from_file(dir.join(&entry.tokenizer)).unwrap();
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).unwrap();
    tokenizer
}
