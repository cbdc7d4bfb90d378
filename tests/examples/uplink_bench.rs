//! Edge → cloud catch-up throughput: a cloud mesh (Postgres, Redis) and an edge mesh whose cloud
//! is unreachable; TRACES traces are staged at the edge through `Sync.Uplink` in batches of
//! BATCH (as the gateway hands them over), then the cloud becomes reachable and the time until
//! the outbox is empty and the cloud's analytics holds every trace is measured.
//!
//! `scripts/test.sh cargo run --release -p meshgate-tests --example uplink_bench -- [TRACES] [BATCH]`

use std::time::{Duration, Instant, SystemTime};

use meshgate_proto::analytics::v1::Trace;
use meshgate_proto::common::v1::{Principal, Usage};
use meshgate_proto::sync::v1::UplinkRequest;
use meshgate_proto::sync::v1::sync_client::SyncClient;
use meshgate_tests::{ADMIN_KEY, MeshOptions, TestMesh};

async fn metric(http: &reqwest::Client, admin: &str, prefix: &str) -> f64 {
    let text = http.get(format!("{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

async fn recorded(cloud: &TestMesh) -> i64 {
    let report = cloud.get_json("/v1/analytics", ADMIN_KEY).await;
    report["data"].as_array().map_or(0, |rows| rows.iter().map(|r| r["requests"].as_i64().unwrap_or(0)).sum())
}

fn trace(i: usize) -> Trace {
    Trace {
        request_id: format!("bench-{i:08}"),
        trace_id: format!("{i:032x}"),
        principal: Some(Principal { org_id: "default".into(), project_id: "default".into(), ..Principal::default() }),
        started_at: Some(prost_types::Timestamp::from(SystemTime::now())),
        requested_model: "mock-gpt".into(),
        served_model: "mock-gpt".into(),
        served_target: "alpha/mock-gpt".into(),
        usage: Some(Usage {
            prompt_tokens: 12,
            completion_tokens: 20,
            total_tokens: 32,
            cost_micros: 9,
            ..Usage::default()
        }),
        latency_us: 1_500,
        status_code: 200,
        ..Trace::default()
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>().expect("a number"));
    let traces = args.next().unwrap_or(20_000);
    let batch = args.next().unwrap_or(1_024);

    let cloud = TestMesh::start().await;
    // The cloud's own admin key uploads: its project is the cloud's default one.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let outbox = tempfile::tempdir().unwrap();
    let outbox_path = outbox.path().to_path_buf();
    let edge = TestMesh::start_with(MeshOptions {
        stores: false,
        tune: Box::new(move |config| {
            config.sync.cloud.url = Some(format!("http://{nowhere}"));
            config.sync.cloud.key = Some(ADMIN_KEY.into());
            config.sync.cloud.outbox = Some(outbox_path);
            config.sync.cloud.backoff_cap_ms = 200;
        }),
    })
    .await;

    let mut sync = SyncClient::new(edge.channel("sync"));
    let started = Instant::now();
    for chunk in (0..traces).collect::<Vec<_>>().chunks(batch) {
        sync.uplink(UplinkRequest { traces: chunk.iter().map(|&i| trace(i)).collect() }).await.unwrap();
    }
    let staging = started.elapsed();
    edge.stop().await;

    // The same outbox, now pointing at the cloud.
    let cloud_url = cloud.edge.clone();
    let outbox_path = outbox.path().to_path_buf();
    let started = Instant::now();
    let edge = TestMesh::start_with(MeshOptions {
        stores: false,
        tune: Box::new(move |config| {
            config.sync.cloud.url = Some(cloud_url);
            config.sync.cloud.key = Some(ADMIN_KEY.into());
            config.sync.cloud.outbox = Some(outbox_path);
        }),
    })
    .await;
    let admin = edge.admin_url("sync");
    loop {
        let pending = metric(&edge.http, &admin, "meshgate_sync_cloud_outbox_batches").await;
        if pending == 0.0 && recorded(&cloud).await >= traces as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let upload = started.elapsed();
    let status = cloud.get_json("/v1/quota/status", ADMIN_KEY).await;
    let project = status["scopes"].as_array().unwrap().iter().find(|s| s["scope"]["kind"] == "project").unwrap();
    assert_eq!(project["used"]["requests"].as_i64(), Some(traces as i64), "charged once each: {project}");
    println!(
        "{traces} traces in batches of {batch}: staged in {:.2} s ({:.0} traces/s, fsync'd), uploaded and applied \
         in {:.2} s ({:.0} traces/s, edge restart included)",
        staging.as_secs_f64(),
        traces as f64 / staging.as_secs_f64(),
        upload.as_secs_f64(),
        traces as f64 / upload.as_secs_f64()
    );
    edge.stop().await;
    cloud.stop().await;
}
