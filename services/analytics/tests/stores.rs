//! What only one of the stores does: Postgres partitions, retention and the latency bucket
//! function; the memory store's bound.

mod common;

use chrono::{Days, NaiveDate};
use common::{T, pg, rows, unique};
use meshgate_analytics::hist::{THRESHOLDS, bucket};
use meshgate_analytics::model::{Scope, TraceRow};
use meshgate_analytics::{
    AnalyticsMetrics, Maintenance, MemoryTraceStore, PARTITIONED_TABLES, PostgresTraceStore, TraceStore, maintain_once,
    partition_name,
};
use meshgate_storage::{PgPool, postgres_client};
use prometheus::IntCounter;

async fn partition_exists(pool: &PgPool, table: &str, day: NaiveDate) -> bool {
    let client = postgres_client(pool).await.unwrap();
    client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&partition_name(table, day)]).await.unwrap().get(0)
}

/// The partition a stored trace landed in.
async fn partition_of(pool: &PgPool, org: &str, request_id: &str) -> String {
    let client = postgres_client(pool).await.unwrap();
    client
        .query_one(
            "SELECT tableoid::regclass::text FROM request_traces WHERE org_id = $1 AND request_id = $2",
            &[&org, &request_id],
        )
        .await
        .unwrap()
        .get(0)
}

/// A trace of `org` starting at noon on `day`.
fn at_day(org: &str, rid: &'static str, day: NaiveDate) -> TraceRow {
    let mut row = rows(org, &[T { rid, ..T::default() }]).remove(0);
    let started = day.and_hms_opt(12, 0, 0).unwrap().and_utc();
    row.trace.started_at = Some(meshgate_analytics::model::to_timestamp(started));
    TraceRow::from_trace(row.trace).unwrap()
}

fn day(s: &str) -> NaiveDate {
    NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
}

#[tokio::test]
async fn partitions_are_created_on_demand_for_past_and_future_days() {
    let pool = pg().await;
    let created = IntCounter::new("created", "test").unwrap();
    let store = PostgresTraceStore::new(pool.clone(), created.clone());
    let org = unique("org");
    let (past, future) = (day("1999-02-03"), day("2099-11-12"));

    let batch = vec![at_day(&org, "past", past), at_day(&org, "future", future)];
    assert_eq!(store.insert(batch).await.unwrap().stored, 2);
    for table in PARTITIONED_TABLES {
        assert!(partition_exists(&pool, table, past).await && partition_exists(&pool, table, future).await);
    }
    assert_eq!(created.get(), 8, "one partition per partitioned table and day");
    assert_eq!(partition_of(&pool, &org, "past").await, partition_name("request_traces", past));
    assert_eq!(partition_of(&pool, &org, "future").await, partition_name("request_traces", future));
    assert_eq!(store.get(&Scope::org(&org), "future").await.unwrap().unwrap().request_id, "future");

    // The model calls and findings went to their own day partitions; rollups were maintained.
    let client = postgres_client(&pool).await.unwrap();
    let calls: i64 = client
        .query_one(&format!("SELECT count(*) FROM {}", partition_name("model_calls", past)), &[])
        .await
        .unwrap()
        .get(0);
    let findings: i64 = client
        .query_one(&format!("SELECT count(*) FROM {}", partition_name("policy_findings", future)), &[])
        .await
        .unwrap()
        .get(0);
    let rollups: i64 =
        client.query_one("SELECT sum(requests)::int8 FROM trace_rollups_daily", &[]).await.unwrap().get(0);
    let stored: (String, i32, serde_json::Value, serde_json::Value) = client
        .query_one(
            "SELECT task, risk_score, routing_reasons, headers FROM request_traces WHERE request_id = 'past'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .unwrap();
    assert_eq!((calls, findings, rollups), (1, 1, 2));
    assert_eq!(
        stored,
        (
            "chat".into(),
            40,
            serde_json::json!(["task=chat", "cheapest healthy target"]),
            serde_json::json!({"user-agent": "test/1"})
        )
    );

    // Known partitions are not created again, by this store or another replica's.
    store.insert(vec![at_day(&org, "again", past)]).await.unwrap();
    let replica = PostgresTraceStore::new(pool.clone(), created.clone());
    replica.insert(vec![at_day(&org, "replica", future)]).await.unwrap();
    assert_eq!(created.get(), 8);
}

#[tokio::test]
async fn maintenance_creates_partitions_ahead_and_retention_drops_old_ones() {
    let pool = pg().await;
    let store = PostgresTraceStore::new(pool.clone(), IntCounter::new("created", "test").unwrap());
    let metrics = AnalyticsMetrics::new(&meshgate_runtime::Metrics::new("analytics-test"));
    let org = unique("org");
    let today = day("2040-06-15");
    let maintenance = Maintenance { ahead_days: 2, retention_days: 10 };
    let old = today - Days::new(11);
    store.insert(vec![at_day(&org, "old", old), at_day(&org, "kept", today - Days::new(10))]).await.unwrap();

    let (created, dropped) = maintain_once(&store, today, maintenance, &metrics).await.unwrap();
    assert_eq!((created, dropped), (5 * 4, 4), "today ± 2 created; the old day's 4 partitions dropped");
    for offset in -2i64..=2 {
        let d = today + chrono::TimeDelta::days(offset);
        for table in PARTITIONED_TABLES {
            assert!(partition_exists(&pool, table, d).await, "{table} {d}");
        }
    }
    for table in PARTITIONED_TABLES {
        assert!(!partition_exists(&pool, table, old).await, "{table} {old} survived retention");
        assert!(partition_exists(&pool, table, today - Days::new(10)).await);
    }
    assert_eq!(store.get(&Scope::org(&org), "old").await.unwrap(), None);
    assert!(store.get(&Scope::org(&org), "kept").await.unwrap().is_some());
    assert_eq!(metrics.partitions.with_label_values(&["request_traces"]).get(), 6);
    assert_eq!(metrics.partitions_dropped.get(), 4);
    // The daily rollup outlives raw retention.
    let client = postgres_client(&pool).await.unwrap();
    let days: i64 = client.query_one("SELECT count(*) FROM trace_rollups_daily", &[]).await.unwrap().get(0);
    assert_eq!(days, 2);

    // A second pass a day later drops one more day and creates one more ahead.
    let (created, dropped) = maintain_once(&store, today + Days::new(1), maintenance, &metrics).await.unwrap();
    assert_eq!((created, dropped), (4, 4));
}

#[tokio::test]
async fn concurrent_replicas_create_partitions_once() {
    let pool = pg().await;
    let far = day("2077-07-07");
    let runs = (0..4).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move {
            PostgresTraceStore::new(pool, IntCounter::new("created", "test").unwrap())
                .ensure_partitions_around(far, 3)
                .await
                .unwrap()
        })
    });
    let created: usize = futures::future::join_all(runs).await.into_iter().map(Result::unwrap).sum();
    assert_eq!(created, 7 * PARTITIONED_TABLES.len());
}

#[tokio::test]
async fn a_partition_dropped_behind_the_stores_back_is_recreated() {
    let pool = pg().await;
    let store = PostgresTraceStore::new(pool.clone(), IntCounter::new("created", "test").unwrap());
    let org = unique("org");
    let d = day("2050-01-01");
    store.insert(vec![at_day(&org, "before", d)]).await.unwrap();
    let client = postgres_client(&pool).await.unwrap();
    client.batch_execute(&format!("DROP TABLE {}", partition_name("request_traces", d))).await.unwrap();

    assert_eq!(store.insert(vec![at_day(&org, "after", d)]).await.unwrap().stored, 1);
    assert_eq!(partition_of(&pool, &org, "after").await, partition_name("request_traces", d));
}

#[tokio::test]
async fn concurrent_batches_with_shared_ids_count_each_trace_once() {
    let pool = pg().await;
    let store = std::sync::Arc::new(PostgresTraceStore::new(pool.clone(), IntCounter::new("c", "t").unwrap()));
    let org = unique("org");
    let names: Vec<&'static str> = (0..200).map(|i| &*format!("r{i}").leak()).collect();
    let all: Vec<T> =
        names.iter().map(|rid| T { rid, cost: 7, user: ["u1", "u2"][rid.len() % 2], ..T::default() }).collect();
    let runs = (0..4).map(|k| {
        let (store, mut batch) = (store.clone(), rows(&org, &all));
        batch.rotate_left(k * 50);
        tokio::spawn(async move { store.insert(batch).await.unwrap().stored })
    });
    let inserted: u64 = futures::future::join_all(runs).await.into_iter().map(Result::unwrap).sum();
    assert_eq!(inserted, 200);
    let client = postgres_client(&pool).await.unwrap();
    let (requests, cost): (i64, i64) = client
        .query_one(
            "SELECT sum(requests)::int8, sum(cost_micros)::int8 FROM trace_rollups_hourly WHERE org_id = $1",
            &[&org],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((requests, cost), (200, 1_400));
}

/// Rows Postgres refuses for what they hold (here a NUL that slipped into a tool name and a
/// finding, which no jsonb or text value can hold) are isolated by splitting the batch: they are
/// refused and named, every other row of the batch — of either tenant — is stored, and the
/// rollups count exactly the stored ones.
#[tokio::test]
async fn rows_postgres_refuses_are_isolated_and_the_rest_is_stored() {
    let store = PostgresTraceStore::new(pg().await, IntCounter::new("created", "test").unwrap());
    let (a, b) = (unique("org"), unique("org"));
    let ids = ["r1", "r2", "r3", "r4", "r5", "r6", "r7"];
    let mut batch: Vec<TraceRow> = ids
        .iter()
        .enumerate()
        .map(|(i, rid)| rows(if i % 2 == 0 { &a } else { &b }, &[T { rid, ..T::default() }]).remove(0))
        .collect();
    batch[2].trace.tool_calls =
        vec![meshgate_proto::analytics::v1::ToolCall { name: "x\0y".into(), kind: "called".into() }];
    batch[5].trace.routing_reasons = vec!["nul\0".into()];
    let inserted = store.insert(batch).await.unwrap();
    assert_eq!(inserted.stored, 5);
    let mut refused: Vec<&str> = inserted.refused.iter().map(|(id, _)| id.as_str()).collect();
    refused.sort_unstable();
    assert_eq!(refused, ["r3", "r6"], "{inserted:?}");
    for (i, rid) in ids.iter().enumerate() {
        let org = if i % 2 == 0 { &a } else { &b };
        let stored = store.get(&Scope::org(org), rid).await.unwrap().is_some();
        assert_eq!(stored, !refused.contains(rid), "{rid}");
    }
    for (org, requests) in [(&a, 3), (&b, 2)] {
        let window = meshgate_analytics::model::TimeWindow::default();
        let query = meshgate_analytics::model::TraceQuery::total(Scope::org(org), window);
        let total = meshgate_analytics::store::query(&store, &query).await.unwrap();
        assert_eq!(total[0].requests, requests, "the rollups count the stored traces");
    }
}

#[tokio::test]
async fn the_sql_latency_bucket_matches_the_services() {
    let pool = pg().await;
    let client = postgres_client(&pool).await.unwrap();
    let mut values: Vec<i64> = vec![0, 1, 99, i64::MAX];
    for t in THRESHOLDS {
        values.extend([t - 1, t, t + 1]);
    }
    let buckets: Vec<i32> = client
        .query_one("SELECT array_agg(analytics_latency_bucket(v) ORDER BY i) FROM unnest($1::int8[]) WITH ORDINALITY AS u(v, i)", &[&values])
        .await
        .unwrap()
        .get(0);
    let expected: Vec<i32> = values.iter().map(|v| bucket(*v) as i32).collect();
    assert_eq!(buckets, expected);
}

#[tokio::test]
async fn the_memory_store_drops_the_oldest_past_its_bound() {
    let evicted = IntCounter::new("evicted", "test").unwrap();
    let store = MemoryTraceStore::new(3, evicted.clone());
    let org = unique("org");
    let ts: Vec<T> = ["a", "b", "c", "d", "e"].into_iter().map(|rid| T { rid, ..T::default() }).collect();
    assert_eq!(store.insert(rows(&org, &ts[..3])).await.unwrap().stored, 3);
    assert_eq!(store.insert(rows(&org, &ts[3..])).await.unwrap().stored, 2);
    assert_eq!(store.len(), 3);
    assert_eq!(evicted.get(), 2);
    for (rid, kept) in [("a", false), ("b", false), ("c", true), ("d", true), ("e", true)] {
        assert_eq!(store.get(&Scope::org(&org), rid).await.unwrap().is_some(), kept, "{rid}");
    }
}
