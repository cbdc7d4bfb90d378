//! What each piece of classification costs, and how much of the traffic each stage settles.
//!
//! `cargo run --release -p meshgate-inference --example classify_bench -- [MODELS_DIR]`
//! (default `models/`, as `scripts/fetch-models.sh` builds it; `ORT_DYLIB_PATH` or the project
//! venv gives ONNX Runtime). Pieces, one text at a time: tokenizing, each classifier's first
//! stage, the encoder pass, a head over an embedding, a cache look-up; then whole `Classify`
//! calls: settled by the first stages, left to the encoder (cache off), found in the cache, and
//! both classifiers in one call against two calls. Shares: per classifier, the texts its first
//! stage settles on the evaluation sets (`scripts/models/eval/benign.jsonl`,
//! `services/router/eval/tasks.jsonl`) and on a sample of their texts repeated as traffic repeats.
//! A debug build says so in its output: its figures are not the service's.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshgate_inference::cascade::Stage;
use meshgate_inference::embedding_cache::{EmbeddingCache, digest};
use meshgate_inference::first_stage::FirstStage;
use meshgate_inference::head::Head;
use meshgate_inference::manifest::{Manifest, ModelEntry};
use meshgate_inference::{Config, Engine, InferenceMetrics};
use tokenizers::{Tokenizer, TruncationParams};

const CLASSIFIERS: [&str; 2] = ["prompt-injection", "task-classifier"];

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| root.join("models"));
    let manifest =
        Manifest::load(&dir.join("manifest.json")).expect("a models directory built by scripts/fetch-models.sh");
    let entries: Vec<ModelEntry> = CLASSIFIERS
        .iter()
        .map(|n| manifest.models.iter().find(|m| m.name == *n).expect("both classifiers").clone())
        .collect();
    let texts = evaluation_texts(&root);
    let build = if cfg!(debug_assertions) { "DEBUG build (not the service's figures)" } else { "release build" };
    println!("classify_bench: {} evaluation texts, {build}", texts.len());

    println!("\n## pieces, per text (median of the evaluation texts)");
    let mut tokenizer = Tokenizer::from_file(dir.join(&entries[0].tokenizer)).unwrap();
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: entries[0].context_length as usize,
            ..Default::default()
        }))
        .unwrap();
    let ids: Vec<Vec<u32>> =
        texts.iter().map(|t| tokenizer.encode(t.as_str(), true).unwrap().get_ids().to_vec()).collect();
    report("tokenize (MiniLM WordPiece)", per_text(&texts, |t| drop(tokenizer.encode(t.as_str(), true).unwrap())));
    for entry in &entries {
        let spec = entry.first_stage.as_ref().expect("a first stage");
        let stage = FirstStage::load(&dir.join(&spec.file), spec, entry.labels.len()).unwrap();
        report(&format!("first stage of {}", entry.name), per_text(&ids, |ids| drop(stage.scores(ids))));
        let dims = entry
            .encoder
            .as_ref()
            .and_then(|e| manifest.models.iter().find(|m| &m.name == e))
            .and_then(|m| m.dims)
            .expect("an encoder with dims") as usize;
        let head = Head::load(&dir.join(&entry.file), dims, entry.labels.len()).unwrap();
        let embedding = vec![0.05f32; dims];
        let fast = vec![0.5f32; entry.labels.len()];
        report(&format!("head of {}", entry.name), per_text(&texts, |_| drop(head.probabilities(&embedding, &fast))));
    }
    let cache = EmbeddingCache::new(8192);
    for t in &texts {
        cache.insert(digest(t), vec![0.0f32; 16].into());
    }
    report("cache look-up (sha256 + map)", per_text(&texts, |t| drop(cache.get(&digest(t)))));

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(whole_calls(&dir, &manifest, &texts));
}

async fn whole_calls(dir: &Path, manifest: &Manifest, texts: &[String]) {
    let encoder = manifest.models.iter().find(|m| m.name == "all-minilm-l6-v2").map(|m| m.name.clone());
    let config = |cache| Config {
        models_dir: dir.to_path_buf(),
        ort_dylib_path: Some(meshgate_test_support::ort_dylib()),
        intra_op_threads: 1,
        verify_sha256: false,
        classification_cache_entries: cache,
        ..Config::default()
    };
    let uncached = Engine::new(config(0), InferenceMetrics::new()).unwrap();
    uncached.load_all().await;
    let cached = Engine::new(config(8192), InferenceMetrics::new()).unwrap();
    cached.load_all().await;

    println!("\n## whole Classify calls, one text each (median)");
    if let Some(encoder) = encoder {
        let mut times = Vec::new();
        for t in texts {
            let started = Instant::now();
            uncached.embed(&encoder, vec![t.clone()]).await.unwrap();
            times.push(started.elapsed());
        }
        report("encoder pass (Embed, batch of 1)", times);
    }
    let models: Vec<String> = CLASSIFIERS.iter().map(|s| s.to_string()).collect();
    // Which stage settles each text, per classifier.
    let mut stages = vec![Vec::new(); CLASSIFIERS.len()];
    for t in texts {
        let out = uncached.classify_many(&models, vec![t.clone()]).await.unwrap();
        for (i, o) in out.iter().enumerate() {
            stages[i].push(o.results[0].stage);
        }
    }
    for (name, stages) in CLASSIFIERS.iter().zip(&stages) {
        let first = stages.iter().filter(|s| **s == Stage::FirstStage).count();
        println!(
            "{name}: the first stage settles {first} of {} evaluation texts ({:.1} %)",
            stages.len(),
            100.0 * first as f64 / stages.len() as f64
        );
    }
    let settled_by_both: Vec<&String> = texts
        .iter()
        .enumerate()
        .filter(|(i, _)| stages.iter().all(|s| s[*i] == Stage::FirstStage))
        .map(|(_, t)| t)
        .collect();
    let to_encoder: Vec<&String> = texts
        .iter()
        .enumerate()
        .filter(|(i, _)| stages.iter().any(|s| s[*i] == Stage::Encoder))
        .map(|(_, t)| t)
        .collect();
    println!(
        "both settled by their first stages: {} texts; at least one needs the encoder: {}",
        settled_by_both.len(),
        to_encoder.len()
    );

    let call = |engine: &Engine, models: &[String], t: &String| {
        let (engine, models, t) = (engine.clone(), models.to_vec(), t.clone());
        async move {
            let started = Instant::now();
            engine.classify_many(&models, vec![t]).await.unwrap();
            started.elapsed()
        }
    };
    let mut both_settled = Vec::new();
    for t in &settled_by_both {
        both_settled.push(call(&uncached, &models, t).await);
    }
    report("both classifiers, settled by the first stages", both_settled);
    let (mut together, mut apart, mut from_cache) = (Vec::new(), Vec::new(), Vec::new());
    for t in &to_encoder {
        together.push(call(&uncached, &models, t).await);
        apart.push(call(&uncached, &models[..1], t).await + call(&uncached, &models[1..], t).await);
        call(&cached, &models, t).await;
        from_cache.push(call(&cached, &models, t).await);
    }
    report("both classifiers, encoder needed, one call (one pass)", together);
    report("both classifiers, encoder needed, two calls", apart);
    report("both classifiers, encoder needed, embedding cached", from_cache);

    // Traffic as it repeats: each text sent three times in a shuffled order, cache on.
    let mut traffic: Vec<&String> = texts.iter().chain(texts).chain(texts).collect();
    let mut seed = 7u64;
    for i in (1..traffic.len()).rev() {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        traffic.swap(i, (seed >> 33) as usize % (i + 1));
    }
    let fresh = Engine::new(config(8192), InferenceMetrics::new()).unwrap();
    fresh.load_all().await;
    let mut times = Vec::new();
    let mut settled = [0usize; 3];
    for t in &traffic {
        let started = Instant::now();
        let out = fresh.classify_many(&models, vec![(*t).clone()]).await.unwrap();
        times.push(started.elapsed());
        let r: Vec<_> = out.iter().map(|o| &o.results[0]).collect();
        let i = if r.iter().all(|r| r.stage == Stage::FirstStage) {
            0
        } else if r.iter().all(|r| r.stage == Stage::FirstStage || r.cached) {
            1
        } else {
            2
        };
        settled[i] += 1;
    }
    let n = traffic.len() as f64;
    println!(
        "\nrepeated traffic ({} requests, both classifiers): {:.1} % first stages only, {:.1} % cache, {:.1} % encoder pass",
        traffic.len(),
        100.0 * settled[0] as f64 / n,
        100.0 * settled[1] as f64 / n,
        100.0 * settled[2] as f64 / n
    );
    report("repeated traffic, per request", times);
}

/// Median and p90 of `times`, in microseconds.
fn report(what: &str, mut times: Vec<Duration>) {
    if times.is_empty() {
        println!("{what:<58} (no texts)");
        return;
    }
    times.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{what:<58} p50 {:>9.1} µs   p90 {:>9.1} µs   (n={})",
        us(times[times.len() / 2]),
        us(times[times.len() * 9 / 10]),
        times.len()
    );
}

fn per_text<T>(items: &[T], mut f: impl FnMut(&T)) -> Vec<Duration> {
    items
        .iter()
        .map(|item| {
            let started = Instant::now();
            f(item);
            started.elapsed()
        })
        .collect()
}

/// The hand-written evaluation texts: the benign set and the router's task prompts.
fn evaluation_texts(root: &Path) -> Vec<String> {
    let mut texts = Vec::new();
    for path in ["scripts/models/eval/benign.jsonl", "services/router/eval/tasks.jsonl"] {
        let body = std::fs::read_to_string(root.join(path)).unwrap();
        for line in body.lines().filter(|l| !l.trim().is_empty()) {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            texts.push(value["text"].as_str().unwrap().to_owned());
        }
    }
    texts
}
