//! What the sync service adds to a forwarded request: the same chat completion sent N times
//! straight to the mock provider over HTTP (what any client does) and through `Sync.Complete`
//! over gRPC (what the gateway does), one at a time, streamed, each read to its end.
//!
//! `cargo run --release -p meshgate-sync --example forward_bench -- [REQUESTS]`

use std::time::{Duration, Instant};

use futures::StreamExt;
use meshgate_mock_provider::{Behavior, MockProvider};
use meshgate_proto::common::v1::ChatMessage;
use meshgate_proto::sync::v1::CompleteRequest;
use meshgate_proto::sync::v1::sync_client::SyncClient;
use meshgate_runtime::{Listeners, Shutdown};
use meshgate_sync::{Config, ProviderSpec};

const MODEL: &str = "bench";
const PROMPT: &str = "say something short about latency";

/// p50 and p99 of `samples`, microseconds.
fn percentiles(samples: &mut [Duration]) -> (u128, u128) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_micros();
    (at(0.50), at(0.99))
}

#[tokio::main]
async fn main() {
    let requests: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(5_000);
    let mock = MockProvider::start_with(Behavior { track_requests: false, ..Behavior::default() }).await.unwrap();
    let config = Config {
        providers: vec![ProviderSpec {
            name: "mock".into(),
            base_url: mock.base_url(),
            models: vec![MODEL.into()],
            ..ProviderSpec::default()
        }],
        providers_from_env: false,
        ..Config::default()
    };
    let listeners = Listeners::ephemeral().await.unwrap();
    let grpc = listeners.grpc_addr();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(meshgate_sync::serve(config, listeners, shutdown.clone()));
    let channel = meshgate_runtime::channel(&format!("http://{grpc}"), Duration::from_secs(1)).unwrap();
    meshgate_runtime::client::wait_serving(&channel, "meshgate.sync.v1.Sync", Duration::from_secs(30)).await.unwrap();
    let sync = SyncClient::new(channel);

    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", mock.base_url());
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let direct = || async {
        let started = Instant::now();
        let mut stream = http.post(&url).json(&body).send().await.unwrap().bytes_stream();
        while let Some(chunk) = stream.next().await {
            chunk.unwrap();
        }
        started.elapsed()
    };
    let forwarded = |mut sync: SyncClient<_>| async move {
        let request = CompleteRequest {
            provider: "mock".into(),
            model: MODEL.into(),
            messages: vec![ChatMessage { role: "user".into(), content: PROMPT.into(), ..ChatMessage::default() }],
            ..CompleteRequest::default()
        };
        let started = Instant::now();
        let mut stream = sync.complete(request).await.unwrap().into_inner();
        while let Some(chunk) = stream.next().await {
            chunk.unwrap();
        }
        started.elapsed()
    };

    // Warm both paths (connections, pools, allocator), then alternate so drift hits both alike.
    for _ in 0..200 {
        direct().await;
        forwarded(sync.clone()).await;
    }
    let (mut straight, mut through) = (Vec::with_capacity(requests), Vec::with_capacity(requests));
    for _ in 0..requests {
        straight.push(direct().await);
        through.push(forwarded(sync.clone()).await);
    }
    let (direct_p50, direct_p99) = percentiles(&mut straight);
    let (sync_p50, sync_p99) = percentiles(&mut through);
    println!("requests: {requests} each, streamed, one at a time");
    println!("direct HTTP to the mock:    p50 {direct_p50} µs  p99 {direct_p99} µs");
    println!("through Sync.Complete:      p50 {sync_p50} µs  p99 {sync_p99} µs");
    println!(
        "added by sync:              p50 {} µs  p99 {} µs",
        sync_p50 as i128 - direct_p50 as i128,
        sync_p99 as i128 - direct_p99 as i128
    );
    shutdown.trigger();
    task.await.unwrap().unwrap();
}
