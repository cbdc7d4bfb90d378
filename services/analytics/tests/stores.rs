//! What only one of the stores does: Postgres partitions, the memory store's bound.

mod common;

use chrono::{Days, NaiveDate, Utc};
use common::{T, pg, rows, unique};
use meshgate_analytics::model::TraceRow;
use meshgate_analytics::{MemoryTraceStore, PostgresTraceStore, TraceStore, partition_name};
use meshgate_storage::{PgPool, postgres_client};
use prometheus::IntCounter;

async fn partition_exists(pool: &PgPool, day: NaiveDate) -> bool {
    let client = postgres_client(pool).await.unwrap();
    client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&partition_name(day)]).await.unwrap().get(0)
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

/// A random day in `base_year ..= base_year + 399` whose partition (and its neighbours') does
/// not exist yet. Each test draws from its own 400 years, so tests never share partitions.
async fn fresh_day(pool: &PgPool, base_year: i32) -> NaiveDate {
    loop {
        let n = uuid::Uuid::new_v4().as_u128();
        let day = NaiveDate::from_ymd_opt(base_year + (n % 400) as i32, 1, 1).unwrap()
            + Days::new((n >> 64) as u64 % 360 + 3);
        let mut free = true;
        for offset in -3i64..=3 {
            free &= !partition_exists(pool, day + chrono::TimeDelta::days(offset)).await;
        }
        if free {
            return day;
        }
    }
}

#[tokio::test]
async fn partitions_are_created_on_demand_for_past_and_future_days() {
    let pool = pg().await;
    let created = IntCounter::new("created", "test").unwrap();
    let store = PostgresTraceStore::new(pool.clone(), created.clone());
    let org = unique("org");
    let past = fresh_day(&pool, 1000).await;
    let future = fresh_day(&pool, 2500).await;

    let batch = vec![at_day(&org, "past", past), at_day(&org, "future", future)];
    assert_eq!(store.insert(batch).await.unwrap(), 2);
    assert!(partition_exists(&pool, past).await && partition_exists(&pool, future).await);
    assert_eq!(created.get(), 2);
    assert_eq!(partition_of(&pool, &org, "past").await, partition_name(past));
    assert_eq!(partition_of(&pool, &org, "future").await, partition_name(future));
    assert_eq!(store.get(&org, "future").await.unwrap().unwrap().request_id, "future");

    // Known partitions are not created again, by this store or another replica's.
    store.insert(vec![at_day(&org, "again", past)]).await.unwrap();
    let replica = PostgresTraceStore::new(pool.clone(), created.clone());
    replica.insert(vec![at_day(&org, "replica", future)]).await.unwrap();
    assert_eq!(created.get(), 2);
}

#[tokio::test]
async fn partitions_ahead_cover_today_plus_minus_n() {
    let pool = pg().await;
    let store = PostgresTraceStore::new(pool.clone(), IntCounter::new("created", "test").unwrap());
    let today = Utc::now().date_naive();
    store.ensure_partitions_around(today, 2).await.unwrap();
    for offset in -2i64..=2 {
        let day = today + chrono::TimeDelta::days(offset);
        assert!(partition_exists(&pool, day).await, "{day}");
    }
    // Concurrent replicas ensuring the same days do not collide.
    let far = fresh_day(&pool, 1500).await;
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
    assert_eq!(created, 7);
}

#[tokio::test]
async fn a_partition_dropped_behind_the_stores_back_is_recreated() {
    let pool = pg().await;
    let store = PostgresTraceStore::new(pool.clone(), IntCounter::new("created", "test").unwrap());
    let org = unique("org");
    let day = fresh_day(&pool, 3000).await;
    store.insert(vec![at_day(&org, "before", day)]).await.unwrap();
    let client = postgres_client(&pool).await.unwrap();
    client.batch_execute(&format!("DROP TABLE {}", partition_name(day))).await.unwrap();
    client.execute("DELETE FROM trace_ids WHERE org_id = $1", &[&org]).await.unwrap();

    assert_eq!(store.insert(vec![at_day(&org, "after", day)]).await.unwrap(), 1);
    assert_eq!(partition_of(&pool, &org, "after").await, partition_name(day));
}

#[tokio::test]
async fn the_memory_store_drops_the_oldest_past_its_bound() {
    let evicted = IntCounter::new("evicted", "test").unwrap();
    let store = MemoryTraceStore::new(3, evicted.clone());
    let org = unique("org");
    let ts: Vec<T> = ["a", "b", "c", "d", "e"].into_iter().map(|rid| T { rid, ..T::default() }).collect();
    assert_eq!(store.insert(rows(&org, &ts[..3])).await.unwrap(), 3);
    assert_eq!(store.insert(rows(&org, &ts[3..])).await.unwrap(), 2);
    assert_eq!(store.len(), 3);
    assert_eq!(evicted.get(), 2);
    for (rid, kept) in [("a", false), ("b", false), ("c", true), ("d", true), ("e", true)] {
        assert_eq!(store.get(&org, rid).await.unwrap().is_some(), kept, "{rid}");
    }
}
