//! Behaviour both trace stores must show, against real Postgres and the in-memory store.

mod common;

use common::{Backend, T, at, rows, trace, unique};
use meshgate_analytics::model::{GroupBy, TimeWindow, TraceQuery};
use meshgate_proto::analytics::v1 as pb;
use meshgate_proto::common::v1::Layer;

async fn traces_round_trip_and_stay_in_their_org(backend: Backend) {
    let store = backend.store().await;
    let (org, other) = (unique("org"), unique("org"));
    let t = T { rid: "round-trip", latency: 1234, cost: 99, error: "upstream_error", status: 502, ..T::default() };
    assert_eq!(store.insert(rows(&org, std::slice::from_ref(&t))).await.unwrap(), 1);

    let got = store.get(&org, "round-trip").await.unwrap().unwrap();
    assert_eq!(got, trace(&org, &t), "the stored trace must come back field for field");
    assert_eq!(store.get(&other, "round-trip").await.unwrap(), None, "another org must not see it");
    assert_eq!(store.get(&org, "no-such-request").await.unwrap(), None);
}

async fn duplicate_request_ids_are_ignored(backend: Backend) {
    let store = backend.store().await;
    let (org, other) = (unique("org"), unique("org"));
    let first = T { rid: "dup", cost: 10, ..T::default() };
    // A retried copy with another start time (another partition) and other numbers.
    let retry = T { rid: "dup", at: "2031-03-12T08:00:00Z", cost: 999, ..T::default() };

    let in_batch =
        rows(&org, &[first.clone(), T { rid: "dup", cost: 5, ..T::default() }, T { rid: "solo", ..T::default() }]);
    assert_eq!(store.insert(in_batch).await.unwrap(), 2);
    assert_eq!(store.insert(rows(&org, std::slice::from_ref(&retry))).await.unwrap(), 0);
    // The same request id in another organization is another request.
    assert_eq!(store.insert(rows(&other, std::slice::from_ref(&retry))).await.unwrap(), 1);

    assert_eq!(store.get(&org, "dup").await.unwrap().unwrap(), trace(&org, &first));
    let query = TraceQuery {
        org_id: org.clone(),
        project_id: None,
        user_id: None,
        model: None,
        window: TimeWindow::default(),
        group_by: GroupBy::Total,
    };
    let total = &store.query(&query).await.unwrap()[0];
    assert_eq!((total.requests, total.cost_micros), (2, 10));
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

fn row(key: &str, counts: [i64; 5], percentiles: [i64; 3]) -> pb::AggregateRow {
    pb::AggregateRow {
        key: key.into(),
        requests: counts[0],
        errors: counts[1],
        prompt_tokens: counts[2],
        completion_tokens: counts[3],
        cost_micros: counts[4],
        p50_latency_us: percentiles[0],
        p95_latency_us: percentiles[1],
        p99_latency_us: percentiles[2],
    }
}

async fn aggregates_are_exact_for_a_known_set(backend: Backend) {
    let store = backend.store().await;
    let (org, noise) = (unique("org"), unique("org"));
    assert_eq!(store.insert(rows(&org, &known_set())).await.unwrap(), 6);
    store.insert(rows(&noise, &[T { rid: "t1", cost: 1_000_000, ..T::default() }])).await.unwrap();

    let q = |group_by: GroupBy| TraceQuery {
        org_id: org.clone(),
        project_id: None,
        user_id: None,
        model: None,
        window: TimeWindow::default(),
        group_by,
    };
    let total = row("", [6, 2, 143, 258, 5_150], [250, 850, 970]);
    assert_eq!(store.query(&q(GroupBy::Total)).await.unwrap(), vec![total.clone()]);
    assert_eq!(
        store.query(&q(GroupBy::Month)).await.unwrap(),
        vec![pb::AggregateRow { key: "2031-03".into(), ..total }]
    );
    assert_eq!(
        store.query(&q(GroupBy::Model)).await.unwrap(),
        vec![
            row("gpt-a", [3, 1, 16, 25, 150], [200, 380, 396]),
            row("gpt-c", [1, 0, 100, 200, 5_000], [1_000, 1_000, 1_000]),
            row("local-b", [2, 1, 27, 33, 0], [180, 288, 298]),
        ]
    );
    assert_eq!(
        store.query(&q(GroupBy::Day)).await.unwrap(),
        vec![
            row("2031-03-10", [3, 1, 22, 28, 150], [200, 290, 298]),
            row("2031-03-11", [2, 1, 21, 30, 0], [230, 383, 397]),
            row("2031-03-18", [1, 0, 100, 200, 5_000], [1_000, 1_000, 1_000]),
        ]
    );
    assert_eq!(
        store.query(&q(GroupBy::Week)).await.unwrap(),
        vec![
            row("2031-03-10", [5, 2, 43, 58, 150], [200, 380, 396]),
            row("2031-03-17", [1, 0, 100, 200, 5_000], [1_000, 1_000, 1_000]),
        ]
    );
    let keys_and_requests = |rows: Vec<pb::AggregateRow>| -> Vec<(String, i64, i64)> {
        rows.into_iter().map(|r| (r.key, r.requests, r.cost_micros)).collect()
    };
    let s = |k: &str, n: i64, c: i64| (k.to_owned(), n, c);
    assert_eq!(
        keys_and_requests(store.query(&q(GroupBy::Project)).await.unwrap()),
        vec![s("p1", 4, 5_150), s("p2", 2, 0)]
    );
    assert_eq!(
        keys_and_requests(store.query(&q(GroupBy::User)).await.unwrap()),
        vec![s("u1", 4, 5_100), s("u2", 2, 50)]
    );
    assert_eq!(
        keys_and_requests(store.query(&q(GroupBy::Layer)).await.unwrap()),
        vec![s("l0", 2, 0), s("l2", 3, 150), s("l3", 1, 5_000)]
    );

    let filtered = TraceQuery { project_id: Some("p1".into()), model: Some("gpt-a".into()), ..q(GroupBy::Total) };
    assert_eq!(store.query(&filtered).await.unwrap(), vec![row("", [2, 0, 15, 25, 150], [150, 195, 199])]);
    let by_user = TraceQuery { user_id: Some("u2".into()), ..q(GroupBy::Total) };
    assert_eq!(store.query(&by_user).await.unwrap()[0].requests, 2);
    let window = TimeWindow { from: Some(at("2031-03-11T00:00:00Z")), to: Some(at("2031-03-18T10:00:00Z")) };
    let ranged = TraceQuery { window, ..q(GroupBy::Total) };
    assert_eq!(store.query(&ranged).await.unwrap(), vec![row("", [2, 1, 21, 30, 0], [230, 383, 397])]);

    let empty = TraceQuery { org_id: unique("org"), ..q(GroupBy::Total) };
    assert_eq!(store.query(&empty).await.unwrap(), vec![row("", [0; 5], [0; 3])]);
    assert!(store.query(&TraceQuery { group_by: GroupBy::Model, ..empty }).await.unwrap().is_empty());
}

async fn top_expensive_and_error_rates(backend: Backend) {
    let store = backend.store().await;
    let org = unique("org");
    store.insert(rows(&org, &known_set())).await.unwrap();
    store.insert(rows(&unique("org"), &[T { rid: "x", cost: 9_999_999, ..T::default() }])).await.unwrap();

    let ids = |traces: Vec<pb::Trace>| traces.into_iter().map(|t| t.request_id).collect::<Vec<_>>();
    let all = TimeWindow::default();
    assert_eq!(ids(store.top_expensive(&org, &all, 2).await.unwrap()), ["t6", "t1"]);
    assert_eq!(ids(store.top_expensive(&org, &all, 100).await.unwrap()), ["t6", "t1", "t2", "t5", "t4", "t3"]);
    let early = TimeWindow { from: None, to: Some(at("2031-03-11T00:00:00Z")) };
    assert_eq!(ids(store.top_expensive(&org, &early, 10).await.unwrap()), ["t1", "t2", "t3"]);
    let top = store.top_expensive(&org, &all, 1).await.unwrap();
    assert_eq!(top[0], trace(&org, &known_set()[5]));

    let rates = store.error_rates(&org, &all).await.unwrap();
    let summary: Vec<(String, i64, i64, f64)> =
        rates.into_iter().map(|r| (r.model, r.requests, r.errors, r.rate)).collect();
    assert_eq!(
        summary,
        vec![("gpt-a".to_owned(), 3, 1, 1.0 / 3.0), ("gpt-c".to_owned(), 1, 0, 0.0), ("local-b".to_owned(), 2, 1, 0.5),]
    );
    let late = TimeWindow { from: Some(at("2031-03-11T00:00:00Z")), to: None };
    let rates = store.error_rates(&org, &late).await.unwrap();
    assert_eq!(
        rates.iter().map(|r| (r.model.as_str(), r.requests)).collect::<Vec<_>>(),
        [("gpt-a", 1), ("gpt-c", 1), ("local-b", 1)]
    );
}

backend_tests!(
    traces_round_trip_and_stay_in_their_org,
    duplicate_request_ids_are_ignored,
    aggregates_are_exact_for_a_known_set,
    top_expensive_and_error_rates,
);
