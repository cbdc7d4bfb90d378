//! Enqueue and delivery throughput of the durable queue, on Postgres (`MESHGATE_TEST_DATABASE_URL`,
//! a fresh schema) and on disk, through a real sync service over gRPC with the mock provider
//! answering at once.
//!
//! `scripts/test.sh cargo run --release -p meshgate-sync --example queue_bench -- [JOBS]`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshgate_mock_provider::{Behavior, MockProvider};
use meshgate_proto::common::v1::{ChatMessage, Principal};
use meshgate_proto::sync::v1::sync_client::SyncClient;
use meshgate_proto::sync::v1::{CompleteRequest, EnqueueRequest, JobStatus, ListJobsRequest};
use meshgate_runtime::{Listeners, Shutdown};
use meshgate_storage::{PostgresConfig, postgres_client, postgres_pool};
use meshgate_sync::{Config, ProviderSpec};

const CLIENTS: usize = 32;

async fn schema_url(base: &str) -> String {
    let schema = format!("syncbench_{}", uuid::Uuid::new_v4().simple());
    let pool = postgres_pool(base, &PostgresConfig::default()).expect("database URL");
    postgres_client(&pool)
        .await
        .expect("database answers")
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}options=-c%20search_path%3D{schema}")
}

async fn run(name: &str, mut config: Config, mock: &MockProvider, jobs: usize) {
    config.providers = vec![ProviderSpec {
        name: "mock".into(),
        base_url: mock.base_url(),
        models: vec!["bench".into()],
        ..ProviderSpec::default()
    }];
    config.providers_from_env = false;
    // Enqueue first with the workers off, then measure delivery alone.
    config.queue.workers = false;
    let listeners = Listeners::ephemeral().await.unwrap();
    let grpc = listeners.grpc_addr();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(meshgate_sync::serve(config.clone(), listeners, shutdown.clone()));
    let channel = meshgate_runtime::channel(&format!("http://{grpc}"), Duration::from_secs(1)).unwrap();
    meshgate_runtime::client::wait_serving(&channel, "meshgate.sync.v1.Sync", Duration::from_secs(30)).await.unwrap();
    let client = SyncClient::new(channel);

    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let clients = (0..CLIENTS).map(|_| {
        let (mut client, next) = (client.clone(), next.clone());
        tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= jobs {
                    break;
                }
                let request = EnqueueRequest {
                    principal: Some(Principal { org_id: "o".into(), project_id: "p".into(), ..Principal::default() }),
                    idempotency_key: format!("bench-{i}"),
                    request: Some(CompleteRequest {
                        provider: "mock".into(),
                        model: "bench".into(),
                        messages: vec![ChatMessage {
                            role: "user".into(),
                            content: format!("job {i}"),
                            ..ChatMessage::default()
                        }],
                        ..CompleteRequest::default()
                    }),
                    prices: Vec::new(),
                    reservation: None,
                };
                client.enqueue(request).await.expect("enqueued");
            }
        })
    });
    futures::future::join_all(clients).await;
    let enqueue = started.elapsed();
    shutdown.trigger();
    task.await.unwrap().unwrap();

    config.queue.workers = true;
    let listeners = Listeners::ephemeral().await.unwrap();
    let grpc = listeners.grpc_addr();
    let shutdown = Shutdown::new();
    let started = Instant::now();
    let task = tokio::spawn(meshgate_sync::serve(config, listeners, shutdown.clone()));
    let channel = meshgate_runtime::channel(&format!("http://{grpc}"), Duration::from_secs(1)).unwrap();
    let mut client = SyncClient::new(channel);
    loop {
        let pending = client
            .list_jobs(ListJobsRequest { project_id: "p".into(), status: JobStatus::Queued as i32, limit: 1 })
            .await
            .map(|r| r.into_inner().jobs.len())
            .unwrap_or(1);
        let running = client
            .list_jobs(ListJobsRequest { project_id: "p".into(), status: JobStatus::Running as i32, limit: 1 })
            .await
            .map(|r| r.into_inner().jobs.len())
            .unwrap_or(1);
        if pending + running == 0 && mock.stats().completions as usize >= jobs {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deliver = started.elapsed();
    shutdown.trigger();
    task.await.unwrap().unwrap();
    println!(
        "{name}: {jobs} jobs; enqueue {:.0} jobs/s ({CLIENTS} gRPC clients); delivery {:.0} jobs/s (mock answering at once)",
        jobs as f64 / enqueue.as_secs_f64(),
        jobs as f64 / deliver.as_secs_f64()
    );
    mock.reset_counters();
}

#[tokio::main]
async fn main() {
    let jobs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5_000);
    let mock =
        MockProvider::start_with(Behavior { models: vec!["bench".into()], ..Behavior::default() }).await.unwrap();
    let base = std::env::var("MESHGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut config = Config::default();
    config.queue.database_url = Some(schema_url(&base).await);
    run("postgres", config, &mock, jobs).await;

    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.queue.path = Some(dir.path().join("queue"));
    run("disk", config, &mock, jobs).await;
}
