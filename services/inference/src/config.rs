//! Configuration of the inference service (`[inference]`, `MESHGATE_INFERENCE__*`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Configuration of the inference service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory holding `manifest.json` and the model files it names (paths in the manifest are
    /// relative to it).
    pub models_dir: PathBuf,
    /// The ONNX Runtime shared library (`libonnxruntime.so.1.31.1`). Unset: `ORT_DYLIB_PATH`,
    /// then the system library search path.
    pub ort_dylib_path: Option<PathBuf>,
    /// Threads one session uses inside an operator; 0 lets ONNX Runtime pick (one per core).
    pub intra_op_threads: usize,
    /// Load every model of the manifest at start; otherwise models load on `Load`.
    pub load_on_start: bool,
    /// Check model and tokenizer files against the manifest's sha256 before loading them.
    pub verify_sha256: bool,
    /// `max_tokens` of a generation that does not set it.
    pub default_max_tokens: u32,
    /// Most texts one `Embed` or `Classify` call may carry.
    pub max_batch_inputs: usize,
    /// Requests executing at once (all models); more are refused with `overloaded`.
    pub max_in_flight: usize,
    /// Decoded chunks buffered per generation stream before decoding waits for the client.
    pub stream_buffer: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            models_dir: PathBuf::from("models"),
            ort_dylib_path: None,
            intra_op_threads: 0,
            load_on_start: true,
            verify_sha256: true,
            default_max_tokens: 256,
            max_batch_inputs: 256,
            max_in_flight: 64,
            stream_buffer: 16,
        }
    }
}
