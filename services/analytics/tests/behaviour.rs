//! Behaviour both trace stores must show, against real Postgres and the in-memory store.

mod common;

use common::{Backend, T, at, rows, trace, unique};
use meshgate_analytics::hist::bucket;
use meshgate_analytics::model::{Filters, GroupBy, Scope, TimeWindow, TraceQuery};
use meshgate_analytics::store::query;
use meshgate_proto::analytics::v1 as pb;
use meshgate_proto::common::v1::Layer;

async fn traces_round_trip_and_stay_in_their_org(backend: Backend) {
    let store = backend.store().await;
    let (org, other) = (unique("org"), unique("org"));
    let t = T { rid: "round-trip", latency: 1234, cost: 99, error: "upstream_error", status: 502, ..T::default() };
    assert_eq!(store.insert(rows(&org, std::slice::from_ref(&t))).await.unwrap().stored, 1);

    let got = store.get(&Scope::org(&org), "round-trip").await.unwrap().unwrap();
    assert_eq!(got, trace(&org, &t), "the stored trace must come back field for field");
    assert_eq!(store.get(&Scope::org(&other), "round-trip").await.unwrap(), None, "another org must not see it");
    assert_eq!(store.get(&Scope::org(&org), "no-such-request").await.unwrap(), None);
    let in_project = Scope { org_id: org.clone(), project_ids: vec!["p9".into(), "p1".into()] };
    assert!(store.get(&in_project, "round-trip").await.unwrap().is_some());
    let other_project = Scope { org_id: org.clone(), project_ids: vec!["p2".into()] };
    assert_eq!(store.get(&other_project, "round-trip").await.unwrap(), None, "another project must not see it");
}

async fn duplicate_request_ids_are_ignored(backend: Backend) {
    let store = backend.store().await;
    let (org, other) = (unique("org"), unique("org"));
    let first = T { rid: "dup", cost: 10, ..T::default() };

    let in_batch =
        rows(&org, &[first.clone(), T { rid: "dup", cost: 5, ..T::default() }, T { rid: "solo", ..T::default() }]);
    assert_eq!(store.insert(in_batch).await.unwrap().stored, 2);
    // The gateway re-sends a batch whose reply it lost: the same traces again.
    assert_eq!(store.insert(rows(&org, &[first.clone(), T { rid: "solo", ..T::default() }])).await.unwrap().stored, 0);
    // The same request id in another organization is another request.
    assert_eq!(store.insert(rows(&other, std::slice::from_ref(&first))).await.unwrap().stored, 1);

    assert_eq!(store.get(&Scope::org(&org), "dup").await.unwrap().unwrap(), trace(&org, &first));
    let total = &query(store.as_ref(), &TraceQuery::total(Scope::org(&org), TimeWindow::default())).await.unwrap()[0];
    assert_eq!((total.requests, total.cost_micros, total.prompt_tokens), (2, 10, 2), "counted exactly once");
    let hourly = TimeWindow { from: Some(at("2031-03-10T10:00:00Z")), to: Some(at("2031-03-10T11:00:00Z")) };
    let total = &query(store.as_ref(), &TraceQuery::total(Scope::org(&org), hourly)).await.unwrap()[0];
    assert_eq!((total.requests, total.cost_micros), (2, 10), "hourly rollups count it once too");
}

/// Six requests of one org over two weeks, plus noise in another org.
fn known_set() -> Vec<T> {
    vec![
        T {
            rid: "t1",
            at: "2031-03-10T10:00:00Z",
            project: "p1",
            user: "u1",
            served: "gpt-a",
            layer: Layer::L2Standard,
            prompt: 10,
            completion: 20,
            cost: 100,
            latency: 100,
            ..T::default()
        },
        T {
            rid: "t2",
            at: "2031-03-10T11:00:00Z",
            project: "p1",
            user: "u2",
            served: "gpt-a",
            layer: Layer::L2Standard,
            prompt: 5,
            completion: 5,
            cost: 50,
            latency: 200,
            ..T::default()
        },
        T {
            rid: "t3",
            at: "2031-03-10T12:00:00Z",
            project: "p2",
            user: "u1",
            served: "local-b",
            layer: Layer::L0Local,
            prompt: 7,
            completion: 3,
            cost: 0,
            latency: 300,
            status: 200,
            error: "upstream_error",
            ..T::default()
        },
        T {
            rid: "t4",
            at: "2031-03-11T09:00:00Z",
            project: "p2",
            user: "u2",
            served: "",
            requested: "gpt-a",
            layer: Layer::L2Standard,
            prompt: 1,
            completion: 0,
            cost: 0,
            latency: 400,
            status: 429,
            ..T::default()
        },
        T {
            rid: "t5",
            at: "2031-03-11T10:00:00Z",
            project: "p1",
            user: "u1",
            served: "local-b",
            layer: Layer::L0Local,
            prompt: 20,
            completion: 30,
            cost: 0,
            latency: 60,
            ..T::default()
        },
        T {
            rid: "t6",
            at: "2031-03-18T10:00:00Z",
            project: "p1",
            user: "u1",
            served: "gpt-c",
            layer: Layer::L3Premium,
            prompt: 100,
            completion: 200,
            cost: 5_000,
            latency: 1_000,
            ..T::default()
        },
    ]
}

/// Exact nearest-rank percentile.
fn exact(latencies: &[i64], p: f64) -> i64 {
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Checks a row's key and sums exactly and its percentiles against the exact ones of
/// `latencies`: within the histogram bucket of the exact value.
fn check(row: &pb::AggregateRow, key: &str, counts: [i64; 5], latencies: &[i64]) {
    assert_eq!(
        (row.key.as_str(), [row.requests, row.errors, row.prompt_tokens, row.completion_tokens, row.cost_micros]),
        (key, counts),
        "{row:?}"
    );
    if latencies.is_empty() {
        assert_eq!([row.p50_latency_us, row.p95_latency_us, row.p99_latency_us, row.avg_latency_us], [0; 4]);
        return;
    }
    for (p, got) in [(0.5, row.p50_latency_us), (0.95, row.p95_latency_us), (0.99, row.p99_latency_us)] {
        let want = exact(latencies, p);
        assert_eq!(bucket(got), bucket(want), "{key} p{p}: {got} vs exact {want}");
    }
    assert_eq!(row.avg_latency_us, latencies.iter().sum::<i64>() / latencies.len() as i64);
}

async fn aggregates_are_exact_for_a_known_set(backend: Backend) {
    let store = backend.store().await;
    let (org, noise) = (unique("org"), unique("org"));
    assert_eq!(store.insert(rows(&org, &known_set())).await.unwrap().stored, 6);
    store.insert(rows(&noise, &[T { rid: "t1", cost: 1_000_000, ..T::default() }])).await.unwrap();
    let store = store.as_ref();

    let q = |group_by: GroupBy| TraceQuery { group_by, ..TraceQuery::total(Scope::org(&org), TimeWindow::default()) };
    let total = query(store, &q(GroupBy::Total)).await.unwrap();
    assert_eq!(total.len(), 1);
    check(&total[0], "", [6, 2, 143, 258, 5_150], &[100, 200, 300, 400, 60, 1_000]);
    let month = query(store, &q(GroupBy::Month)).await.unwrap();
    assert_eq!(month.len(), 1);
    check(&month[0], "2031-03", [6, 2, 143, 258, 5_150], &[100, 200, 300, 400, 60, 1_000]);
    let models = query(store, &q(GroupBy::Model)).await.unwrap();
    assert_eq!(models.len(), 3);
    check(&models[0], "gpt-a", [3, 1, 16, 25, 150], &[100, 200, 400]);
    check(&models[1], "gpt-c", [1, 0, 100, 200, 5_000], &[1_000]);
    check(&models[2], "local-b", [2, 1, 27, 33, 0], &[300, 60]);
    assert_eq!(models[1].p99_latency_us, 1_000, "a single value is exact (clamped to min and max)");
    let days = query(store, &q(GroupBy::Day)).await.unwrap();
    assert_eq!(days.len(), 3);
    check(&days[0], "2031-03-10", [3, 1, 22, 28, 150], &[100, 200, 300]);
    check(&days[1], "2031-03-11", [2, 1, 21, 30, 0], &[400, 60]);
    check(&days[2], "2031-03-18", [1, 0, 100, 200, 5_000], &[1_000]);
    let weeks = query(store, &q(GroupBy::Week)).await.unwrap();
    assert_eq!(weeks.len(), 2);
    check(&weeks[0], "2031-03-10", [5, 2, 43, 58, 150], &[100, 200, 300, 400, 60]);
    check(&weeks[1], "2031-03-17", [1, 0, 100, 200, 5_000], &[1_000]);
    let keys_and_requests = |rows: Vec<pb::AggregateRow>| -> Vec<(String, i64, i64)> {
        rows.into_iter().map(|r| (r.key, r.requests, r.cost_micros)).collect()
    };
    let s = |k: &str, n: i64, c: i64| (k.to_owned(), n, c);
    assert_eq!(
        keys_and_requests(query(store, &q(GroupBy::Project)).await.unwrap()),
        vec![s("p1", 4, 5_150), s("p2", 2, 0)]
    );
    assert_eq!(
        keys_and_requests(query(store, &q(GroupBy::User)).await.unwrap()),
        vec![s("u1", 4, 5_100), s("u2", 2, 50)]
    );
    assert_eq!(
        keys_and_requests(query(store, &q(GroupBy::Layer)).await.unwrap()),
        vec![s("l0", 2, 0), s("l2", 3, 150), s("l3", 1, 5_000)]
    );

    let filters = |project: Option<&str>, user: Option<&str>, model: Option<&str>, layer: Option<&str>| Filters {
        project_id: project.map(Into::into),
        user_id: user.map(Into::into),
        model: model.map(Into::into),
        layer: layer.map(Into::into),
    };
    let filtered = TraceQuery { filters: filters(Some("p1"), None, Some("gpt-a"), None), ..q(GroupBy::Total) };
    check(&query(store, &filtered).await.unwrap()[0], "", [2, 0, 15, 25, 150], &[100, 200]);
    let by_user = TraceQuery { filters: filters(None, Some("u2"), None, None), ..q(GroupBy::Total) };
    check(&query(store, &by_user).await.unwrap()[0], "", [2, 1, 6, 5, 50], &[200, 400]);
    let by_layer = TraceQuery { filters: filters(None, None, None, Some("l0")), ..q(GroupBy::Model) };
    let local = query(store, &by_layer).await.unwrap();
    assert_eq!(local.len(), 1);
    check(&local[0], "local-b", [2, 1, 27, 33, 0], &[300, 60]);

    // Whole days (daily rollup), whole hours (hourly rollup) and minutes (raw rows) of a range.
    let window = TimeWindow { from: Some(at("2031-03-11T00:00:00Z")), to: Some(at("2031-03-18T10:00:00Z")) };
    check(
        &query(store, &TraceQuery { window, ..q(GroupBy::Total) }).await.unwrap()[0],
        "",
        [2, 1, 21, 30, 0],
        &[400, 60],
    );
    let window = TimeWindow { from: Some(at("2031-03-10T10:30:00Z")), to: Some(at("2031-03-18T10:00:00.000001Z")) };
    check(
        &query(store, &TraceQuery { window, ..q(GroupBy::Total) }).await.unwrap()[0],
        "",
        [5, 2, 133, 238, 5_050],
        &[200, 300, 400, 60, 1_000],
    );
    let window = TimeWindow { from: Some(at("2031-03-10T10:59:59Z")), to: Some(at("2031-03-10T11:00:01Z")) };
    check(&query(store, &TraceQuery { window, ..q(GroupBy::Total) }).await.unwrap()[0], "", [1, 0, 5, 5, 50], &[200]);

    // Tenancy: only the caller's projects; another organization sees nothing.
    let p2 = Scope { org_id: org.clone(), project_ids: vec!["p2".into()] };
    let scoped = query(store, &TraceQuery { scope: p2.clone(), ..q(GroupBy::Project) }).await.unwrap();
    assert_eq!(scoped.len(), 1);
    check(&scoped[0], "p2", [2, 2, 8, 3, 0], &[300, 400]);
    let outside = TraceQuery { scope: p2, filters: filters(Some("p1"), None, None, None), ..q(GroupBy::Total) };
    check(&query(store, &outside).await.unwrap()[0], "", [0; 5], &[]);
    let empty = TraceQuery::total(Scope::org(&unique("org")), TimeWindow::default());
    check(&query(store, &empty).await.unwrap()[0], "", [0; 5], &[]);
    assert!(query(store, &TraceQuery { group_by: GroupBy::Model, ..empty }).await.unwrap().is_empty());
}

async fn top_expensive_and_error_rates(backend: Backend) {
    let store = backend.store().await;
    let org = unique("org");
    store.insert(rows(&org, &known_set())).await.unwrap();
    store.insert(rows(&unique("org"), &[T { rid: "x", cost: 9_999_999, ..T::default() }])).await.unwrap();

    let ids = |traces: Vec<pb::Trace>| traces.into_iter().map(|t| t.request_id).collect::<Vec<_>>();
    let all = TimeWindow::default();
    let scope = Scope::org(&org);
    assert_eq!(ids(store.top_expensive(&scope, &all, 2).await.unwrap()), ["t6", "t1"]);
    assert_eq!(ids(store.top_expensive(&scope, &all, 100).await.unwrap()), ["t6", "t1", "t2", "t5", "t4", "t3"]);
    let early = TimeWindow { from: None, to: Some(at("2031-03-11T00:00:00Z")) };
    assert_eq!(ids(store.top_expensive(&scope, &early, 10).await.unwrap()), ["t1", "t2", "t3"]);
    let top = store.top_expensive(&scope, &all, 1).await.unwrap();
    assert_eq!(top[0], trace(&org, &known_set()[5]));
    let p2 = Scope { org_id: org.clone(), project_ids: vec!["p2".into()] };
    assert_eq!(ids(store.top_expensive(&p2, &all, 10).await.unwrap()), ["t4", "t3"]);

    let error_rates = |scope: Scope, window: TimeWindow| {
        let store = store.clone();
        async move {
            let q = TraceQuery { group_by: GroupBy::Model, ..TraceQuery::total(scope, window) };
            store.aggregate(&q).await.unwrap().into_iter().map(|(m, a)| (m, a.requests, a.errors)).collect::<Vec<_>>()
        }
    };
    let rates: Vec<(String, i64, i64)> = error_rates(scope.clone(), all).await;
    assert_eq!(rates, vec![("gpt-a".to_owned(), 3, 1), ("gpt-c".to_owned(), 1, 0), ("local-b".to_owned(), 2, 1)]);
    let late = TimeWindow { from: Some(at("2031-03-11T00:00:00Z")), to: None };
    let rates = error_rates(scope, late).await;
    assert_eq!(rates, vec![("gpt-a".to_owned(), 1, 1), ("gpt-c".to_owned(), 1, 0), ("local-b".to_owned(), 1, 0)]);
}

/// Cached, cache-write and reasoning tokens are summed like the rest, whichever source (daily or
/// hourly rollup, raw rows) a range reads.
async fn usage_details_are_summed_from_every_source(backend: Backend) {
    let store = backend.store().await;
    let org = unique("org");
    let detailed = |rid, at, cached, cache_write, reasoning| T {
        rid,
        at,
        prompt: 100,
        completion: 50,
        cached,
        cache_write,
        reasoning,
        ..T::default()
    };
    let set = [
        detailed("d1", "2031-03-10T10:00:00Z", 60, 0, 0),
        detailed("d2", "2031-03-10T10:30:00Z", 0, 40, 20),
        detailed("d3", "2031-03-11T09:15:00Z", 30, 10, 45),
        T { rid: "plain", at: "2031-03-11T09:20:00Z", ..T::default() },
    ];
    assert_eq!(store.insert(rows(&org, &set)).await.unwrap().stored, 4);
    let sums = |window: TimeWindow| {
        let store = store.clone();
        let org = org.clone();
        async move {
            let row = query(store.as_ref(), &TraceQuery::total(Scope::org(&org), window)).await.unwrap().remove(0);
            (row.requests, row.cached_prompt_tokens, row.cache_write_tokens, row.reasoning_tokens)
        }
    };
    assert_eq!(sums(TimeWindow::default()).await, (4, 90, 50, 65), "whole days");
    let hours = TimeWindow { from: Some(at("2031-03-10T10:00:00Z")), to: Some(at("2031-03-11T10:00:00Z")) };
    assert_eq!(sums(hours).await, (4, 90, 50, 65), "whole hours");
    let minutes = TimeWindow { from: Some(at("2031-03-10T10:10:00Z")), to: Some(at("2031-03-11T09:16:00Z")) };
    assert_eq!(sums(minutes).await, (2, 30, 50, 65), "slivers of hours from raw rows");
    let by_day = query(
        store.as_ref(),
        &TraceQuery { group_by: GroupBy::Day, ..TraceQuery::total(Scope::org(&org), TimeWindow::default()) },
    )
    .await
    .unwrap();
    let details: Vec<(String, i64, i64, i64)> =
        by_day.into_iter().map(|r| (r.key, r.cached_prompt_tokens, r.cache_write_tokens, r.reasoning_tokens)).collect();
    assert_eq!(details, [("2031-03-10".to_owned(), 60, 40, 20), ("2031-03-11".to_owned(), 30, 10, 45)]);
    let got = store.get(&Scope::org(&org), "d3").await.unwrap().unwrap();
    assert_eq!(got.usage.unwrap().reasoning_tokens, 45, "the trace keeps them too");
}

/// Memory and Postgres (rollups) answer every grouping identically, percentiles included.
#[tokio::test]
async fn memory_and_postgres_answer_alike() {
    let (memory, postgres) = (Backend::Memory.store().await, Backend::Postgres.store().await);
    let org = unique("org");
    let mut many = known_set();
    let names: Vec<&'static str> = (0..300).map(|i| &*format!("bulk{i}").leak()).collect();
    for (i, rid) in names.iter().enumerate() {
        let i = i as i64;
        many.push(T {
            rid,
            at: ["2031-03-10T10:00:00Z", "2031-03-12T23:59:59Z", "2031-03-13T00:30:00Z"][(i % 3) as usize],
            user: ["u1", "u2", "u3"][(i % 3) as usize],
            served: ["gpt-a", "local-b"][(i % 2) as usize],
            latency: (i * i * 7_919) % 2_000_000 + 1,
            cost: i * 3,
            prompt: 20,
            completion: 10,
            cached: i % 5,
            cache_write: i % 3,
            reasoning: i % 4,
            status: if i % 7 == 0 { 500 } else { 200 },
            ..T::default()
        });
    }
    for store in [&memory, &postgres] {
        for chunk in many.chunks(100) {
            store.insert(rows(&org, chunk)).await.unwrap();
        }
    }
    let windows = [
        TimeWindow::default(),
        TimeWindow { from: Some(at("2031-03-10T10:00:00Z")), to: Some(at("2031-03-13T00:00:00Z")) },
        TimeWindow { from: Some(at("2031-03-12T23:10:00Z")), to: Some(at("2031-03-13T00:45:00Z")) },
    ];
    for group_by in ["", "day", "week", "month", "model", "layer", "user", "project"] {
        for window in windows {
            let q = TraceQuery {
                window,
                group_by: GroupBy::parse(group_by).unwrap(),
                ..TraceQuery::total(Scope::org(&org), window)
            };
            assert_eq!(
                query(memory.as_ref(), &q).await.unwrap(),
                query(postgres.as_ref(), &q).await.unwrap(),
                "{group_by} {window:?}"
            );
        }
    }
}

backend_tests!(
    traces_round_trip_and_stay_in_their_org,
    duplicate_request_ids_are_ignored,
    aggregates_are_exact_for_a_known_set,
    top_expensive_and_error_rates,
    usage_details_are_summed_from_every_source,
);
