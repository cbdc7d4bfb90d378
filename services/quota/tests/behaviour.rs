//! Behaviour every quota store must show, run against both the Redis store (real Redis, limits in
//! real Postgres) and the in-memory store, through the engine.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{Backend, charge, commit, principal, reserve, scope, set_limits, status_of};
use meshgate_proto::quota::v1 as pb;
use meshgate_quota::model::Limits;
use meshgate_quota::{DefaultLimits, EngineSettings, Ledger, LedgerFlusher, QuotaMetrics};
use meshgate_runtime::ErrorCode;
use meshgate_storage::{ManualClock, SharedClock, postgres_client, system_clock};

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

/// Default limits, but no per-minute limit on users: tests that hammer one principal would hit
/// the default 100 requests a minute.
fn settings() -> EngineSettings {
    let defaults = DefaultLimits::default();
    EngineSettings {
        limits_cache_ttl: Duration::from_secs(3600),
        defaults: DefaultLimits { user: Limits { requests_per_minute: 0, ..defaults.user }, ..defaults },
        ..EngineSettings::default()
    }
}

async fn concurrent_reserves_never_exceed_the_limit(backend: Backend) {
    let harness = backend.harness(system_clock()).await;
    let engine = harness.engine(settings());
    let p = principal();
    engine.set_limits(&set_limits(scope(pb::ScopeKind::Key, &p.key_id), 10_000, 0)).await.unwrap();

    // Equal amounts: exactly floor(10_000 / 70) = 142 fit.
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (engine, p) = (engine.clone(), p.clone());
            tokio::spawn(async move { engine.reserve(&reserve(&p, &format!("eq-{i}"), 70, 0)).await.unwrap() })
        })
        .collect();
    let responses = futures::future::join_all(tasks).await;
    let admitted = responses.iter().filter(|r| r.as_ref().unwrap().admitted).count();
    assert_eq!(admitted, 142);
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!(key.reserved_tokens, 142 * 70);
    assert_eq!(key.remaining_tokens, 10_000 - 142 * 70);

    // Mixed amounts on a fresh key: the admitted sum never passes the limit, and since holds only
    // grew, every refused amount would still not fit at the end.
    let p = principal();
    engine.set_limits(&set_limits(scope(pb::ScopeKind::Key, &p.key_id), 10_000, 0)).await.unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (engine, p) = (engine.clone(), p.clone());
            let amount = 1 + (i * 37) % 151;
            tokio::spawn(async move {
                (amount, engine.reserve(&reserve(&p, &format!("mix-{i}"), amount, 0)).await.unwrap().admitted)
            })
        })
        .collect();
    let results: Vec<(i64, bool)> = futures::future::join_all(tasks).await.into_iter().map(Result::unwrap).collect();
    let held: i64 = results.iter().filter(|(_, ok)| *ok).map(|(a, _)| a).sum();
    assert!(held <= 10_000, "admitted {held} tokens over a 10000 limit");
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!(key.reserved_tokens, held);
    for (amount, ok) in &results {
        if !ok {
            assert!(held + amount > 10_000, "{amount} was refused but fits ({held} held)");
        }
    }
    assert!(results.iter().any(|(_, ok)| !ok), "the limit was never reached");
}

async fn commit_and_release_arithmetic(backend: Backend) {
    let harness = backend.harness(system_clock()).await;
    let engine = harness.engine(settings());
    let p = principal();
    engine.set_limits(&set_limits(scope(pb::ScopeKind::Key, &p.key_id), 1_000, 50_000)).await.unwrap();

    let first = engine.reserve(&reserve(&p, "a", 100, 4_000)).await.unwrap();
    assert!(first.admitted);
    assert_eq!(first.remaining_tokens, 900);
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.reserved_tokens, key.used_cost_micros), (0, 100, 0));

    let committed = engine.commit(&commit(&first.reservation_id, 60, 2_500)).await.unwrap();
    assert_eq!(committed.remaining_tokens, 940);
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.reserved_tokens, key.used_cost_micros), (60, 0, 2_500));
    assert_eq!(key.remaining_tokens, 940);
    assert_eq!(key.tokens_per_day, 1_000);
    assert_eq!(key.cost_micros_per_day, 50_000);
    // Every scope of the principal was charged, not only the key.
    let org = status_of(&engine, &p, pb::ScopeKind::Org).await;
    assert_eq!((org.used_tokens, org.remaining_tokens), (60, -1));

    // A replayed commit charges nothing more.
    let replay = engine.commit(&commit(&first.reservation_id, 60, 2_500)).await.unwrap();
    assert_eq!(replay.remaining_tokens, 940);
    assert_eq!(status_of(&engine, &p, pb::ScopeKind::Key).await.used_tokens, 60);

    let second = engine.reserve(&reserve(&p, "b", 300, 0)).await.unwrap();
    assert_eq!(second.remaining_tokens, 640);
    engine.release(&pb::ReleaseRequest { reservation_id: second.reservation_id.clone() }).await.unwrap();
    engine.release(&pb::ReleaseRequest { reservation_id: second.reservation_id.clone() }).await.unwrap();
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.reserved_tokens), (60, 0));

    // Settling the other way round is a conflict; unknown ids are not found.
    let err = engine.commit(&commit(&second.reservation_id, 1, 0)).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::Conflict, "{err}");
    let err = engine.release(&pb::ReleaseRequest { reservation_id: first.reservation_id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::Conflict, "{err}");
    let err = engine.commit(&commit("rsv_00000000000000000000000000000000", 1, 0)).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotFound, "{err}");

    // Actual usage above the estimate is charged in full, and then nothing more fits.
    let third = engine.reserve(&reserve(&p, "c", 100, 0)).await.unwrap();
    engine.commit(&commit(&third.reservation_id, 2_000, 0)).await.unwrap();
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.reserved_tokens, key.remaining_tokens), (2_060, 0, 0));
    let refused = engine.reserve(&reserve(&p, "d", 1, 0)).await.unwrap();
    assert!(!refused.admitted);
    assert_eq!(refused.remaining_tokens, 0);
}

async fn expired_reservations_are_reclaimed(backend: Backend) {
    let ttl = Duration::from_millis(300);
    let harness = backend.harness(system_clock()).await;
    let engine = harness.engine(EngineSettings { reservation_ttl: ttl, ..settings() });
    let p = principal();
    engine.set_limits(&set_limits(scope(pb::ScopeKind::Key, &p.key_id), 1_000, 0)).await.unwrap();

    // A gateway reserves and dies without committing or releasing.
    let orphan = engine.reserve(&reserve(&p, "orphan", 800, 0)).await.unwrap();
    assert!(orphan.admitted);
    assert!(!engine.reserve(&reserve(&p, "blocked", 300, 0)).await.unwrap().admitted);

    tokio::time::sleep(Duration::from_millis(450)).await;
    let after = engine.reserve(&reserve(&p, "after", 300, 0)).await.unwrap();
    assert!(after.admitted, "the orphaned hold was not reclaimed");
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.reserved_tokens), (0, 300));

    // A late commit of the expired reservation still charges its usage, without touching the
    // holds of others.
    engine.commit(&commit(&orphan.reservation_id, 500, 0)).await.unwrap();
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.reserved_tokens), (500, 300));
}

async fn the_window_resets_at_utc_midnight(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at("2031-05-06T23:59:58.400Z")));
    let harness = backend.harness(clock.clone() as SharedClock).await;
    let engine = harness.engine(settings());
    let p = principal();
    engine.set_limits(&set_limits(scope(pb::ScopeKind::Key, &p.key_id), 100, 0)).await.unwrap();

    let yesterday = engine.reserve(&reserve(&p, "r1", 100, 0)).await.unwrap();
    assert!(yesterday.admitted);
    let refused = engine.reserve(&reserve(&p, "r2", 1, 0)).await.unwrap();
    assert!(!refused.admitted);
    assert_eq!(refused.rejected_limit, "tokens_per_day");
    assert_eq!(refused.rejected_scope, Some(scope(pb::ScopeKind::Key, &p.key_id)));
    let reset = refused.reset_at.unwrap();
    assert_eq!(DateTime::from_timestamp(reset.seconds, 0).unwrap(), at("2031-05-07T00:00:00Z"));
    assert_eq!(refused.retry_after_seconds, 2);

    clock.advance(Duration::from_millis(1_600));
    let today = engine.reserve(&reserve(&p, "r3", 40, 0)).await.unwrap();
    assert!(today.admitted, "the new day must start from zero");
    assert_eq!(today.remaining_tokens, 60);

    // Yesterday's reservation settles into yesterday's window.
    engine.commit(&commit(&yesterday.reservation_id, 90, 0)).await.unwrap();
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.reserved_tokens), (0, 40));
    let reset = key.reset_at.unwrap();
    assert_eq!(DateTime::from_timestamp(reset.seconds, 0).unwrap(), at("2031-05-08T00:00:00Z"));
}

async fn reserve_is_idempotent_by_request_id(backend: Backend) {
    let harness = backend.harness(system_clock()).await;
    let engine = harness.engine(settings());
    let p = principal();

    let first = engine.reserve(&reserve(&p, "same", 250, 10)).await.unwrap();
    let again = engine.reserve(&reserve(&p, "same", 250, 10)).await.unwrap();
    assert!(first.admitted && again.admitted);
    assert_eq!(first.reservation_id, again.reservation_id);
    assert_eq!(first.reservation_id, meshgate_quota::reservation_id(&p, "same"));
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!(key.reserved_tokens, 250);
    let user = status_of(&engine, &p, pb::ScopeKind::User).await;
    assert_eq!(
        (user.tokens_per_day, user.cost_micros_per_day),
        (1_000_000, 10_000_000),
        "the configured default applies without an override"
    );

    // The same request id from another key is another reservation.
    let other = principal();
    let theirs = engine.reserve(&reserve(&other, "same", 250, 10)).await.unwrap();
    assert_ne!(theirs.reservation_id, first.reservation_id);

    // Replaying after the commit returns the same, settled reservation and charges nothing.
    engine.commit(&commit(&first.reservation_id, 200, 10)).await.unwrap();
    let replay = engine.reserve(&reserve(&p, "same", 250, 10)).await.unwrap();
    assert_eq!(replay.reservation_id, first.reservation_id);
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.reserved_tokens), (200, 0));
}

async fn set_limits_applies_to_the_next_reserve_on_another_replica(backend: Backend) {
    let harness = backend.harness(system_clock()).await;
    // Both caches would keep limits for an hour: only the generation can make B notice.
    let a = harness.engine(settings());
    let b = harness.engine(settings());
    let p = principal();

    assert!(b.reserve(&reserve(&p, "warm", 100, 0)).await.unwrap().admitted);
    a.set_limits(&set_limits(scope(pb::ScopeKind::Key, &p.key_id), 150, 0)).await.unwrap();
    let refused = b.reserve(&reserve(&p, "next", 100, 0)).await.unwrap();
    assert!(!refused.admitted, "replica B still used the old limit");
    assert_eq!(refused.rejected_limit, "tokens_per_day");

    a.set_limits(&set_limits(scope(pb::ScopeKind::Key, &p.key_id), 1_000, 0)).await.unwrap();
    let admitted = b.reserve(&reserve(&p, "after", 100, 0)).await.unwrap();
    assert!(admitted.admitted);
    assert_eq!(admitted.remaining_tokens, 800);
    assert_eq!(status_of(&b, &p, pb::ScopeKind::Key).await.tokens_per_day, 1_000);
}

async fn every_scope_must_admit_and_a_refusal_changes_nothing(backend: Backend) {
    let harness = backend.harness(system_clock()).await;
    let engine = harness.engine(settings());
    let p = principal();
    engine.set_limits(&set_limits(scope(pb::ScopeKind::Org, &p.org_id), 500, 0)).await.unwrap();
    engine.set_limits(&set_limits(scope(pb::ScopeKind::Project, &p.project_id), 0, 1_000)).await.unwrap();

    let by_org = engine.reserve(&reserve(&p, "big", 600, 0)).await.unwrap();
    assert!(!by_org.admitted);
    assert_eq!(by_org.rejected_scope, Some(scope(pb::ScopeKind::Org, &p.org_id)));
    assert_eq!(by_org.rejected_limit, "tokens_per_day");
    assert!(by_org.retry_after_seconds >= 1);

    let by_cost = engine.reserve(&reserve(&p, "pricey", 10, 2_000)).await.unwrap();
    assert!(!by_cost.admitted);
    assert_eq!(by_cost.rejected_scope, Some(scope(pb::ScopeKind::Project, &p.project_id)));
    assert_eq!(by_cost.rejected_limit, "cost_micros_per_day");

    let status = engine.status(&pb::StatusRequest { principal: Some(p.clone()) }).await.unwrap();
    assert_eq!(status.scopes.len(), 4);
    for s in &status.scopes {
        assert_eq!((s.used_tokens, s.reserved_tokens, s.used_cost_micros), (0, 0, 0), "{s:?}");
    }

    let fits = engine.reserve(&reserve(&p, "fits", 500, 1_000)).await.unwrap();
    assert!(fits.admitted);
    assert_eq!(fits.remaining_tokens, 0);
}

async fn invalid_input_is_refused_and_writes_nothing(backend: Backend) {
    let harness = backend.harness(system_clock()).await;
    let engine = harness.engine(settings());
    let p = principal();
    let key = scope(pb::ScopeKind::Key, &p.key_id);
    engine.set_limits(&set_limits(key.clone(), 700, 0)).await.unwrap();

    let invalid = |code: ErrorCode, err: meshgate_quota::Error| assert_eq!(err.code(), code, "{err}");
    invalid(ErrorCode::InvalidRequest, engine.reserve(&reserve(&p, "n", -1, 0)).await.unwrap_err());
    invalid(ErrorCode::InvalidRequest, engine.reserve(&reserve(&p, "n", 1, -5)).await.unwrap_err());
    invalid(ErrorCode::InvalidRequest, engine.reserve(&reserve(&p, "n", i64::MAX, 0)).await.unwrap_err());
    invalid(ErrorCode::InvalidRequest, engine.reserve(&reserve(&p, "", 1, 0)).await.unwrap_err());
    let mut no_key = p.clone();
    no_key.key_id.clear();
    invalid(ErrorCode::InvalidRequest, engine.reserve(&reserve(&no_key, "n", 1, 0)).await.unwrap_err());
    let missing = pb::ReserveRequest { request_id: "n".into(), principal: None, ..Default::default() };
    invalid(ErrorCode::InvalidRequest, engine.reserve(&missing).await.unwrap_err());

    invalid(ErrorCode::InvalidRequest, engine.set_limits(&set_limits(key.clone(), -1, 0)).await.unwrap_err());
    invalid(ErrorCode::InvalidRequest, engine.set_limits(&set_limits(key.clone(), 0, i64::MAX)).await.unwrap_err());
    let unspecified = pb::Scope { kind: pb::ScopeKind::Unspecified as i32, id: "x".into() };
    invalid(ErrorCode::InvalidRequest, engine.set_limits(&set_limits(unspecified, 1, 0)).await.unwrap_err());
    let no_limits = pb::SetLimitsRequest { scope: Some(key.clone()), limits: None };
    invalid(ErrorCode::InvalidRequest, engine.set_limits(&no_limits).await.unwrap_err());
    let zoned_key = pb::SetLimitsRequest {
        scope: Some(key.clone()),
        limits: Some(pb::Limits { tokens_per_day: 5, time_zone: "Europe/Paris".into(), ..Default::default() }),
    };
    invalid(ErrorCode::InvalidRequest, engine.set_limits(&zoned_key).await.unwrap_err());
    let unknown_zone = pb::SetLimitsRequest {
        scope: Some(scope(pb::ScopeKind::Org, &p.org_id)),
        limits: Some(pb::Limits { time_zone: "Europe/Atlantis".into(), ..Default::default() }),
    };
    invalid(ErrorCode::InvalidRequest, engine.set_limits(&unknown_zone).await.unwrap_err());
    let absurd_rate = pb::SetLimitsRequest {
        scope: Some(key.clone()),
        limits: Some(pb::Limits { requests_per_minute: i64::MAX, ..Default::default() }),
    };
    invalid(ErrorCode::InvalidRequest, engine.set_limits(&absurd_rate).await.unwrap_err());

    let no_usage = pb::CommitRequest { reservation_id: "rsv_x".into(), usage: None, principal: None };
    invalid(ErrorCode::InvalidRequest, engine.commit(&no_usage).await.unwrap_err());
    invalid(ErrorCode::InvalidRequest, engine.commit(&commit("rsv_x", -3, 0)).await.unwrap_err());
    invalid(ErrorCode::InvalidRequest, engine.release(&pb::ReleaseRequest::default()).await.unwrap_err());

    let key_status = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!(key_status.tokens_per_day, 700, "a refused SetLimits changed the limit");
    assert_eq!((key_status.used_tokens, key_status.reserved_tokens), (0, 0));
}

async fn the_ledger_receives_committed_usage(backend: Backend) {
    let harness = backend.harness(system_clock()).await;
    let engine = harness.engine(settings());
    let pool = harness.pool().await;
    let flusher = LedgerFlusher::new(
        engine.store().clone(),
        Ledger::new(pool.clone()),
        2,
        Duration::from_secs(60),
        QuotaMetrics::new(&meshgate_runtime::Metrics::new("quota")),
    );
    let p = principal();
    let today = Utc::now().date_naive();
    let ledger = |kind: &'static str, id: String| {
        let pool = pool.clone();
        async move {
            let client = postgres_client(&pool).await.unwrap();
            client
                .query_opt(
                    "SELECT tokens, cost_micros, requests FROM usage_ledger \
                     WHERE scope_kind = $1 AND scope_id = $2 AND day = $3",
                    &[&kind, &id, &today],
                )
                .await
                .unwrap()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2)))
        }
    };

    for (i, tokens) in [120, 80].into_iter().enumerate() {
        let r = engine.reserve(&reserve(&p, &format!("l{i}"), 200, 0)).await.unwrap();
        engine.commit(&commit(&r.reservation_id, tokens, 1_000 * (i as i64 + 1))).await.unwrap();
    }
    // Releases and open reservations are not usage.
    let released = engine.reserve(&reserve(&p, "rel", 50, 0)).await.unwrap();
    engine.release(&pb::ReleaseRequest { reservation_id: released.reservation_id }).await.unwrap();
    engine.reserve(&reserve(&p, "open", 50, 0)).await.unwrap();

    // Four scopes dirty, two per batch: the flusher drains them all.
    assert!(flusher.flush().await.unwrap() >= 4);
    for (kind, id) in [("org", &p.org_id), ("project", &p.project_id), ("user", &p.user_id), ("key", &p.key_id)] {
        assert_eq!(ledger(kind, id.clone()).await, Some((200, 3_000, 2)), "{kind}");
    }

    let r = engine.reserve(&reserve(&p, "l3", 10, 0)).await.unwrap();
    engine.commit(&commit(&r.reservation_id, 5, 7)).await.unwrap();
    flusher.flush().await.unwrap();
    assert_eq!(ledger("key", p.key_id.clone()).await, Some((205, 3_007, 3)));

    // Charged usage is usage too, with all its requests.
    engine.charge(&charge(&p, "uploaded", 95, 993, 4)).await.unwrap();
    flusher.flush().await.unwrap();
    assert_eq!(ledger("key", p.key_id.clone()).await, Some((300, 4_000, 7)));
    assert_eq!(ledger("org", p.org_id.clone()).await, Some((300, 4_000, 7)));

    // Rows never go backwards: a stale lower write keeps the recorded values.
    let key_scope = meshgate_quota::model::Scope::new(meshgate_quota::model::ScopeKind::Key, p.key_id.clone()).unwrap();
    let stale =
        meshgate_quota::model::CounterState { used_tokens: 1, used_cost_micros: 1, requests: 1, ..Default::default() };
    Ledger::new(pool.clone()).write([(&key_scope, today, &stale)]).await.unwrap();
    assert_eq!(ledger("key", p.key_id.clone()).await, Some((300, 4_000, 7)));
}

fn per_minute(scope: pb::Scope, requests_per_minute: i64, tokens_per_minute: i64) -> pb::SetLimitsRequest {
    pb::SetLimitsRequest {
        scope: Some(scope),
        limits: Some(pb::Limits { requests_per_minute, tokens_per_minute, ..Default::default() }),
    }
}

async fn per_minute_limits_refuse_the_101st_request_with_an_exact_retry_after(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at("2031-05-06T10:00:00Z")));
    let harness = backend.harness(clock.clone() as SharedClock).await;
    // The shipped defaults: 100 requests a minute per user.
    let engine = harness.engine(EngineSettings::default());
    let p = principal();

    for i in 0..100 {
        let r = engine.reserve(&reserve(&p, &format!("q{i}"), 10, 0)).await.unwrap();
        assert!(r.admitted, "request {i} refused: {r:?}");
        assert_eq!(r.remaining_requests_this_minute, 99 - i64::from(i));
    }
    let refused = engine.reserve(&reserve(&p, "q100", 10, 0)).await.unwrap();
    assert!(!refused.admitted);
    assert_eq!(refused.rejected_limit, "requests_per_minute");
    assert_eq!(refused.rejected_scope, Some(scope(pb::ScopeKind::User, &p.user_id)));
    // The bucket drains one request every 600 ms.
    assert_eq!((refused.retry_after_ms, refused.retry_after_seconds), (600, 1));
    let reset = refused.reset_at.unwrap();
    assert_eq!(DateTime::from_timestamp(reset.seconds, reset.nanos as u32).unwrap(), at("2031-05-06T10:00:00.600Z"));
    // A refusal holds nothing: the daily counters only carry the 100 admitted.
    assert_eq!(status_of(&engine, &p, pb::ScopeKind::User).await.reserved_tokens, 1_000);

    clock.advance(Duration::from_millis(599));
    let early = engine.reserve(&reserve(&p, "q101", 10, 0)).await.unwrap();
    assert!(!early.admitted);
    assert_eq!(early.retry_after_ms, 1);
    clock.advance(Duration::from_millis(1));
    assert!(engine.reserve(&reserve(&p, "q102", 10, 0)).await.unwrap().admitted, "retry at the exact time");
    assert!(!engine.reserve(&reserve(&p, "q103", 10, 0)).await.unwrap().admitted);
    // Commits and releases do not give requests back; a full minute refills the bucket.
    clock.advance(Duration::from_secs(60));
    let status = status_of(&engine, &p, pb::ScopeKind::User).await;
    assert_eq!((status.requests_per_minute, status.remaining_requests_this_minute), (100, 100));
    assert_eq!(status.remaining_tokens_this_minute, -1, "no token rate limit is set");
}

async fn tokens_per_minute_count_the_estimate_then_the_actual_usage(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at("2031-05-06T10:00:00Z")));
    let harness = backend.harness(clock.clone() as SharedClock).await;
    let engine = harness.engine(settings());
    let p = principal();
    let key = scope(pb::ScopeKind::Key, &p.key_id);
    engine.set_limits(&per_minute(key.clone(), 0, 6_000)).await.unwrap();

    let big = engine.reserve(&reserve(&p, "big", 5_000, 0)).await.unwrap();
    assert!(big.admitted);
    let refused = engine.reserve(&reserve(&p, "more", 2_000, 0)).await.unwrap();
    assert_eq!(refused.rejected_limit, "tokens_per_minute");
    // 1,000 tokens over the limit drain in 10 s at 6,000 a minute.
    assert_eq!(refused.retry_after_ms, 10_000);
    // The reply used 500 tokens, not the 5,000 estimated: the bucket is corrected on commit.
    engine.commit(&commit(&big.reservation_id, 500, 0)).await.unwrap();
    assert_eq!(status_of(&engine, &p, pb::ScopeKind::Key).await.remaining_tokens_this_minute, 5_500);
    assert!(engine.reserve(&reserve(&p, "more", 2_000, 0)).await.unwrap().admitted);
    // A release gives the whole estimate back.
    let released = engine.reserve(&reserve(&p, "rel", 3_000, 0)).await.unwrap();
    assert!(released.admitted);
    engine.release(&pb::ReleaseRequest { reservation_id: released.reservation_id }).await.unwrap();
    assert_eq!(status_of(&engine, &p, pb::ScopeKind::Key).await.remaining_tokens_this_minute, 3_500);
    // An estimate above the limit never fits: a whole window to wait.
    let never = engine.reserve(&reserve(&p, "never", 6_001, 0)).await.unwrap();
    assert_eq!((never.rejected_limit.as_str(), never.retry_after_ms), ("tokens_per_minute", 60_000));
}

async fn an_org_time_zone_moves_the_daily_window(backend: Backend) {
    // 14:59:59 UTC is 23:59:59 in Tokyo.
    let clock = Arc::new(ManualClock::new(at("2031-05-06T14:59:59Z")));
    let harness = backend.harness(clock.clone() as SharedClock).await;
    let engine = harness.engine(settings());
    let p = principal();
    let org = pb::SetLimitsRequest {
        scope: Some(scope(pb::ScopeKind::Org, &p.org_id)),
        limits: Some(pb::Limits { tokens_per_day: 100, time_zone: "Asia/Tokyo".into(), ..Default::default() }),
    };
    let set = engine.set_limits(&org).await.unwrap();
    assert_eq!(set.limits.unwrap().time_zone, "Asia/Tokyo");

    let r = engine.reserve(&reserve(&p, "late", 100, 0)).await.unwrap();
    assert!(r.admitted);
    engine.commit(&commit(&r.reservation_id, 100, 0)).await.unwrap();
    let refused = engine.reserve(&reserve(&p, "refused", 1, 0)).await.unwrap();
    assert_eq!(refused.rejected_limit, "tokens_per_day");
    assert_eq!(refused.retry_after_seconds, 1);
    let reset = refused.reset_at.unwrap();
    assert_eq!(DateTime::from_timestamp(reset.seconds, 0).unwrap(), at("2031-05-06T15:00:00Z"));

    // Midnight in Tokyo, mid-afternoon in UTC: a new window for the org and all its scopes.
    clock.advance(Duration::from_secs(1));
    let next = engine.reserve(&reserve(&p, "next", 60, 0)).await.unwrap();
    assert!(next.admitted, "{next:?}");
    let org_status = status_of(&engine, &p, pb::ScopeKind::Org).await;
    assert_eq!((org_status.used_tokens, org_status.reserved_tokens), (0, 60));
    assert_eq!(org_status.time_zone, "Asia/Tokyo");
    let key_status = status_of(&engine, &p, pb::ScopeKind::Key).await;
    let reset = key_status.reset_at.unwrap();
    assert_eq!(DateTime::from_timestamp(reset.seconds, 0).unwrap(), at("2031-05-07T15:00:00Z"));
}

/// Redis restarted empty (or FLUSHALL) a moment after answering: every answered charge — commits,
/// charges, lease settlements — is in the ledger already, with no flush in between, so the
/// rebuilt counters are exact.
async fn a_store_that_loses_everything_keeps_every_answered_charge(backend: Backend) {
    let mut harness = backend.harness(system_clock()).await;
    let engine = harness.engine_with_ledger(settings()).await;
    let p = principal();
    engine.set_limits(&set_limits(scope(pb::ScopeKind::Key, &p.key_id), 1_000, 0)).await.unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (engine, p) = (engine.clone(), p.clone());
            tokio::spawn(async move {
                let r = engine.reserve(&reserve(&p, &format!("c{i}"), 20, 0)).await.unwrap();
                engine.commit(&commit(&r.reservation_id, 10, 3)).await.unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    engine.charge(&charge(&p, "uploaded", 45, 5, 2)).await.unwrap();
    let lease = |sequence, spent| pb::LeaseRequest {
        lease_id: "replica-1".into(),
        principal: Some(p.clone()),
        sequence,
        spent,
        want: Some(pb::LeaseAmounts { tokens: 80, ..Default::default() }),
        ..Default::default()
    };
    engine.lease(&lease(1, None)).await.unwrap();
    let spent = Some(pb::LeaseSpent { tokens: 33, cost_micros: 7, started_requests: 2, settled_requests: 2 });
    engine.lease(&lease(2, spent)).await.unwrap();

    harness.lose_counters();
    let engine = harness.engine_with_ledger(settings()).await;
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!(
        (key.used_tokens, key.used_cost_micros, key.requests_today),
        (20 * 10 + 45 + 33, 20 * 3 + 5 + 7, 20 + 2 + 2),
        "usage answered before the loss must survive it"
    );
}

async fn lost_counters_come_back_from_the_ledger(backend: Backend) {
    let mut harness = backend.harness(system_clock()).await;
    let engine = harness.engine_with_ledger(settings()).await;
    let flusher = |engine: &meshgate_quota::QuotaEngine, pool| {
        LedgerFlusher::new(
            engine.store().clone(),
            Ledger::new(pool),
            100,
            Duration::from_secs(60),
            QuotaMetrics::new(&meshgate_runtime::Metrics::new("quota")),
        )
    };
    let pool = harness.pool().await;
    let p = principal();
    engine.set_limits(&set_limits(scope(pb::ScopeKind::Key, &p.key_id), 1_000, 0)).await.unwrap();
    let done = engine.reserve(&reserve(&p, "done", 700, 0)).await.unwrap();
    engine.commit(&commit(&done.reservation_id, 600, 42)).await.unwrap();
    flusher(&engine, pool.clone()).flush().await.unwrap();
    // Reserved before the loss, committed after it.
    let in_flight = engine.reserve(&reserve(&p, "in-flight", 300, 0)).await.unwrap();
    assert!(in_flight.admitted);

    harness.lose_counters();
    let engine = harness.engine_with_ledger(settings()).await;

    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.used_cost_micros, key.requests_today), (600, 42, 1), "not back to zero");
    let refused = engine.reserve(&reserve(&p, "too-much", 500, 0)).await.unwrap();
    assert!(!refused.admitted, "the rebuilt counter must still enforce the day's usage");

    // The gateway's commit names the principal, so usage of a lost reservation is charged, once.
    let mut late = commit(&in_flight.reservation_id, 250, 8);
    late.principal = Some(p.clone());
    let charged = engine.commit(&late).await.unwrap();
    assert_eq!(charged.remaining_tokens, 150);
    engine.commit(&late).await.unwrap();
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.used_cost_micros, key.requests_today), (850, 50, 2));
    // Without a principal a lost reservation stays an error.
    let err = engine.commit(&commit(&meshgate_quota::reservation_id(&p, "gone"), 1, 0)).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotFound);

    flusher(&engine, pool.clone()).flush().await.unwrap();
    let client = postgres_client(&pool).await.unwrap();
    let row = client
        .query_one(
            "SELECT tokens, requests FROM usage_ledger WHERE scope_kind = 'key' AND scope_id = $1 AND day = $2",
            &[&p.key_id, &Utc::now().date_naive()],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (850, 2));
}

async fn charge_adds_usage_to_every_scope_once_per_charge_id(backend: Backend) {
    let harness = backend.harness(system_clock()).await;
    let engine = harness.engine(settings());
    let p = principal();
    engine.set_limits(&set_limits(scope(pb::ScopeKind::Key, &p.key_id), 1_000, 50_000)).await.unwrap();

    let charged = engine.charge(&charge(&p, "edge-upload-1", 301, 7_000, 3)).await.unwrap();
    assert!(!charged.replay);
    assert_eq!((charged.remaining_tokens, charged.remaining_cost_micros), (699, 43_000));
    for kind in [pb::ScopeKind::Org, pb::ScopeKind::Project, pb::ScopeKind::User, pb::ScopeKind::Key] {
        let s = status_of(&engine, &p, kind).await;
        assert_eq!(
            (s.used_tokens, s.used_cost_micros, s.requests_today, s.reserved_tokens),
            (301, 7_000, 3, 0),
            "{kind:?}"
        );
    }

    // A replay changes nothing and says so, with the same remaining figures.
    let replay = engine.charge(&charge(&p, "edge-upload-1", 301, 7_000, 3)).await.unwrap();
    assert!(replay.replay);
    assert_eq!((replay.remaining_tokens, replay.remaining_cost_micros), (699, 43_000));
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.used_cost_micros, key.requests_today), (301, 7_000, 3));

    // 0 requests counts as one; total_tokens wins over prompt + completion.
    let mut job = charge(&p, "async-job-9", 0, 0, 0);
    job.usage = Some(meshgate_proto::common::v1::Usage {
        prompt_tokens: 5,
        completion_tokens: 5,
        total_tokens: 40,
        cost_micros: 1,
        ..Default::default()
    });
    assert!(!engine.charge(&job).await.unwrap().replay);
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.used_cost_micros, key.requests_today), (341, 7_001, 4));

    // Charge ids are the principal's own: another tenant's equal id is charged, and a charge id
    // equal to a reservation id leaves that reservation alone.
    let other = principal();
    assert!(!engine.charge(&charge(&other, "edge-upload-1", 10, 0, 1)).await.unwrap().replay);
    assert_eq!(status_of(&engine, &other, pb::ScopeKind::Key).await.used_tokens, 10);
    let held = engine.reserve(&reserve(&p, "held", 100, 0)).await.unwrap();
    assert!(!engine.charge(&charge(&p, &held.reservation_id, 9, 0, 1)).await.unwrap().replay);
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.reserved_tokens), (350, 100));
    engine.commit(&commit(&held.reservation_id, 50, 0)).await.unwrap();
    assert_eq!(status_of(&engine, &p, pb::ScopeKind::Key).await.used_tokens, 400);
}

async fn a_charge_over_the_budget_is_recorded_and_refuses_the_next_reserve(backend: Backend) {
    let harness = backend.harness(system_clock()).await;
    let engine = harness.engine(settings());
    let p = principal();
    engine.set_limits(&set_limits(scope(pb::ScopeKind::Key, &p.key_id), 1_000, 0)).await.unwrap();

    // The usage already happened: it is charged even past the limit.
    let charged = engine.charge(&charge(&p, "offline-day", 1_500, 0, 20)).await.unwrap();
    assert!(!charged.replay);
    assert_eq!(charged.remaining_tokens, 0);
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.requests_today, key.remaining_tokens), (1_500, 20, 0));
    let refused = engine.reserve(&reserve(&p, "next", 1, 0)).await.unwrap();
    assert!(!refused.admitted);
    assert_eq!(refused.rejected_limit, "tokens_per_day");
    assert_eq!(refused.rejected_scope, Some(scope(pb::ScopeKind::Key, &p.key_id)));
}

async fn charge_ids_are_forgotten_after_the_charge_retention(backend: Backend) {
    let harness = backend.harness(system_clock()).await;
    let retention = Duration::from_millis(300);
    let engine = harness.engine(EngineSettings { charge_retention: retention, ..settings() });
    let p = principal();

    assert!(!engine.charge(&charge(&p, "c-1", 10, 1, 1)).await.unwrap().replay);
    assert!(engine.charge(&charge(&p, "c-1", 10, 1, 1)).await.unwrap().replay);
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(!engine.charge(&charge(&p, "c-1", 10, 1, 1)).await.unwrap().replay, "the charge id was not forgotten");
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.used_cost_micros, key.requests_today), (20, 2, 2));
}

async fn invalid_charges_are_refused_and_write_nothing(backend: Backend) {
    let harness = backend.harness(system_clock()).await;
    let engine = harness.engine(settings());
    let p = principal();

    let invalid = |req: pb::ChargeRequest| {
        let engine = engine.clone();
        async move {
            let err = engine.charge(&req).await.unwrap_err();
            assert_eq!(err.code(), ErrorCode::InvalidRequest, "{err}");
        }
    };
    invalid(charge(&p, "", 1, 0, 1)).await;
    invalid(charge(&p, &"x".repeat(300), 1, 0, 1)).await;
    invalid(charge(&p, "bad\nid", 1, 0, 1)).await;
    invalid(pb::ChargeRequest { principal: None, ..charge(&p, "c", 1, 0, 1) }).await;
    let mut no_org = p.clone();
    no_org.org_id.clear();
    invalid(charge(&no_org, "c", 1, 0, 1)).await;
    invalid(pb::ChargeRequest { usage: None, ..charge(&p, "c", 1, 0, 1) }).await;
    invalid(charge(&p, "c", -2, 0, 1)).await;
    invalid(charge(&p, "c", 1, -1, 1)).await;
    invalid(charge(&p, "c", i64::MAX, 0, 1)).await;
    invalid(charge(&p, "c", 1, 0, -1)).await;
    invalid(charge(&p, "c", 1, 0, 1_000_001)).await;

    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.used_cost_micros, key.requests_today), (0, 0, 0));
    // Nothing was recorded under the refused ids either.
    assert!(!engine.charge(&charge(&p, "c", 1, 0, 1_000_000)).await.unwrap().replay);
    assert_eq!(status_of(&engine, &p, pb::ScopeKind::Key).await.requests_today, 1_000_000);
}

/// A queued job's reservation asks for a lifetime longer than a request's: it holds that long,
/// and never longer than the service's cap.
async fn a_reservation_holds_for_the_lifetime_it_asks_for_up_to_the_cap(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at("2031-05-06T08:00:00Z")));
    let harness = backend.harness(clock.clone() as SharedClock).await;
    let engine = harness.engine(EngineSettings {
        reservation_ttl: Duration::from_secs(300),
        max_reservation_ttl: Duration::from_secs(3_600),
        ..settings()
    });
    let p = principal();
    let request = engine.reserve(&reserve(&p, "request", 1, 0)).await.unwrap();
    let job = engine.reserve(&pb::ReserveRequest { ttl_seconds: 1_800, ..reserve(&p, "job", 100, 7) }).await.unwrap();
    let greedy =
        engine.reserve(&pb::ReserveRequest { ttl_seconds: 30 * 86_400, ..reserve(&p, "greedy", 10, 0) }).await.unwrap();
    assert!(request.admitted && job.admitted && greedy.admitted);
    let held = |kind| {
        let engine = engine.clone();
        let p = p.clone();
        async move {
            let s = status_of(&engine, &p, kind).await;
            (s.reserved_tokens, s.reserved_cost_micros)
        }
    };
    assert_eq!(held(pb::ScopeKind::Project).await, (111, 7));

    clock.advance(Duration::from_secs(301));
    assert_eq!(held(pb::ScopeKind::Project).await, (110, 7), "the request's hold ends after the default ttl");
    clock.advance(Duration::from_secs(1_500));
    assert_eq!(held(pb::ScopeKind::Key).await, (10, 0), "the job's after the 30 minutes it asked for");
    clock.advance(Duration::from_secs(1_800));
    assert_eq!(held(pb::ScopeKind::Org).await, (0, 0), "and the greedy one at the one-hour cap");

    // Committed (with its principal) after its hold ended, the job is still charged, once.
    let late = pb::CommitRequest { principal: Some(p.clone()), ..commit(&job.reservation_id, 40, 3) };
    engine.commit(&late).await.unwrap();
    engine.commit(&late).await.unwrap();
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!((key.used_tokens, key.used_cost_micros, key.reserved_tokens), (40, 3, 0));

    let negative = engine.reserve(&pb::ReserveRequest { ttl_seconds: -1, ..reserve(&p, "neg", 1, 0) }).await;
    assert_eq!(negative.unwrap_err().code(), ErrorCode::InvalidRequest);
}

/// An empty org, project or key never stands for "every tenant" nor leaves a budget out: every
/// operation that names a scope refuses it, and nothing is written.
async fn an_empty_tenant_id_is_refused_by_every_operation(backend: Backend) {
    let harness = backend.harness(system_clock()).await;
    let engine = harness.engine(settings());
    let p = principal();
    let invalid = |err: meshgate_quota::Error| assert_eq!(err.code(), ErrorCode::InvalidRequest, "{err}");
    for field in ["org", "project", "key"] {
        let mut partial = p.clone();
        match field {
            "org" => partial.org_id.clear(),
            "project" => partial.project_id.clear(),
            _ => partial.key_id.clear(),
        }
        invalid(engine.reserve(&reserve(&partial, "r", 1, 0)).await.unwrap_err());
        invalid(engine.charge(&charge(&partial, "c", 1, 0, 1)).await.unwrap_err());
        invalid(engine.status(&pb::StatusRequest { principal: Some(partial.clone()) }).await.unwrap_err());
        let lost = pb::CommitRequest { principal: Some(partial), ..commit("rsv_lost", 1, 0) };
        invalid(engine.commit(&lost).await.unwrap_err());
    }
    for kind in [pb::ScopeKind::Org, pb::ScopeKind::Project, pb::ScopeKind::User, pb::ScopeKind::Key] {
        invalid(engine.set_limits(&set_limits(scope(kind, ""), 1, 0)).await.unwrap_err());
    }
    for kind in [pb::ScopeKind::Org, pb::ScopeKind::Project, pb::ScopeKind::Key] {
        let s = status_of(&engine, &p, kind).await;
        assert_eq!((s.used_tokens, s.reserved_tokens, s.requests_today), (0, 0, 0), "{kind:?}");
    }
}

backend_tests!(
    concurrent_reserves_never_exceed_the_limit,
    commit_and_release_arithmetic,
    expired_reservations_are_reclaimed,
    the_window_resets_at_utc_midnight,
    reserve_is_idempotent_by_request_id,
    set_limits_applies_to_the_next_reserve_on_another_replica,
    every_scope_must_admit_and_a_refusal_changes_nothing,
    invalid_input_is_refused_and_writes_nothing,
    the_ledger_receives_committed_usage,
    per_minute_limits_refuse_the_101st_request_with_an_exact_retry_after,
    tokens_per_minute_count_the_estimate_then_the_actual_usage,
    an_org_time_zone_moves_the_daily_window,
    lost_counters_come_back_from_the_ledger,
    a_store_that_loses_everything_keeps_every_answered_charge,
    charge_adds_usage_to_every_scope_once_per_charge_id,
    a_charge_over_the_budget_is_recorded_and_refuses_the_next_reserve,
    charge_ids_are_forgotten_after_the_charge_retention,
    invalid_charges_are_refused_and_write_nothing,
    a_reservation_holds_for_the_lifetime_it_asks_for_up_to_the_cap,
    an_empty_tenant_id_is_refused_by_every_operation,
);
