//! Where tests (this crate's and the workspace's) find the tiny ONNX models built by
//! `scripts/make-test-models.py` and the ONNX Runtime library of the project venv.

use std::path::PathBuf;

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
