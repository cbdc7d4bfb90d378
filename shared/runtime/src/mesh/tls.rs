//! mTLS with rustls: each identity's certificate, re-read when its files change; the server's
//! acceptor (which learns the caller's identity from its certificate) and the channels'
//! connector (which presents the caller's certificate and checks the server's name).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::SecurityError;
use super::pki::SPIFFE_PREFIX;

/// A handshake still unfinished after this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once per listener; further connections wait in the backlog.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// Who is calling, as the server established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A certificate of the mesh CA naming this identity.
    Verified(Arc<str>),
    /// No certificate.
    Anonymous,
    /// A certificate that is not one of the mesh's (another CA, expired, no mesh identity).
    Untrusted(Arc<str>),
}

/// What the server knows about a connection; in every request's extensions.
#[derive(Debug, Clone)]
pub struct MeshConnectInfo {
    pub local_addr: Option<SocketAddr>,
    pub remote_addr: Option<SocketAddr>,
    pub peer: Peer,
}

/// The files one identity is built from.
#[derive(PartialEq, Eq)]
struct Files {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// Configurations built from one version of an identity's files.
struct Built {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// Checks client certificates against the mesh CA once the handshake is done.
    verifier: Arc<dyn ClientCertVerifier>,
}

/// One identity's TLS: its server and client configurations, swapped when its files change.
/// One client configuration per identity keeps TLS sessions resumable across connections.
pub(crate) struct IdentityTls {
    name: Arc<str>,
    built: ArcSwap<Built>,
    files: Mutex<Files>,
}

impl IdentityTls {
    fn client_config(&self) -> Arc<ClientConfig> {
        self.built.load().client.clone()
    }
}

/// The TLS directory of a process: the identities loaded from it, re-read every `reload`.
pub(crate) struct TlsStore {
    dir: PathBuf,
    provider: Arc<CryptoProvider>,
    identities: Mutex<HashMap<String, Arc<IdentityTls>>>,
}

impl TlsStore {
    /// Opens `dir`; with a non-zero `reload`, a task re-reads every loaded identity's files
    /// that often until the store is dropped.
    pub(crate) fn open(dir: PathBuf, reload: Duration) -> Result<Arc<Self>, SecurityError> {
        let ca = dir.join("ca.crt");
        if !ca.is_file() {
            return Err(SecurityError::Files {
                path: ca,
                message: "not found (the mesh CA; `meshgate certs --out DIR` makes a development one)".into(),
            });
        }
        let store = Arc::new(Self {
            dir,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            identities: Mutex::new(HashMap::new()),
        });
        if !reload.is_zero() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(reload_loop(Arc::downgrade(&store), reload));
                }
                Err(_) => tracing::warn!("no async runtime: certificates are not re-read"),
            }
        }
        Ok(store)
    }

    /// `name`'s TLS, loaded from the directory the first time.
    pub(crate) fn identity(&self, name: &str) -> Result<Arc<IdentityTls>, SecurityError> {
        let mut identities = self.identities.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = identities.get(name) {
            return Ok(found.clone());
        }
        let files = read_files(&self.dir, name)?;
        let built = build(&self.provider, name, &files, &self.dir)?;
        let identity =
            Arc::new(IdentityTls { name: name.into(), built: ArcSwap::from_pointee(built), files: Mutex::new(files) });
        identities.insert(name.to_owned(), identity.clone());
        Ok(identity)
    }

    /// Re-reads every identity's files and swaps in the ones that changed and are valid; a
    /// half-rotated or broken set keeps the previous one (and is tried again next time).
    fn reload(&self) {
        let identities: Vec<Arc<IdentityTls>> =
            self.identities.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for identity in identities {
            let files = match read_files(&self.dir, &identity.name) {
                Ok(files) => files,
                Err(err) => {
                    tracing::warn!(identity = %identity.name, %err, "cannot re-read certificates; keeping the current ones");
                    continue;
                }
            };
            let mut current = identity.files.lock().unwrap_or_else(|e| e.into_inner());
            if *current == files {
                continue;
            }
            match build(&self.provider, &identity.name, &files, &self.dir) {
                Ok(built) => {
                    identity.built.store(Arc::new(built));
                    *current = files;
                    tracing::info!(identity = %identity.name, "certificates reloaded");
                }
                Err(err) => {
                    tracing::warn!(identity = %identity.name, %err, "changed certificates are not usable; keeping the current ones")
                }
            }
        }
    }
}

async fn reload_loop(store: Weak<TlsStore>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(store) = store.upgrade() else { return };
        // A few small files: read off the async workers.
        if tokio::task::spawn_blocking(move || store.reload()).await.is_err() {
            tracing::warn!("certificate reload task failed");
        }
    }
}

fn read_files(dir: &Path, name: &str) -> Result<Files, SecurityError> {
    let read = |file: String| {
        let path = dir.join(file);
        std::fs::read(&path).map_err(|err| SecurityError::Files { message: err.to_string(), path })
    };
    Ok(Files { ca: read("ca.crt".into())?, cert: read(format!("{name}.crt"))?, key: read(format!("{name}.key"))? })
}

/// The server and client configurations of identity `name` from `files` (TLS 1.3, ALPN h2):
/// trust the CA bundle (which may hold the old and the new CA during a rotation), present the
/// identity's certificate, and check that it names `name`.
fn build(provider: &Arc<CryptoProvider>, name: &str, files: &Files, dir: &Path) -> Result<Built, SecurityError> {
    let invalid = |file: &str, message: String| SecurityError::Files { path: dir.join(file), message };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&files.ca) {
        let cert = cert.map_err(|err| invalid("ca.crt", err.to_string()))?;
        roots.add(cert).map_err(|err| invalid("ca.crt", err.to_string()))?;
    }
    if roots.is_empty() {
        return Err(invalid("ca.crt", "no certificate in the file".into()));
    }
    let cert_file = format!("{name}.crt");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&files.cert)
        .collect::<Result<_, _>>()
        .map_err(|err| invalid(&cert_file, err.to_string()))?;
    let leaf = chain.first().ok_or_else(|| invalid(&cert_file, "no certificate in the file".into()))?;
    match identity_of(leaf) {
        Some(found) if found == name => {}
        found => {
            return Err(invalid(&cert_file, format!("names {found:?}, not {SPIFFE_PREFIX}{name}")));
        }
    }
    let key_file = format!("{name}.key");
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|err| invalid(&key_file, err.to_string()))?;
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|err| invalid("ca.crt", err.to_string()))?;
    let tls = |err: rustls::Error| invalid(&cert_file, err.to_string());
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(Arc::new(DeferredClientAuth { verifier: verifier.clone() }))
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(tls)?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(tls)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Built { server: Arc::new(server), client: Arc::new(client), verifier })
}

/// The identity a certificate names: its one `spiffe://meshgate/<name>` URI SAN.
pub(crate) fn identity_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let sans = parsed.subject_alternative_name().ok()??;
    let mut names = sans.value.general_names.iter().filter_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => uri.strip_prefix(SPIFFE_PREFIX),
        _ => None,
    });
    let name = names.next()?;
    (names.next().is_none() && super::config::is_valid_identity(name)).then(|| name.to_owned())
}

/// Asks every client for a certificate but lets the handshake finish whatever it presents
/// (while still checking that the client holds the certificate's key), so that a missing or
/// foreign certificate is answered with a gRPC UNAUTHENTICATED that says why, rather than a
/// TLS alert. The chain is checked against the mesh CA right after the handshake
/// ([`identify`]); only a certificate that passes becomes an identity.
#[derive(Debug)]
struct DeferredClientAuth {
    verifier: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for DeferredClientAuth {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a client sends whatever certificate it has, to be refused with a reason.
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier.supported_verify_schemes()
    }
}

/// The caller of a finished handshake: its certificate checked against the mesh CA.
fn identify(connection: &rustls::ServerConnection, verifier: &dyn ClientCertVerifier) -> Peer {
    let Some((leaf, intermediates)) = connection.peer_certificates().and_then(|certs| certs.split_first()) else {
        return Peer::Anonymous;
    };
    if let Err(err) = verifier.verify_client_cert(leaf, intermediates, UnixTime::now()) {
        return Peer::Untrusted(err.to_string().into());
    }
    match identity_of(leaf) {
        Some(name) => Peer::Verified(name.into()),
        None => Peer::Untrusted(format!("the certificate names no {SPIFFE_PREFIX}<identity>").into()),
    }
}

/// A TLS connection accepted by a service, with its caller.
pub struct MeshStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: MeshConnectInfo,
}

impl tonic::transport::server::Connected for MeshStream {
    type ConnectInfo = MeshConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The connections of a TLS listener: accepted, handshaken concurrently (each on its own
/// task, under a deadline) with the identity's current certificate, and yielded with their
/// caller. Dropping it closes the listener and abandons unfinished handshakes.
pub(crate) struct TlsIncoming {
    listener: TcpListener,
    identity: Arc<IdentityTls>,
    handshakes: JoinSet<Option<MeshStream>>,
}

impl TlsIncoming {
    pub(crate) fn new(listener: TcpListener, identity: Arc<IdentityTls>) -> Self {
        Self { listener, identity, handshakes: JoinSet::new() }
    }

    fn start_handshake(&mut self, tcp: TcpStream, remote: SocketAddr) {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "cannot set TCP_NODELAY");
        }
        let built = self.identity.built.load_full();
        self.handshakes.spawn(async move {
            let local_addr = tcp.local_addr().ok();
            let acceptor = tokio_rustls::TlsAcceptor::from(built.server.clone());
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    tracing::debug!(%remote, %err, "TLS handshake failed");
                    return None;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return None;
                }
            };
            let peer = identify(stream.get_ref().1, built.verifier.as_ref());
            Some(MeshStream { inner: stream, info: MeshConnectInfo { local_addr, remote_addr: Some(remote), peer } })
        });
    }
}

impl futures::Stream for TlsIncoming {
    type Item = std::io::Result<MeshStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        while self.handshakes.len() < MAX_PENDING_HANDSHAKES {
            match self.listener.poll_accept(cx) {
                Poll::Ready(Ok((tcp, remote))) => self.start_handshake(tcp, remote),
                // The server logs it and goes on accepting, as with its own listener.
                Poll::Ready(Err(err)) => return Poll::Ready(Some(Err(err))),
                Poll::Pending => break,
            }
        }
        loop {
            match self.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(stream)))) => return Poll::Ready(Some(Ok(stream))),
                Poll::Ready(Some(Ok(None) | Err(_))) => continue,
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Connects channels: TCP, then TLS checking the server's certificate against the mesh CA under
/// the endpoint's host name (or address) and presenting the caller's, if it has one.
#[derive(Clone)]
pub(crate) enum TlsConnector {
    /// As an identity, with its current certificate.
    Identity(Arc<IdentityTls>),
    /// Without a certificate, as a public client of the gateway's edge.
    Anonymous(Arc<ClientConfig>),
}

impl TlsConnector {
    fn client_config(&self) -> Arc<ClientConfig> {
        match self {
            TlsConnector::Identity(identity) => identity.client_config(),
            TlsConnector::Anonymous(config) => config.clone(),
        }
    }
}

impl TlsStore {
    /// A client configuration trusting the mesh CA that presents no certificate.
    pub(crate) fn anonymous_client(&self) -> Result<Arc<ClientConfig>, SecurityError> {
        let path = self.dir.join("ca.crt");
        let invalid = |message: String| SecurityError::Files { path: path.clone(), message };
        let pem = std::fs::read(&path).map_err(|err| invalid(err.to_string()))?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert.map_err(|err| invalid(err.to_string()))?).map_err(|err| invalid(err.to_string()))?;
        }
        let mut client = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|err| invalid(err.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(client))
    }
}

type Connecting =
    Pin<Box<dyn Future<Output = Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, std::io::Error>> + Send>>;

impl tower::Service<http::Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.client_config();
        Box::pin(async move {
            let invalid = |message: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, message);
            let host = uri.host().ok_or_else(|| invalid(format!("{uri}: no host")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("http") { 80 } else { 443 });
            let server_name = ServerName::try_from(host.clone()).map_err(|err| invalid(format!("{host}: {err}")))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(server_name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}
