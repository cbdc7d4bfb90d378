//! `meshgate-mock-provider`: the mock OpenAI and Anthropic provider as a standalone server, for
//! benchmarks, the real-client tests and manual testing. Prints `listening on <base url>` once it accepts connections.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use meshgate_mock_provider::{Behavior, MockProvider, ServeOptions};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(
    name = "meshgate-mock-provider",
    about = "Mock OpenAI-compatible and Anthropic provider for tests and benchmarks"
)]
struct Args {
    /// Address to bind.
    #[arg(long, env = "MESHGATE_MOCK_HOST", default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port to bind (0 picks a free one).
    #[arg(long, env = "MESHGATE_MOCK_PORT", default_value_t = 18000)]
    port: u16,
    /// Delay before each answer, in milliseconds.
    #[arg(long, env = "MESHGATE_MOCK_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,
    /// Delay before each streamed chunk, in milliseconds.
    #[arg(long, env = "MESHGATE_MOCK_CHUNK_DELAY_MS", default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Completion chunks (tokens) per reply; 0 = one per echoed word.
    #[arg(long, env = "MESHGATE_MOCK_STREAM_CHUNKS", default_value_t = 0)]
    stream_chunks: u32,
    /// Fraction of requests that fail, 0.0..=1.0.
    #[arg(long, env = "MESHGATE_MOCK_FAILURE_RATE", default_value_t = 0.0)]
    failure_rate: f64,
    /// HTTP status of injected failures.
    #[arg(long, env = "MESHGATE_MOCK_FAILURE_STATUS", default_value_t = 500)]
    failure_status: u16,
    /// Retry-After seconds on injected 429/503 answers.
    #[arg(long, env = "MESHGATE_MOCK_RETRY_AFTER_SECS", default_value_t = 1)]
    retry_after_secs: u64,
    /// Seed of the failure decisions.
    #[arg(long, env = "MESHGATE_MOCK_SEED", default_value_t = 0)]
    seed: u64,
    /// Required bearer key (none accepts every request).
    #[arg(long, env = "MESHGATE_MOCK_API_KEY")]
    api_key: Option<String>,
    /// Models to list, comma separated.
    #[arg(long, env = "MESHGATE_MOCK_MODELS", value_delimiter = ',', default_value = "mock-model")]
    models: Vec<String>,
    /// Largest prompt (in the mock's tokens) a model takes; a larger one is answered 400
    /// context_length_exceeded.
    #[arg(long, env = "MESHGATE_MOCK_CONTEXT_WINDOW")]
    context_window: Option<u64>,
    /// Answer 404 for models not listed.
    #[arg(long, env = "MESHGATE_MOCK_STRICT_MODELS")]
    strict_models: bool,
    /// Keep per-key counts and recent requests (costs a lock per request).
    #[arg(long, env = "MESHGATE_MOCK_TRACK_REQUESTS")]
    track_requests: bool,
    /// Answer a request whose Idempotency-Key already completed as a replay instead of doing the
    /// work again.
    #[arg(long, env = "MESHGATE_MOCK_HONOUR_IDEMPOTENCY_KEYS", requires = "track_requests")]
    honour_idempotency_keys: bool,
    /// Serve GET/PUT /_mock/behavior: the fault knobs (hang, failures, latency, stream cuts, ...)
    /// read and changed at runtime by another process.
    #[arg(long, env = "MESHGATE_MOCK_CONTROL")]
    control: bool,
    /// Worker threads (default: one per CPU).
    #[arg(long, env = "MESHGATE_MOCK_THREADS")]
    threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        anyhow::ensure!(threads > 0, "--threads must be at least 1");
        runtime.worker_threads(threads);
    }
    let runtime = runtime.enable_all().build().context("building the Tokio runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!((0.0..=1.0).contains(&args.failure_rate), "--failure-rate must be within 0.0..=1.0");
    let behavior = Behavior {
        latency: Duration::from_millis(args.latency_ms),
        chunk_delay: Duration::from_millis(args.chunk_delay_ms),
        stream_chunks: args.stream_chunks,
        failure_rate: args.failure_rate,
        seed: args.seed,
        failure_status: args.failure_status,
        retry_after_secs: Some(args.retry_after_secs),
        api_key: args.api_key,
        models: args.models.into_iter().map(|m| m.trim().to_owned()).filter(|m| !m.is_empty()).collect(),
        strict_models: args.strict_models,
        context_window: args.context_window,
        track_requests: args.track_requests,
        honour_idempotency_keys: args.honour_idempotency_keys,
        ..Behavior::default()
    };
    let addr = SocketAddr::new(args.host, args.port);
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let options = ServeOptions { control: args.control };
    let mock = MockProvider::serve_with_options(listener, behavior, options).context("serving")?;
    println!("listening on {}", mock.base_url());
    shutdown_signal().await?;
    mock.shutdown().await.context("shutting down")
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    Ok(())
}
