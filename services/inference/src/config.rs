//! Configuration of the inference service (`[inference]`, `MESHGATE_INFERENCE__*`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::batcher::BatchingConfig;
use crate::error::Error;

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
    /// Let idle intra-op threads busy-wait for the next operator. Off by default: the sessions
    /// share the cores with the gRPC runtime (and, under `meshgate up`, the other services), and
    /// spinning threads take CPU from them, so each request costs more CPU on a machine with few
    /// cores.
    pub intra_op_spinning: bool,
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
    /// Dynamic batching of `Embed` and `Classify`.
    pub batching: BatchingConfig,
    /// Sentence embeddings each shared encoder keeps for its classifiers, by text digest (about
    /// 1.5 KiB each for 384 dims); 0 turns the cache off.
    pub classification_cache_entries: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            models_dir: PathBuf::from("models"),
            ort_dylib_path: None,
            intra_op_threads: 0,
            intra_op_spinning: false,
            load_on_start: true,
            verify_sha256: true,
            default_max_tokens: 256,
            max_batch_inputs: 256,
            max_in_flight: 64,
            stream_buffer: 16,
            batching: BatchingConfig::default(),
            classification_cache_entries: 8192,
        }
    }
}

impl Config {
    /// Refuses values the service cannot serve with, naming the key: no models directory, no
    /// completion by default, no input per call, no request at once, or a batching that cannot
    /// hold a request.
    pub fn validate(&self) -> Result<(), Error> {
        if self.models_dir.as_os_str().is_empty() {
            return Err(Error::Config("models_dir must not be empty".into()));
        }
        for (key, value) in [
            ("default_max_tokens", self.default_max_tokens as usize),
            ("max_batch_inputs", self.max_batch_inputs),
            ("max_in_flight", self.max_in_flight),
        ] {
            if value == 0 {
                return Err(Error::Config(format!("{key} must be at least 1")));
            }
        }
        self.batching.validate().map_err(Error::Config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        Config::default().validate().unwrap();
        let cases: [(Config, &str); 5] = [
            (Config { models_dir: PathBuf::new(), ..Config::default() }, "models_dir"),
            (Config { default_max_tokens: 0, ..Config::default() }, "default_max_tokens"),
            (Config { max_batch_inputs: 0, ..Config::default() }, "max_batch_inputs"),
            (Config { max_in_flight: 0, ..Config::default() }, "max_in_flight"),
            (
                Config {
                    batching: BatchingConfig { queue_capacity: 0, ..BatchingConfig::default() },
                    ..Config::default()
                },
                "batching.queue_capacity",
            ),
        ];
        for (config, key) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }
}
