//! The CLI's subcommands; errors are returned as the message the process exits with.

use std::path::Path;

use meshgate_runtime::Shutdown;

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

/// `meshgate check-config`: the file and environment parse, and the values the services check
/// before they start are valid.
pub fn check_config(file: Option<&Path>) -> Result<(), String> {
    let mesh = MeshConfig::load(file).map_err(|err| err.to_string())?;
    mesh.quota.validate().map_err(|err| err.to_string())?;
    mesh.analytics.validate().map_err(|err| err.to_string())?;
    mesh.sync.validate().map_err(|err| err.to_string())?;
    println!("configuration OK{}", file.map(|f| format!(": {}", f.display())).unwrap_or_default());
    Ok(())
}
