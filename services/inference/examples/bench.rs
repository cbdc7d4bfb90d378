//! Benchmark driver of the inference service, run by `services/inference/bench/run.sh` beside
//! the Python onnxruntime baseline (`bench_python.py`). Prints one JSON object per measurement.
//!
//! ```text
//! bench MODELS_DIR embed    MODEL SENTENCES_FILE THREADS DURATION_S CONCURRENCY MAX_BATCH MAX_WAIT_US [engine]
//! bench MODELS_DIR generate MODEL PROMPTS_FILE   THREADS RUNS MAX_TOKENS
//! bench MODELS_DIR memory   THREADS
//! ```
//! `embed` and `generate` go through the real gRPC service on 127.0.0.1:0, as a client sees it
//! (`embed ... engine` calls the engine in-process instead, without gRPC, which is what the
//! Python loop it is compared with does). `embed` also reports the mean texts per session call.
//! Sessions spin only with `INTRA_OP_SPINNING=1` (as the Python side).
//! `memory` loads each model of the manifest in turn and reports the growth of the process's
//! resident memory after the load and after a first request.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshgate_inference::batcher::BatchingConfig;
use meshgate_inference::chat::ChatTurn;
use meshgate_inference::engine::GenerateEvent;
use meshgate_inference::manifest::{Manifest, Task};
use meshgate_inference::{Config, Engine, InferenceMetrics};
use meshgate_proto::common::v1::{ChatMessage, SamplingParams};
use meshgate_proto::inference::v1 as pb;
use meshgate_proto::inference::v1::inference_client::InferenceClient;
use meshgate_runtime::{Listeners, Shutdown};
use serde_json::json;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, Error> {
    args.get(i)
        .ok_or_else(|| format!("missing argument {i}: {what}"))?
        .parse()
        .map_err(|_| format!("argument {i} ({what}) is invalid").into())
}

fn config(dir: PathBuf, threads: usize, batching: BatchingConfig) -> Config {
    Config {
        models_dir: dir,
        intra_op_threads: threads,
        intra_op_spinning: std::env::var("INTRA_OP_SPINNING").is_ok_and(|v| v == "1"),
        load_on_start: false,
        max_in_flight: 1024,
        batching,
        ..Config::default()
    }
}

/// Serves `config` on an ephemeral port with `model` loaded; returns a client and the shutdown.
async fn serve(config: Config, model: &str) -> Result<(InferenceClient<Channel>, Shutdown), Error> {
    let listeners = Listeners::ephemeral().await?;
    let addr = listeners.grpc_addr();
    let shutdown = Shutdown::new();
    tokio::spawn(meshgate_inference::serve(config, listeners, shutdown.clone()));
    let channel = Channel::from_shared(format!("http://{addr}"))?.connect_lazy();
    let mut client = InferenceClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.load(pb::LoadRequest { model: model.into(), unload: false }).await {
            Ok(reply) => {
                let status = reply.into_inner().model.ok_or("no model status")?;
                if !status.loaded {
                    return Err(format!("{model} did not load: {}", status.error).into());
                }
                break;
            }
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(status) => return Err(status.into()),
        }
    }
    Ok((client, shutdown))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn lines(path: &str) -> Result<Vec<String>, Error> {
    let text = std::fs::read_to_string(path)?;
    Ok(text.lines().filter(|l| !l.trim().is_empty()).map(str::to_owned).collect())
}

/// Where `embed` requests go.
#[derive(Clone)]
enum Target {
    Grpc(InferenceClient<Channel>),
    Engine(Engine),
}

impl Target {
    async fn embed(&mut self, model: &str, text: String) -> Result<(), Error> {
        match self {
            Target::Grpc(client) => {
                drop(client.embed(pb::EmbedRequest { model: model.into(), inputs: vec![text] }).await?)
            }
            Target::Engine(engine) => drop(engine.embed(model, vec![text]).await?),
        }
        Ok(())
    }
}

async fn embed(dir: PathBuf, args: &[String]) -> Result<(), Error> {
    let model: String = arg(args, 3, "MODEL")?;
    let sentences = Arc::new(lines(&arg::<String>(args, 4, "SENTENCES_FILE")?)?);
    let threads: usize = arg(args, 5, "THREADS")?;
    let duration = Duration::from_secs_f64(arg(args, 6, "DURATION_S")?);
    let concurrency: usize = arg(args, 7, "CONCURRENCY")?;
    let max_batch_size: usize = arg(args, 8, "MAX_BATCH")?;
    let max_wait_us: u64 = arg(args, 9, "MAX_WAIT_US")?;
    let in_process = args.get(10).map(String::as_str) == Some("engine");
    let batching = BatchingConfig { max_batch_size, max_wait_us, queue_capacity: 4096 };
    let config = config(dir, threads, batching);
    let metrics = InferenceMetrics::new();
    let (target, shutdown) = if in_process {
        let engine = Engine::new(config, metrics.clone())?;
        let status = engine.load(&model).await?;
        if !status.loaded {
            return Err(format!("{model} did not load: {:?}", status.error).into());
        }
        (Target::Engine(engine), None)
    } else {
        let (client, shutdown) = serve(config, &model).await?;
        (Target::Grpc(client), Some(shutdown))
    };

    // Warm-up: first runs allocate ONNX Runtime's buffers.
    for s in sentences.iter().take(20) {
        target.clone().embed(&model, s.clone()).await?;
    }
    let cpu_before = cpu_seconds()?;
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (mut target, model, sentences) = (target.clone(), model.clone(), sentences.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut i = w * 7919;
                while started.elapsed() < duration {
                    let text = sentences[i % sentences.len()].clone();
                    i += 1;
                    let t = Instant::now();
                    target.embed(&model, text).await?;
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                }
                Ok::<_, Error>(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds()? - cpu_before;
    latencies.sort_by(f64::total_cmp);
    // Texts per session call, from the engine's own histogram (in-process runs only).
    let sizes = metrics.batch_size.with_label_values(&[model.as_str()]);
    let mean_batch = (sizes.get_sample_count() > 0).then(|| sizes.get_sample_sum() / sizes.get_sample_count() as f64);
    println!(
        "{}",
        json!({
            "impl": if in_process { "rust-engine" } else { "rust-grpc" }, "what": "embed", "model": model,
            "threads": threads, "concurrency": concurrency, "max_batch_size": max_batch_size,
            "max_wait_us": max_wait_us, "requests": latencies.len(), "rps": latencies.len() as f64 / elapsed,
            "p50_ms": percentile(&latencies, 0.5), "p99_ms": percentile(&latencies, 0.99),
            "mean_batch": mean_batch, "cpu_ms_per_request": cpu * 1e3 / latencies.len() as f64,
        })
    );
    if let Some(shutdown) = shutdown {
        shutdown.trigger();
    }
    Ok(())
}

async fn generate(dir: PathBuf, args: &[String]) -> Result<(), Error> {
    let model: String = arg(args, 3, "MODEL")?;
    let prompts = lines(&arg::<String>(args, 4, "PROMPTS_FILE")?)?;
    let threads: usize = arg(args, 5, "THREADS")?;
    let runs: usize = arg(args, 6, "RUNS")?;
    let max_tokens: i64 = arg(args, 7, "MAX_TOKENS")?;
    let (mut client, shutdown) = serve(config(dir, threads, BatchingConfig::default()), &model).await?;
    let mut ttfts = Vec::new();
    let mut rates = Vec::new();
    let mut tokens = 0;
    for run in 0..runs + 1 {
        for prompt in &prompts {
            let request = pb::GenerateRequest {
                model: model.clone(),
                messages: vec![ChatMessage { role: "user".into(), content: prompt.clone(), ..Default::default() }],
                sampling: Some(SamplingParams { max_tokens: Some(max_tokens), ..Default::default() }),
                request_id: String::new(),
            };
            let started = Instant::now();
            let mut stream = client.generate(request).await?.into_inner();
            let mut first = None;
            let mut completion = 0;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                if !chunk.delta.is_empty() && first.is_none() {
                    first = Some(started.elapsed().as_secs_f64());
                }
                if let Some(usage) = chunk.usage {
                    completion = usage.completion_tokens;
                }
            }
            let total = started.elapsed().as_secs_f64();
            // The first round only warms the session up.
            if run > 0
                && let Some(first) = first
            {
                ttfts.push(first * 1e3);
                rates.push((completion - 1) as f64 / (total - first));
                tokens += completion;
            }
        }
    }
    ttfts.sort_by(f64::total_cmp);
    rates.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({
            "impl": "rust-grpc", "what": "generate", "model": model, "threads": threads,
            "generations": ttfts.len(), "tokens": tokens,
            "ttft_p50_ms": percentile(&ttfts, 0.5), "tokens_per_s_p50": percentile(&rates, 0.5),
        })
    );
    shutdown.trigger();
    Ok(())
}

/// CPU time of this process (all threads, user + system), in seconds: the work per request,
/// whatever share of a busy machine the process gets. With gRPC it includes the client's work.
fn cpu_seconds() -> Result<f64, Error> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat.rsplit_once(')').ok_or("bad /proc/self/stat")?.1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // USER_HZ is 100 on Linux.
    Ok(ticks / 100.0)
}

/// Resident memory of this process, in MiB.
fn rss_mib() -> Result<f64, Error> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or("no VmRSS in /proc/self/status")?;
    let kib: f64 = line.split_whitespace().nth(1).ok_or("bad VmRSS line")?.parse()?;
    Ok(kib / 1024.0)
}

async fn memory(dir: PathBuf, args: &[String]) -> Result<(), Error> {
    let threads: usize = arg(args, 3, "THREADS")?;
    let manifest = Manifest::load(&dir.join("manifest.json"))?;
    let engine = Engine::new(config(dir, threads, BatchingConfig::default()), InferenceMetrics::new())?;
    let mut before = rss_mib()?;
    for entry in &manifest.models {
        let status = engine.load(&entry.name).await?;
        if !status.loaded {
            return Err(format!("{} did not load: {:?}", entry.name, status.error).into());
        }
        let loaded = rss_mib()?;
        let text = "The quick brown fox jumps over the lazy dog.".to_owned();
        match entry.task {
            Task::Embeddings => drop(engine.embed(&entry.name, vec![text]).await?),
            Task::Classification => drop(engine.classify(&entry.name, vec![text]).await?),
            Task::Chat => {
                let params = SamplingParams { max_tokens: Some(16), ..Default::default() };
                let mut stream = engine.generate(&entry.name, vec![ChatTurn::new("user", text)], Some(params)).await?;
                while let Some(event) = stream.next().await {
                    if let GenerateEvent::Done(_) = event? {
                        break;
                    }
                }
            }
        }
        let used = rss_mib()?;
        let file_mib = std::fs::metadata(engine.config().models_dir.join(&entry.file))?.len() as f64 / (1 << 20) as f64;
        println!(
            "{}",
            json!({
                "impl": "rust", "what": "memory", "model": entry.name, "file_mib": file_mib,
                "rss_after_load_mib": loaded - before, "rss_after_first_request_mib": used - before,
            })
        );
        before = used;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let dir: PathBuf = arg(&args, 1, "MODELS_DIR")?;
    match args.get(2).map(String::as_str) {
        Some("embed") => embed(dir, &args).await,
        Some("generate") => generate(dir, &args).await,
        Some("memory") => memory(dir, &args).await,
        _ => Err("usage: bench MODELS_DIR embed|generate|memory ... (see the file's doc comment)".into()),
    }
}
