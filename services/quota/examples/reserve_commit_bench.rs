//! Reserve + Commit latency and throughput of the quota service against real Redis (and the
//! Postgres ledger when a database is given), over real gRPC on loopback.
//!
//! ```text
//! cargo run --release -p meshgate-quota --example reserve_commit_bench -- \
//!     --redis redis://127.0.0.1:6379/0 [--database postgres://...] [--rate 2000] [--seconds 10] [--concurrency 32] \
//!     [--tls-dir DIR]
//! ```
//! `--tls-dir` (certificates from `meshgate certs --out DIR`) serves quota over mTLS and calls it
//! as the gateway, to compare with plaintext.
//! Open loop at `--rate` pairs per second (latency measured from each pair's scheduled start, so a
//! stall is not hidden by the pacing; the pacer thread oversleeps by some tens of microseconds,
//! which count against the figures), then closed loop with `--concurrency` workers for the
//! throughput. Each pair reserves for one of 1,000 principals and commits.

use std::time::{Duration, Instant};

use meshgate_proto::common::v1::{Principal, Usage};
use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_proto::quota::v1::{CommitRequest, ReserveRequest};
use meshgate_quota::Config;
use meshgate_runtime::{Listeners, MeshChannel, Shutdown};

struct Args {
    redis: String,
    database: Option<String>,
    rate: u64,
    seconds: u64,
    concurrency: usize,
    tls_dir: Option<std::path::PathBuf>,
}

fn parse_args() -> Args {
    let mut args =
        Args { redis: String::new(), database: None, rate: 2_000, seconds: 10, concurrency: 32, tls_dir: None };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--redis" => args.redis = value,
            "--database" => args.database = Some(value),
            "--rate" => args.rate = value.parse().expect("--rate is a number"),
            "--seconds" => args.seconds = value.parse().expect("--seconds is a number"),
            "--concurrency" => args.concurrency = value.parse().expect("--concurrency is a number"),
            "--tls-dir" => args.tls_dir = Some(value.into()),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(!args.redis.is_empty(), "--redis is required");
    args
}

fn principal(i: u64) -> Principal {
    Principal {
        org_id: format!("bench-org-{}", i % 10),
        project_id: format!("bench-project-{}", i % 100),
        user_id: format!("bench-user-{i}"),
        key_id: format!("bench-key-{i}"),
        role: 0,
    }
}

/// One Reserve + Commit pair.
async fn pair(client: &mut QuotaClient<MeshChannel>, n: u64) {
    let principal = principal(n % 1_000);
    let reserve = ReserveRequest {
        request_id: format!("bench-{n}-{}", uuid::Uuid::new_v4().simple()),
        principal: Some(principal.clone()),
        estimated_tokens: 300,
        estimated_cost_micros: 50,
        ttl_seconds: 0,
    };
    let reserved = client.reserve(reserve).await.expect("reserve").into_inner();
    assert!(reserved.admitted, "the benchmark's limits never refuse: {reserved:?}");
    let usage =
        Usage { prompt_tokens: 20, completion_tokens: 80, total_tokens: 100, cost_micros: 20, ..Default::default() };
    let commit =
        CommitRequest { reservation_id: reserved.reservation_id, usage: Some(usage), principal: Some(principal) };
    client.commit(commit).await.expect("commit");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn report(name: &str, mut latencies: Vec<Duration>, elapsed: Duration) {
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name}: {} pairs in {:.2} s = {:.0} pairs/s; reserve+commit p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.90)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().expect("at least one pair")),
    );
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let config = Config {
        redis_url: Some(args.redis.clone()),
        database_url: args.database.clone(),
        key_prefix: format!("meshgate:bench:{}:", uuid::Uuid::new_v4().simple()),
        defaults: meshgate_quota::DefaultLimits {
            user: meshgate_quota::model::Limits {
                tokens_per_day: 1_000_000_000_000,
                cost_micros_per_day: 1_000_000_000_000,
                requests_per_minute: 1_000_000_000,
                tokens_per_minute: 1_000_000_000,
                time_zone: None,
            },
            ..Default::default()
        },
        ..Config::default()
    };
    let mesh = args.tls_dir.clone().map(|tls_dir| {
        let config = meshgate_runtime::mesh::Config { tls_dir: Some(tls_dir), ..Default::default() };
        meshgate_runtime::mesh::Mesh::new(&config).expect("usable certificates")
    });
    let mut listeners = Listeners::ephemeral().await.expect("listeners");
    if let Some(mesh) = &mesh {
        listeners = listeners.with_identity(mesh.identity("quota").expect("the quota certificate"));
    }
    let url = format!("http://{}", listeners.grpc_addr());
    let shutdown = Shutdown::new();
    let server = tokio::spawn(meshgate_quota::serve(config, listeners, shutdown.clone()));
    let channel = match &mesh {
        Some(mesh) => mesh.identity("gateway").expect("the gateway certificate").channel(&url, Duration::from_secs(5)),
        None => meshgate_runtime::channel(&url, Duration::from_secs(5)),
    }
    .expect("valid url");
    meshgate_runtime::client::wait_serving(&channel, "", Duration::from_secs(30)).await.expect("quota serving");
    let client = QuotaClient::new(channel);

    // Warm up: connections, scripts loaded, counters seeded.
    for n in 0..2_000 {
        pair(&mut client.clone(), n).await;
    }

    // A pacer thread releases each pair at its scheduled instant: tokio's timer has a 1 ms
    // granularity, which would add up to a millisecond to every measured latency.
    let total = args.rate * args.seconds;
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let runtime = tokio::runtime::Handle::current();
    let started = Instant::now();
    let pacer = {
        let client = client.clone();
        std::thread::spawn(move || {
            (0..total)
                .map(|i| {
                    let scheduled = started + interval * u32::try_from(i).expect("fits");
                    if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let mut client = client.clone();
                    runtime.spawn(async move {
                        pair(&mut client, 10_000 + i).await;
                        scheduled.elapsed()
                    })
                })
                .collect::<Vec<_>>()
        })
    };
    let tasks = tokio::task::spawn_blocking(move || pacer.join().expect("pacer")).await.expect("pacer joins");
    let mut latencies = Vec::with_capacity(tasks.len());
    for task in tasks {
        latencies.push(task.await.expect("pair task"));
    }
    report(&format!("open loop at {} pairs/s", args.rate), latencies, started.elapsed());

    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|w| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = 1_000_000 + w as u64 * 1_000_000;
                while Instant::now() < deadline {
                    let start = Instant::now();
                    pair(&mut client, n).await;
                    latencies.push(start.elapsed());
                    n += 1;
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.expect("worker"));
    }
    report(&format!("closed loop, {} workers", args.concurrency), latencies, started.elapsed());

    shutdown.trigger();
    server.await.expect("server task").expect("server stops cleanly");
}
