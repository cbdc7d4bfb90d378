//! What an admission costs from a held lease (the gateway's `LeasePool`) against a `Reserve`
//! round trip, with the quota service on real Redis (and the Postgres ledger when a database is
//! given) over gRPC on loopback, every kind of limit set on every principal.
//!
//! ```text
//! cargo run --release -p meshgate-quota --example lease_bench -- \
//!     --redis redis://127.0.0.1:6379/0 [--database postgres://...] [--seconds 5] [--concurrency 32] \
//!     [--principals 10]
//! ```
//! For each way, one worker in a closed loop (the latency of one admission, and of admission plus
//! settlement), then `--concurrency` workers spread over `--principals` principals (throughput).
//! A leased admission that had to wait on a call (its slice ran out) is in the figures too.

use std::time::{Duration, Instant};

use meshgate_proto::common::v1::{Principal, Usage};
use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_proto::quota::v1::{CommitRequest, ReserveRequest};
use meshgate_quota::Config;
use meshgate_quota_lease::{Estimate, LeasePool, LeaseSettings};
use meshgate_runtime::{Listeners, MeshChannel, Shutdown};

struct Args {
    redis: String,
    database: Option<String>,
    seconds: u64,
    concurrency: usize,
    principals: u64,
}

fn parse_args() -> Args {
    let mut args = Args { redis: String::new(), database: None, seconds: 5, concurrency: 32, principals: 10 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--redis" => args.redis = value,
            "--database" => args.database = Some(value),
            "--seconds" => args.seconds = value.parse().expect("--seconds is a number"),
            "--concurrency" => args.concurrency = value.parse().expect("--concurrency is a number"),
            "--principals" => args.principals = value.parse().expect("--principals is a number"),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(!args.redis.is_empty(), "--redis is required");
    args
}

fn principal(i: u64) -> Principal {
    Principal {
        org_id: "bench-org".into(),
        project_id: format!("bench-project-{}", i % 3),
        user_id: format!("bench-user-{i}"),
        key_id: format!("bench-key-{i}"),
        role: 0,
    }
}

const ESTIMATE: Estimate = Estimate { tokens: 300, cost_micros: 50 };

fn usage() -> Usage {
    Usage { prompt_tokens: 20, completion_tokens: 80, total_tokens: 100, cost_micros: 20, ..Default::default() }
}

/// One admission and its settlement by the way under test; the admission's latency.
#[derive(Clone)]
enum Way {
    Reserve(Box<QuotaClient<MeshChannel>>),
    Lease(LeasePool),
}

impl Way {
    async fn once(&self, principal: &Principal, n: u64) -> Duration {
        let request_id = format!("bench-{n}-{}", uuid::Uuid::new_v4().simple());
        match self {
            Way::Reserve(client) => {
                let start = Instant::now();
                let reserve = ReserveRequest {
                    request_id,
                    principal: Some(principal.clone()),
                    estimated_tokens: ESTIMATE.tokens,
                    estimated_cost_micros: ESTIMATE.cost_micros,
                    ttl_seconds: 0,
                };
                let reserved = client.clone().reserve(reserve).await.expect("reserve").into_inner();
                let admitted = start.elapsed();
                assert!(reserved.admitted, "the benchmark's limits never refuse: {reserved:?}");
                let commit = CommitRequest {
                    reservation_id: reserved.reservation_id,
                    usage: Some(usage()),
                    principal: Some(principal.clone()),
                };
                client.clone().commit(commit).await.expect("commit");
                admitted
            }
            Way::Lease(pool) => {
                let start = Instant::now();
                let admission = pool.admit(&request_id, principal, ESTIMATE).await.expect("admitted");
                let admitted = start.elapsed();
                admission.settle(Some(&usage())).await;
                admitted
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn report(name: &str, mut admissions: Vec<Duration>, pairs: usize, elapsed: Duration) {
    admissions.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{name}: {pairs} admissions+settlements in {:.2} s = {:.0}/s; admission p50 {:.1} µs, p90 {:.1} µs, \
         p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs",
        elapsed.as_secs_f64(),
        pairs as f64 / elapsed.as_secs_f64(),
        us(percentile(&admissions, 0.50)),
        us(percentile(&admissions, 0.90)),
        us(percentile(&admissions, 0.99)),
        us(percentile(&admissions, 0.999)),
        us(*admissions.last().expect("at least one admission")),
    );
}

/// `workers` closed loops for `seconds`, worker w on principal w mod `principals`.
async fn run(way: &Way, workers: usize, principals: u64, seconds: u64) -> (Vec<Duration>, usize, Duration) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let way = way.clone();
            let principal = principal(w as u64 % principals);
            tokio::spawn(async move {
                let mut admissions = Vec::new();
                let mut n = w as u64 * 10_000_000;
                while Instant::now() < deadline {
                    admissions.push(way.once(&principal, n).await);
                    n += 1;
                    // A leased admission and its settlement never wait: without a yield the
                    // workers would starve the quota service sharing their runtime, which a
                    // gateway's requests (all I/O) never do.
                    tokio::task::yield_now().await;
                }
                admissions
            })
        })
        .collect();
    let mut admissions = Vec::new();
    for task in tasks {
        admissions.extend(task.await.expect("worker"));
    }
    let pairs = admissions.len();
    (admissions, pairs, started.elapsed())
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let huge = meshgate_quota::model::Limits {
        tokens_per_day: 1_000_000_000_000,
        cost_micros_per_day: 1_000_000_000_000,
        requests_per_minute: 1_000_000_000,
        tokens_per_minute: 1_000_000_000,
        time_zone: None,
    };
    let config = Config {
        redis_url: Some(args.redis.clone()),
        database_url: args.database.clone(),
        key_prefix: format!("meshgate:bench:{}:", uuid::Uuid::new_v4().simple()),
        defaults: meshgate_quota::DefaultLimits { user: huge, key: huge, ..Default::default() },
        ..Config::default()
    };
    let listeners = Listeners::ephemeral().await.expect("listeners");
    let url = format!("http://{}", listeners.grpc_addr());
    let shutdown = Shutdown::new();
    let server = tokio::spawn(meshgate_quota::serve(config, listeners, shutdown.clone()));
    let channel = meshgate_runtime::channel(&url, Duration::from_secs(5)).expect("valid url");
    meshgate_runtime::client::wait_serving(&channel, "", Duration::from_secs(30)).await.expect("quota serving");
    let client = QuotaClient::new(channel);
    let pool = LeasePool::new(client.clone(), LeaseSettings::default()).expect("valid settings");

    let ways = [("reserve+commit", Way::Reserve(Box::new(client))), ("lease pool", Way::Lease(pool.clone()))];
    for (name, way) in &ways {
        // Warm up: connections, scripts loaded, counters seeded, slices sized.
        run(way, args.concurrency, args.principals, 1).await;
        let (admissions, pairs, elapsed) = run(way, 1, 1, args.seconds).await;
        report(&format!("{name}, one worker"), admissions, pairs, elapsed);
        let (admissions, pairs, elapsed) = run(way, args.concurrency, args.principals, args.seconds).await;
        report(
            &format!("{name}, {} workers on {} principals", args.concurrency, args.principals),
            admissions,
            pairs,
            elapsed,
        );
    }
    let stats = pool.stats();
    println!(
        "lease pool: {} admitted from a lease, {} reserved one by one, {} lease calls ({} failed)",
        stats.leased, stats.reserved, stats.lease_calls, stats.failed_calls
    );
    pool.close().await;
    shutdown.trigger();
    server.await.expect("server task").expect("server stops cleanly");
}
