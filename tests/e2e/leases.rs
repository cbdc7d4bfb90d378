//! Quota leases across the mesh (mTLS, Redis, Postgres): two gateway replicas' lease pools, on two
//! quota replicas, spending one budget to the last token with the usage ledger agreeing; a
//! per-minute limit under leases; and who may lease.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshgate_proto::common::v1::{Principal, Role, Usage};
use meshgate_proto::quota::v1 as pb;
use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_quota_lease::{AdmitError, Estimate, LeasePool, LeaseSettings};
use meshgate_runtime::Shutdown;
use meshgate_tests::{ADMIN_KEY, MeshOptions, TestMesh};
use parking_lot::Mutex;
use serde_json::{Value, json};

/// The admin key's principal, as the gateway builds it.
fn admin_principal() -> Principal {
    Principal {
        org_id: "default".into(),
        project_id: "default".into(),
        user_id: "admin".into(),
        key_id: "admin".into(),
        role: Role::Owner as i32,
    }
}

async fn put_limits(mesh: &TestMesh, body: Value) {
    let response = mesh
        .http
        .put(format!("{}/v1/quota/limits", mesh.edge))
        .bearer_auth(ADMIN_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
}

async fn key_status(mesh: &TestMesh) -> Value {
    let status = mesh.get_json("/v1/quota/status", ADMIN_KEY).await;
    status["scopes"].as_array().unwrap().iter().find(|s| s["scope"]["kind"] == "key").unwrap().clone()
}

/// Admits and settles requests of `tokens` estimated and `used(n)` charged until one is refused
/// by `limit`; returns the tokens charged and the requests admitted.
async fn spend_until_refused(
    pool: LeasePool,
    tokens: i64,
    used: impl Fn(i64) -> i64,
    limit: &'static str,
) -> (i64, i64) {
    let principal = admin_principal();
    let (mut charged, mut admitted) = (0, 0);
    loop {
        let id = format!("lease-{}", uuid::Uuid::new_v4().simple());
        match pool.admit(&id, &principal, Estimate { tokens, cost_micros: 0 }).await {
            Ok(admission) => {
                let spent = used(admitted);
                let usage = Usage { prompt_tokens: spent, total_tokens: spent, ..Default::default() };
                admission.settle(Some(&usage)).await;
                charged += spent;
                admitted += 1;
            }
            Err(AdmitError::Refused(refused)) => {
                assert_eq!(refused.rejected_limit, limit, "{refused:?}");
                return (charged, admitted);
            }
            Err(err) => panic!("admission failed: {err}"),
        }
    }
}

/// Workers on each pool at once, each spending until refused; the tokens and requests charged.
async fn concurrent_spend(pools: &[LeasePool], workers: usize, tokens: i64, limit: &'static str) -> (i64, i64) {
    let tasks: Vec<_> = (0..workers)
        .map(|i| {
            let pool = pools[i % pools.len()].clone();
            tokio::spawn(spend_until_refused(pool, tokens, move |n| tokens - (n + i as i64) % 5, limit))
        })
        .collect();
    futures::future::join_all(tasks).await.into_iter().map(Result::unwrap).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_leasing_spend_one_budget_to_the_last_token_and_the_ledger_agrees() {
    let captured = Arc::new(Mutex::new(None));
    let config = captured.clone();
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(move |mesh_config| {
            mesh_config.quota.ledger_flush_interval_ms = 100;
            *config.lock() = Some(mesh_config.quota.clone());
        }),
        ..MeshOptions::default()
    })
    .await;
    let quota_config = captured.lock().take().unwrap();
    let database_url = quota_config.database_url.clone().unwrap();
    // A second quota replica on the same Redis key space and database.
    let shutdown = Shutdown::new();
    let listeners = mesh.listeners("quota").await;
    let second_quota = format!("http://{}", listeners.grpc_addr());
    let replica = tokio::spawn(meshgate_quota::serve(quota_config, listeners, shutdown.clone()));
    let second = mesh.identity("gateway").channel(&second_quota, Duration::from_secs(1)).unwrap();
    meshgate_runtime::client::wait_serving(&second, "meshgate.quota.v1.Quota", Duration::from_secs(10)).await.unwrap();

    // No per-minute limit on the user (the default 100 would refuse the load), 20,000 tokens a
    // day on the key.
    put_limits(&mesh, json!({"scope": {"kind": "user", "id": "admin"}, "limits": {}})).await;
    put_limits(&mesh, json!({"scope": {"kind": "key", "id": "admin"}, "limits": {"tokens_per_day": 20_000}})).await;

    let pools = [
        LeasePool::new(QuotaClient::new(mesh.channel("quota")), LeaseSettings::default()).unwrap(),
        LeasePool::new(QuotaClient::new(second), LeaseSettings::default()).unwrap(),
    ];
    let (charged, requests) = concurrent_spend(&pools, 32, 40, "tokens_per_day").await;
    assert!(charged <= 20_000, "{charged} tokens charged over a 20,000 limit");
    let leased: u64 = pools.iter().map(|p| p.stats().leased).sum();
    let reserved: u64 = pools.iter().map(|p| p.stats().reserved).sum();
    assert!(leased > reserved, "{leased} leased, {reserved} reserved one by one");
    for pool in &pools {
        pool.close().await;
    }
    let key = key_status(&mesh).await;
    assert_eq!(key["used"]["tokens"], charged, "{key}");
    assert_eq!(key["reserved"]["tokens"], 0, "every slice came back: {key}");

    // The last tokens, one at a time, through a third replica's pool.
    let last = LeasePool::new(QuotaClient::new(mesh.channel("quota")), LeaseSettings::default()).unwrap();
    let (rest, rest_requests) = spend_until_refused(last.clone(), 1, |_| 1, "tokens_per_day").await;
    last.close().await;
    assert_eq!(charged + rest, 20_000);
    let key = key_status(&mesh).await;
    assert_eq!((&key["used"]["tokens"], &key["remaining"]["tokens"]), (&json!(20_000), &json!(0)), "{key}");
    assert_eq!(key["used"]["requests"], requests + rest_requests);

    // The ledger, written by both quota replicas, holds the same day.
    let db = meshgate_storage::postgres_pool(&database_url, &meshgate_storage::PostgresConfig::default()).unwrap();
    let client = meshgate_storage::postgres_client(&db).await.unwrap();
    let today = chrono::Utc::now().date_naive();
    let mut ledger = (0, 0);
    for _ in 0..100 {
        let row = client
            .query_opt(
                "SELECT tokens, requests FROM usage_ledger WHERE scope_kind = 'key' AND scope_id = 'admin' AND day = $1",
                &[&today],
            )
            .await
            .unwrap();
        ledger = row.map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1))).unwrap_or_default();
        if ledger == (20_000, requests + rest_requests) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ledger, (20_000, requests + rest_requests));

    shutdown.trigger();
    replica.await.unwrap().unwrap();
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_per_minute_limit_holds_for_two_replicas_leasing() {
    let mesh = TestMesh::start().await;
    put_limits(&mesh, json!({"scope": {"kind": "user", "id": "admin"}, "limits": {}})).await;
    put_limits(&mesh, json!({"scope": {"kind": "key", "id": "admin"}, "limits": {"requests_per_minute": 120}})).await;
    let pools = [
        LeasePool::new(QuotaClient::new(mesh.channel("quota")), LeaseSettings::default()).unwrap(),
        LeasePool::new(QuotaClient::new(mesh.channel("quota")), LeaseSettings::default()).unwrap(),
    ];
    let started = Instant::now();
    let (_, burst) = concurrent_spend(&pools, 16, 10, "requests_per_minute").await;
    for pool in &pools {
        pool.close().await;
    }
    let (_, rest) = spend_until_refused(pools[0].clone(), 10, |_| 10, "requests_per_minute").await;
    // The bucket refills two requests a second while the test runs.
    let refilled = (started.elapsed().as_secs_f64() * 2.0).ceil() as i64;
    let admitted = burst + rest;
    assert!((120..=120 + refilled).contains(&admitted), "{admitted} admitted; 120 + {refilled} at most");
    let key = key_status(&mesh).await;
    assert_eq!(key["reserved"]["tokens"], 0, "{key}");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_gateway_may_lease() {
    let mesh = TestMesh::start().await;
    let request = pb::LeaseRequest {
        lease_id: "e2e".into(),
        principal: Some(admin_principal()),
        sequence: 1,
        want: Some(pb::LeaseAmounts { tokens: 100, ..Default::default() }),
        ..Default::default()
    };
    let mut sync = QuotaClient::new(mesh.channel_as("sync", "quota"));
    let refused = sync.lease(request.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let mut gateway = QuotaClient::new(mesh.channel("quota"));
    let held = gateway.lease(request).await.unwrap().into_inner();
    assert_eq!(held.held.unwrap().tokens, 100);
    mesh.stop().await;
}
