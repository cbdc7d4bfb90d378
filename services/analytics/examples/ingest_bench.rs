//! Ingest throughput through `Analytics.Record` and query latency over the stored traces, against
//! a real Postgres (a fresh schema, dropped at the end unless `--keep`).
//!
//! ```text
//! MESHGATE_TEST_DATABASE_URL=postgres://... cargo run --release -p meshgate-analytics \
//!     --example ingest_bench -- --traces 1000000 --batch 1000 --streams 2
//! ```
//!
//! Traces: one organization, 4 projects, 25 users, 6 models (layers l0–l3), their start times
//! rising evenly over the last 30 days (sender `s` of `--streams` sends every `s`-th batch), each with one or two model calls, tool calls, headers and (one in five) a policy
//! finding. Every query runs `--repeat` times; the median and the slowest are printed.

use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Timelike, Utc};
use meshgate_analytics::model::to_timestamp;
use meshgate_analytics::{Config, serve};
use meshgate_proto::analytics::v1 as pb;
use meshgate_proto::analytics::v1::analytics_client::AnalyticsClient;
use meshgate_proto::common::v1::{ErrorDetail, Principal, Usage};
use meshgate_runtime::{Listeners, Shutdown};
use meshgate_storage::{PostgresConfig, postgres_client, postgres_pool};
use tonic::transport::{Channel, Endpoint};

const ORG: &str = "bench-org";
const MODELS: [(&str, i32, i64); 6] = [
    ("local-small", 1, 0),
    ("local-embed", 1, 0),
    ("cheap-mini", 2, 150),
    ("std-4o", 3, 2_500),
    ("std-sonnet", 3, 3_000),
    ("premium-opus", 4, 15_000),
];

struct Args {
    traces: u64,
    batch: u64,
    streams: u64,
    repeat: usize,
    keep: bool,
}

fn args() -> Args {
    let mut a = Args { traces: 1_000_000, batch: 1_000, streams: 2, repeat: 5, keep: false };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value =
            || it.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or_else(|| panic!("{flag} needs a number"));
        match flag.as_str() {
            "--traces" => a.traces = value(),
            "--batch" => a.batch = value().max(1),
            "--streams" => a.streams = value().max(1),
            "--repeat" => a.repeat = usize::try_from(value()).unwrap_or(5).max(1),
            "--keep" => a.keep = true,
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// splitmix64: deterministic, dependency-free pseudo-random numbers.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Trace `i` of `total`: start times rise with `i` across the last 30 days, as traffic arrives.
fn make_trace(i: u64, total: u64, now: DateTime<Utc>) -> pb::Trace {
    let r = mix(i);
    let (model, layer, price) = MODELS[(r % 6) as usize];
    let project = format!("proj-{}", (r >> 8) % 4);
    let user = format!("user-{}", (r >> 16) % 25);
    let span_ms = 30 * 86_400_000 * (total - i) / total.max(1);
    let started = now - TimeDelta::milliseconds(i64::try_from(span_ms).unwrap_or(0)) - TimeDelta::minutes(1);
    // Log-uniform latency between 1 ms and ~16 s.
    let latency = (1_000.0 * 2f64.powf(((r >> 40) % 14_000) as f64 / 1_000.0)) as i64;
    let prompt = ((r >> 20) % 2_000) as i64 + 10;
    let completion = ((r >> 30) % 800) as i64;
    let cost = (prompt + completion) * price / 1_000;
    let failed = (r >> 50).is_multiple_of(50);
    let usage = Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        cost_micros: cost,
        ..Usage::default()
    };
    let call = |status: &str| pb::ModelCall {
        target_id: format!("prov/{model}"),
        provider: "prov".into(),
        model: model.into(),
        latency_us: latency,
        usage: Some(usage),
        status: status.into(),
        error: None,
    };
    let mut calls = vec![call(if failed { "error" } else { "ok" })];
    if (r >> 52).is_multiple_of(10) {
        calls.insert(0, call("error"));
    }
    pb::Trace {
        request_id: format!("req-{i:012}"),
        trace_id: format!("{:032x}", u128::from(r) << 64 | u128::from(i)),
        principal: Some(Principal {
            org_id: ORG.into(),
            project_id: project,
            user_id: user.clone(),
            key_id: format!("key-{user}"),
            role: 2,
        }),
        started_at: Some(to_timestamp(started)),
        requested_model: model.into(),
        served_model: if failed { String::new() } else { model.into() },
        served_target: format!("prov/{model}"),
        routing_reason: "cheapest healthy target".into(),
        calls,
        usage: Some(usage),
        latency_us: latency,
        status_code: if failed { 502 } else { 200 },
        error: failed.then(|| ErrorDetail {
            code: "upstream_error".into(),
            message: "boom".into(),
            request_id: String::new(),
        }),
        stream: r.is_multiple_of(2),
        layer,
        task: "chat".into(),
        routing_reasons: vec!["task=chat".into(), format!("layer={layer}")],
        findings: if (r >> 56).is_multiple_of(5) {
            vec![pb::PolicyFinding {
                direction: "prompt".into(),
                rule: "pii.email".into(),
                category: "pii".into(),
                severity: "medium".into(),
                action: "redact".into(),
                message: 0,
                start: 1,
                end: 9,
                score: None,
            }]
        } else {
            Vec::new()
        },
        risk_score: (r % 40) as u32,
        tool_calls: vec![pb::ToolCall { name: "search".into(), kind: "offered".into() }],
        headers: [("user-agent".to_owned(), "bench/1".to_owned())].into(),
        dropped_params: Vec::new(),
    }
}

async fn timed<T, F: std::future::Future<Output = T>>(
    repeat: usize,
    mut run: impl FnMut() -> F,
) -> (Duration, Duration, T) {
    let mut times = Vec::with_capacity(repeat);
    let mut last = None;
    for _ in 0..repeat {
        let started = Instant::now();
        last = Some(run().await);
        times.push(started.elapsed());
    }
    times.sort();
    (times[times.len() / 2], times[times.len() - 1], last.expect("repeat >= 1"))
}

#[tokio::main]
async fn main() {
    let args = args();
    let base = std::env::var("MESHGATE_TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .expect("set MESHGATE_TEST_DATABASE_URL or DATABASE_URL");
    let schema = format!("analytics_bench_{}", uuid::Uuid::new_v4().simple());
    let admin = postgres_pool(&base, &PostgresConfig::default()).unwrap();
    postgres_client(&admin).await.unwrap().batch_execute(&format!("CREATE SCHEMA {schema}")).await.unwrap();
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");

    let listeners = Listeners::ephemeral().await.unwrap();
    let endpoint = format!("http://{}", listeners.grpc_addr());
    let shutdown = Shutdown::new();
    let config = Config { database_url: Some(url), partitions_ahead_days: 1, ..Config::default() };
    let server = tokio::spawn(serve(config, listeners, shutdown.clone()));
    let health = meshgate_runtime::channel(&endpoint, Duration::from_secs(1)).unwrap();
    meshgate_runtime::client::wait_serving(&health, "meshgate.analytics.v1.Analytics", Duration::from_secs(30))
        .await
        .unwrap();
    let channel: Channel = Endpoint::from_shared(endpoint).unwrap().connect_lazy();
    let now = Utc::now();

    // Ingest: `streams` concurrent senders, one Record call per batch (as the gateway sends).
    let started = Instant::now();
    let senders = (0..args.streams).map(|s| {
        let mut client = AnalyticsClient::new(channel.clone());
        let (batch, streams, total) = (args.batch, args.streams, args.traces);
        tokio::spawn(async move {
            let mut accepted = 0;
            let mut i = s * batch;
            while i < total {
                let end = (i + batch).min(total);
                let traces = (i..end).map(|n| make_trace(n, total, now)).collect();
                let request = futures::stream::iter([pb::RecordBatch { traces }]);
                accepted += client.record(request).await.unwrap().into_inner().accepted;
                i += batch * streams;
            }
            accepted
        })
    });
    let accepted: i64 = futures::future::join_all(senders).await.into_iter().map(Result::unwrap).sum();
    let elapsed = started.elapsed();
    println!(
        "ingest: {accepted} traces in {:.1} s = {:.0} traces/s (batch {}, {} concurrent streams)",
        elapsed.as_secs_f64(),
        accepted as f64 / elapsed.as_secs_f64(),
        args.batch,
        args.streams
    );
    let pool =
        postgres_pool(&format!("{base}{separator}options=-c%20search_path%3D{schema}"), &PostgresConfig::default())
            .unwrap();
    let client = postgres_client(&pool).await.unwrap();
    client.batch_execute("ANALYZE").await.unwrap();
    let counts = client
        .query_one(
            "SELECT (SELECT count(*) FROM trace_rollups_daily), (SELECT count(*) FROM trace_rollups_hourly), \
                    (SELECT count(*) FROM model_calls), (SELECT count(*) FROM policy_findings)",
            &[],
        )
        .await
        .unwrap();
    println!(
        "rows: daily rollups {}, hourly rollups {}, model calls {}, findings {}",
        counts.get::<_, i64>(0),
        counts.get::<_, i64>(1),
        counts.get::<_, i64>(2),
        counts.get::<_, i64>(3)
    );

    // Queries.
    let api = AnalyticsClient::new(channel.clone());
    let range = |from: DateTime<Utc>, to: DateTime<Utc>| {
        Some(pb::TimeRange { from: Some(to_timestamp(from)), to: Some(to_timestamp(to)) })
    };
    let unaligned = range(now - TimeDelta::days(7) + TimeDelta::minutes(17), now);
    let last_day = range(
        (now - TimeDelta::hours(24)).with_minute(0).unwrap().with_second(0).unwrap().with_nanosecond(0).unwrap(),
        now,
    );
    let repeat = args.repeat;
    let query = |group_by: &str, range: Option<pb::TimeRange>, project_ids: Vec<String>| pb::QueryRequest {
        org_id: ORG.into(),
        group_by: group_by.into(),
        range,
        all_projects: project_ids.is_empty(),
        project_ids,
        ..Default::default()
    };
    let mut cases: Vec<(String, pb::QueryRequest)> = Vec::new();
    for group_by in ["", "day", "week", "month", "model", "layer", "user", "project"] {
        cases.push((format!("Query group_by={:?}", group_by), query(group_by, None, vec![])));
    }
    cases.push(("Query total, last 7 days from :17 past (raw slivers)".into(), query("", unaligned, vec![])));
    cases.push(("Query by model, last 24 h (hourly + raw)".into(), query("model", last_day, vec![])));
    cases.push((
        "Query by user, 2-project scope, filter model".into(),
        pb::QueryRequest { model: "std-4o".into(), ..query("user", None, vec!["proj-1".into(), "proj-2".into()]) },
    ));
    for (name, request) in cases {
        let (median, max, rows) = timed(repeat, || {
            let mut api = api.clone();
            let request = request.clone();
            async move { api.query(request).await.unwrap().into_inner().rows }
        })
        .await;
        println!(
            "{name:<52} median {median:>9.2?} max {max:>9.2?} ({} rows, {} requests)",
            rows.len(),
            rows.iter().map(|r| r.requests).sum::<i64>()
        );
    }
    let (median, max, n) = timed(repeat, || {
        let mut api = api.clone();
        async move {
            api.error_rates(pb::ErrorRatesRequest { org_id: ORG.into(), all_projects: true, ..Default::default() })
                .await
                .unwrap()
                .into_inner()
                .models
                .len()
        }
    })
    .await;
    println!("{:<52} median {median:>9.2?} max {max:>9.2?} ({n} models)", "ErrorRates");
    let (median, max, n) = timed(repeat, || {
        let mut api = api.clone();
        async move {
            api.latency(pb::LatencyRequest { org_id: ORG.into(), all_projects: true, ..Default::default() })
                .await
                .unwrap()
                .into_inner()
                .models
        }
    })
    .await;
    println!(
        "{:<52} median {median:>9.2?} max {max:>9.2?} ({} models; {} p50/p95/p99 {}/{}/{} us)",
        "Latency",
        n.len(),
        n[0].model,
        n[0].p50_latency_us,
        n[0].p95_latency_us,
        n[0].p99_latency_us
    );
    let (median, max, n) = timed(repeat, || {
        let mut api = api.clone();
        async move {
            let all =
                pb::TopExpensiveRequest { org_id: ORG.into(), limit: 10, all_projects: true, ..Default::default() };
            api.top_expensive(all).await.unwrap().into_inner().traces.len()
        }
    })
    .await;
    println!("{:<52} median {median:>9.2?} max {max:>9.2?} ({n} traces)", "TopExpensive (raw rows, all 30 days)");
    let (median, max, n) = timed(repeat, || {
        let mut api = api.clone();
        async move {
            api.top_expensive(pb::TopExpensiveRequest {
                org_id: ORG.into(),
                limit: 10,
                range: last_day,
                project_ids: vec!["proj-3".into()],
                all_projects: false,
            })
            .await
            .unwrap()
            .into_inner()
            .traces
            .len()
        }
    })
    .await;
    println!("{:<52} median {median:>9.2?} max {max:>9.2?} ({n} traces)", "TopExpensive (last 24 h, one project)");
    let (median, max, _) = timed(repeat, || {
        let mut api = api.clone();
        async move {
            api.get_trace(pb::GetTraceRequest {
                request_id: format!("req-{:012}", args.traces / 2),
                org_id: ORG.into(),
                project_ids: vec![],
                all_projects: true,
            })
            .await
            .unwrap()
        }
    })
    .await;
    println!("{:<52} median {median:>9.2?} max {max:>9.2?}", "GetTrace");

    shutdown.trigger();
    server.await.unwrap().unwrap();
    drop(client);
    if args.keep {
        println!("kept schema {schema}");
    } else {
        postgres_client(&admin).await.unwrap().batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
    }
}
