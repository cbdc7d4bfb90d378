//! The CLI's subcommands; errors are returned as the message the process exits with.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use meshgate_runtime::Shutdown;
use meshgate_runtime::mesh::{Mesh, Transport, pki};

use crate::{MeshConfig, MeshListeners};

/// `meshgate up`.
pub async fn up(file: Option<&Path>) -> Result<(), String> {
    let config = MeshConfig::load(file).map_err(|err| err.to_string())?;
    if let Some(url) = config
        .gateway
        .database_url
        .as_ref()
        .or(config.quota.database_url.as_ref())
        .or(config.analytics.database_url.as_ref())
    {
        migrate_all(url).await?;
    }
    let listeners = MeshListeners::bind(&config.standalone).await.map_err(|err| err.to_string())?;
    for (name, grpc, admin) in listeners.addresses() {
        tracing::info!(service = name, %grpc, %admin, "listening");
    }
    if let Some(edge) = listeners.edge_addr() {
        println!("meshgate is up: edge http://{edge}  (Ctrl-C to stop)");
    }
    let shutdown = Shutdown::new();
    shutdown.trigger_on_signals();
    crate::run(config, listeners, shutdown).await.map_err(|err| err.to_string())
}

/// `meshgate migrate`.
pub async fn migrate() -> Result<(), String> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set".to_owned())?;
    migrate_all(&url).await
}

/// Applies every component's migrations to the database at `url`.
pub async fn migrate_all(url: &str) -> Result<(), String> {
    let pool = meshgate_storage::postgres_pool(url, &meshgate_storage::PostgresConfig::default())
        .map_err(|err| err.to_string())?;
    for (component, migrations) in [
        (meshgate_gateway::COMPONENT, meshgate_gateway::migrations()),
        ("quota", meshgate_quota::migrations()),
        ("analytics", meshgate_analytics::migrations()),
        ("sync", meshgate_sync::migrations()),
    ] {
        let report = meshgate_storage::migrate(&pool, component, migrations)
            .await
            .map_err(|err| format!("migrating {component}: {err}"))?;
        tracing::info!(component, applied = report.applied.len(), "migrations up to date");
    }
    Ok(())
}

/// `meshgate check-config`: the file and environment parse, the values each of the six services
/// checks before it starts are valid, and every cloud model has a price (unless allowed).
pub fn check_config(file: Option<&Path>) -> Result<(), String> {
    let mut mesh = MeshConfig::load(file).map_err(|err| err.to_string())?;
    mesh.share_providers();
    mesh.gateway.validate().map_err(|err| err.to_string())?;
    mesh.inference.validate().map_err(|err| format!("[inference] {err}"))?;
    mesh.router.validate().map_err(|err| err.to_string())?;
    mesh.quota.validate().map_err(|err| err.to_string())?;
    mesh.analytics.validate().map_err(|err| err.to_string())?;
    mesh.sync.validate().map_err(|err| err.to_string())?;
    mesh.sync.resolve_providers().map_err(|err| format!("[sync] {err}"))?;
    Mesh::validate(&mesh.mesh).map_err(|err| err.to_string())?;
    if mesh.mesh.transport == Transport::Plaintext && !mesh.standalone.host.is_loopback() {
        return Err(format!(
            "[mesh] transport = \"plaintext\" needs a loopback [standalone] host, not {}",
            mesh.standalone.host
        ));
    }
    println!("configuration OK{}", file.map(|f| format!(": {}", f.display())).unwrap_or_default());
    Ok(())
}

/// `meshgate certs`: a development mesh CA and one certificate per service.
#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    /// Directory to write `ca.crt`, `ca.key`, `<identity>.crt` and `<identity>.key` into (the
    /// layout `[mesh] tls_dir` reads).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace existing files (a new CA and new certificates); without it, existing files are
    /// kept and only missing ones are made, signed by the existing CA.
    #[arg(long)]
    pub force: bool,
    /// Prefix of the services' DNS names, e.g. `meshgate-` for the chart's `meshgate-quota`.
    #[arg(long, default_value = "")]
    pub dns_prefix: String,
    /// Also `<prefix><service>.<DOMAIN>` (repeatable), e.g. `meshgate.svc.cluster.local`.
    #[arg(long = "domain", value_name = "DOMAIN")]
    pub domains: Vec<String>,
    /// Another IP address the services answer on (repeatable).
    #[arg(long = "ip", value_name = "IP")]
    pub ips: Vec<IpAddr>,
    /// Another identity to make a certificate for (repeatable), e.g. `operator` for
    /// `[mesh] extra_callers`.
    #[arg(long = "identity", value_name = "NAME")]
    pub identities: Vec<String>,
    /// Validity of the identity certificates, in days.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

/// `meshgate certs`.
pub fn certs(args: CertsArgs) -> Result<(), String> {
    let identities: Vec<String> =
        meshgate_runtime::mesh::SERVICES.iter().map(|s| (*s).to_owned()).chain(args.identities).collect();
    let options =
        pki::SanOptions { dns_prefix: args.dns_prefix, domains: args.domains, ips: args.ips, days: args.days };
    let report = pki::write_pki(&args.out, &identities, &options, args.force).map_err(|err| err.to_string())?;
    for path in &report.written {
        println!("wrote {}", path.display());
    }
    for path in &report.kept {
        println!("kept {} (exists; --force replaces it)", path.display());
    }
    Ok(())
}
