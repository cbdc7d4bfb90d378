//! The analytics service over real gRPC, with Postgres and standalone.

mod common;

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use common::{T, database_url, trace, unique};
use meshgate_analytics::model::to_timestamp;
use meshgate_analytics::{Config, migrations, partition_name, serve};
use meshgate_proto::analytics::v1 as pb;
use meshgate_proto::analytics::v1::analytics_client::AnalyticsClient;
use meshgate_runtime::error::ERROR_CODE_METADATA;
use meshgate_runtime::{Listeners, Shutdown};
use meshgate_storage::{migrate, postgres_client, postgres_pool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

struct Running {
    channel: Channel,
    admin: std::net::SocketAddr,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), meshgate_analytics::Error>>,
}

async fn start(config: Config) -> Running {
    let listeners = Listeners::ephemeral().await.unwrap();
    let url = format!("http://{}", listeners.grpc_addr());
    let admin = listeners.admin_addr();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(serve(config, listeners, shutdown.clone()));
    let health = meshgate_runtime::channel(&url, Duration::from_secs(1)).unwrap();
    meshgate_runtime::client::wait_serving(&health, "meshgate.analytics.v1.Analytics", Duration::from_secs(10))
        .await
        .unwrap();
    let channel = Endpoint::from_shared(url).unwrap().connect_lazy();
    Running { channel, admin, shutdown, task }
}

impl Running {
    fn client(&self) -> AnalyticsClient<Channel> {
        AnalyticsClient::new(self.channel.clone())
    }

    async fn metrics(&self) -> String {
        let mut stream = tokio::net::TcpStream::connect(self.admin).await.unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        body
    }

    async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(15), self.task).await.unwrap().unwrap().unwrap();
    }
}

/// A trace of `org` that started `minutes_ago`.
fn recent(org: &str, rid: &'static str, minutes_ago: i64, cost: i64) -> pb::Trace {
    let mut t = trace(org, &T { rid, cost, ..T::default() });
    t.started_at = Some(to_timestamp(Utc::now() - TimeDelta::minutes(minutes_ago)));
    t
}

fn batch(traces: Vec<pb::Trace>) -> pb::RecordBatch {
    pb::RecordBatch { traces }
}

async fn record(client: &mut AnalyticsClient<Channel>, batches: Vec<pb::RecordBatch>) -> Result<i64, tonic::Status> {
    Ok(client.record(tokio_stream::iter(batches)).await?.into_inner().accepted)
}

async fn round_trip(running: &Running) {
    let mut client = running.client();
    let (org, other) = (unique("org"), unique("org"));

    let accepted = record(
        &mut client,
        vec![
            batch(vec![recent(&org, "a", 5, 300), recent(&org, "b", 4, 100)]),
            batch(vec![recent(&org, "a", 3, 999), recent(&org, "c", 2, 200)]),
            batch(vec![]),
        ],
    )
    .await
    .unwrap();
    assert_eq!(accepted, 3, "the duplicate of a is ignored");

    let got = client
        .get_trace(pb::GetTraceRequest { request_id: "a".into(), org_id: org.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.usage.unwrap().cost_micros, 300, "the first copy wins");
    let err =
        client.get_trace(pb::GetTraceRequest { request_id: "a".into(), org_id: other.clone() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(err.metadata().get(ERROR_CODE_METADATA).unwrap(), "not_found");
    let err =
        client.get_trace(pb::GetTraceRequest { request_id: "a".into(), org_id: String::new() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let rows = client
        .query(pb::QueryRequest { org_id: org.clone(), group_by: "model".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].key.as_str(), rows[0].requests, rows[0].cost_micros), ("m", 3, 600));
    let err = client
        .query(pb::QueryRequest { org_id: org.clone(), group_by: "hour".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let now = to_timestamp(Utc::now());
    let backwards = pb::TimeRange { from: Some(now), to: Some(to_timestamp(Utc::now() - TimeDelta::hours(1))) };
    let err = client
        .query(pb::QueryRequest { org_id: org.clone(), range: Some(backwards), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let top = client
        .top_expensive(pb::TopExpensiveRequest { org_id: org.clone(), limit: 0, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(top.traces.iter().map(|t| t.request_id.as_str()).collect::<Vec<_>>(), ["a", "c", "b"]);
    let err = client
        .top_expensive(pb::TopExpensiveRequest { org_id: org.clone(), limit: -1, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let rates =
        client.error_rates(pb::ErrorRatesRequest { org_id: org.clone(), range: None }).await.unwrap().into_inner();
    assert_eq!(rates.models.len(), 1);
    assert_eq!((rates.models[0].requests, rates.models[0].errors), (3, 0));

    // Invalid batches are refused whole, with INVALID_ARGUMENT, and store nothing.
    let old = recent(&org, "old", 100 * 24 * 60, 0);
    let future = recent(&org, "future", -3 * 24 * 60, 0);
    let mut orphan = recent(&org, "orphan", 1, 0);
    orphan.principal = None;
    for bad in [old, future, orphan] {
        let err = record(&mut client, vec![batch(vec![recent(&org, "fine", 1, 0), bad])]).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }
    let too_many: Vec<pb::Trace> = (0..6).map(|_| recent(&org, "x", 1, 0)).collect();
    let err = record(&mut client, vec![batch(too_many)]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err =
        client.get_trace(pb::GetTraceRequest { request_id: "fine".into(), org_id: org.clone() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let metrics = running.metrics().await;
    assert!(metrics.contains("meshgate_analytics_traces_duplicate_total"), "{metrics}");
    assert!(metrics.contains("meshgate_analytics_insert_duration_seconds_count"), "{metrics}");
}

fn config() -> Config {
    Config { max_batch_traces: 5, ..Config::default() }
}

#[tokio::test]
async fn serves_over_grpc_with_postgres_and_keeps_partitions_ahead() {
    let running = start(Config { database_url: Some(database_url()), ..config() }).await;
    round_trip(&running).await;

    let pool = common::pg().await;
    let ahead = partition_name(Utc::now().date_naive() + TimeDelta::days(3));
    let mut exists = false;
    for _ in 0..100 {
        let client = postgres_client(&pool).await.unwrap();
        exists = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&ahead]).await.unwrap().get(0);
        if exists {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(exists, "{ahead} was not created ahead of time");
    running.stop().await;
}

#[tokio::test]
async fn serves_standalone_in_memory() {
    let running = start(config()).await;
    round_trip(&running).await;
    running.stop().await;
}

#[tokio::test]
async fn invalid_configuration_is_refused() {
    let listeners = Listeners::ephemeral().await.unwrap();
    let err =
        serve(Config { memory_max_traces: 0, ..Config::default() }, listeners, Shutdown::new()).await.unwrap_err();
    assert!(err.to_string().contains("memory_max_traces"), "{err}");
}

#[tokio::test]
async fn analytics_migrations_apply_concurrently_and_repeatedly() {
    let runs = (0..4).map(|_| {
        tokio::spawn(async {
            let pool = postgres_pool(&database_url(), &Default::default()).unwrap();
            migrate(&pool, "analytics", migrations()).await.unwrap()
        })
    });
    for report in futures::future::join_all(runs).await {
        let report = report.unwrap();
        assert_eq!(report.applied.len() + report.already_applied.len(), migrations().len());
    }
    let pool = common::pg().await;
    let client = postgres_client(&pool).await.unwrap();
    let partitioned: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid \
             WHERE c.relname = 'request_traces')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(partitioned);
}
