//! Service identity inside the mesh. Each service has a certificate of the mesh CA naming it
//! (`spiffe://meshgate/<service>`, CN `<service>`); its gRPC listener speaks mTLS, learns the
//! caller's identity from the caller's certificate, and lets it call only the RPCs the
//! allow-list gives it ([`access`]); its channels present its certificate and check the
//! server's. In-process calls (the standalone) carry the calling service's identity and pass
//! the same checks. Without a mesh configuration (library use: tests calling a service's
//! `serve()` directly with bare [`crate::Listeners`]) everything stays plaintext and unchecked.

mod access;
pub mod config;
mod guard;
mod limits;
pub mod pki;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use config::{Config, DEFAULT_TLS_DIR, SERVICES, Transport};
pub(crate) use guard::{Authentication, Guard, GuardLayer, LocalCaller};
pub use limits::MAX_MESSAGE_BYTES;
pub(crate) use tls::{IdentityTls, TlsConnector, TlsIncoming};
pub use tls::{MeshConnectInfo, Peer};

/// A mesh configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("[mesh] {0}")]
    Config(String),
    #[error("[mesh] {path}: {message}")]
    Files { path: PathBuf, message: String },
    #[error(
        "[mesh] transport = \"plaintext\" needs every gRPC listener on a loopback address, but one listens on {0}: \
         use mtls (tls_dir) or listen on 127.0.0.1"
    )]
    PlaintextNotLoopback(SocketAddr),
}

/// How one process takes part in the mesh: transport, certificates, allow-list and limits,
/// shared by every service (identity) it runs.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<MeshInner>,
}

struct MeshInner {
    transport: Transport,
    reflection: bool,
    policy: Arc<access::AccessPolicy>,
    limits: Arc<limits::RequestLimits>,
    tls: Option<Arc<tls::TlsStore>>,
}

impl Mesh {
    /// Reads `config`. With mTLS, `tls_dir` must be set and hold `ca.crt` (binaries default it to
    /// [`DEFAULT_TLS_DIR`]; `meshgate up` makes a development PKI). Certificates are re-read
    /// every `reload_secs` by a task of the current async runtime.
    pub fn new(config: &Config) -> Result<Self, SecurityError> {
        let policy = Arc::new(access::AccessPolicy::new(&config.extra_callers)?);
        let limits = Arc::new(limits::RequestLimits::new(&config.max_request_bytes)?);
        let tls = match config.transport {
            Transport::Plaintext => None,
            Transport::Mtls => {
                let dir = config
                    .tls_dir
                    .clone()
                    .ok_or_else(|| SecurityError::Config("transport = \"mtls\" needs tls_dir".into()))?;
                Some(tls::TlsStore::open(dir, Duration::from_secs(config.reload_secs))?)
            }
        };
        Ok(Self {
            inner: Arc::new(MeshInner {
                transport: config.transport,
                reflection: config.reflection,
                policy,
                limits,
                tls,
            }),
        })
    }

    /// Checks `config` without reading certificates: RPC and identity names.
    pub fn validate(config: &Config) -> Result<(), SecurityError> {
        access::AccessPolicy::new(&config.extra_callers)?;
        limits::RequestLimits::new(&config.max_request_bytes)?;
        Ok(())
    }

    pub fn transport(&self) -> Transport {
        self.inner.transport
    }

    /// The TLS of a client without an identity (`None` in a plaintext mesh): it checks the
    /// server against the mesh CA and presents no certificate. `Mesh::anonymous_channel`
    /// (in the `client` module) connects with it.
    pub(crate) fn anonymous_tls(&self) -> Result<Option<TlsConnector>, SecurityError> {
        let tls = self.inner.tls.as_ref().map(|store| store.anonymous_client()).transpose()?;
        Ok(tls.map(TlsConnector::Anonymous))
    }

    /// The identity `name` (a service, or e.g. `operator`): with mTLS, its certificate and key
    /// are read (and checked to name it) now.
    pub fn identity(&self, name: &str) -> Result<ServiceIdentity, SecurityError> {
        if !config::is_valid_identity(name) {
            return Err(SecurityError::Config(format!("{name:?} is not a valid identity")));
        }
        let tls = self.inner.tls.as_ref().map(|store| store.identity(name)).transpose()?;
        Ok(ServiceIdentity { name: name.into(), mesh: self.clone(), tls })
    }
}

/// Who a service is in the mesh: its name and certificate, for its listener and its channels.
#[derive(Clone)]
pub struct ServiceIdentity {
    name: Arc<str>,
    mesh: Mesh,
    tls: Option<Arc<IdentityTls>>,
}

impl std::fmt::Debug for ServiceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceIdentity")
            .field("name", &self.name)
            .field("transport", &self.mesh.inner.transport)
            .finish()
    }
}

impl ServiceIdentity {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn transport(&self) -> Transport {
        self.mesh.inner.transport
    }

    /// The name its channels call as (`ServiceIdentity::channel`, in the `client` module).
    pub(crate) fn caller_name(&self) -> Arc<str> {
        self.name.clone()
    }

    /// The TLS its channels connect with: its certificate, in an mTLS mesh.
    pub(crate) fn client_tls(&self) -> Option<TlsConnector> {
        self.tls.clone().map(TlsConnector::Identity)
    }

    /// Refuses a plaintext listener off loopback.
    pub fn check_listener(&self, addr: SocketAddr) -> Result<(), SecurityError> {
        if self.transport() == Transport::Plaintext && !addr.ip().to_canonical().is_loopback() {
            return Err(SecurityError::PlaintextNotLoopback(addr));
        }
        Ok(())
    }

    pub(crate) fn tls(&self) -> Option<&Arc<IdentityTls>> {
        self.tls.as_ref()
    }

    pub(crate) fn reflection(&self) -> bool {
        self.mesh.inner.reflection
    }

    pub(crate) fn guard(&self, refusals: prometheus::IntCounterVec) -> Guard {
        Guard {
            authentication: match self.transport() {
                Transport::Mtls => Authentication::Certificates,
                Transport::Plaintext => Authentication::TrustedLoopback,
            },
            policy: self.mesh.inner.policy.clone(),
            limits: self.mesh.inner.limits.clone(),
            refusals,
        }
    }
}

/// The guard of a service without a mesh configuration: message limits only.
pub(crate) fn unchecked_guard(refusals: prometheus::IntCounterVec) -> Guard {
    Guard {
        authentication: Authentication::Off,
        policy: Arc::new(access::AccessPolicy::new(&Default::default()).expect("the built-in table is valid")),
        limits: Arc::new(limits::RequestLimits::new(&Default::default()).expect("the built-in table is valid")),
        refusals,
    }
}
