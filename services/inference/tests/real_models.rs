//! The real models of `scripts/fetch-models.sh` (MiniLM, the two classifiers and, when fetched
//! with `--with-chat`, SmolLM2) against the references the fetch script computed with Python
//! onnxruntime + tokenizers. `scripts/test.sh` fetches the encoders, so these run in every suite
//! run; without them the tests fail, naming `scripts/test.sh`. The chat check runs on
//! tiny-smollm2 (built by `scripts/make-test-models.py` and served exactly as SmolLM2 is: its
//! tokenizer pipeline, ChatML with its default system prompt, its end tokens, the KV-cache
//! interface) in every run, and on SmolLM2 itself wherever it was fetched.

mod common;

use std::path::Path;

use futures::StreamExt;
use meshgate_inference::chat::ChatTurn;
use meshgate_inference::engine::GenerateEvent;
use meshgate_inference::manifest::{Manifest, ModelEntry, Task};
use meshgate_inference::{Config, Engine, InferenceMetrics};
use meshgate_proto::common::v1::SamplingParams;

/// Greedy tokens compared with the Python reference.
const GREEDY_TOKENS: usize = 20;

/// The engine over the models of `dir` for a `task`, loading only those.
async fn engine_for(dir: &Path, task: Task) -> (Engine, Vec<ModelEntry>) {
    let manifest = Manifest::load(&dir.join("manifest.json")).unwrap();
    let entries: Vec<ModelEntry> = manifest.models.into_iter().filter(|m| m.task == task).collect();
    // fetch-models.sh checked the hashes; hashing 540 MB in a debug build would take most of the
    // test's time (the check itself is covered on the tiny models). Results do not depend on the
    // thread count beyond float rounding.
    let config = Config { load_on_start: false, intra_op_threads: 2, verify_sha256: false, ..common::config(dir) };
    let engine = Engine::new(config, InferenceMetrics::new()).unwrap();
    for entry in &entries {
        let status = engine.load(&entry.name).await.unwrap();
        assert!(status.loaded, "{}: {:?}", entry.name, status.error);
    }
    (engine, entries)
}

/// The engine over the real models of a `task`, which `scripts/test.sh` fetches.
async fn real_engine_for(task: Task) -> (Engine, Vec<ModelEntry>, std::path::PathBuf) {
    let dir = common::real_models_dir();
    let (engine, entries) = engine_for(&dir, task).await;
    assert!(
        !entries.is_empty(),
        "{} has no {} model: scripts/test.sh fetches them (scripts/fetch-models.sh)",
        dir.display(),
        task.as_str()
    );
    (engine, entries, dir)
}

fn reference(dir: &Path, entry: &ModelEntry) -> common::Reference {
    common::reference_in(dir, entry).unwrap_or_else(|| panic!("{} has no reference file", entry.name))
}

#[tokio::test]
async fn real_embeddings_match_python_onnxruntime() {
    let (engine, entries, dir) = real_engine_for(Task::Embeddings).await;
    for entry in entries {
        let reference = reference(&dir, &entry);
        assert!(!reference.embeddings.is_empty());
        let texts: Vec<String> = reference.embeddings.iter().map(|c| c.text.clone()).collect();
        // One batch padded to its longest text, and each text concurrently (merged by the batcher
        // however they arrive): both must match the unpadded single-sentence reference.
        let batch = engine.embed(&entry.name, texts.clone()).await.unwrap();
        let singles = futures::future::join_all(texts.iter().map(|t| engine.embed(&entry.name, vec![t.clone()]))).await;
        assert_eq!(batch.dims, entry.dims.unwrap() as usize);
        let tokens: usize = reference.embeddings.iter().map(|c| c.input_ids.len()).sum();
        assert_eq!(batch.prompt_tokens, tokens as u64, "{}: token counts", entry.name);
        for ((case, batched), single) in reference.embeddings.iter().zip(&batch.vectors).zip(singles) {
            let single = single.unwrap();
            for (how, vector) in [("batched", batched), ("single", &single.vectors[0])] {
                let cos = common::cosine(vector, &case.vector);
                assert!(cos >= 0.999, "{} {how} {:?}: cosine {cos} to the Python reference", entry.name, case.text);
            }
            assert_eq!(single.prompt_tokens, case.input_ids.len() as u64);
        }
        // Different sentences are not all alike: the vectors carry meaning.
        assert!(common::cosine(&batch.vectors[0], &batch.vectors[1]) < 0.9);
    }
}

#[tokio::test]
async fn real_classifiers_match_python_onnxruntime() {
    let (engine, entries, dir) = real_engine_for(Task::Classification).await;
    for entry in entries {
        let reference = reference(&dir, &entry);
        assert!(!reference.cascade.is_empty(), "{}: a cascade reference", entry.name);
        let texts: Vec<String> = reference.cascade.iter().map(|c| c.text.clone()).collect();
        let out = engine.classify(&entry.name, texts).await.unwrap();
        for (result, case) in out.results.iter().zip(&reference.cascade) {
            assert_eq!(result.stage.as_str(), case.stage, "{} {:?}", entry.name, case.text);
            let expected_top = case.probabilities.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            assert_eq!(
                result.scores[0].0, entry.labels[expected_top],
                "{} {:?}: {:?}",
                entry.name, case.text, result.scores
            );
            // The first stage is exact arithmetic on the same token ids; the encoder's int8
            // activations are quantised per batch, so padding shifts them slightly.
            let tolerance = if case.stage == "first_stage" { 1e-4 } else { 0.02 };
            for (label, p) in &result.scores {
                let i = entry.labels.iter().position(|l| l == label).unwrap();
                assert!(
                    (p - case.probabilities[i]).abs() < tolerance,
                    "{} {:?}: {label} {p} vs Python {}",
                    entry.name,
                    case.text,
                    case.probabilities[i]
                );
            }
        }
    }
}

/// The policy's default prompt-injection threshold (`shared/policy`, `injection.threshold`).
const INJECTION_THRESHOLD: f32 = 0.8;

/// Benign messages must not be flagged as injections at the default threshold: greetings and
/// acknowledgements never, and the hand-written benign set (`scripts/models/eval/benign.jsonl`,
/// several languages, never trained on) at most 0.5 % of the time (issue 17's target; the
/// classifier flags none of it today, `scripts/models/DATA.md`).
#[tokio::test]
async fn the_injection_classifier_leaves_benign_messages_alone() {
    let (engine, entries, _) = real_engine_for(Task::Classification).await;
    assert!(entries.iter().any(|e| e.name == "prompt-injection"), "fetch-models.sh builds prompt-injection");
    let injection = |scores: &[(String, f32)]| scores.iter().find(|(l, _)| l == "injection").unwrap().1;

    let short = ["hi", "ok", "thanks", "hello", "thank you", "yes", "no", "ok thanks", "Hola", "merci", "danke"];
    let out = engine.classify("prompt-injection", short.iter().map(|s| s.to_string()).collect()).await.unwrap();
    for (text, result) in short.iter().zip(&out.results) {
        assert!(injection(&result.scores) < INJECTION_THRESHOLD, "{text:?} flagged: {:?}", result.scores);
    }

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/models/eval/benign.jsonl");
    let texts: Vec<String> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["text"].as_str().unwrap().to_owned())
        .collect();
    let mut flagged = Vec::new();
    for chunk in texts.chunks(64) {
        let out = engine.classify("prompt-injection", chunk.to_vec()).await.unwrap();
        for (text, result) in chunk.iter().zip(&out.results) {
            if injection(&result.scores) >= INJECTION_THRESHOLD {
                flagged.push(text.clone());
            }
        }
    }
    let allowed = texts.len() / 200;
    assert!(flagged.len() <= allowed, "{} of {} benign texts flagged: {flagged:?}", flagged.len(), texts.len());
}

#[tokio::test]
async fn chat_greedy_generation_matches_python_onnxruntime_token_for_token() {
    let mut dirs = vec![common::smollm2_shaped_dir()];
    let real = common::real_models_dir();
    let manifest = Manifest::load(&real.join("manifest.json")).unwrap();
    if manifest.models.iter().any(|m| m.task == Task::Chat) {
        dirs.push(real);
    } else {
        eprintln!(
            "SmolLM2 is not in {} (scripts/fetch-models.sh --with-chat fetches it): checking the SmolLM2-shaped \
             tiny-smollm2 only",
            real.display()
        );
    }
    let mut checked = Vec::new();
    for dir in dirs {
        let (engine, entries) = engine_for(&dir, Task::Chat).await;
        assert!(!entries.is_empty(), "{} has no chat model", dir.display());
        for entry in entries {
            check_greedy(&engine, &dir, &entry).await;
            checked.push(entry.name);
        }
    }
    assert!(checked.iter().any(|name| name == "tiny-smollm2"), "{checked:?}");
}

/// Greedy generation on `entry` reproduces the Python reference: the prompt as rendered by the
/// template (with the default system prompt where the conversation has none) and the first
/// tokens, then the text decoded from them.
async fn check_greedy(engine: &Engine, dir: &Path, entry: &ModelEntry) {
    let reference = reference(dir, entry);
    assert!(!reference.greedy.is_empty());
    assert!(entry.default_system_prompt.is_some(), "{}: served with a default system prompt", entry.name);
    assert!(
        reference.greedy.iter().any(|case| case.messages[0].role != "system"),
        "{}: a reference without a system message exercises the default one",
        entry.name
    );
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join(&entry.tokenizer)).unwrap();
    for case in &reference.greedy {
        let messages = case.messages.iter().map(|m| ChatTurn::new(&m.role, &m.content)).collect();
        let params = SamplingParams { max_tokens: Some(GREEDY_TOKENS as i64), ..Default::default() };
        let mut stream = engine.generate(&entry.name, messages, Some(params)).await.unwrap();
        let mut text = String::new();
        let mut done = None;
        while let Some(event) = stream.next().await {
            match event.unwrap() {
                GenerateEvent::Delta(delta) => text.push_str(&delta),
                GenerateEvent::Done(completion) => done = Some(completion),
            }
        }
        let done = done.unwrap();
        let n = GREEDY_TOKENS.min(case.completion_ids.len());
        assert_eq!(done.prompt_tokens, case.prompt_ids.len(), "{}: prompt {:?}", entry.name, case.prompt);
        assert_eq!(done.token_ids[..n], case.completion_ids[..n], "{}: prompt {:?}", entry.name, case.prompt);
        assert_eq!(text, tokenizer.decode(&done.token_ids, true).unwrap());
    }
}
