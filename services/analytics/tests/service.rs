//! The analytics service over real gRPC, with Postgres and standalone.

mod common;

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use common::{T, isolated_database_url, trace, unique};
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
    Ok(summary(client, batches).await?.accepted)
}

async fn summary(
    client: &mut AnalyticsClient<Channel>,
    batches: Vec<pb::RecordBatch>,
) -> Result<pb::RecordSummary, tonic::Status> {
    Ok(client.record(tokio_stream::iter(batches)).await?.into_inner())
}

async fn round_trip(running: &Running) {
    let mut client = running.client();
    let (org, other) = (unique("org"), unique("org"));

    let a = recent(&org, "a", 5, 300);
    // A re-sent copy (same request id and start); its other numbers must not count.
    let mut a_again = a.clone();
    a_again.usage.as_mut().unwrap().cost_micros = 999;
    let accepted = record(
        &mut client,
        vec![batch(vec![a, recent(&org, "b", 4, 100)]), batch(vec![a_again, recent(&org, "c", 2, 200)]), batch(vec![])],
    )
    .await
    .unwrap();
    assert_eq!(accepted, 3, "the duplicate of a is ignored");

    let got = client
        .get_trace(pb::GetTraceRequest {
            request_id: "a".into(),
            org_id: org.clone(),
            project_ids: vec!["p1".into()],
            all_projects: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.usage.unwrap().cost_micros, 300, "the first copy wins");
    for (org_id, project_ids) in [(other.clone(), vec![]), (org.clone(), vec!["p2".to_owned()])] {
        let all_projects = project_ids.is_empty();
        let lookup = pb::GetTraceRequest { request_id: "a".into(), org_id, project_ids, all_projects };
        let err = client.get_trace(lookup).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "outside the caller's tenancy");
        assert_eq!(err.metadata().get(ERROR_CODE_METADATA).unwrap(), "not_found");
    }
    let err = client
        .get_trace(pb::GetTraceRequest {
            request_id: "a".into(),
            org_id: String::new(),
            project_ids: vec![],
            all_projects: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let rows = client
        .query(pb::QueryRequest {
            org_id: org.clone(),
            group_by: "model".into(),
            all_projects: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].key.as_str(), rows[0].requests, rows[0].cost_micros), ("m", 3, 600));
    let err = client
        .query(pb::QueryRequest {
            org_id: org.clone(),
            group_by: "hour".into(),
            all_projects: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let scoped = client
        .query(pb::QueryRequest { org_id: org.clone(), project_ids: vec!["p2".into()], ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(scoped[0].requests, 0, "p1's traces are outside a p2 scope");
    for bad in [
        pb::QueryRequest { org_id: org.clone(), layer: "l9".into(), all_projects: true, ..Default::default() },
        pb::QueryRequest { org_id: org.clone(), project_ids: vec![String::new()], ..Default::default() },
        pb::QueryRequest { org_id: String::new(), all_projects: true, ..Default::default() },
    ] {
        assert_eq!(client.query(bad).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    }
    let latency = client
        .latency(pb::LatencyRequest { org_id: org.clone(), all_projects: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(latency.len(), 1);
    assert_eq!(
        (latency[0].model.as_str(), latency[0].requests, latency[0].p50_latency_us, latency[0].p99_latency_us),
        ("m", 3, 100, 100)
    );
    let err = client
        .latency(pb::LatencyRequest {
            org_id: org.clone(),
            layer: "premium".into(),
            all_projects: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let now = to_timestamp(Utc::now());
    let backwards = pb::TimeRange { from: Some(now), to: Some(to_timestamp(Utc::now() - TimeDelta::hours(1))) };
    let err = client
        .query(pb::QueryRequest {
            org_id: org.clone(),
            range: Some(backwards),
            all_projects: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let top = client
        .top_expensive(pb::TopExpensiveRequest {
            org_id: org.clone(),
            limit: 0,
            all_projects: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(top.traces.iter().map(|t| t.request_id.as_str()).collect::<Vec<_>>(), ["a", "c", "b"]);
    let top = client
        .top_expensive(pb::TopExpensiveRequest {
            org_id: org.clone(),
            project_ids: vec!["p2".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(top.traces.is_empty());
    let err = client
        .top_expensive(pb::TopExpensiveRequest {
            org_id: org.clone(),
            limit: -1,
            all_projects: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let rates = client
        .error_rates(pb::ErrorRatesRequest { org_id: org.clone(), all_projects: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rates.models.len(), 1);
    assert_eq!((rates.models[0].requests, rates.models[0].errors), (3, 0));

    // An invalid trace is refused alone, counted and explained: the rest of its batch is stored.
    let old = recent(&org, "old", 100 * 24 * 60, 0);
    let future = recent(&org, "future", -3 * 24 * 60, 0);
    let mut orphan = recent(&org, "orphan", 1, 0);
    orphan.principal = None;
    let mut risky = recent(&org, "risky", 1, 0);
    risky.risk_score = 101;
    let mut negative_call = recent(&org, "negative", 1, 0);
    negative_call.calls[0].latency_us = -5;
    let fine = ["fine-1", "fine-2", "fine-3", "fine-4", "fine-5"];
    for (bad, fine) in [old, future, orphan, risky, negative_call].into_iter().zip(fine) {
        let id = bad.request_id.clone();
        let answer = summary(&mut client, vec![batch(vec![recent(&org, fine, 1, 0), bad])]).await.unwrap();
        assert_eq!((answer.accepted, answer.rejected), (1, 1), "{id}");
        assert!(!answer.first_rejection.is_empty(), "{id}");
    }
    // A batch over the size limit is still refused whole.
    let too_many: Vec<pb::Trace> = (0..6).map(|_| recent(&org, "x", 1, 0)).collect();
    let err = record(&mut client, vec![batch(too_many)]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let whole_org = |request_id: &str| pb::GetTraceRequest {
        request_id: request_id.into(),
        org_id: org.clone(),
        project_ids: vec![],
        all_projects: true,
    };
    for id in fine {
        client.get_trace(whole_org(id)).await.unwrap();
    }
    for id in ["old", "future", "risky", "negative", "x"] {
        assert_eq!(client.get_trace(whole_org(id)).await.unwrap_err().code(), tonic::Code::NotFound, "{id}");
    }

    let metrics = running.metrics().await;
    assert!(metrics.contains("meshgate_analytics_traces_rejected_total{service=\"analytics\"} 11"), "{metrics}");
    assert!(metrics.contains("meshgate_analytics_traces_duplicate_total"), "{metrics}");
    assert!(metrics.contains("meshgate_analytics_insert_duration_seconds_count"), "{metrics}");
    assert!(metrics.contains("meshgate_analytics_batch_traces_count"), "{metrics}");
}

/// No read takes an empty list of projects for "every project": the whole organization is asked
/// for explicitly, or the read is refused.
async fn no_read_scopes_to_every_project_by_default(running: &Running) {
    let mut client = running.client();
    let org = unique("org");
    record(&mut client, vec![batch(vec![recent(&org, "secret", 1, 500)])]).await.unwrap();
    fn invalid<T>(result: Result<tonic::Response<T>, tonic::Status>) {
        assert_eq!(result.map(drop).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
    let o = || org.clone();
    invalid(client.query(pb::QueryRequest { org_id: o(), ..Default::default() }).await);
    invalid(client.top_expensive(pb::TopExpensiveRequest { org_id: o(), ..Default::default() }).await);
    invalid(client.error_rates(pb::ErrorRatesRequest { org_id: o(), ..Default::default() }).await);
    invalid(client.latency(pb::LatencyRequest { org_id: o(), ..Default::default() }).await);
    let lookup = pb::GetTraceRequest { request_id: "secret".into(), org_id: o(), ..Default::default() };
    invalid(client.get_trace(lookup).await);
    // Projects and "all of them" at once is refused too; an empty org with either is refused.
    let both =
        pb::QueryRequest { org_id: o(), project_ids: vec!["p1".into()], all_projects: true, ..Default::default() };
    invalid(client.query(both).await);
    invalid(client.query(pb::QueryRequest { all_projects: true, ..Default::default() }).await);
    invalid(client.query(pb::QueryRequest { project_ids: vec!["p1".into()], ..Default::default() }).await);
    let all = client.query(pb::QueryRequest { org_id: o(), all_projects: true, ..Default::default() }).await;
    assert_eq!(all.unwrap().into_inner().rows[0].cost_micros, 500);
}

/// A trace whose tool name (or header, or routing reason) holds a NUL, among good traces of two
/// tenants: every trace is stored, the NUL stripped from the one that carried it.
async fn a_nul_in_one_trace_loses_no_trace(running: &Running) {
    let mut client = running.client();
    let (tenant_a, tenant_b) = (unique("org"), unique("org"));
    let mut poisoned = recent(&tenant_a, "poisoned", 1, 7);
    poisoned.tool_calls = vec![pb::ToolCall { name: "get_\0weather".into(), kind: "offered".into() }];
    poisoned.headers.insert("x-note".into(), "a\0b".into());
    poisoned.routing_reasons.push("because\0".into());
    poisoned.calls[0].model = "m\0".into();
    let traces = vec![
        recent(&tenant_a, "a-1", 2, 1),
        recent(&tenant_b, "b-1", 2, 2),
        poisoned,
        recent(&tenant_b, "b-2", 1, 3),
        recent(&tenant_a, "a-2", 1, 4),
    ];
    let answer = summary(&mut client, vec![batch(traces)]).await.unwrap();
    assert_eq!((answer.accepted, answer.rejected), (5, 0), "{answer:?}");
    for (org, ids) in [(&tenant_a, &["a-1", "a-2", "poisoned"][..]), (&tenant_b, &["b-1", "b-2"][..])] {
        for id in ids {
            let lookup = pb::GetTraceRequest {
                request_id: (*id).into(),
                org_id: org.clone(),
                project_ids: vec![],
                all_projects: true,
            };
            let trace = client.get_trace(lookup).await.unwrap().into_inner();
            if *id == "poisoned" {
                assert_eq!(trace.tool_calls[0].name, "get_weather");
                assert_eq!(trace.headers["x-note"], "ab");
                assert_eq!(trace.calls[0].model, "m");
            }
        }
    }
}

#[tokio::test]
async fn reads_need_a_scope_and_a_nul_loses_no_trace_on_postgres() {
    let running = start(Config { database_url: Some(isolated_database_url().await), ..config() }).await;
    no_read_scopes_to_every_project_by_default(&running).await;
    a_nul_in_one_trace_loses_no_trace(&running).await;
    running.stop().await;
}

#[tokio::test]
async fn reads_need_a_scope_and_a_nul_loses_no_trace_in_memory() {
    let running = start(config()).await;
    no_read_scopes_to_every_project_by_default(&running).await;
    a_nul_in_one_trace_loses_no_trace(&running).await;
    running.stop().await;
}

fn config() -> Config {
    Config { max_batch_traces: 5, ..Config::default() }
}

#[tokio::test]
async fn serves_over_grpc_with_postgres_and_keeps_partitions_ahead() {
    let url = isolated_database_url().await;
    let running = start(Config { database_url: Some(url.clone()), ..config() }).await;
    round_trip(&running).await;

    let pool = postgres_pool(&url, &Default::default()).unwrap();
    let ahead = partition_name("request_traces", Utc::now().date_naive() + TimeDelta::days(3));
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
    // The partition gauges are set once the maintenance pass that made the partitions ends.
    let families = [
        "meshgate_db_pool_connections{state=\"in_use\"",
        "meshgate_db_pool_connections{state=\"idle\"",
        "meshgate_analytics_partitions{table=\"model_calls\"",
    ];
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = running.metrics().await;
        if families.iter().all(|family| metrics.contains(family)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for family in families {
        assert!(metrics.contains(family), "{family} missing from {metrics}");
    }
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

/// Traces stored under migration 0001 are counted into the rollups by 0002, and the new
/// columns get defaults.
#[tokio::test]
async fn migration_0002_backfills_rollups_from_existing_traces() {
    let url = isolated_database_url().await;
    let pool = postgres_pool(&url, &Default::default()).unwrap();
    migrate(&pool, "analytics", &migrations()[..1]).await.unwrap();
    let client = postgres_client(&pool).await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE request_traces_p20310310 PARTITION OF request_traces \
                 FOR VALUES FROM ('2031-03-10 00:00:00+00') TO ('2031-03-11 00:00:00+00');
             INSERT INTO request_traces (started_at, org_id, request_id, project_id, served_model, layer,
                 prompt_tokens, completion_tokens, cost_micros, latency_us, status_code, trace)
             VALUES ('2031-03-10 10:00+00', 'o', 'a', 'p', 'm', 'l2', 3, 4, 50, 150, 200, ''),
                    ('2031-03-10 10:30+00', 'o', 'b', 'p', 'm', 'l2', 1, 1, 7, 100000, 502, ''),
                    ('2031-03-10 12:00+00', 'o', 'c', 'p', 'm', 'l2', 1, 1, 1, 99, 200, '');",
        )
        .await
        .unwrap();
    drop(client);
    migrate(&pool, "analytics", migrations()).await.unwrap();
    let client = postgres_client(&pool).await.unwrap();
    let daily = client
        .query_one(
            "SELECT requests, errors, prompt_tokens, completion_tokens, cost_micros, latency_sum_us, latency_min_us, \
                    latency_max_us, latency_hist FROM trace_rollups_daily",
            &[],
        )
        .await
        .unwrap();
    let sums: Vec<i64> = (0..8).map(|i| daily.get(i)).collect();
    assert_eq!(sums, [3, 1, 5, 6, 58, 100_249, 99, 100_000]);
    let hist: Vec<i64> = daily.get(8);
    let mut want = vec![0i64; meshgate_analytics::hist::BUCKETS];
    for latency in [150, 100_000, 99] {
        want[meshgate_analytics::hist::bucket(latency)] += 1;
    }
    assert_eq!(hist, want);
    let hours: Vec<i64> = client
        .query("SELECT requests FROM trace_rollups_hourly ORDER BY bucket_start", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(hours, [2, 1]);
    let task: String = client.query_one("SELECT task FROM request_traces LIMIT 1", &[]).await.unwrap().get(0);
    assert_eq!(task, "");
}

#[tokio::test]
async fn analytics_migrations_apply_concurrently_and_repeatedly() {
    let url = isolated_database_url().await;
    let runs = (0..4).map(|_| {
        let url = url.clone();
        tokio::spawn(async move {
            let pool = postgres_pool(&url, &Default::default()).unwrap();
            migrate(&pool, "analytics", migrations()).await.unwrap()
        })
    });
    for report in futures::future::join_all(runs).await {
        let report = report.unwrap();
        assert_eq!(report.applied.len() + report.already_applied.len(), migrations().len());
    }
    let pool = postgres_pool(&url, &Default::default()).unwrap();
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
