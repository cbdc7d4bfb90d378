//! The quota service over real gRPC (Redis + Postgres, and standalone), its failure modes, and
//! its migrations.

mod common;

use std::time::Duration;

use common::{charge, commit, database_url, delete_prefix, principal, redis_url, reserve, scope, set_limits, unique};
use meshgate_proto::quota::v1 as pb;
use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_quota::{
    Config, EngineSettings, MemoryLimits, QuotaEngine, QuotaMetrics, RedisStore, RedisStoreSettings, migrations, serve,
};
use meshgate_runtime::error::ERROR_CODE_METADATA;
use meshgate_runtime::{ErrorCode, Listeners, Shutdown};
use meshgate_storage::{RedisConfig, migrate, postgres_client, redis_connection, system_clock};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Running {
    grpc: String,
    admin: std::net::SocketAddr,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), meshgate_quota::Error>>,
}

async fn start(config: Config) -> Running {
    let listeners = Listeners::ephemeral().await.unwrap();
    let grpc = format!("http://{}", listeners.grpc_addr());
    let admin = listeners.admin_addr();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(serve(config, listeners, shutdown.clone()));
    Running { grpc, admin, shutdown, task }
}

impl Running {
    async fn client(&self) -> QuotaClient<tonic::transport::Channel> {
        QuotaClient::connect(self.grpc.clone()).await.unwrap()
    }

    async fn wait_serving(&self) {
        let health = meshgate_runtime::channel(&self.grpc, Duration::from_secs(1)).unwrap();
        meshgate_runtime::client::wait_serving(&health, "meshgate.quota.v1.Quota", Duration::from_secs(5))
            .await
            .unwrap();
    }

    async fn admin_get(&self, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(self.admin).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        body
    }

    async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(15), self.task).await.unwrap().unwrap().unwrap();
    }
}

async fn round_trip(running: &Running) {
    running.wait_serving().await;
    let mut client = running.client().await;
    let p = principal();
    let key = scope(pb::ScopeKind::Key, &p.key_id);

    let set = client.set_limits(set_limits(key.clone(), 1_000, 0)).await.unwrap().into_inner();
    assert_eq!(set.limits.unwrap().tokens_per_day, 1_000);
    let r = client.reserve(reserve(&p, "grpc-1", 400, 0)).await.unwrap().into_inner();
    assert!(r.admitted);
    assert_eq!(r.remaining_tokens, 600);
    let c = client.commit(commit(&r.reservation_id, 300, 12)).await.unwrap().into_inner();
    assert_eq!(c.remaining_tokens, 700);
    let refused = client.reserve(reserve(&p, "grpc-2", 800, 0)).await.unwrap().into_inner();
    assert!(!refused.admitted);
    assert_eq!(refused.rejected_scope, Some(key.clone()));
    assert!(refused.retry_after_seconds >= 1);
    let status = client.status(pb::StatusRequest { principal: Some(p.clone()) }).await.unwrap().into_inner();
    let key_status = status.scopes.iter().find(|s| s.scope.as_ref() == Some(&key)).unwrap();
    assert_eq!((key_status.used_tokens, key_status.used_cost_micros, key_status.remaining_tokens), (300, 12, 700));

    // Bad input is INVALID_ARGUMENT with the shared error code attached; unknown is NOT_FOUND.
    let err = client.reserve(reserve(&p, "grpc-3", -1, 0)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.metadata().get(ERROR_CODE_METADATA).unwrap(), "invalid_request");
    let err = client.set_limits(set_limits(pb::Scope { kind: 0, id: "x".into() }, 1, 0)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = client.release(pb::ReleaseRequest { reservation_id: "rsv_nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Charge: usage without a reservation, once per charge id, even over the budget.
    let charged = client.charge(charge(&p, "edge-1", 500, 3, 2)).await.unwrap().into_inner();
    assert_eq!((charged.replay, charged.remaining_tokens, charged.remaining_cost_micros), (false, 200, 9_999_985));
    let replay = client.charge(charge(&p, "edge-1", 500, 3, 2)).await.unwrap().into_inner();
    assert_eq!((replay.replay, replay.remaining_tokens), (true, 200));
    let over = client.charge(charge(&p, "edge-2", 400, 0, 1)).await.unwrap().into_inner();
    assert_eq!((over.replay, over.remaining_tokens), (false, 0));
    let status = client.status(pb::StatusRequest { principal: Some(p.clone()) }).await.unwrap().into_inner();
    for s in &status.scopes {
        assert_eq!((s.used_tokens, s.used_cost_micros, s.requests_today), (1_200, 15, 4), "{:?}", s.scope);
    }
    assert!(!client.reserve(reserve(&p, "grpc-4", 1, 0)).await.unwrap().into_inner().admitted);
    let no_principal = pb::ChargeRequest { principal: None, ..charge(&p, "edge-3", 1, 0, 1) };
    let no_usage = pb::ChargeRequest { usage: None, ..charge(&p, "edge-3", 1, 0, 1) };
    for bad in [
        charge(&p, "", 1, 0, 1),
        charge(&p, &"x".repeat(300), 1, 0, 1),
        no_principal,
        no_usage,
        charge(&p, "edge-3", -1, 0, 1),
        charge(&p, "edge-3", 1, -1, 1),
        charge(&p, "edge-3", 1, 0, -1),
        charge(&p, "edge-3", 1, 0, 1_000_001),
    ] {
        let err = client.charge(bad.clone()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}: {err}");
        assert_eq!(err.metadata().get(ERROR_CODE_METADATA).unwrap(), "invalid_request");
    }

    assert!(running.admin_get("/readyz").await.starts_with("HTTP/1.1 200"));
    let metrics = running.admin_get("/metrics").await;
    assert!(
        metrics.contains("meshgate_quota_reservations_total{limit=\"tokens_per_day\",result=\"rejected\""),
        "{metrics}"
    );
    assert!(metrics.contains("meshgate_quota_reserve_duration_seconds_count"), "{metrics}");
    assert!(metrics.contains("meshgate_quota_charges_total{outcome=\"replay\""), "{metrics}");
}

#[tokio::test]
async fn serves_over_grpc_with_redis_and_postgres_and_flushes_the_ledger_on_shutdown() {
    let prefix = format!("{}:", unique("test:quota-svc"));
    let config = Config {
        database_url: Some(database_url()),
        redis_url: Some(redis_url()),
        key_prefix: prefix.clone(),
        // Long enough that only the shutdown flush can have written the ledger.
        ledger_flush_interval_ms: 3_600_000,
        ..Config::default()
    };
    let running = start(config).await;
    round_trip(&running).await;

    let mut client = running.client().await;
    let p = principal();
    let r = client.reserve(reserve(&p, "ledger", 50, 0)).await.unwrap().into_inner();
    client.commit(commit(&r.reservation_id, 42, 9)).await.unwrap();
    running.stop().await;

    let pool = common::pg().await;
    let row = postgres_client(&pool)
        .await
        .unwrap()
        .query_one(
            "SELECT tokens, cost_micros, requests FROM usage_ledger WHERE scope_kind = 'key' AND scope_id = $1",
            &[&p.key_id],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, i64>(2)), (42, 9, 1));
    delete_prefix(&prefix);
}

#[tokio::test]
async fn serves_standalone_in_memory() {
    let running = start(Config::default()).await;
    round_trip(&running).await;
    running.stop().await;
}

#[tokio::test]
async fn bad_configuration_fails_serve_with_a_clear_message() {
    let listeners = Listeners::ephemeral().await.unwrap();
    let config = Config { reservation_ttl_secs: 0, ..Config::default() };
    let err = serve(config, listeners, Shutdown::new()).await.unwrap_err();
    assert!(err.to_string().contains("reservation_ttl_secs"), "{err}");
    let listeners = Listeners::ephemeral().await.unwrap();
    let config = Config { database_url: Some("definitely not a url://".into()), ..Config::default() };
    assert!(serve(config, listeners, Shutdown::new()).await.is_err());
}

fn unreachable_engine(fail_open: bool) -> (QuotaEngine, QuotaMetrics) {
    let conn = redis_connection(
        "redis://127.0.0.1:1/0",
        &RedisConfig { connect_timeout_ms: 200, response_timeout_ms: 200, reconnect_retries: 0 },
    )
    .unwrap();
    let store = RedisStore::new(
        conn,
        RedisStoreSettings {
            key_prefix: "unused:".into(),
            settled_retention: Duration::from_secs(60),
            track_dirty: false,
            late_after: Duration::from_secs(2),
        },
    );
    let metrics = QuotaMetrics::new(&meshgate_runtime::Metrics::new("quota"));
    let engine = QuotaEngine::new(
        Arc::new(store),
        Arc::new(MemoryLimits::default()),
        system_clock(),
        EngineSettings { fail_open, ..EngineSettings::default() },
        metrics.clone(),
    );
    (engine, metrics)
}

/// Redis stalled (SIGSTOP) with reservation scripts queued runs them when it wakes, after the
/// quota service answered 503 and the gateway refused the requests: such a late script holds
/// nothing, where before its hold blocked the budget until its TTL (five minutes) — found by the
/// chaos suite's `redis-stall`. Here every script is late (`late_after` zero).
#[tokio::test]
async fn a_reservation_redis_runs_after_its_caller_gave_up_holds_nothing() {
    let prefix = format!("{}:", unique("test:quota:late"));
    let store = |late_after| {
        let conn = redis_connection(&redis_url(), &RedisConfig::default()).unwrap();
        let settings = RedisStoreSettings {
            key_prefix: prefix.clone(),
            settled_retention: Duration::from_secs(60),
            track_dirty: false,
            late_after,
        };
        Arc::new(RedisStore::new(conn, settings))
    };
    let engine = |late_after| {
        let metrics = QuotaMetrics::new(&meshgate_runtime::Metrics::new("quota"));
        QuotaEngine::new(
            store(late_after),
            Arc::new(MemoryLimits::default()),
            system_clock(),
            EngineSettings::default(),
            metrics,
        )
    };
    let p = principal();
    let late = engine(Duration::ZERO);
    let err = late.reserve(&reserve(&p, "stalled", 500, 0)).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
    assert!(err.to_string().contains("after it was sent"), "{err}");
    let on_time = engine(Duration::from_secs(2));
    let status = on_time.status(&pb::StatusRequest { principal: Some(p.clone()) }).await.unwrap();
    assert!(status.scopes.iter().all(|s| s.reserved_tokens == 0), "a late script held budget: {status:?}");
    assert!(on_time.reserve(&reserve(&p, "on-time", 500, 0)).await.unwrap().admitted);
    delete_prefix(&prefix);
}

#[tokio::test]
async fn unreachable_redis_fails_closed_by_default() {
    let (engine, metrics) = unreachable_engine(false);
    let p = principal();
    let started = std::time::Instant::now();
    for i in 0..3 {
        let err = engine.reserve(&reserve(&p, &format!("down-{i}"), 10, 0)).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
        assert!(err.to_string().contains("fail-closed") && err.to_string().contains("Redis"), "{err}");
        let status: tonic::Status = err.into();
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!(metrics.store_errors.with_label_values(&["reserve"]).get(), 3);
    let err = engine.status(&pb::StatusRequest { principal: Some(p.clone()) }).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable);
    let err = engine.charge(&charge(&p, "down", 10, 0, 1)).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
}

#[tokio::test]
async fn unreachable_redis_fails_open_when_configured() {
    let (engine, metrics) = unreachable_engine(true);
    let p = principal();
    let r = engine.reserve(&reserve(&p, "open", 10, 0)).await.unwrap();
    assert!(r.admitted);
    assert!(r.reservation_id.starts_with("open_"));
    assert_eq!(r.remaining_tokens, -1);
    engine.commit(&commit(&r.reservation_id, 8, 0)).await.unwrap();
    engine.release(&pb::ReleaseRequest { reservation_id: r.reservation_id }).await.unwrap();
    assert_eq!(metrics.reservations.with_label_values(&["fail_open", "none"]).get(), 1);
    assert_eq!(metrics.store_errors.with_label_values(&["reserve"]).get(), 1);
    // A charge is never reported done unless the store took it: the caller must retry.
    let err = engine.charge(&charge(&p, "open", 8, 0, 1)).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
    assert_eq!(metrics.store_errors.with_label_values(&["charge"]).get(), 1);
    assert_eq!(metrics.charges.with_label_values(&["charged"]).get(), 0);
}

#[tokio::test]
async fn quota_migrations_apply_concurrently_and_repeatedly() {
    let runs = (0..4).map(|_| {
        tokio::spawn(async {
            let pool = meshgate_storage::postgres_pool(&database_url(), &Default::default()).unwrap();
            migrate(&pool, "quota", migrations()).await.unwrap()
        })
    });
    for report in futures::future::join_all(runs).await {
        let report = report.unwrap();
        assert_eq!(report.applied.len() + report.already_applied.len(), migrations().len());
    }
    let pool = common::pg().await;
    let client = postgres_client(&pool).await.unwrap();
    let n: i64 =
        client.query_one("SELECT count(*) FROM schema_migrations WHERE component = 'quota'", &[]).await.unwrap().get(0);
    assert_eq!(n, migrations().len() as i64);
    for table in ["quota_limits", "usage_ledger"] {
        let exists: bool = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await.unwrap().get(0);
        assert!(exists, "{table}");
    }
}
