//! Leases against both stores (Redis with limits in Postgres, and memory), over real gRPC and
//! through the gateway's lease pool: two holders spending one budget to the last token, a holder
//! that dies mid-lease, per-minute limits, the usage ledger, and the Lease call itself (slices,
//! replays, low scopes, daily windows, expiry, bad input).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{Backend, commit, principal, reserve, scope, set_limits, status_of, unique};
use meshgate_proto::common::v1::{Principal, Usage};
use meshgate_proto::quota::v1 as pb;
use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_quota::model::Limits;
use meshgate_quota::{DefaultLimits, EngineSettings, Ledger, LedgerFlusher, QuotaEngine, QuotaMetrics, QuotaService};
use meshgate_quota_lease::{AdmitError, Estimate, LeasePool, LeaseSettings};
use meshgate_runtime::{ErrorCode, Listeners, MeshChannel, ServiceHost, Shutdown};
use meshgate_storage::{ManualClock, SharedClock, postgres_client, system_clock};

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

/// Default limits without the users' 100 requests a minute, which load tests would hit.
fn settings() -> EngineSettings {
    let defaults = DefaultLimits::default();
    EngineSettings {
        limits_cache_ttl: Duration::from_secs(3600),
        defaults: DefaultLimits { user: Limits { requests_per_minute: 0, ..defaults.user }, ..defaults },
        ..EngineSettings::default()
    }
}

/// One quota replica: an engine served over gRPC on port 0.
struct Replica {
    client: QuotaClient<MeshChannel>,
    shutdown: Shutdown,
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

async fn serve(engine: Arc<QuotaEngine>) -> Replica {
    let listeners = Listeners::ephemeral().await.unwrap();
    let url = format!("http://{}", listeners.grpc_addr());
    let shutdown = Shutdown::new();
    let server = QuotaService::new(engine).into_server();
    let probe = || async { Ok::<(), String>(()) };
    tokio::spawn(ServiceHost::new("quota").run(server, listeners, probe, shutdown.clone()));
    let channel = meshgate_runtime::channel(&url, Duration::from_secs(1)).unwrap();
    meshgate_runtime::client::wait_serving(&channel, "meshgate.quota.v1.Quota", Duration::from_secs(5)).await.unwrap();
    Replica { client: QuotaClient::new(channel), shutdown }
}

fn pool(replica: &Replica, settings: LeaseSettings) -> LeasePool {
    LeasePool::new(replica.client.clone(), settings).unwrap()
}

fn usage(tokens: i64, cost_micros: i64) -> Usage {
    Usage { prompt_tokens: tokens, total_tokens: tokens, cost_micros, ..Default::default() }
}

fn estimate(tokens: i64) -> Estimate {
    Estimate { tokens, cost_micros: 0 }
}

fn refusal(result: Result<meshgate_quota_lease::Admission, AdmitError>) -> pb::ReserveResponse {
    match result {
        Err(AdmitError::Refused(response)) => *response,
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(admission) => panic!("expected a refusal, got an admission: {:?}", admission.response()),
    }
}

/// Admits and settles requests of `tokens` estimated, `used(n)` charged, until one is refused;
/// returns the tokens charged and the requests admitted.
async fn spend_until_refused(
    pool: LeasePool,
    p: Principal,
    tokens: i64,
    used: impl Fn(i64) -> i64,
    limit: &str,
) -> (i64, i64) {
    let (mut charged, mut admitted) = (0, 0);
    loop {
        match pool.admit(&unique("req"), &p, estimate(tokens)).await {
            Ok(admission) => {
                let spent = used(admitted);
                tokio::task::yield_now().await;
                admission.settle(Some(&usage(spent, 0))).await;
                charged += spent;
                admitted += 1;
            }
            Err(AdmitError::Refused(response)) => {
                assert_eq!(response.rejected_limit, limit, "{response:?}");
                return (charged, admitted);
            }
            Err(err) => panic!("admission failed: {err}"),
        }
    }
}

async fn two_pools_spend_one_budget_to_the_last_token(backend: Backend) {
    let harness = backend.harness(system_clock()).await;
    let engine = harness.engine(settings());
    // Two quota replicas, a gateway replica (pool) on each.
    let replicas = [serve(harness.engine(settings())).await, serve(harness.engine(settings())).await];
    let p = principal();
    engine.set_limits(&set_limits(scope(pb::ScopeKind::Key, &p.key_id), 10_000, 0)).await.unwrap();
    let pools: Vec<LeasePool> = replicas.iter().map(|r| pool(r, LeaseSettings::default())).collect();

    // Twelve concurrent workers per replica, each until its first refusal; replies use 10 or 6 of
    // the 10 tokens estimated.
    let charged = Arc::new(AtomicI64::new(0));
    let workers: Vec<_> = (0..24)
        .map(|i| {
            let (pool, p, charged) = (pools[i % 2].clone(), p.clone(), charged.clone());
            tokio::spawn(async move {
                let (spent, _) =
                    spend_until_refused(pool, p, 10, |n| if n % 2 == 0 { 10 } else { 6 }, "tokens_per_day").await;
                charged.fetch_add(spent, Ordering::Relaxed);
            })
        })
        .collect();
    for worker in futures::future::join_all(workers).await {
        worker.unwrap();
    }
    let charged = charged.load(Ordering::Relaxed);
    for pool in &pools {
        pool.flush().await;
    }
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!(key.used_tokens, charged, "every settled reply was charged once");
    assert!(key.used_tokens + key.reserved_tokens <= 10_000, "{key:?}");
    let (leased, reserved): (u64, u64) =
        pools.iter().map(|p| p.stats()).fold((0, 0), |(l, r), s| (l + s.leased, r + s.reserved));
    assert!(leased > reserved, "most requests are admitted without a call: {leased} leased, {reserved} reserved");

    // Returned slices come back whole, and the budget's last tokens are admitted one by one.
    for pool in &pools {
        pool.close().await;
    }
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.reserved_tokens, key.leased_tokens), (0, 0), "nothing stranded: {key:?}");
    let last = pool(&replicas[0], LeaseSettings::default());
    let (rest, _) = spend_until_refused(last.clone(), p.clone(), 1, |_| 1, "tokens_per_day").await;
    last.close().await;
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!(charged + rest, 10_000);
    assert_eq!((key.used_tokens, key.reserved_tokens, key.remaining_tokens), (10_000, 0, 0), "{key:?}");
}

async fn a_holder_killed_mid_lease_gives_its_slices_back_when_they_expire(backend: Backend) {
    let harness = backend.harness(system_clock()).await;
    let engine = harness.engine(settings());
    let replica = serve(harness.engine(settings())).await;
    let p = principal();
    engine.set_limits(&set_limits(scope(pb::ScopeKind::Key, &p.key_id), 1_000, 0)).await.unwrap();
    let short =
        LeaseSettings { ttl_ms: 1_000, flush_interval_ms: 100, call_timeout_ms: 400, ..LeaseSettings::default() };

    let doomed = pool(&replica, short.clone());
    let served = doomed.admit("a", &p, estimate(100)).await.unwrap();
    assert!(served.is_leased());
    let in_flight = doomed.admit("b", &p, estimate(20)).await.unwrap();
    served.settle(Some(&usage(60, 0))).await;
    doomed.flush().await;
    // The replica dies: a request still in flight, its slices held, nothing returned.
    std::mem::forget(in_flight);
    drop(doomed);
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!(key.used_tokens, 60);
    assert!(key.leased_tokens >= 20, "the dead replica's slice is held: {key:?}");
    assert_eq!(key.reserved_tokens, key.leased_tokens);

    // Until it expires, a request needing that budget is told to retry soon, not at midnight.
    let survivor = pool(&replica, short);
    let refused = refusal(survivor.admit("rest", &p, estimate(940)).await);
    assert_eq!((refused.rejected_limit.as_str(), refused.retry_after_ms), ("tokens_per_day", 1_000), "{refused:?}");

    let mut key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    for _ in 0..60 {
        if key.reserved_tokens == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    }
    assert_eq!((key.reserved_tokens, key.leased_tokens, key.remaining_tokens), (0, 0, 940), "{key:?}");
    let rest = engine.reserve(&reserve(&p, "rest", 940, 0)).await.unwrap();
    assert!(rest.admitted, "the expired slices came back whole: {rest:?}");
    engine.commit(&commit(&rest.reservation_id, 940, 0)).await.unwrap();
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.remaining_tokens), (1_000, 0), "spent once, to the last token");
    survivor.close().await;
}

/// A replica killed without a drain (SIGKILL, OOM) loses only the usage settled in its last
/// `report_delay_ms`: settled usage does not wait for the next renewal tick (ten seconds here).
async fn settled_usage_is_charged_within_the_report_delay(backend: Backend) {
    let harness = backend.harness(system_clock()).await;
    let engine = harness.engine(settings());
    let replica = serve(harness.engine(settings())).await;
    let p = principal();
    let slow_ticks =
        LeaseSettings { ttl_ms: 60_000, flush_interval_ms: 10_000, report_delay_ms: 20, ..LeaseSettings::default() };
    let doomed = pool(&replica, slow_ticks);
    for round in 0..3 {
        let ids: Vec<String> = (0..5).map(|i| format!("r{round}-{i}")).collect();
        let admissions = futures::future::join_all(ids.iter().map(|id| doomed.admit(id, &p, estimate(50)))).await;
        for admission in admissions {
            let admission = admission.unwrap();
            assert!(admission.is_leased());
            admission.settle(Some(&usage(7, 3))).await;
        }
        let expected = 35 * (round + 1);
        let mut key = status_of(&engine, &p, pb::ScopeKind::Key).await;
        for _ in 0..80 {
            if key.used_tokens == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            key = status_of(&engine, &p, pb::ScopeKind::Key).await;
        }
        assert_eq!((key.used_tokens, key.used_cost_micros), (expected, 15 * (round + 1)), "round {round}: {key:?}");
    }
    // The replica dies now: nothing it answered is left uncharged.
    drop(doomed);
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.requests_today), (105, 15));
}

fn per_minute(scope: pb::Scope, requests_per_minute: i64, tokens_per_minute: i64) -> pb::SetLimitsRequest {
    pb::SetLimitsRequest {
        scope: Some(scope),
        limits: Some(pb::Limits { requests_per_minute, tokens_per_minute, ..Default::default() }),
    }
}

async fn per_minute_limits_hold_under_leases(backend: Backend) {
    // The store's clock stands still, so no request drains away during the test.
    let clock = Arc::new(ManualClock::new(at("2031-05-06T10:00:00Z")));
    let harness = backend.harness(clock.clone() as SharedClock).await;
    let engine = harness.engine(settings());
    let replicas = [serve(harness.engine(settings())).await, serve(harness.engine(settings())).await];
    let p = principal();
    let key = scope(pb::ScopeKind::Key, &p.key_id);
    engine.set_limits(&per_minute(key.clone(), 60, 600)).await.unwrap();
    let pools: Vec<LeasePool> = replicas.iter().map(|r| pool(r, LeaseSettings::default())).collect();

    // A burst of 100 across both replicas: at most the 60 of the minute get through.
    let burst: Vec<_> = (0..100)
        .map(|i| {
            let (pool, p) = (pools[i % 2].clone(), p.clone());
            tokio::spawn(async move {
                match pool.admit(&format!("burst-{i}"), &p, estimate(5)).await {
                    Ok(admission) => {
                        admission.settle(Some(&usage(3, 0))).await;
                        true
                    }
                    Err(AdmitError::Refused(r)) => {
                        // Tokens too: what the other replica holds of the minute's tokens may
                        // stand in the way until it gives its slice back.
                        assert!(r.rejected_limit.ends_with("_per_minute"), "{r:?}");
                        false
                    }
                    Err(err) => panic!("{err}"),
                }
            })
        })
        .collect();
    let admitted = futures::future::join_all(burst).await.into_iter().filter(|r| *r.as_ref().unwrap()).count() as i64;
    assert!((1..=60).contains(&admitted), "{admitted} admitted in a minute limited to 60");
    for pool in &pools {
        pool.close().await;
    }
    let status = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((status.leased_minute_requests, status.leased_minute_tokens), (0, 0), "{status:?}");
    assert_eq!(status.remaining_requests_this_minute, 60 - admitted);
    // The token bucket holds what the replies used (3 each), not the estimates (5).
    assert_eq!(status.remaining_tokens_this_minute, 600 - 3 * admitted);

    // What the burst left is admitted exactly, to the 60th request.
    let last = pool(&replicas[0], LeaseSettings::default());
    let (_, rest) = spend_until_refused(last.clone(), p.clone(), 5, |_| 3, "requests_per_minute").await;
    assert_eq!(admitted + rest, 60);
    let refused = refusal(last.admit("61st", &p, estimate(5)).await);
    assert_eq!(refused.rejected_scope, Some(key));
    assert_eq!(refused.retry_after_ms, 1_000, "one request drains every second: {refused:?}");
    clock.advance(Duration::from_secs(1));
    last.admit("62nd", &p, estimate(5)).await.unwrap().settle(Some(&usage(3, 0))).await;
    refusal(last.admit("63rd", &p, estimate(5)).await);
    last.close().await;
}

async fn the_ledger_holds_what_leases_charged(backend: Backend) {
    let harness = backend.harness(system_clock()).await;
    let engine = harness.engine(settings());
    let replica = serve(harness.engine(settings())).await;
    let db = harness.pool().await;
    let flusher = LedgerFlusher::new(
        engine.store().clone(),
        Ledger::new(db.clone()),
        100,
        Duration::from_secs(60),
        QuotaMetrics::new(&meshgate_runtime::Metrics::new("quota")),
    );
    let p = principal();
    let leases = pool(&replica, LeaseSettings::default());
    for i in 0..40 {
        let admission = leases.admit(&format!("r{i}"), &p, Estimate { tokens: 50, cost_micros: 20 }).await.unwrap();
        if i % 4 == 3 {
            // Nothing served: released, not charged.
            drop(admission);
        } else {
            admission.settle(Some(&usage(7, 11))).await;
        }
    }
    leases.close().await;
    flusher.flush().await.unwrap();
    let today = Utc::now().date_naive();
    let client = postgres_client(&db).await.unwrap();
    for (kind, id) in [("org", &p.org_id), ("project", &p.project_id), ("user", &p.user_id), ("key", &p.key_id)] {
        let row = client
            .query_one(
                "SELECT tokens, cost_micros, requests FROM usage_ledger \
                 WHERE scope_kind = $1 AND scope_id = $2 AND day = $3",
                &[&kind, id, &today],
            )
            .await
            .unwrap();
        let ledger: (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(ledger, (30 * 7, 30 * 11, 30), "{kind}");
    }
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.used_cost_micros, key.requests_today), (210, 330, 30));
    assert_eq!((key.reserved_tokens, key.reserved_cost_micros), (0, 0));
}

fn lease(p: &Principal, sequence: i64) -> pb::LeaseRequest {
    pb::LeaseRequest { lease_id: "replica-1".into(), principal: Some(p.clone()), sequence, ..Default::default() }
}

fn tokens(n: i64) -> Option<pb::LeaseAmounts> {
    Some(pb::LeaseAmounts { tokens: n, ..Default::default() })
}

async fn the_lease_call_carves_settles_and_returns_slices(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at("2031-05-06T23:50:00Z")));
    let harness = backend.harness(clock.clone() as SharedClock).await;
    let engine = harness.engine(settings());
    let p = principal();
    engine.set_limits(&set_limits(scope(pb::ScopeKind::Key, &p.key_id), 8_000, 0)).await.unwrap();

    // A slice is at most an eighth of what the tightest scope has free; limits nobody sets are
    // not held (-1), those the user's defaults set are (cost).
    let first =
        engine.lease(&pb::LeaseRequest { want: tokens(5_000), need: tokens(100), ..lease(&p, 1) }).await.unwrap();
    let held = first.held.unwrap();
    assert_eq!((held.tokens, held.cost_micros, held.minute_requests, held.minute_tokens), (1_000, 0, -1, -1));
    assert_eq!((first.replay, first.window_ended, first.low_scope.is_none()), (false, false, true));
    assert_eq!((first.remaining_tokens, first.ttl_ms), (7_000, 10_000));
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.reserved_tokens, key.leased_tokens, key.used_tokens), (1_000, 1_000, 0));

    // A replay charges nothing; the next call charges what was spent and keeps the rest.
    let spent = Some(pb::LeaseSpent { tokens: 400, cost_micros: 0, started_requests: 3, settled_requests: 3 });
    let replay = engine.lease(&pb::LeaseRequest { spent, ..lease(&p, 1) }).await.unwrap();
    assert!(replay.replay);
    assert_eq!(replay.held.unwrap().tokens, 1_000);
    let second = engine.lease(&pb::LeaseRequest { spent, keep: tokens(600), ..lease(&p, 2) }).await.unwrap();
    assert_eq!(second.held.unwrap().tokens, 600);
    let again = engine.lease(&pb::LeaseRequest { spent, keep: tokens(600), ..lease(&p, 2) }).await.unwrap();
    assert!(again.replay, "sent again after a lost answer: applied once");
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.requests_today, key.reserved_tokens, key.leased_tokens), (400, 3, 600, 600));

    // Reservations see what leases hold; a refusal caused by them only is told to retry soon.
    let big = engine.reserve(&reserve(&p, "big", 7_000, 0)).await.unwrap();
    assert!(big.admitted);
    let refused = engine.reserve(&reserve(&p, "one", 1, 0)).await.unwrap();
    assert_eq!((refused.admitted, refused.retry_after_ms, refused.retry_after_seconds), (false, 1_000, 1));
    engine.release(&pb::ReleaseRequest { reservation_id: big.reservation_id }).await.unwrap();
    let beyond = engine.reserve(&reserve(&p, "beyond", 7_601, 0)).await.unwrap();
    assert!(!beyond.admitted);
    assert_eq!(beyond.retry_after_ms, 10 * 60 * 1_000, "no lease could make room: the window's reset");

    // A scope that cannot spare the least slice asked for carves nothing and says which.
    let low = engine
        .lease(&pb::LeaseRequest { keep: tokens(600), want: tokens(10_000), need: tokens(7_000), ..lease(&p, 3) })
        .await
        .unwrap();
    assert_eq!(low.low_scope, Some(scope(pb::ScopeKind::Key, &p.key_id)));
    assert_eq!((low.low_limit.as_str(), low.held.unwrap().tokens), ("tokens_per_day", 600));
    // Returned: nothing kept, nothing held.
    let returned = engine.lease(&lease(&p, 4)).await.unwrap();
    assert_eq!(returned.held.unwrap().tokens, 0);
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.reserved_tokens, key.leased_tokens, key.used_tokens), (0, 0, 400));

    // Past midnight the lease's window is over: what it spent and keeps stays in its own day.
    clock.advance(Duration::from_secs(9 * 60 + 30));
    let minute = engine
        .lease(&pb::LeaseRequest { want: tokens(100), need: tokens(10), ttl_ms: 60_000, ..lease(&p, 5) })
        .await
        .unwrap();
    assert_eq!(minute.held.unwrap().tokens, 100);
    clock.advance(Duration::from_secs(40));
    let spent = Some(pb::LeaseSpent { tokens: 30, settled_requests: 1, started_requests: 1, ..Default::default() });
    let ended =
        engine.lease(&pb::LeaseRequest { spent, keep: tokens(50), want: tokens(100), ..lease(&p, 6) }).await.unwrap();
    assert!(ended.window_ended);
    assert_eq!(ended.held.unwrap().tokens, 50);
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.reserved_tokens), (0, 0), "the new day starts clean: {key:?}");
    engine.lease(&lease(&p, 7)).await.unwrap();
    let fresh = engine
        .lease(&pb::LeaseRequest { lease_id: "replica-1-b".into(), want: tokens(100), ..lease(&p, 1) })
        .await
        .unwrap();
    assert_eq!((fresh.window_ended, fresh.held.unwrap().tokens), (false, 100));

    // An expired lease keeps nothing; its lifetime is capped by the service.
    let capped = engine
        .lease(&pb::LeaseRequest { keep: tokens(100), ttl_ms: 1_000_000_000, ..lease_named(&p, "replica-1-b", 2) })
        .await
        .unwrap();
    assert_eq!((capped.ttl_ms, capped.held.unwrap().tokens), (60_000, 100));
    clock.advance(Duration::from_secs(61));
    assert_eq!(status_of(&engine, &p, pb::ScopeKind::Key).await.reserved_tokens, 0, "expired");
    let late =
        engine.lease(&pb::LeaseRequest { keep: tokens(100), ..lease_named(&p, "replica-1-b", 3) }).await.unwrap();
    assert_eq!(late.held.unwrap().tokens, 0);
}

fn lease_named(p: &Principal, id: &str, sequence: i64) -> pb::LeaseRequest {
    pb::LeaseRequest { lease_id: id.into(), ..lease(p, sequence) }
}

async fn bad_lease_calls_are_refused_naming_the_field(backend: Backend) {
    let harness = backend.harness(system_clock()).await;
    let engine = harness.engine(settings());
    let p = principal();
    let invalid = |err: meshgate_quota::Error, field: &str| {
        assert_eq!(err.code(), ErrorCode::InvalidRequest, "{err}");
        assert!(err.to_string().contains(field), "{err} should name {field}");
    };
    invalid(engine.lease(&lease(&p, 0)).await.unwrap_err(), "sequence");
    invalid(engine.lease(&pb::LeaseRequest { keep: tokens(-1), ..lease(&p, 1) }).await.unwrap_err(), "keep.tokens");
    let huge = Some(pb::LeaseAmounts { minute_requests: i64::MAX, ..Default::default() });
    invalid(engine.lease(&pb::LeaseRequest { want: huge, ..lease(&p, 1) }).await.unwrap_err(), "want.minute_requests");
    let spent = Some(pb::LeaseSpent { started_requests: -2, ..Default::default() });
    invalid(engine.lease(&pb::LeaseRequest { spent, ..lease(&p, 1) }).await.unwrap_err(), "spent.started_requests");
    invalid(engine.lease(&pb::LeaseRequest { ttl_ms: -5, ..lease(&p, 1) }).await.unwrap_err(), "ttl_ms");
    invalid(engine.lease(&lease_named(&p, "", 1)).await.unwrap_err(), "lease_id");
    invalid(engine.lease(&pb::LeaseRequest { principal: None, ..lease(&p, 1) }).await.unwrap_err(), "principal");
    // A lease is never settled as a reservation.
    let held = engine.lease(&pb::LeaseRequest { want: tokens(10), ..lease(&p, 1) }).await.unwrap();
    assert_eq!(held.held.unwrap().tokens, 10);
    invalid(engine.commit(&commit("lse_0123456789abcdef", 1, 0)).await.unwrap_err(), "lease");
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.reserved_tokens), (0, 10), "refused calls wrote nothing");
}

backend_tests!(
    two_pools_spend_one_budget_to_the_last_token,
    a_holder_killed_mid_lease_gives_its_slices_back_when_they_expire,
    settled_usage_is_charged_within_the_report_delay,
    per_minute_limits_hold_under_leases,
    the_ledger_holds_what_leases_charged,
    the_lease_call_carves_settles_and_returns_slices,
    bad_lease_calls_are_refused_naming_the_field,
);
