//! Behaviour every quota store must show, run against both the Redis store (real Redis, limits in
//! real Postgres) and the in-memory store, through the engine.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{Backend, commit, principal, reserve, scope, set_limits, status_of};
use meshgate_proto::quota::v1 as pb;
use meshgate_quota::{EngineSettings, LedgerFlusher, LedgerWriter, QuotaMetrics};
use meshgate_runtime::ErrorCode;
use meshgate_storage::{ManualClock, SharedClock, postgres_client, system_clock};

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

fn settings() -> EngineSettings {
    EngineSettings { limits_cache_ttl: Duration::from_secs(3600), ..EngineSettings::default() }
}

async fn concurrent_reserves_never_exceed_the_limit(backend: Backend) {
    let harness = backend.harness(system_clock(), Duration::from_secs(300)).await;
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
    let harness = backend.harness(system_clock(), Duration::from_secs(300)).await;
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
    let harness = backend.harness(system_clock(), ttl).await;
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
    let harness = backend.harness(clock.clone() as SharedClock, Duration::from_secs(300)).await;
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
    let harness = backend.harness(system_clock(), Duration::from_secs(300)).await;
    let engine = harness.engine(settings());
    let p = principal();

    let first = engine.reserve(&reserve(&p, "same", 250, 10)).await.unwrap();
    let again = engine.reserve(&reserve(&p, "same", 250, 10)).await.unwrap();
    assert!(first.admitted && again.admitted);
    assert_eq!(first.reservation_id, again.reservation_id);
    assert_eq!(first.reservation_id, meshgate_quota::reservation_id(&p, "same"));
    let key = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!(key.reserved_tokens, 250);
    assert_eq!(key.tokens_per_day, 1_000_000, "the configured default applies without an override");

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
    let harness = backend.harness(system_clock(), Duration::from_secs(300)).await;
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
    let harness = backend.harness(system_clock(), Duration::from_secs(300)).await;
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
    let harness = backend.harness(system_clock(), Duration::from_secs(300)).await;
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
    let per_minute = pb::SetLimitsRequest {
        scope: Some(key.clone()),
        limits: Some(pb::Limits { tokens_per_day: 5, requests_per_minute: 100, ..Default::default() }),
    };
    invalid(ErrorCode::NotImplemented, engine.set_limits(&per_minute).await.unwrap_err());

    let no_usage = pb::CommitRequest { reservation_id: "rsv_x".into(), usage: None };
    invalid(ErrorCode::InvalidRequest, engine.commit(&no_usage).await.unwrap_err());
    invalid(ErrorCode::InvalidRequest, engine.commit(&commit("rsv_x", -3, 0)).await.unwrap_err());
    invalid(ErrorCode::InvalidRequest, engine.release(&pb::ReleaseRequest::default()).await.unwrap_err());

    let key_status = status_of(&engine, &p, pb::ScopeKind::Key).await;
    assert_eq!(key_status.tokens_per_day, 700, "a refused SetLimits changed the limit");
    assert_eq!((key_status.used_tokens, key_status.reserved_tokens), (0, 0));
}

async fn the_ledger_receives_committed_usage(backend: Backend) {
    let harness = backend.harness(system_clock(), Duration::from_secs(300)).await;
    let engine = harness.engine(settings());
    let pool = harness.pool().await;
    let flusher = LedgerFlusher::new(
        engine.store().clone(),
        LedgerWriter::new(pool.clone()),
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

    // Rows never go backwards: a stale lower write keeps the recorded values.
    let stale = meshgate_quota::store::DirtyUsage {
        scope: meshgate_quota::model::Scope::new(meshgate_quota::model::ScopeKind::Key, p.key_id.clone()).unwrap(),
        day: today,
        usage: meshgate_quota::model::CounterState {
            used_tokens: 1,
            used_cost_micros: 1,
            requests: 1,
            ..Default::default()
        },
        version: 0,
    };
    LedgerWriter::new(pool.clone()).write(&[stale]).await.unwrap();
    assert_eq!(ledger("key", p.key_id.clone()).await, Some((205, 3_007, 3)));
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
);
