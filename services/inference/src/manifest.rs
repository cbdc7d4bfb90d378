//! The model manifest (`<models_dir>/manifest.json`), written by `scripts/make-test-models.py` for
//! the test models and by `scripts/fetch-models.sh` for the real ones.
//!
//! ```json
//! {"version": 1, "models": [{"name": "tiny-chat", "task": "chat", "file": "tiny-chat/model.onnx",
//!   "sha256": "…", "tokenizer": "tiny-chat/tokenizer.json", "tokenizer_sha256": "…",
//!   "context_length": 128, "chat_template": "chatml", "eos_tokens": ["<|im_end|>"]}]}
//! ```
//! Unknown fields are ignored so newer manifests still load.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The manifest format version this build reads.
pub const MANIFEST_VERSION: u32 = 1;

/// The parsed manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version, [`MANIFEST_VERSION`].
    pub version: u32,
    /// Models in the registry.
    pub models: Vec<ModelEntry>,
}

/// What a model does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Chat,
    Embeddings,
    Classification,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Chat => "chat",
            Task::Embeddings => "embeddings",
            Task::Classification => "classification",
        }
    }
}

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean over the tokens the attention mask keeps (sentence-transformers' default).
    #[default]
    Mean,
    /// The first token's vector (`[CLS]`).
    Cls,
}

/// How a conversation becomes a prompt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatTemplate {
    /// `<|im_start|>role\ncontent<|im_end|>\n` per message, then `<|im_start|>assistant\n`.
    #[default]
    Chatml,
}

/// One model of the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// Registry name, the `model` of requests.
    pub name: String,
    pub task: Task,
    /// ONNX file, relative to the models directory.
    pub file: PathBuf,
    /// Expected sha256 (hex) of `file`.
    #[serde(default)]
    pub sha256: Option<String>,
    /// `tokenizer.json`, relative to the models directory.
    pub tokenizer: PathBuf,
    /// Expected sha256 (hex) of `tokenizer`.
    #[serde(default)]
    pub tokenizer_sha256: Option<String>,
    /// Context length in tokens: inputs are truncated (embeddings) or refused (chat) beyond it.
    pub context_length: u32,
    /// Embedding dimensions (embedding models); checked against the graph when it declares them.
    #[serde(default)]
    pub dims: Option<u32>,
    /// Pooling of embedding models.
    #[serde(default)]
    pub pooling: Pooling,
    /// L2-normalise embeddings (default true).
    #[serde(default = "default_true")]
    pub normalize: bool,
    /// Class labels in output order (classification models).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Chat template (chat models).
    #[serde(default)]
    pub chat_template: ChatTemplate,
    /// System prompt inserted when a conversation has none (chat models), as the model's own
    /// template does.
    #[serde(default)]
    pub default_system_prompt: Option<String>,
    /// Tokens that end a generation (chat models).
    #[serde(default)]
    pub eos_tokens: Vec<String>,
    /// Classification models: the registry name of the embeddings model whose sentence embedding
    /// this classifier's head reads. `file` is then the head (`head.json`, see [`crate::head`]),
    /// not a graph, and classifiers naming the same encoder share its pass over a text.
    #[serde(default)]
    pub encoder: Option<String>,
    /// Classification models over an `encoder`: the cheap first stage of the cascade.
    #[serde(default)]
    pub first_stage: Option<FirstStageSpec>,
    /// Reference outputs computed with Python onnxruntime, for correctness checks.
    #[serde(default)]
    pub reference: Option<PathBuf>,
    #[serde(default)]
    pub reference_sha256: Option<String>,
}

fn default_true() -> bool {
    true
}

/// The first stage of a classifier cascade (see [`crate::first_stage`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FirstStageSpec {
    /// Weights file (little-endian f32), relative to the models directory.
    pub file: PathBuf,
    /// Expected sha256 (hex) of `file`.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Rows of the hashed n-gram table.
    pub buckets: u32,
    /// Lengths of the token windows hashed (1: single tokens, 2: pairs...).
    pub orders: Vec<u8>,
    /// Per label, in label order: the probability from which the first stage settles that label
    /// (chosen on a validation split by the training script); `null`: never settled there.
    pub min_confidence: Vec<Option<f32>>,
}

impl Manifest {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let err = |message: String| Error::Manifest { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        manifest.validate().map_err(err)?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), String> {
        if self.version != MANIFEST_VERSION {
            return Err(format!("version {} is not supported (expected {MANIFEST_VERSION})", self.version));
        }
        let mut names = HashSet::new();
        for entry in &self.models {
            if entry.name.trim().is_empty() {
                return Err("a model has an empty name".into());
            }
            if !names.insert(entry.name.as_str()) {
                return Err(format!("model `{}` is listed twice", entry.name));
            }
            let first_stage_file = entry.first_stage.as_ref().map(|f| &f.file);
            for path in [Some(&entry.file), Some(&entry.tokenizer), entry.reference.as_ref(), first_stage_file]
                .into_iter()
                .flatten()
            {
                // Manifest paths stay inside the models directory.
                if !path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
                    return Err(format!(
                        "model `{}`: path {} must be relative, without `..`",
                        entry.name,
                        path.display()
                    ));
                }
            }
            if entry.context_length == 0 {
                return Err(format!("model `{}`: context_length must be positive", entry.name));
            }
            if entry.task == Task::Classification && entry.labels.is_empty() {
                return Err(format!("model `{}`: a classification model needs labels", entry.name));
            }
            if entry.task == Task::Chat && entry.eos_tokens.is_empty() {
                return Err(format!("model `{}`: a chat model needs eos_tokens", entry.name));
            }
            self.validate_cascade(entry)?;
        }
        Ok(())
    }

    /// A classifier's encoder is an embeddings model of this manifest, and its first stage scores
    /// its labels.
    fn validate_cascade(&self, entry: &ModelEntry) -> Result<(), String> {
        let name = &entry.name;
        if (entry.encoder.is_some() || entry.first_stage.is_some()) && entry.task != Task::Classification {
            return Err(format!("model `{name}`: only classification models take an encoder or a first stage"));
        }
        if let Some(encoder) = &entry.encoder {
            let found = self.models.iter().find(|m| &m.name == encoder);
            if !found.is_some_and(|m| m.task == Task::Embeddings) {
                return Err(format!("model `{name}`: encoder `{encoder}` is not an embeddings model of the manifest"));
            }
        }
        if let Some(stage) = &entry.first_stage {
            if entry.encoder.is_none() {
                return Err(format!("model `{name}`: a first stage needs an encoder to hand uncertain texts to"));
            }
            if stage.buckets == 0 || stage.orders.is_empty() || stage.orders.iter().any(|&o| o == 0 || o > 8) {
                return Err(format!("model `{name}`: first_stage needs buckets and orders between 1 and 8"));
            }
            if stage.min_confidence.len() != entry.labels.len() {
                return Err(format!(
                    "model `{name}`: first_stage.min_confidence has {} values for {} labels",
                    stage.min_confidence.len(),
                    entry.labels.len()
                ));
            }
            if stage.min_confidence.iter().flatten().any(|c| !(0.0..=1.0).contains(c)) {
                return Err(format!("model `{name}`: first_stage.min_confidence values must be within [0, 1]"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Manifest, String> {
        let m: Manifest = serde_json::from_str(json).map_err(|e| e.to_string())?;
        m.validate()?;
        Ok(m)
    }

    const CHAT: &str = r#"{"name": "c", "task": "chat", "file": "c/model.onnx", "tokenizer": "c/tokenizer.json",
        "context_length": 64, "eos_tokens": ["<|im_end|>"]}"#;

    #[test]
    fn minimal_entries_get_defaults() {
        let m = parse(&format!(r#"{{"version": 1, "models": [{CHAT}]}}"#)).unwrap();
        let e = &m.models[0];
        assert_eq!(e.task, Task::Chat);
        assert_eq!(e.chat_template, ChatTemplate::Chatml);
        assert_eq!(e.pooling, Pooling::Mean);
        assert!(e.normalize);
        assert_eq!(e.sha256, None);
    }

    #[test]
    fn invalid_manifests_are_rejected_with_the_reason() {
        let dup = format!(r#"{{"version": 1, "models": [{CHAT}, {CHAT}]}}"#);
        assert!(parse(&dup).unwrap_err().contains("twice"));
        assert!(parse(r#"{"version": 2, "models": []}"#).unwrap_err().contains("version 2"));
        let escape = CHAT.replace("c/model.onnx", "../etc/model.onnx");
        assert!(parse(&format!(r#"{{"version": 1, "models": [{escape}]}}"#)).unwrap_err().contains("relative"));
        let no_eos = CHAT.replace(r#"["<|im_end|>"]"#, "[]");
        assert!(parse(&format!(r#"{{"version": 1, "models": [{no_eos}]}}"#)).unwrap_err().contains("eos_tokens"));
        let bad_task = CHAT.replace("\"chat\"", "\"vision\"");
        assert!(parse(&format!(r#"{{"version": 1, "models": [{bad_task}]}}"#)).unwrap_err().contains("vision"));
    }

    const EMBED: &str = r#"{"name": "e", "task": "embeddings", "file": "e/model.onnx", "tokenizer": "e/tokenizer.json",
        "context_length": 64}"#;

    fn cascade(encoder: &str, stage: &str) -> String {
        format!(
            r#"{{"name": "k", "task": "classification", "file": "k/head.json", "tokenizer": "e/tokenizer.json",
            "context_length": 64, "labels": ["a", "b"], "encoder": "{encoder}"{stage}}}"#
        )
    }

    #[test]
    fn a_cascade_names_an_embeddings_model_and_scores_its_labels() {
        let stage = r#", "first_stage": {"file": "k/first_stage.bin", "buckets": 16, "orders": [1, 2],
            "min_confidence": [0.9, null]}"#;
        let m = parse(&format!(r#"{{"version": 1, "models": [{EMBED}, {}]}}"#, cascade("e", stage))).unwrap();
        let entry = &m.models[1];
        assert_eq!(entry.encoder.as_deref(), Some("e"));
        assert_eq!(entry.first_stage.as_ref().unwrap().min_confidence, vec![Some(0.9), None]);

        let cases = [
            (cascade("nope", ""), "not an embeddings model"),
            (cascade("e", &stage.replace("[0.9, null]", "[0.9]")), "1 values for 2 labels"),
            (cascade("e", &stage.replace("[0.9, null]", "[1.5, null]")), "within [0, 1]"),
            (cascade("e", &stage.replace("[1, 2]", "[0]")), "orders"),
            (cascade("e", &stage.replace("k/first_stage.bin", "../x.bin")), "relative"),
        ];
        for (entry, expected) in cases {
            let err = parse(&format!(r#"{{"version": 1, "models": [{EMBED}, {entry}]}}"#)).unwrap_err();
            assert!(err.contains(expected), "{expected}: {err}");
        }
        let no_encoder = cascade("e", stage).replace(r#", "encoder": "e""#, "");
        let err = parse(&format!(r#"{{"version": 1, "models": [{EMBED}, {no_encoder}]}}"#)).unwrap_err();
        assert!(err.contains("needs an encoder"), "{err}");
    }
}
