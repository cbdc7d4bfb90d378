//! Test models and references for in-crate tests (built by `scripts/make-test-models.py`).

use std::path::PathBuf;
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

/// `MESHGATE_TEST_MODELS_DIR`, else `<workspace>/target/test-models`.
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("MESHGATE_TEST_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-models"));
    assert!(
        dir.join("manifest.json").is_file(),
        "no test models in {}: run `scripts/setup-python.sh && .venv/bin/python scripts/make-test-models.py target/test-models`",
        dir.display()
    );
    dir
}

/// `ORT_DYLIB_PATH`, else the library of the onnxruntime wheel in `<workspace>/.venv`.
pub fn ort_dylib() -> PathBuf {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let lib = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/lib");
    std::fs::read_dir(&lib)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|python| python.path().join("site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("set ORT_DYLIB_PATH or run scripts/setup-python.sh (nothing under {})", lib.display())
        })
}

/// The tiny chat model, loaded once per test process, with its reference runs.
pub fn chat_model() -> (Arc<ChatModel>, ChatReference) {
    static MODEL: std::sync::OnceLock<(Arc<ChatModel>, ChatReference)> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = models_dir();
            let manifest = Manifest::load(&dir.join("manifest.json")).unwrap();
            let entry = manifest.models.iter().find(|m| m.task == Task::Chat).unwrap();
            let env = crate::onnx::environment(Some(&ort_dylib())).unwrap();
            let session = crate::onnx::open_session(env, &dir.join(&entry.file), 1).unwrap();
            let model = ChatModel::load(entry, session, &dir.join(&entry.tokenizer)).unwrap();
            let reference_path = dir.join(entry.reference.as_ref().unwrap());
            let reference = serde_json::from_str(&std::fs::read_to_string(reference_path).unwrap()).unwrap();
            (Arc::new(model), reference)
        })
        .clone()
}
