//! In-process calls between services that share a process (the standalone meshgate).
//!
//! A loopback gRPC call pays for HTTP/2 framing, TCP, syscalls and task wake-ups (BENCHMARKS.md
//! measures it), and a standalone request makes several on its critical path. With
//! [`enable`] on, every [`crate::ServiceHost`] registers its gRPC routes — behind the same
//! observing layer as its listener — under its listening address, and a
//! [`crate::MeshChannel`] to that address calls them directly: the same generated client and
//! server code and the same protobuf encoding, without the transport. Each service still listens
//! for clients in other processes, and a service that stops leaves the registry when its
//! shutdown begins, so its callers then meet the closed listener as they would across processes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, RwLock};

use futures::future::BoxFuture;
use tonic::body::Body;

/// An error of a call.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A service's routes, callable in process.
pub type LocalService =
    Arc<dyn Fn(http::Request<Body>) -> BoxFuture<'static, Result<http::Response<Body>, BoxError>> + Send + Sync>;

static ENABLED: AtomicBool = AtomicBool::new(false);
static REGISTRY: LazyLock<RwLock<HashMap<SocketAddr, LocalService>>> = LazyLock::new(Default::default);

/// Turns in-process calls on for this process: services started from now on register.
pub fn enable() {
    ENABLED.store(true, Ordering::Release);
}

/// Whether in-process calls are on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// Whether a service listening on `addr` takes calls in this process.
pub fn registered(addr: SocketAddr) -> bool {
    lookup(addr).is_some()
}

/// The service listening on `addr` in this process, if it registered.
pub(crate) fn lookup(addr: SocketAddr) -> Option<LocalService> {
    if !enabled() {
        return None;
    }
    REGISTRY.read().unwrap_or_else(|e| e.into_inner()).get(&addr).cloned()
}

/// Keeps a service registered until dropped.
pub(crate) struct Registration(SocketAddr);

impl Drop for Registration {
    fn drop(&mut self) {
        REGISTRY.write().unwrap_or_else(|e| e.into_inner()).remove(&self.0);
    }
}

/// Registers `service` under `addr`, the address its listener is bound to.
pub(crate) fn register(addr: SocketAddr, service: LocalService) -> Registration {
    REGISTRY.write().unwrap_or_else(|e| e.into_inner()).insert(addr, service);
    Registration(addr)
}
