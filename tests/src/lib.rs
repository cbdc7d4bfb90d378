//! Boots the whole mesh for integration tests: six real services on ephemeral loopback ports,
//! real Postgres and Redis (from `MESHGATE_TEST_DATABASE_URL` / `MESHGATE_TEST_REDIS_URL`, set by
//! `scripts/test.sh`), the tiny ONNX models, and the project's mock OpenAI providers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use meshgate::{MeshConfig, MeshListeners};
use meshgate_catalog::ProviderSpec;
use meshgate_mock_provider::MockProvider;
use meshgate_proto::analytics::v1::analytics_client::AnalyticsClient;
use meshgate_proto::analytics::v1::{GetTraceRequest, Trace};
use meshgate_runtime::mesh::{Mesh, ServiceIdentity};
use meshgate_runtime::{Listeners, Shutdown};
pub use meshgate_test_support::{database_url, models_dir, redis_url};

/// The bootstrap key every test mesh accepts.
pub const ADMIN_KEY: &str = "sk-meshgate-test-admin";
/// The model both mock providers serve.
pub const CLOUD_MODEL: &str = "mock-gpt";

/// The mesh CA and the certificates of the six services and of `operator`, made once per run
/// of the tests (processes racing to make them agree on one set).
pub fn test_pki() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/test-pki"));
        let identities: Vec<String> =
            meshgate_runtime::mesh::SERVICES.iter().map(|s| (*s).to_owned()).chain(["operator".to_owned()]).collect();
        meshgate_runtime::mesh::pki::ensure_dev_pki(&dir, &identities, &Default::default())
            .expect("the test PKI can be made");
        dir
    })
    .clone()
}

/// A running mesh with two mock providers (`alpha` tried first, then `beta`) serving
/// [`CLOUD_MODEL`].
pub struct TestMesh {
    pub edge: String,
    pub addresses: [(&'static str, SocketAddr, SocketAddr); 6],
    pub alpha: MockProvider,
    pub beta: MockProvider,
    pub shutdown: Shutdown,
    pub http: reqwest::Client,
    /// The mesh's certificates and allow-list, for the tests' own channels.
    pub mesh: Mesh,
    task: tokio::task::JoinHandle<Result<(), meshgate::MeshError>>,
}

/// A second gateway in front of a mesh's services ([`TestMesh::gateway_replica`]).
pub struct GatewayReplica {
    /// Its HTTP edge, e.g. `http://127.0.0.1:40001`.
    pub edge: String,
    /// Its admin listener (`/metrics`, `/readyz`).
    pub admin: String,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), meshgate_gateway::Error>>,
}

impl GatewayReplica {
    pub async fn stop(self) {
        self.shutdown.trigger();
        self.task.await.expect("the replica's task").expect("the replica stops cleanly");
    }
}

/// How to build a test mesh.
pub struct MeshOptions {
    /// Use Postgres and Redis (true) or the embedded in-memory stores.
    pub stores: bool,
    /// Adjusts the configuration before start.
    pub tune: Box<dyn FnOnce(&mut MeshConfig) + Send>,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self { stores: true, tune: Box::new(|_| {}) }
    }
}

impl TestMesh {
    pub async fn start() -> Self {
        Self::start_with(MeshOptions::default()).await
    }

    pub async fn start_with(options: MeshOptions) -> Self {
        meshgate_runtime::telemetry::init("meshgate-tests");
        let alpha = MockProvider::start().await.expect("mock provider alpha");
        let beta = MockProvider::start().await.expect("mock provider beta");
        let mut config = base_config(&[("alpha", &alpha), ("beta", &beta)], options.stores);
        if options.stores {
            // Tests run at once and name the same tenants (the admin key's org, user and key):
            // each mesh gets a schema of its own, so limits and traces never cross tests.
            let url = isolated_database_url().await;
            config.quota.database_url = Some(url.clone());
            config.analytics.database_url = Some(url.clone());
            config.gateway.database_url = Some(url.clone());
            config.sync.queue.database_url = Some(url);
        }
        (options.tune)(&mut config);
        let mesh = config.security().expect("the mesh configuration is usable");
        let listeners = MeshListeners::ephemeral().await.expect("ephemeral listeners");
        let addresses = listeners.addresses();
        let edge = format!("http://{}", listeners.edge_addr().expect("edge listener"));
        let shutdown = Shutdown::new();
        let task = tokio::spawn(meshgate::run(config, listeners, shutdown.clone()));
        let mesh = Self { edge, addresses, alpha, beta, shutdown, http: reqwest::Client::new(), mesh, task };
        mesh.wait_until_serving(Duration::from_secs(30)).await;
        mesh
    }

    pub fn grpc_url(&self, service: &str) -> String {
        let (_, grpc, _) = self.addresses.iter().find(|(name, _, _)| *name == service).expect("known service");
        format!("http://{grpc}")
    }

    pub fn admin_url(&self, service: &str) -> String {
        let (_, _, admin) = self.addresses.iter().find(|(name, _, _)| *name == service).expect("known service");
        format!("http://{admin}")
    }

    /// A channel to one service, calling as the gateway (which may call every RPC the tests use).
    pub fn channel(&self, service: &str) -> meshgate_runtime::MeshChannel {
        self.channel_as("gateway", service)
    }

    /// A channel to one service, calling as `identity`.
    pub fn channel_as(&self, identity: &str, service: &str) -> meshgate_runtime::MeshChannel {
        self.identity(identity).channel(&self.grpc_url(service), Duration::from_secs(1)).expect("valid endpoint")
    }

    /// An identity of this mesh, with its certificate.
    pub fn identity(&self, name: &str) -> ServiceIdentity {
        self.mesh.identity(name).expect("the test PKI has the identity")
    }

    /// Ephemeral listeners serving as `identity` in this mesh (another replica of a service).
    pub async fn listeners(&self, identity: &str) -> Listeners {
        Listeners::ephemeral().await.expect("ephemeral listeners").with_identity(self.identity(identity))
    }

    /// gRPC health of one service.
    pub async fn health(&self, service: &str) -> Option<i32> {
        meshgate_runtime::client::health_status(self.channel(service), "", Duration::from_secs(1))
            .await
            .ok()
            .map(|s| s as i32)
    }

    async fn wait_until_serving(&self, limit: Duration) {
        for (name, _, _) in self.addresses {
            if let Err(reason) = meshgate_runtime::client::wait_serving(&self.channel(name), "", limit).await {
                panic!("{name}: {reason}");
            }
            assert!(!self.task.is_finished(), "the mesh stopped while starting");
        }
    }

    /// `POST /v1/chat/completions` with the admin key.
    pub async fn chat(&self, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chat/completions", self.edge))
            .bearer_auth(ADMIN_KEY)
            .json(&body)
            .send()
            .await
            .expect("edge answers")
    }

    /// `GET path` on the edge with `key`, parsed as JSON (for reads whose status is not the point).
    pub async fn get_json(&self, path: &str, key: &str) -> serde_json::Value {
        let response =
            self.http.get(format!("{}{path}", self.edge)).bearer_auth(key).send().await.expect("edge answers");
        response.json().await.expect("a JSON body")
    }

    /// The trace analytics stored for `request_id` (traces are flushed in the background).
    pub async fn trace(&self, request_id: &str) -> Trace {
        let mut analytics = AnalyticsClient::new(self.channel("analytics"));
        for _ in 0..200 {
            let request = GetTraceRequest {
                request_id: request_id.to_owned(),
                org_id: "default".into(),
                all_projects: true,
                ..Default::default()
            };
            if let Ok(found) = analytics.get_trace(request).await {
                return found.into_inner();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no trace stored for {request_id}");
    }

    /// Another gateway replica on this mesh's services, with `config`: the mesh's own gateway
    /// configuration kept through [`MeshOptions::tune`], so it shares the mesh's database and Redis.
    pub async fn gateway_replica(&self, config: meshgate_gateway::Config) -> GatewayReplica {
        self.start_replica(self.wire_replica(config)).await
    }

    /// `config` with the endpoints of this mesh's services.
    pub fn wire_replica(&self, mut config: meshgate_gateway::Config) -> meshgate_gateway::Config {
        for (service, endpoint) in [
            ("quota", &mut config.quota_endpoint),
            ("router", &mut config.router_endpoint),
            ("sync", &mut config.sync_endpoint),
            ("inference", &mut config.inference_endpoint),
            ("analytics", &mut config.analytics_endpoint),
        ] {
            *endpoint = self.grpc_url(service);
        }
        config
    }

    /// A gateway replica with `config` as it is, under the gateway's mesh identity.
    pub async fn start_replica(&self, config: meshgate_gateway::Config) -> GatewayReplica {
        let listeners = self.listeners("gateway").await;
        let edge = format!("http://{}", listeners.http_addr().expect("an edge listener"));
        let admin = format!("http://{}", listeners.admin_addr());
        let shutdown = Shutdown::new();
        let task = tokio::spawn(meshgate_gateway::serve(config, listeners, shutdown.clone()));
        GatewayReplica { edge, admin, shutdown, task }
    }

    /// The sum of the samples of the Prometheus metric `name` on the admin listener `admin`, over
    /// the series that carry every label of `labels`.
    pub async fn metric(&self, admin: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        let page = self.http.get(format!("{admin}/metrics")).send().await.expect("admin answers");
        let page = page.text().await.expect("a metrics page");
        let wanted: Vec<String> = labels.iter().map(|(label, value)| format!("{label}=\"{value}\"")).collect();
        page.lines()
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (metric, series_labels) = series.split_once('{').unwrap_or((series, ""));
                let series_labels: Vec<&str> = series_labels.trim_end_matches('}').split(',').collect();
                let matches = metric == name && wanted.iter().all(|label| series_labels.contains(&label.as_str()));
                matches.then(|| value.parse::<f64>().ok()).flatten()
            })
            .sum()
    }

    /// Stops the mesh and waits for every service to drain.
    pub async fn stop(self) {
        self.shutdown.trigger();
        let result = tokio::time::timeout(Duration::from_secs(15), self.task).await;
        let stopped = result.expect("the mesh stops within 15 s").expect("mesh task joins");
        stopped.expect("every service stops cleanly");
    }
}

/// A URL of the test database whose connections use a fresh schema of their own.
pub async fn isolated_database_url() -> String {
    meshgate_test_support::isolated_database_url("mgtest").await
}

/// The configuration every test mesh starts from: mTLS with [`test_pki`], the admin key, short
/// timeouts, the mock `providers` in the given order serving [`CLOUD_MODEL`], the tiny models,
/// and (with `stores`) Postgres and Redis under a Redis key prefix of its own.
pub fn base_config(providers: &[(&str, &MockProvider)], stores: bool) -> MeshConfig {
    let mut config = MeshConfig::default();
    config.mesh.tls_dir = Some(test_pki());
    config.gateway.admin_key = Some(ADMIN_KEY.into());
    config.gateway.target_timeout_ms = 1_000;
    config.gateway.trace_flush_ms = 20;
    config.sync.providers = providers
        .iter()
        .zip(1..)
        .map(|((name, mock), priority)| ProviderSpec {
            name: (*name).into(),
            base_url: mock.base_url(),
            models: vec![CLOUD_MODEL.into()],
            priority: Some(priority),
            ..Default::default()
        })
        .collect();
    config.inference.models_dir = models_dir();
    config.router.local_refresh_ms = 200;
    if stores {
        config.use_stores(Some(database_url()), Some(redis_url()));
        // One run's tests share a database and a Redis: each mesh gets its own key space.
        config.quota.key_prefix = format!("mgtest:{}:", uuid::Uuid::new_v4().simple());
    }
    config
}

/// A chat request body for `model` with one user message.
pub fn chat_body(model: &str, text: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 64})
}

/// Parses an SSE body into its `data:` payloads.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|event| event.strip_prefix("data: ")).map(str::to_owned).collect()
}
