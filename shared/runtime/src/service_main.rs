//! The shared `main` of the single-service binaries.

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::server::{ListenConfig, Listeners};
use crate::shutdown::Shutdown;

/// Default ports of one service; binaries listen on all interfaces (they run in pods).
pub fn default_listen(grpc_port: u16, admin_port: u16, http_port: Option<u16>) -> ListenConfig {
    let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
    ListenConfig { grpc: any(grpc_port), admin: any(admin_port), http: http_port.map(any) }
}

/// Runs one service as a process: reads `--config FILE` (or `MESHGATE_CONFIG`), section `section`
/// plus `MESHGATE_<SECTION>__*`, takes the identity `section` in the mesh per `[mesh]`
/// (`MESHGATE_MESH__*`; mTLS with certificates from [`crate::mesh::DEFAULT_TLS_DIR`] unless
/// configured otherwise), listens per `MESHGATE_LISTEN__*` over `listen`, serves until SIGTERM,
/// and exits non-zero with a clear message when startup or serving fails.
pub fn run_main<C, F, Fut, E>(section: &'static str, listen: ListenConfig, serve: F) -> ExitCode
where
    C: DeserializeOwned + Serialize + Default,
    F: FnOnce(C, Listeners, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let file = config_file_from_args();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return fail(section, &format!("cannot start the async runtime: {err}")),
    };
    runtime.block_on(async move {
        crate::telemetry::init(&format!("meshgate-{section}"));
        let config: C = match crate::config::load(section, file.as_deref()) {
            Ok(config) => config,
            Err(err) => return fail(section, &err.to_string()),
        };
        let listen = match crate::config::load_with_defaults("listen", None, listen) {
            Ok(listen) => listen,
            Err(err) => return fail(section, &err.to_string()),
        };
        let identity = match identity(section, file.as_deref()) {
            Ok(identity) => identity,
            Err(message) => return fail(section, &message),
        };
        if let Err(err) = identity.check_listener(listen.grpc) {
            return fail(section, &err.to_string());
        }
        let listeners = match Listeners::bind(&listen).await {
            Ok(listeners) => listeners.with_identity(identity),
            Err(err) => return fail(section, &err.to_string()),
        };
        let shutdown = Shutdown::new();
        shutdown.trigger_on_signals();
        let result = serve(config, listeners, shutdown).await;
        crate::telemetry::shutdown();
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => fail(section, &err.to_string()),
        }
    })
}

/// This process's identity `name` per `[mesh]` in `file` and the environment.
fn identity(name: &str, file: Option<&std::path::Path>) -> Result<crate::mesh::ServiceIdentity, String> {
    let mut config: crate::mesh::Config = crate::config::load("mesh", file).map_err(|err| err.to_string())?;
    if config.tls_dir.is_none() {
        config.tls_dir = Some(crate::mesh::DEFAULT_TLS_DIR.into());
    }
    let mesh = crate::mesh::Mesh::new(&config).map_err(|err| err.to_string())?;
    mesh.identity(name).map_err(|err| err.to_string())
}

/// `--config FILE` / `--config=FILE` from the command line, else `MESHGATE_CONFIG`.
pub fn config_file_from_args() -> Option<PathBuf> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os("MESHGATE_CONFIG").map(PathBuf::from)
}

fn fail(section: &str, message: &str) -> ExitCode {
    eprintln!("meshgate-{section}: {message}");
    tracing::error!(service = section, %message, "exiting");
    ExitCode::FAILURE
}
