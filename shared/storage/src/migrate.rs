use std::collections::HashMap;

use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::{Error, PgClient, PgPool, postgres_client};

/// One embedded schema migration of a component. Versions are applied in increasing order and
/// never edited once released (the checksum of applied SQL is verified).
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    /// One or more SQL statements, run in one transaction.
    pub sql: &'static str,
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub component: String,
    /// Versions this call applied.
    pub applied: Vec<i64>,
    /// Versions that were already applied before this call.
    pub already_applied: Vec<i64>,
}

/// One advisory-lock key for every component's migrations: concurrent runners (replicas starting
/// together, parallel test processes, the Helm hook) queue instead of racing on DDL. ASCII
/// "meshgate".
const MIGRATION_LOCK_KEY: i64 = 0x6d65_7368_6761_7465;

const CREATE_TABLE: &str = "CREATE TABLE schema_migrations (
    component  text        NOT NULL,
    version    bigint      NOT NULL,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)";

fn checksum(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

fn validate(component: &str, migrations: &[Migration]) -> Result<(), Error> {
    let invalid = |reason: String| Error::InvalidMigrations { component: component.to_owned(), reason };
    if component.trim().is_empty() {
        return Err(invalid("the component name is empty".into()));
    }
    let mut previous = 0;
    for m in migrations {
        if m.version <= previous {
            return Err(invalid(format!(
                "version {} must be positive and greater than the one before it ({previous})",
                m.version
            )));
        }
        if m.name.trim().is_empty() {
            return Err(invalid(format!("version {} has no name", m.version)));
        }
        previous = m.version;
    }
    Ok(())
}

/// Applies the pending `migrations` of `component`, each in its own transaction, and records them
/// in `schema_migrations`. Safe to call concurrently from many processes on one database: every
/// transaction holds a transaction-scoped advisory lock and re-checks what is applied, and a
/// cancelled call leaves no lock behind. Fails if an applied migration's SQL changed.
pub async fn migrate(pool: &PgPool, component: &str, migrations: &[Migration]) -> Result<MigrationReport, Error> {
    validate(component, migrations)?;
    let mut client = postgres_client(pool).await?;

    {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY]).await?;
        // Checked first so a routine start does not log Postgres' "already exists" notice.
        let missing: bool = tx.query_one("SELECT to_regclass('schema_migrations') IS NULL", &[]).await?.get(0);
        if missing {
            tx.batch_execute(CREATE_TABLE).await?;
        }
        tx.commit().await?;
    }

    let rows =
        client.query("SELECT version, checksum FROM schema_migrations WHERE component = $1", &[&component]).await?;
    let applied: HashMap<i64, String> = rows.iter().map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1))).collect();

    let known_max = migrations.last().map_or(0, |m| m.version);
    if let Some(newer) = applied.keys().copied().filter(|v| *v > known_max).max() {
        warn!(component, newer, known_max, "database has migrations newer than this binary knows");
    }

    let mut report =
        MigrationReport { component: component.to_owned(), applied: Vec::new(), already_applied: Vec::new() };
    for m in migrations {
        let sum = checksum(m.sql);
        let recorded = match applied.get(&m.version) {
            Some(existing) => Some(existing.clone()),
            None => apply_if_pending(&mut client, component, m, &sum).await?,
        };
        match recorded {
            None => report.applied.push(m.version),
            Some(existing) if existing == sum => report.already_applied.push(m.version),
            Some(_) => {
                return Err(Error::MigrationChanged {
                    component: component.to_owned(),
                    version: m.version,
                    name: m.name,
                });
            }
        }
    }
    Ok(report)
}

/// Applies `m` under the lock unless another runner did while we waited; returns `None` when
/// applied here, or the checksum recorded by the other runner.
async fn apply_if_pending(
    client: &mut PgClient,
    component: &str,
    m: &Migration,
    sum: &str,
) -> Result<Option<String>, Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY]).await?;
    let existing = tx
        .query_opt(
            "SELECT checksum FROM schema_migrations WHERE component = $1 AND version = $2",
            &[&component, &m.version],
        )
        .await?;
    if let Some(row) = existing {
        tx.commit().await?;
        return Ok(Some(row.get(0)));
    }
    tx.batch_execute(m.sql).await.map_err(|source| Error::MigrationFailed {
        component: component.to_owned(),
        version: m.version,
        name: m.name,
        source,
    })?;
    tx.execute(
        "INSERT INTO schema_migrations (component, version, name, checksum) VALUES ($1, $2, $3, $4)",
        &[&component, &m.version, &m.name, &sum],
    )
    .await?;
    tx.commit().await?;
    info!(component, version = m.version, name = m.name, "applied migration");
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn m(version: i64, name: &'static str) -> Migration {
        Migration { version, name, sql: "SELECT 1" }
    }

    #[test]
    fn rejects_unordered_duplicate_or_unnamed_versions() {
        assert!(validate("c", &[m(1, "a"), m(2, "b")]).is_ok());
        assert!(validate("c", &[]).is_ok());
        assert!(validate("c", &[m(2, "a"), m(1, "b")]).is_err());
        assert!(validate("c", &[m(1, "a"), m(1, "b")]).is_err());
        assert!(validate("c", &[m(0, "a")]).is_err());
        assert!(validate("c", &[m(1, " ")]).is_err());
        assert!(validate("", &[m(1, "a")]).is_err());
    }
}
