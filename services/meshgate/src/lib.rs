//! The standalone meshgate: all six services in one process, each on its own loopback port, with
//! embedded defaults (in-memory quota and traces) unless `DATABASE_URL` / `REDIS_URL` point at
//! stores. They call each other through the same gRPC clients and servers as the mesh: in
//! process by default (`[standalone] in_process_calls`, see `meshgate_runtime::in_process`), or over
//! their loopback listeners. Each service has its own identity (`[mesh]`): its listener speaks
//! mTLS with a development PKI made once under `<data_dir>/tls` unless `tls_dir` names one, and
//! in-process calls carry the calling service's identity through the same allow-list.

pub mod commands;
pub mod tenancy;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use meshgate_runtime::config::{self, ConfigError};
use meshgate_runtime::mesh::{Mesh, SecurityError, Transport, pki};
use meshgate_runtime::{ListenConfig, Listeners, Shutdown};
use serde::{Deserialize, Serialize};

/// Every top-level section a meshgate configuration file may have.
pub const SECTIONS: &[&str] = &["standalone", "mesh", "gateway", "inference", "router", "quota", "analytics", "sync"];

/// Where the standalone process listens (`[standalone]`, `MESHGATE_STANDALONE__*`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StandaloneConfig {
    /// Address of the edge (HTTP); the services listen on `host`.
    pub edge: SocketAddr,
    /// Interface the six gRPC services and admin listeners bind to.
    pub host: IpAddr,
    /// gRPC ports: gateway, inference, router, quota, analytics, sync.
    pub grpc_ports: [u16; 6],
    /// Admin ports in the same order.
    pub admin_ports: [u16; 6],
    /// Where state without a database lives (the on-disk sync queue, the cloud outbox).
    pub data_dir: std::path::PathBuf,
    /// The services call each other in process (the same gRPC clients, servers and encoding,
    /// without HTTP/2 over loopback); off: every call goes through its service's listener, as
    /// between processes.
    pub in_process_calls: bool,
}

impl Default for StandaloneConfig {
    fn default() -> Self {
        Self {
            edge: SocketAddr::from(([127, 0, 0, 1], 8080)),
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            grpc_ports: [50051, 50052, 50053, 50054, 50055, 50056],
            admin_ports: [9101, 9102, 9103, 9104, 9105, 9106],
            data_dir: "meshgate-data".into(),
            in_process_calls: true,
        }
    }
}

/// The configuration of the whole mesh.
#[derive(Debug, Clone, Default)]
pub struct MeshConfig {
    pub standalone: StandaloneConfig,
    /// Transport and identities between the services (`[mesh]`).
    pub mesh: meshgate_runtime::mesh::Config,
    pub gateway: meshgate_gateway::Config,
    pub inference: meshgate_inference::Config,
    pub router: meshgate_router::Config,
    pub quota: meshgate_quota::Config,
    pub analytics: meshgate_analytics::Config,
    pub sync: meshgate_sync::Config,
}

impl MeshConfig {
    /// Reads every section from `file` (when given) and the environment; unknown sections and
    /// keys are errors. `DATABASE_URL` and `REDIS_URL` switch the stores from memory to
    /// Postgres and Redis.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        if let Some(file) = file {
            config::check_sections(file, SECTIONS)?;
        }
        let mut mesh = Self {
            standalone: config::load("standalone", file)?,
            mesh: config::load("mesh", file)?,
            gateway: config::load("gateway", file)?,
            inference: config::load("inference", file)?,
            router: config::load("router", file)?,
            quota: config::load("quota", file)?,
            analytics: config::load("analytics", file)?,
            sync: config::load("sync", file)?,
        };
        mesh.use_stores(std::env::var("DATABASE_URL").ok(), std::env::var("REDIS_URL").ok());
        if mesh.sync.queue.database_url.is_none() && mesh.sync.queue.path.is_none() {
            mesh.sync.queue.path = Some(mesh.standalone.data_dir.join("sync-queue"));
        }
        mesh.sync.cloud = std::mem::take(&mut mesh.sync.cloud).with_env();
        if mesh.sync.cloud.outbox.is_none() {
            mesh.sync.cloud.outbox = Some(mesh.standalone.data_dir.join("cloud-outbox"));
        }
        Ok(mesh)
    }

    /// Points the stateful services at Postgres and Redis (unless their own sections already do).
    pub fn use_stores(&mut self, database_url: Option<String>, redis_url: Option<String>) {
        let database_url = database_url.filter(|u| !u.is_empty());
        let redis_url = redis_url.filter(|u| !u.is_empty());
        if self.quota.database_url.is_none() {
            self.quota.database_url = database_url.clone();
        }
        if self.quota.redis_url.is_none() {
            self.quota.redis_url = redis_url;
        }
        if self.analytics.database_url.is_none() {
            self.analytics.database_url = database_url.clone();
        }
        if self.gateway.database_url.is_none() {
            self.gateway.database_url = database_url.clone();
        }
        if self.sync.queue.database_url.is_none() && self.sync.queue.path.is_none() {
            self.sync.queue.database_url = database_url;
        }
        if self.gateway.redis_url.is_none() {
            self.gateway.redis_url = self.quota.redis_url.clone();
        }
    }

    /// The mesh the services join: as configured, with a development PKI under
    /// `<data_dir>/tls` (made once, for the six services, the extra callers and the configured
    /// host) when mTLS has no `tls_dir`.
    pub fn security(&self) -> Result<Mesh, SecurityError> {
        let mut mesh = self.mesh.clone();
        if mesh.transport == Transport::Mtls && mesh.tls_dir.is_none() {
            let dir = self.standalone.data_dir.join("tls");
            let identities: Vec<String> = meshgate_runtime::mesh::SERVICES
                .iter()
                .map(|s| (*s).to_owned())
                .chain(mesh.extra_callers.keys().cloned())
                .collect();
            let mut options = pki::SanOptions::default();
            if !self.standalone.host.is_loopback() {
                options.ips.push(self.standalone.host);
            }
            pki::ensure_dev_pki(&dir, &identities, &options)
                .map_err(|err| SecurityError::Files { path: dir.clone(), message: err.to_string() })?;
            mesh.tls_dir = Some(dir);
        }
        Mesh::new(&mesh)
    }

    /// Gives the router sync's providers when it has none of its own, so the plans cover what
    /// sync can call (both read the same `MESHGATE_PROVIDER_*` variables on top).
    pub fn share_providers(&mut self) {
        if self.router.providers.is_empty() {
            self.router.providers = self.sync.providers.clone();
        }
    }

    /// Connects the services to each other at the addresses they actually listen on.
    pub fn wire(&mut self, listeners: &MeshListeners) {
        let url = |l: &Listeners| format!("http://{}", l.grpc_addr());
        self.gateway.quota_endpoint = url(&listeners.quota);
        self.gateway.router_endpoint = url(&listeners.router);
        self.gateway.sync_endpoint = url(&listeners.sync);
        self.gateway.inference_endpoint = url(&listeners.inference);
        self.gateway.analytics_endpoint = url(&listeners.analytics);
        self.router.inference_endpoint = Some(url(&listeners.inference));
        self.sync.quota_endpoint = Some(url(&listeners.quota));
        self.share_providers();
        // An edge uploading to a cloud meshgate: the gateway hands its traces to sync's outbox.
        self.gateway.cloud_uplink |= self.sync.cloud.enabled();
    }
}

/// The listeners of the six services.
#[derive(Debug)]
pub struct MeshListeners {
    pub gateway: Listeners,
    pub inference: Listeners,
    pub router: Listeners,
    pub quota: Listeners,
    pub analytics: Listeners,
    pub sync: Listeners,
}

impl MeshListeners {
    /// Binds the configured ports.
    pub async fn bind(config: &StandaloneConfig) -> std::io::Result<Self> {
        let at = |i: usize, http: Option<SocketAddr>| ListenConfig {
            grpc: SocketAddr::new(config.host, config.grpc_ports[i]),
            admin: SocketAddr::new(config.host, config.admin_ports[i]),
            http,
        };
        Ok(Self {
            gateway: Listeners::bind(&at(0, Some(config.edge))).await?,
            inference: Listeners::bind(&at(1, None)).await?,
            router: Listeners::bind(&at(2, None)).await?,
            quota: Listeners::bind(&at(3, None)).await?,
            analytics: Listeners::bind(&at(4, None)).await?,
            sync: Listeners::bind(&at(5, None)).await?,
        })
    }

    /// Ephemeral loopback ports for every listener (tests, benchmarks).
    pub async fn ephemeral() -> std::io::Result<Self> {
        let bare = || async {
            let mut listeners = Listeners::ephemeral().await?;
            listeners.http = None;
            Ok::<_, std::io::Error>(listeners)
        };
        Ok(Self {
            gateway: Listeners::ephemeral().await?,
            inference: bare().await?,
            router: bare().await?,
            quota: bare().await?,
            analytics: bare().await?,
            sync: bare().await?,
        })
    }

    /// Gives each service its identity in `mesh`; a plaintext mesh must listen on loopback.
    pub fn identify(self, mesh: &Mesh) -> Result<Self, SecurityError> {
        let join = |name: &str, listeners: Listeners| -> Result<Listeners, SecurityError> {
            let identity = mesh.identity(name)?;
            identity.check_listener(listeners.grpc_addr())?;
            Ok(listeners.with_identity(identity))
        };
        Ok(Self {
            gateway: join("gateway", self.gateway)?,
            inference: join("inference", self.inference)?,
            router: join("router", self.router)?,
            quota: join("quota", self.quota)?,
            analytics: join("analytics", self.analytics)?,
            sync: join("sync", self.sync)?,
        })
    }

    /// The edge's HTTP address.
    pub fn edge_addr(&self) -> Option<SocketAddr> {
        self.gateway.http_addr()
    }

    /// `(name, gRPC address, admin address)` of each service.
    pub fn addresses(&self) -> [(&'static str, SocketAddr, SocketAddr); 6] {
        let of = |name, l: &Listeners| (name, l.grpc_addr(), l.admin_addr());
        [
            of("gateway", &self.gateway),
            of("inference", &self.inference),
            of("router", &self.router),
            of("quota", &self.quota),
            of("analytics", &self.analytics),
            of("sync", &self.sync),
        ]
    }
}

/// A service of the mesh that stopped with an error.
#[derive(Debug, thiserror::Error)]
#[error("{service}: {message}")]
pub struct MeshError {
    pub service: &'static str,
    pub message: String,
}

/// Runs one service as a task; its failure (or panic) triggers `failure` so the whole mesh
/// stops with it.
fn spawn_service<F, E>(
    service: &'static str,
    serving: F,
    failure: Shutdown,
) -> tokio::task::JoinHandle<Result<(), MeshError>>
where
    F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    tokio::spawn(async move {
        let result = match tokio::spawn(serving).await {
            Ok(result) => result.map_err(|err| MeshError { service, message: err.to_string() }),
            Err(err) => Err(MeshError { service, message: format!("the service task failed: {err}") }),
        };
        if result.is_err() {
            failure.trigger();
        }
        result
    })
}

/// Runs the six services until `shutdown`; the first one to fail stops the others. The
/// gateway stops first and its peers only once it has drained, so the requests it finishes
/// while draining can still commit their quota and record their traces.
pub async fn run(mut config: MeshConfig, listeners: MeshListeners, shutdown: Shutdown) -> Result<(), MeshError> {
    config.wire(&listeners);
    let security = |err: SecurityError| MeshError { service: "mesh", message: err.to_string() };
    let mesh = config.security().map_err(security)?;
    let listeners = listeners.identify(&mesh).map_err(security)?;
    if config.standalone.in_process_calls {
        meshgate_runtime::in_process::enable();
    }
    let MeshListeners { gateway, inference, router, quota, analytics, sync } = listeners;
    let edge = Shutdown::new();
    let core = Shutdown::new();
    let stop_edge = {
        let (shutdown, edge) = (shutdown.clone(), edge.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            edge.trigger();
        })
    };
    let s = &shutdown;
    let gateway = spawn_service("gateway", meshgate_gateway::serve(config.gateway, gateway, edge), s.clone());
    let peers = [
        spawn_service("inference", meshgate_inference::serve(config.inference, inference, core.clone()), s.clone()),
        spawn_service("router", meshgate_router::serve(config.router, router, core.clone()), s.clone()),
        spawn_service("quota", meshgate_quota::serve(config.quota, quota, core.clone()), s.clone()),
        spawn_service("analytics", meshgate_analytics::serve(config.analytics, analytics, core.clone()), s.clone()),
        spawn_service("sync", meshgate_sync::serve(config.sync, sync, core.clone()), s.clone()),
    ];
    let mut results = vec![gateway.await];
    core.trigger();
    results.extend(futures::future::join_all(peers).await);
    stop_edge.abort();
    let mut first_error = None;
    for result in results {
        let result = result
            .map_err(|err| MeshError { service: "mesh", message: format!("a supervisor task failed: {err}") })
            .and_then(|r| r);
        if let Err(err) = result {
            tracing::error!(%err, "service stopped");
            first_error.get_or_insert(err);
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        f
    }

    #[test]
    fn loads_every_section_and_rejects_unknown_ones() {
        let good = file("[standalone]\nedge = \"127.0.0.1:18080\"\n[gateway]\nmax_body_bytes = 2048\n");
        let config = MeshConfig::load(Some(good.path())).unwrap();
        assert_eq!(config.standalone.edge.port(), 18080);
        assert_eq!(config.gateway.max_body_bytes, 2048);

        let unknown_section = file("[gatewya]\nmax_body_bytes = 2048\n");
        let err = MeshConfig::load(Some(unknown_section.path())).unwrap_err().to_string();
        assert!(err.contains("gatewya"), "{err}");

        let unknown_key = file("[router]\nbreakr = 1\n");
        let err = MeshConfig::load(Some(unknown_key.path())).unwrap_err().to_string();
        assert!(err.contains("breakr"), "{err}");
    }

    #[test]
    fn gateways_lease_quota_unless_told_not_to() {
        assert!(MeshConfig::default().gateway.quota_leases, "leasing is the default");
        let off = file("[gateway]\nquota_leases = false\n[gateway.leases]\nttl_ms = 20000\n");
        let config = MeshConfig::load(Some(off.path())).unwrap();
        assert!(!config.gateway.quota_leases);
        assert_eq!(config.gateway.leases.ttl_ms, 20_000);
        assert_eq!(config.gateway.leases.flush_interval_ms, 200, "the other lease settings keep their defaults");

        let misspelt = file("[gateway.leases]\nttl_secs = 20\n");
        let err = MeshConfig::load(Some(misspelt.path())).unwrap_err().to_string();
        assert!(err.contains("ttl_secs"), "{err}");
    }

    #[tokio::test]
    async fn wiring_points_every_client_at_the_bound_ports() {
        let listeners = MeshListeners::ephemeral().await.unwrap();
        let mut config = MeshConfig::default();
        config.wire(&listeners);
        assert_eq!(config.gateway.quota_endpoint, format!("http://{}", listeners.quota.grpc_addr()));
        assert_eq!(config.gateway.analytics_endpoint, format!("http://{}", listeners.analytics.grpc_addr()));
        assert_eq!(config.router.inference_endpoint, Some(format!("http://{}", listeners.inference.grpc_addr())));
        assert!(listeners.edge_addr().is_some());
        assert!(listeners.quota.http.is_none());
    }

    #[tokio::test]
    async fn the_standalone_makes_its_development_pki_once_and_refuses_plaintext_off_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = MeshConfig::default();
        config.standalone.data_dir = dir.path().into();
        config.mesh.extra_callers.insert("operator".into(), vec!["Inference.Load".into()]);
        let mesh = config.security().unwrap();
        for name in ["ca", "gateway", "quota", "sync", "operator"] {
            assert!(dir.path().join(format!("tls/{name}.key")).is_file(), "{name}");
        }
        let ca = std::fs::read(dir.path().join("tls/ca.crt")).unwrap();
        config.security().unwrap();
        assert_eq!(std::fs::read(dir.path().join("tls/ca.crt")).unwrap(), ca, "made once, then reused");
        let listeners = MeshListeners::ephemeral().await.unwrap().identify(&mesh).unwrap();
        assert_eq!(listeners.quota.identity.as_ref().map(|i| i.name()), Some("quota"));

        config.mesh.transport = Transport::Plaintext;
        let plaintext = config.security().unwrap();
        let open = StandaloneConfig {
            edge: SocketAddr::from(([127, 0, 0, 1], 0)),
            host: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            grpc_ports: [0; 6],
            admin_ports: [0; 6],
            ..StandaloneConfig::default()
        };
        let err = MeshListeners::bind(&open).await.unwrap().identify(&plaintext).unwrap_err();
        assert!(matches!(err, SecurityError::PlaintextNotLoopback(_)), "{err}");
        assert!(MeshListeners::ephemeral().await.unwrap().identify(&plaintext).is_ok(), "loopback is fine");
    }

    #[test]
    fn store_urls_apply_unless_a_section_sets_its_own() {
        let mut config = MeshConfig::default();
        config.analytics.database_url = Some("postgres://own".into());
        config.use_stores(Some("postgres://shared".into()), Some("redis://shared".into()));
        assert_eq!(config.quota.database_url.as_deref(), Some("postgres://shared"));
        assert_eq!(config.quota.redis_url.as_deref(), Some("redis://shared"));
        assert_eq!(config.analytics.database_url.as_deref(), Some("postgres://own"));
        let mut memory = MeshConfig::default();
        memory.use_stores(Some(String::new()), None);
        assert!(memory.quota.database_url.is_none() && memory.quota.redis_url.is_none());
    }
}
