//! Test models and references for in-crate tests (built by `scripts/make-test-models.py`).

use std::sync::Arc;

use serde::Deserialize;

use crate::chat::ChatModel;
use crate::manifest::{Manifest, Task};

/// One greedy reference run recorded by the build script with Python onnxruntime.
#[derive(Debug, Clone, Deserialize)]
pub struct GreedyCase {
    pub prompt_ids: Vec<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatReference {
    pub greedy: Vec<GreedyCase>,
}

pub use crate::test_env::{models_dir, ort_dylib};

/// The tiny chat model, loaded once per test process, with its reference runs.
pub fn chat_model() -> (Arc<ChatModel>, ChatReference) {
    static MODEL: std::sync::OnceLock<(Arc<ChatModel>, ChatReference)> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = models_dir();
            let manifest = Manifest::load(&dir.join("manifest.json")).unwrap();
            let entry = manifest.models.iter().find(|m| m.task == Task::Chat).unwrap();
            let env = crate::onnx::environment(Some(&ort_dylib())).unwrap();
            let session = crate::onnx::open_session(env, &dir.join(&entry.file), 1, false).unwrap();
            let model = ChatModel::load(entry, session, &dir.join(&entry.tokenizer)).unwrap();
            let reference_path = dir.join(entry.reference.as_ref().unwrap());
            let reference = serde_json::from_str(&std::fs::read_to_string(reference_path).unwrap()).unwrap();
            (Arc::new(model), reference)
        })
        .clone()
}
