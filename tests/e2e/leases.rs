//! Quota leases across the mesh (mTLS, Redis, Postgres): two gateway replicas' lease pools, on two
//! quota replicas, spending one budget to the last token with the usage ledger agreeing; a
//! per-minute limit under leases; who may lease; and the gateway admitting through its leases:
//! two replicas' HTTP edges spending one budget without a Reserve per request, a leased request
//! charged once however it ends, and the per-request reservations when leases are off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshgate_proto::common::v1::{Principal, Role, Usage};
use meshgate_proto::quota::v1 as pb;
use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_quota_lease::{AdmitError, Estimate, LeasePool, LeaseSettings};
use meshgate_runtime::Shutdown;
use meshgate_tests::{ADMIN_KEY, CLOUD_MODEL, MeshOptions, TestMesh, chat_body};
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

/// Sends chat requests through `edge` until the key's daily tokens refuse one for the rest of
/// the day; a refusal that only waits for another replica's lease (retry in about a second) is
/// retried after its exact wait. Every 429 has the JSON error shape and the quota headers.
/// Returns the tokens charged, the requests served and the largest estimate a request held.
async fn chat_until_spent(http: reqwest::Client, edge: String, worker: usize) -> (i64, i64, i64) {
    let (mut charged, mut served, mut estimate) = (0, 0, 0);
    for attempt in 0..1_000 {
        let body = json!({"model": CLOUD_MODEL, "max_tokens": 40,
                          "messages": [{"role": "user", "content": format!("worker {worker} asks {attempt}")}]});
        let response =
            http.post(format!("{edge}/v1/chat/completions")).bearer_auth(ADMIN_KEY).json(&body).send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body: Value = response.json().await.unwrap();
        match status {
            200 => {
                charged += body["usage"]["total_tokens"].as_i64().unwrap();
                estimate = estimate.max(body["usage"]["prompt_tokens"].as_i64().unwrap() + 40);
                served += 1;
                assert!(headers.contains_key("x-meshgate-quota-remaining-tokens"), "{headers:?}");
            }
            429 => {
                let error = &body["error"];
                assert_eq!(error["code"], "quota_exceeded", "{body}");
                assert!(error["type"].is_string() && error["message"].is_string(), "{body}");
                assert!(error["request_id"].as_str().is_some_and(|id| !id.is_empty()), "{body}");
                assert_eq!(headers["x-meshgate-quota-limit"], "tokens_per_day");
                assert_eq!(headers["x-meshgate-quota-scope"], "key:admin");
                let wait_ms: u64 = headers["retry-after-ms"].to_str().unwrap().parse().unwrap();
                let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert_eq!(retry_after, wait_ms.div_ceil(1000).max(1));
                if wait_ms > 5_000 {
                    return (charged, served, estimate);
                }
                tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            }
            _ => panic!("{status}: {body}"),
        }
    }
    panic!("worker {worker} never saw the budget spent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_leasing_spend_one_budget_through_the_edge_without_a_reserve_per_request() {
    let captured = Arc::new(Mutex::new(None));
    let config = captured.clone();
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(move |mesh_config| {
            mesh_config.quota.ledger_flush_interval_ms = 100;
            *config.lock() = Some((mesh_config.gateway.clone(), mesh_config.quota.database_url.clone().unwrap()));
        }),
        ..MeshOptions::default()
    })
    .await;
    let (gateway_config, database_url) = captured.lock().take().unwrap();
    assert!(gateway_config.quota_leases, "gateways lease unless configured otherwise");
    let replica = mesh.gateway_replica(gateway_config).await;
    let ready = format!("{}/readyz", replica.admin);
    for _ in 0..200 {
        if mesh.http.get(&ready).send().await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // No per-minute limit on the user (the default 100 would refuse the load); 6,000 tokens a day
    // on the key: about a hundred requests.
    let budget = 6_000;
    put_limits(&mesh, json!({"scope": {"kind": "user", "id": "admin"}, "limits": {}})).await;
    put_limits(&mesh, json!({"scope": {"kind": "key", "id": "admin"}, "limits": {"tokens_per_day": budget}})).await;
    let edges = [mesh.edge.clone(), replica.edge.clone()];
    let workers: Vec<_> = (0..16)
        .map(|worker| tokio::spawn(chat_until_spent(mesh.http.clone(), edges[worker % 2].clone(), worker)))
        .collect();
    let (mut charged, mut served, mut estimate) = (0, 0, 0);
    for worker in futures::future::join_all(workers).await {
        let (tokens, requests, held) = worker.unwrap();
        (charged, served, estimate) = (charged + tokens, served + requests, estimate.max(held));
    }
    assert!(charged <= budget, "two gateways charged {charged} tokens over a {budget} limit");
    assert!(budget - charged < estimate, "{charged} of {budget} charged: the last requests were refused early");

    // The counters hold exactly what the replies charged, once the slices are back (a second
    // idle), and the Postgres ledger the same.
    let mut key = key_status(&mesh).await;
    for _ in 0..200 {
        if key["reserved"]["tokens"] == 0 && key["used"]["tokens"] == charged {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        key = key_status(&mesh).await;
    }
    assert_eq!((&key["used"]["tokens"], &key["reserved"]["tokens"]), (&json!(charged), &json!(0)), "{key}");
    assert_eq!(key["used"]["requests"], served, "{key}");
    let db = meshgate_storage::postgres_pool(&database_url, &meshgate_storage::PostgresConfig::default()).unwrap();
    let client = meshgate_storage::postgres_client(&db).await.unwrap();
    let mut ledger = (0, 0);
    for _ in 0..100 {
        let row = client
            .query_opt(
                "SELECT tokens, requests FROM usage_ledger WHERE scope_kind = 'key' AND scope_id = 'admin' AND day = $1",
                &[&chrono::Utc::now().date_naive()],
            )
            .await
            .unwrap();
        ledger = row.map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1))).unwrap_or_default();
        if ledger == (charged, served) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ledger, (charged, served), "the ledger holds what the counters hold");

    // Most requests were admitted without a Reserve call of their own: the gateways say how
    // each was admitted, and the quota service counts the reservations it made.
    let gateways = [mesh.admin_url("gateway"), replica.admin.clone()];
    let (mut leased, mut reserved) = (0.0, 0.0);
    for admin in &gateways {
        leased += mesh.metric(admin, "meshgate_quota_admissions_total", &[("via", "lease")]).await;
        reserved += mesh.metric(admin, "meshgate_quota_admissions_total", &[("via", "reservation")]).await;
    }
    assert_eq!((leased + reserved) as i64, served, "{leased} leased and {reserved} reserved");
    let reservations =
        mesh.metric(&mesh.admin_url("quota"), "meshgate_quota_reservations_total", &[("result", "admitted")]).await;
    assert_eq!(reservations, reserved, "every reserved admission is one Reserve, and no other was made");
    assert!(leased > 2.0 * reserved, "{leased} requests leased, {reserved} reserved one by one");

    replica.stop().await;
    mesh.stop().await;
}

/// The usage served and the requests (of `requests`) that were served, by their traces.
async fn charged_by_traces(mesh: &TestMesh, requests: &[String]) -> (i64, i64) {
    let mut charged = (0, 0);
    for request_id in requests {
        let trace = mesh.trace(request_id).await;
        if !trace.served_target.is_empty() {
            charged.0 += trace.usage.unwrap().total_tokens;
            charged.1 += 1;
        }
    }
    charged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leased_request_is_charged_once_however_it_ends() {
    let mesh = TestMesh::start().await;
    put_limits(&mesh, json!({"scope": {"kind": "user", "id": "admin"}, "limits": {}})).await;
    put_limits(&mesh, json!({"scope": {"kind": "key", "id": "admin"}, "limits": {"tokens_per_day": 1_000_000}})).await;
    let id_of = |response: &reqwest::Response| response.headers()["x-meshgate-request-id"].to_str().unwrap().to_owned();
    let mut requests = Vec::new();

    // Served as JSON.
    let served = mesh.chat(chat_body(CLOUD_MODEL, "a plain reply")).await;
    assert_eq!(served.status(), 200);
    requests.push(id_of(&served));
    // Retried on the second provider after the first failed: one request, charged once.
    mesh.alpha.set_failures(1.0, 500);
    let retried = mesh.chat(chat_body(CLOUD_MODEL, "after a fallback")).await;
    assert_eq!(retried.status(), 200);
    assert_eq!(retried.headers()["x-meshgate-target"], "beta/mock-gpt");
    requests.push(id_of(&retried));
    // Every target failing: nothing served, the hold released.
    mesh.beta.set_failures(1.0, 500);
    let failed = mesh.chat(chat_body(CLOUD_MODEL, "nobody answers")).await;
    assert!(failed.status().is_server_error(), "{}", failed.status());
    requests.push(id_of(&failed));
    let providers = [&mesh.alpha, &mesh.beta];
    for provider in providers {
        provider.set_failures(0.0, 500);
    }
    // A stream read to its end.
    let mut body = chat_body(CLOUD_MODEL, "a streamed reply");
    body["stream"] = json!(true);
    let streamed = mesh.chat(body.clone()).await;
    assert_eq!(streamed.status(), 200);
    requests.push(id_of(&streamed));
    assert!(streamed.text().await.unwrap().contains("[DONE]"));
    // A stream its provider breaks after two chunks (whichever serves it): what was produced is
    // charged.
    for provider in providers {
        provider.update(|b| {
            b.stream_chunks = 8;
            b.fail_after_chunks = Some(2);
            b.stream_fault = meshgate_mock_provider::StreamFault::ErrorEvent;
        });
    }
    let broken = mesh.chat(body.clone()).await;
    requests.push(id_of(&broken));
    assert!(broken.text().await.unwrap().contains("error"));
    // A stream whose client goes away after its first chunk.
    for provider in providers {
        provider.update(|b| {
            b.fail_after_chunks = None;
            b.chunk_delay = Duration::from_millis(100);
        });
    }
    let mut abandoned = mesh.chat(body).await;
    requests.push(id_of(&abandoned));
    assert!(abandoned.chunk().await.unwrap().is_some());
    drop(abandoned);

    let (tokens, served) = charged_by_traces(&mesh, &requests).await;
    assert_eq!(served, 5, "every request but the failed one was served");
    let mut key = key_status(&mesh).await;
    for _ in 0..200 {
        if key["reserved"]["tokens"] == 0 && key["used"]["tokens"] == tokens {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        key = key_status(&mesh).await;
    }
    assert_eq!((&key["used"]["tokens"], &key["reserved"]["tokens"]), (&json!(tokens), &json!(0)), "{key}");
    assert_eq!(key["used"]["requests"], served, "{key}");
    let quota = mesh.admin_url("quota");
    assert_eq!(
        mesh.metric(&quota, "meshgate_quota_reservations_total", &[]).await,
        0.0,
        "no request made a Reserve call"
    );
    assert!(mesh.metric(&quota, "meshgate_quota_leases_total", &[]).await >= 1.0);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_leases_every_request_reserves_and_commits_its_own_budget() {
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(|config| config.gateway.quota_leases = false),
        ..MeshOptions::default()
    })
    .await;
    put_limits(&mesh, json!({"scope": {"kind": "key", "id": "admin"}, "limits": {"tokens_per_day": 1_000_000}})).await;
    let mut charged = 0;
    for i in 0..3 {
        let response = mesh.chat(chat_body(CLOUD_MODEL, &format!("reserved {i}"))).await;
        assert_eq!(response.status(), 200);
        assert!(response.headers().contains_key("x-meshgate-quota-remaining-tokens"));
        let body: Value = response.json().await.unwrap();
        charged += body["usage"]["total_tokens"].as_i64().unwrap();
    }
    let quota = mesh.admin_url("quota");
    assert_eq!(mesh.metric(&quota, "meshgate_quota_reservations_total", &[("result", "admitted")]).await, 3.0);
    assert_eq!(mesh.metric(&quota, "meshgate_quota_leases_total", &[]).await, 0.0);
    let gateway = mesh.admin_url("gateway");
    assert_eq!(mesh.metric(&gateway, "meshgate_quota_admissions_total", &[("via", "reservation")]).await, 3.0);
    let mut key = key_status(&mesh).await;
    for _ in 0..200 {
        if key["used"]["tokens"] == charged {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        key = key_status(&mesh).await;
    }
    assert_eq!((&key["used"]["tokens"], &key["reserved"]["tokens"]), (&json!(charged), &json!(0)), "{key}");
    mesh.stop().await;
}
