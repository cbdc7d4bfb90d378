//! The runtime every meshgate service shares: configuration, telemetry, metrics, the gRPC and
//! admin servers, inter-service clients, service identity (mTLS and the allow-list), shutdown,
//! and the one error-code table.

pub mod client;
pub mod config;
pub mod error;
pub mod in_process;
pub mod mesh;
pub mod metrics;
mod rpc_methods;
pub mod server;
pub mod service_main;
pub mod shutdown;
pub mod telemetry;

pub use client::{MeshChannel, channel};
pub use error::{ApiError, ErrorCode};
pub use metrics::Metrics;
pub use server::{ListenConfig, Listeners, Readiness, ServeError, ServiceHost};
pub use service_main::run_main;
pub use shutdown::Shutdown;
