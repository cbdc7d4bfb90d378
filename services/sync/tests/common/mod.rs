//! Shared by the sync tests: the test Postgres (one schema per test, so the workers of tests
//! running at once never claim each other's jobs), queues over either store, gRPC clients, and a
//! running service to complete through.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use meshgate_mock_provider::MockProvider;
use meshgate_proto::common::v1::{ChatMessage, Principal, Target, TargetKind};
use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_proto::quota::v1::{ReserveRequest, StatusRequest, StatusResponse};
use meshgate_proto::sync::v1::sync_client::SyncClient;
use meshgate_proto::sync::v1::{
    CompleteChunk, CompleteRequest, EnqueueRequest, GetJobRequest, Job, JobReservation, JobStatus, RetryJobRequest,
};
use meshgate_runtime::{ListenConfig, Listeners, MeshChannel, Shutdown};
use meshgate_storage::{PostgresConfig, SharedClock, migrate, postgres_pool};
use meshgate_sync::metrics::UpstreamMetrics;
use meshgate_sync::{
    Config, Dispatcher, FileJobStore, JobStore, PgJobStore, ProviderSpec, Queue, QueueMetrics, Upstream, migrations,
};

pub const MODEL: &str = "gpt-test";
pub const ORG: &str = "org-1";
pub const PROJECT: &str = "proj-1";

/// A URL on the test database whose `search_path` is a fresh schema.
pub async fn isolated_database_url() -> String {
    meshgate_test_support::isolated_database_url("synctest").await
}

/// Which store a test runs on.
#[derive(Clone, Copy, Debug)]
pub enum StoreKind {
    Postgres,
    File,
}

/// A store of `kind`, migrated; the temp dir (for the file store) lives as long as the guard.
pub async fn store(kind: StoreKind) -> (Arc<dyn JobStore>, Option<tempfile::TempDir>) {
    match kind {
        StoreKind::Postgres => {
            let pool = postgres_pool(&isolated_database_url().await, &PostgresConfig::default()).unwrap();
            migrate(&pool, meshgate_sync::COMPONENT, migrations()).await.unwrap();
            (Arc::new(PgJobStore::new(pool)), None)
        }
        StoreKind::File => {
            let dir = tempfile::tempdir().unwrap();
            (Arc::new(FileJobStore::open(dir.path().join("queue")).unwrap()), Some(dir))
        }
    }
}

pub fn provider(name: &str, mock: &MockProvider) -> ProviderSpec {
    ProviderSpec { name: name.into(), base_url: mock.base_url(), models: vec![MODEL.into()], ..ProviderSpec::default() }
}

/// A queue over `store` delivering to `providers`, driven by hand (`dispatcher().run_once()`).
pub fn queue(store: Arc<dyn JobStore>, providers: &[ProviderSpec], clock: SharedClock, config: &Config) -> Queue {
    let upstream = Upstream::new(config, providers, UpstreamMetrics::new()).unwrap();
    let metrics = QueueMetrics::new();
    let dispatcher =
        Dispatcher::new(store.clone(), upstream, clock.clone(), config.queue.dispatcher(), metrics.clone());
    Queue::new(store, dispatcher, clock, config.queue.max_attempts as i32, metrics)
}

pub fn principal() -> Principal {
    Principal { org_id: ORG.into(), project_id: PROJECT.into(), user_id: "u".into(), key_id: "k".into(), role: 0 }
}

pub fn completion(provider: &str, text: &str) -> CompleteRequest {
    CompleteRequest {
        provider: provider.into(),
        model: MODEL.into(),
        messages: vec![ChatMessage { role: "user".into(), content: text.into(), ..ChatMessage::default() }],
        ..CompleteRequest::default()
    }
}

/// What [`enqueue_request`] says the provider `mock` charges for [`MODEL`]: 1 µ$ per prompt token,
/// 2 µ$ per completion token.
pub fn mock_price() -> Target {
    Target {
        id: format!("mock/{MODEL}"),
        kind: TargetKind::Cloud as i32,
        provider: "mock".into(),
        model: MODEL.into(),
        input_price_micros_per_mtok: 1_000_000,
        output_price_micros_per_mtok: 2_000_000,
        ..Target::default()
    }
}

pub fn enqueue_request(key: &str, provider: &str, text: &str) -> EnqueueRequest {
    EnqueueRequest {
        principal: Some(principal()),
        idempotency_key: key.into(),
        request: Some(completion(provider, text)),
        prices: vec![mock_price()],
        reservation: None,
    }
}

/// `RetryJob` of [`PROJECT`]'s job `id` without a new admission.
pub fn retry_request(id: &str) -> RetryJobRequest {
    RetryJobRequest { id: id.into(), project_id: PROJECT.into(), principal: None, reservation: None }
}

/// Admits a job of `principal` at the quota service at `url` as the gateway does: `tokens` and
/// `cost` held for an hour. The reservation to enqueue it with.
pub async fn admit(url: &str, principal: &Principal, request_id: &str, tokens: i64, cost: i64) -> JobReservation {
    let channel = meshgate_runtime::channel(url, Duration::from_secs(1)).unwrap();
    let reserve = ReserveRequest {
        request_id: request_id.into(),
        principal: Some(principal.clone()),
        estimated_tokens: tokens,
        estimated_cost_micros: cost,
        ttl_seconds: 3_600,
    };
    let reserved = QuotaClient::new(channel).reserve(reserve).await.unwrap().into_inner();
    assert!(reserved.admitted, "{reserved:?}");
    JobReservation { reservation_id: reserved.reservation_id, estimated_tokens: tokens, estimated_cost_micros: cost }
}

/// A quota service in this process on `grpc` (port 0: any), with its in-memory store: the
/// budgets deliveries are charged to. Its URL, and the shutdown that stops it.
pub async fn quota_service(grpc: std::net::SocketAddr) -> (String, Shutdown) {
    let addrs = ListenConfig { grpc, admin: "127.0.0.1:0".parse().unwrap(), http: None };
    let listeners = Listeners::bind(&addrs).await.unwrap();
    let url = format!("http://{}", listeners.grpc_addr());
    let shutdown = Shutdown::new();
    tokio::spawn(meshgate_quota::serve(meshgate_quota::Config::default(), listeners, shutdown.clone()));
    let channel = meshgate_runtime::channel(&url, Duration::from_secs(1)).unwrap();
    meshgate_runtime::client::wait_serving(&channel, "", Duration::from_secs(30)).await.expect("quota serves");
    (url, shutdown)
}

/// What the quota service at `url` holds for [`principal`].
pub async fn quota_status(url: &str) -> StatusResponse {
    let channel = meshgate_runtime::channel(url, Duration::from_secs(1)).unwrap();
    QuotaClient::new(channel).status(StatusRequest { principal: Some(principal()) }).await.unwrap().into_inner()
}

/// Polls `GetJob` until the job reaches `status` (or panics after `limit`).
pub async fn wait_for_status(client: &SyncClient<MeshChannel>, id: &str, status: JobStatus, limit: Duration) -> Job {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let job = client
            .clone()
            .get_job(GetJobRequest { id: id.into(), project_id: PROJECT.into() })
            .await
            .unwrap()
            .into_inner();
        if job.status == status as i32 {
            return job;
        }
        assert!(tokio::time::Instant::now() < deadline, "job {id} never became {status:?}: {job:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sync service serving `providers` on ephemeral ports, with a client; shut down when dropped.
/// Retries wait 10 ms (then 20 ms) and a `Retry-After` above 2 s is not waited for.
pub struct RunningSync {
    pub client: SyncClient<MeshChannel>,
    shutdown: Shutdown,
}

impl RunningSync {
    pub async fn start(providers: Vec<ProviderSpec>) -> Self {
        let config = Config {
            providers,
            providers_from_env: false,
            retry_base_delay_ms: 10,
            retry_max_delay_ms: 2_000,
            ..Config::default()
        };
        let listeners = Listeners::ephemeral().await.unwrap();
        let grpc = listeners.grpc_addr();
        let shutdown = Shutdown::new();
        tokio::spawn(meshgate_sync::serve(config, listeners, shutdown.clone()));
        let channel = meshgate_runtime::channel(&format!("http://{grpc}"), Duration::from_secs(1)).unwrap();
        meshgate_runtime::client::wait_serving(&channel, "meshgate.sync.v1.Sync", Duration::from_secs(10))
            .await
            .unwrap();
        Self { client: SyncClient::new(channel), shutdown }
    }

    /// Runs a completion: the chunks received, then the error that ended the stream (if any).
    pub async fn complete(&self, request: CompleteRequest) -> (Vec<CompleteChunk>, Option<tonic::Status>) {
        let mut client = self.client.clone();
        let mut stream = match client.complete(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return (Vec::new(), Some(status)),
        };
        let mut chunks = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => chunks.push(chunk),
                Ok(None) => return (chunks, None),
                Err(status) => return (chunks, Some(status)),
            }
        }
    }
}

impl Drop for RunningSync {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}
