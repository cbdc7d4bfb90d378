//! Storage against the real Postgres and Redis of the test environment.

use std::time::Duration;

use meshgate_storage::{
    Error, Migration, PgPool, PostgresConfig, RedisConfig, migrate, ping_postgres, ping_redis, postgres_client,
    postgres_pool, redis_connection,
};
use meshgate_test_support::{database_url, redis_url};

fn pool() -> PgPool {
    postgres_pool(&database_url(), &PostgresConfig::default()).unwrap()
}

/// `<prefix>_<uuid>`: usable as an SQL identifier.
fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Migrations that fail loudly if applied twice: a plain CREATE TABLE and an INSERT.
fn leaked(sql: String) -> &'static str {
    Box::leak(sql.into_boxed_str())
}

fn test_migrations(table: &str) -> Vec<Migration> {
    vec![
        Migration {
            version: 1,
            name: "create",
            sql: leaked(format!("CREATE TABLE {table} (id bigint PRIMARY KEY, note text)")),
        },
        Migration {
            version: 2,
            name: "seed",
            sql: leaked(format!(
                "INSERT INTO {table} (id, note) VALUES (1, 'a'); INSERT INTO {table} (id, note) VALUES (2, 'b')"
            )),
        },
        Migration {
            version: 5,
            name: "column",
            sql: leaked(format!("ALTER TABLE {table} ADD COLUMN extra int NOT NULL DEFAULT 7")),
        },
    ]
}

async fn recorded_versions(pool: &PgPool, component: &str) -> Vec<(i64, String)> {
    let client = postgres_client(pool).await.unwrap();
    client
        .query("SELECT version, name FROM schema_migrations WHERE component = $1 ORDER BY version", &[&component])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn migrations_apply_once_and_twice_is_a_no_op() {
    let pool = pool();
    let table = unique("mig_twice");
    let component = unique("component");
    let migrations = test_migrations(&table);

    let first = migrate(&pool, &component, &migrations).await.unwrap();
    assert_eq!(first.applied, vec![1, 2, 5]);
    assert!(first.already_applied.is_empty());

    let second = migrate(&pool, &component, &migrations).await.unwrap();
    assert!(second.applied.is_empty());
    assert_eq!(second.already_applied, vec![1, 2, 5]);

    assert_eq!(
        recorded_versions(&pool, &component).await,
        vec![(1, "create".into()), (2, "seed".into()), (5, "column".into())]
    );
    let client = postgres_client(&pool).await.unwrap();
    let row = client.query_one(&format!("SELECT count(*), sum(extra) FROM {table}"), &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 2);
    assert_eq!(row.get::<_, i64>(1), 14);
}

#[tokio::test]
async fn migrations_are_serialised_across_concurrent_runners() {
    let table = unique("mig_conc");
    let component = unique("component");
    let migrations = test_migrations(&table);

    // Separate pools stand in for separate processes: each runner has its own connections.
    let runners = (0..8).map(|_| {
        let migrations = migrations.clone();
        let component = component.clone();
        tokio::spawn(async move { migrate(&pool(), &component, &migrations).await })
    });
    let reports: Vec<_> = futures::future::join_all(runners).await.into_iter().map(|r| r.unwrap().unwrap()).collect();

    let mut applied: Vec<i64> = reports.iter().flat_map(|r| r.applied.clone()).collect();
    applied.sort_unstable();
    assert_eq!(applied, vec![1, 2, 5], "each migration applied by exactly one runner");
    for report in &reports {
        let mut all: Vec<i64> = report.applied.iter().chain(&report.already_applied).copied().collect();
        all.sort_unstable();
        assert_eq!(all, vec![1, 2, 5]);
    }
    let pool = pool();
    assert_eq!(recorded_versions(&pool, &component).await.len(), 3);
    let client = postgres_client(&pool).await.unwrap();
    let count: i64 = client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get(0);
    assert_eq!(count, 2);
}

#[tokio::test]
async fn a_failing_migration_rolls_back_and_stops_the_run() {
    let pool = pool();
    let table = unique("mig_fail");
    let component = unique("component");
    let migrations = vec![
        Migration { version: 1, name: "create", sql: leaked(format!("CREATE TABLE {table} (id int)")) },
        Migration {
            version: 2,
            name: "broken",
            sql: leaked(format!("INSERT INTO {table} VALUES (1); SELECT no_such_column FROM {table}")),
        },
        Migration { version: 3, name: "after", sql: leaked(format!("INSERT INTO {table} VALUES (3)")) },
    ];
    let err = migrate(&pool, &component, &migrations).await.unwrap_err();
    assert!(matches!(err, Error::MigrationFailed { version: 2, .. }), "{err}");
    assert!(err.to_string().contains("no_such_column"), "{err}");
    assert_eq!(recorded_versions(&pool, &component).await, vec![(1, "create".into())]);
    let client = postgres_client(&pool).await.unwrap();
    let count: i64 = client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get(0);
    assert_eq!(count, 0, "the failed migration's first statement was rolled back");
}

#[tokio::test]
async fn an_edited_migration_is_refused() {
    let pool = pool();
    let table = unique("mig_edit");
    let component = unique("component");
    let original =
        vec![Migration { version: 1, name: "create", sql: leaked(format!("CREATE TABLE {table} (id int)")) }];
    migrate(&pool, &component, &original).await.unwrap();
    let edited =
        vec![Migration { version: 1, name: "create", sql: leaked(format!("CREATE TABLE {table} (id bigint)")) }];
    let err = migrate(&pool, &component, &edited).await.unwrap_err();
    assert!(matches!(err, Error::MigrationChanged { version: 1, .. }), "{err}");
}

#[tokio::test]
async fn invalid_migration_sets_are_rejected_before_touching_the_database() {
    let unreachable = postgres_pool("postgres://postgres@127.0.0.1:1/none", &PostgresConfig::default()).unwrap();
    let m = |version| Migration { version, name: "x", sql: "SELECT 1" };
    let err = migrate(&unreachable, "c", &[m(2), m(1)]).await.unwrap_err();
    assert!(matches!(err, Error::InvalidMigrations { .. }), "{err}");
}

#[tokio::test]
async fn pings_answer_for_live_stores() {
    ping_postgres(&pool(), Duration::from_secs(5)).await.unwrap();
    let redis = redis_connection(&redis_url(), &RedisConfig::default()).unwrap();
    ping_redis(&redis).await.unwrap();
}

#[tokio::test]
async fn unreachable_stores_are_reported_unavailable() {
    let config = PostgresConfig { connect_timeout_ms: 500, acquire_timeout_ms: 500, ..Default::default() };
    let pg = postgres_pool("postgres://postgres@127.0.0.1:1/postgres", &config).unwrap();
    let err = ping_postgres(&pg, Duration::from_secs(5)).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.to_string().starts_with("Postgres is unavailable"), "{err}");

    let redis = redis_connection("redis://127.0.0.1:1/0", &RedisConfig::default()).unwrap();
    let err = ping_redis(&redis).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
}

#[tokio::test]
async fn bad_urls_are_configuration_errors() {
    assert!(matches!(postgres_pool("not a url at all://", &PostgresConfig::default()), Err(Error::Config(_))));
    assert!(matches!(
        postgres_pool(&database_url(), &PostgresConfig { max_connections: 0, ..Default::default() }),
        Err(Error::Config(_))
    ));
    let result =
        tokio::spawn(async { redis_connection("http://nope", &RedisConfig::default()).map(|_| ()) }).await.unwrap();
    assert!(matches!(result, Err(Error::Config(_))));
}

#[tokio::test]
async fn sql_errors_are_not_unavailability() {
    let client = postgres_client(&pool()).await.unwrap();
    let err: Error = client.simple_query("SELECT * FROM no_such_table_anywhere").await.unwrap_err().into();
    assert!(!err.is_unavailable());
    assert!(err.to_string().contains("no_such_table_anywhere"), "{err}");
}
