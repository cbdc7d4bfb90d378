//! The durable queue on both stores: the retry schedule and dead letters under an injected clock,
//! bad provider answers, exclusive claims, and the gRPC API over a running service.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use meshgate_catalog::UnknownParams;
use meshgate_mock_provider::{Behavior, MockProvider, PromptCache, StreamFault};
use meshgate_proto::common::v1::{ChatMessage, ChatOptions, SamplingParams, Target, ToolDefinition};
use meshgate_proto::sync::v1::sync_client::SyncClient;
use meshgate_proto::sync::v1::{EnqueueRequest, GetJobRequest, JobStatus, ListJobsRequest, RetryJobRequest};
use meshgate_runtime::error::ERROR_CODE_METADATA;
use meshgate_runtime::{Listeners, Shutdown};
use meshgate_storage::{Clock, ManualClock};
use meshgate_sync::queue::{JobRecord, from_micros};
use meshgate_sync::service::IDEMPOTENT_REPLAY_METADATA;
use meshgate_sync::{Config, ProviderSpec};
use tonic::Code;

fn start() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2031-05-01T12:00:00Z").unwrap().to_utc()
}

fn config(max_attempts: u32) -> Config {
    let mut config = Config { providers_from_env: false, ..Config::default() };
    config.queue.max_attempts = max_attempts;
    config
}

async fn job(queue: &meshgate_sync::Queue, id: &str) -> JobRecord {
    queue.store().get(id, PROJECT).await.unwrap().unwrap()
}

async fn retry_schedule_and_dead_letters(kind: StoreKind) {
    let mock = MockProvider::start().await.unwrap();
    mock.set_failures(1.0, 500);
    let (store, _dir) = store(kind).await;
    let clock = Arc::new(ManualClock::new(start()));
    let queue = queue(store, &[provider("mock", &mock)], clock.clone(), &config(8));
    let dispatcher = queue.dispatcher().clone();

    let upstream = meshgate_sync::Upstream::new(&config(8), &[provider("mock", &mock)], Default::default()).unwrap();
    let (created, fresh) = queue.enqueue(&upstream, enqueue_request("order-1", "mock", "hello queue")).await.unwrap();
    assert!(fresh);
    assert_eq!(created.job_status(), JobStatus::Queued);
    assert_eq!(from_micros(created.next_attempt_at_us), start());

    // Eight attempts, 1 s·2ⁿ apart and capped at 30 s, then a dead letter.
    let mut waits = Vec::new();
    for attempt in 1..=8 {
        assert_eq!(dispatcher.run_once().await.unwrap(), 1, "attempt {attempt} is due");
        let current = job(&queue, &created.id).await;
        assert_eq!(current.attempts, attempt);
        assert!(current.last_error.contains("500"), "{}", current.last_error);
        assert_eq!(current.last_error_code, "upstream_error");
        if attempt == 8 {
            assert_eq!(current.job_status(), JobStatus::Dead);
            break;
        }
        assert_eq!(current.job_status(), JobStatus::Queued);
        let wait = from_micros(current.next_attempt_at_us) - clock.now();
        waits.push(wait.num_milliseconds());
        // Not due a millisecond early.
        clock.advance(Duration::from_millis(wait.num_milliseconds() as u64 - 1));
        assert_eq!(dispatcher.run_once().await.unwrap(), 0);
        clock.advance(Duration::from_millis(1));
    }
    assert_eq!(waits, [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000]);
    assert_eq!(mock.requests_total(), 8);
    assert_eq!(mock.count_for_idempotency_key(&created.id), 8, "every attempt carries the job id as its key");

    // The dead letter is listed, stays put, and comes back with a fresh budget when retried.
    clock.advance(Duration::from_secs(3600));
    assert_eq!(dispatcher.run_once().await.unwrap(), 0);
    let dead = queue
        .list(ListJobsRequest { project_id: PROJECT.into(), status: JobStatus::Dead as i32, limit: 0 })
        .await
        .unwrap();
    assert_eq!(dead.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), [created.id.as_str()]);
    let queued = queue
        .list(ListJobsRequest { project_id: PROJECT.into(), status: JobStatus::Queued as i32, limit: 0 })
        .await
        .unwrap();
    assert!(queued.is_empty());

    mock.set_failures(0.0, 500);
    let revived = queue.retry(retry_request(&created.id)).await.unwrap();
    assert_eq!((revived.job_status(), revived.attempts), (JobStatus::Queued, 0));
    assert_eq!(dispatcher.run_once().await.unwrap(), 1);
    let done = job(&queue, &created.id).await;
    assert_eq!(done.job_status(), JobStatus::Succeeded);
    assert_eq!(done.attempts, 1);
    assert_eq!(done.last_error, "");
    let view = done.to_proto();
    assert_eq!(view.result, "echo: hello queue");
    assert_eq!(view.finish_reason, "stop");
    assert_eq!(view.provider, "mock");
    assert_eq!(view.usage.unwrap().completion_tokens, 3);
    assert_eq!(from_micros(done.finished_at_us), clock.now());

    let err = queue.retry(retry_request(&created.id)).await.unwrap_err();
    assert_eq!(err.code(), meshgate_runtime::ErrorCode::Conflict, "{err}");
    let err = queue.retry(retry_request("0190f0e1-0000-7000-8000-000000000000")).await.unwrap_err();
    assert_eq!(err.code(), meshgate_runtime::ErrorCode::NotFound, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_schedule_and_dead_letters_on_postgres() {
    retry_schedule_and_dead_letters(StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_schedule_and_dead_letters_on_disk() {
    retry_schedule_and_dead_letters(StoreKind::File).await;
}

/// A change of the mock's behaviour.
type Edit = dyn Fn(&mut Behavior);

async fn bad_answers_leave_a_clear_error_and_lose_nothing(kind: StoreKind) {
    let mock = MockProvider::start_with(Behavior { garbage: true, ..Behavior::default() }).await.unwrap();
    let (store, _dir) = store(kind).await;
    let clock = Arc::new(ManualClock::new(start()));
    let cfg = config(8);
    let queue = queue(store, &[provider("mock", &mock)], clock.clone(), &cfg);
    let upstream = meshgate_sync::Upstream::new(&cfg, &[provider("mock", &mock)], Default::default()).unwrap();
    let (created, _) = queue.enqueue(&upstream, enqueue_request("", "mock", "one two three four")).await.unwrap();

    let cases: [(&Edit, &str); 4] = [
        (&|_| {}, "malformed chunk"),
        (
            &|b| {
                b.garbage = false;
                b.fail_after_chunks = Some(2);
                b.stream_fault = StreamFault::Close;
            },
            "before [DONE]",
        ),
        (&|b| b.stream_fault = StreamFault::Abort, "mid-stream"),
        (&|b| b.stream_fault = StreamFault::ErrorEvent, "mid-stream failure injected"),
    ];
    for (attempt, (edit, expected)) in cases.into_iter().enumerate() {
        mock.update(edit);
        assert_eq!(queue.dispatcher().run_once().await.unwrap(), 1);
        let current = job(&queue, &created.id).await;
        assert_eq!(current.job_status(), JobStatus::Queued, "{expected}: back in the queue");
        assert_eq!(current.attempts, attempt as i32 + 1);
        assert!(current.last_error.contains(expected), "{expected}: {}", current.last_error);
        clock.advance(Duration::from_secs(60));
    }
    mock.update(|b| b.fail_after_chunks = None);
    assert_eq!(queue.dispatcher().run_once().await.unwrap(), 1);
    let done = job(&queue, &created.id).await;
    assert_eq!(done.job_status(), JobStatus::Succeeded);
    assert_eq!(done.to_proto().result, "echo: one two three four");

    // A request the provider rejects cannot succeed later: a dead letter at once.
    mock.set_failures(0.0, 400);
    mock.fail_next(1);
    let (rejected, _) = queue.enqueue(&upstream, enqueue_request("", "mock", "rejected")).await.unwrap();
    assert_eq!(queue.dispatcher().run_once().await.unwrap(), 1);
    let rejected = job(&queue, &rejected.id).await;
    assert_eq!((rejected.job_status(), rejected.attempts), (JobStatus::Dead, 1));
    assert_eq!(rejected.last_error_code, "invalid_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_answers_leave_a_clear_error_and_lose_nothing_on_postgres() {
    bad_answers_leave_a_clear_error_and_lose_nothing(StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_answers_leave_a_clear_error_and_lose_nothing_on_disk() {
    bad_answers_leave_a_clear_error_and_lose_nothing(StoreKind::File).await;
}

/// A job carries the canonical request like a call: its tools, sampling and unknown parameters
/// reach the provider shaped by the listed target of the provider's model; the stored result keeps
/// the tool calls, the reasoning, the usage details (cached prompt tokens charged at the cached
/// price) and what the provider's body left out. A context overflow is a dead letter at once.
async fn agent_jobs_keep_tool_calls_and_usage_details(kind: StoreKind) {
    let mock = MockProvider::start_with(Behavior {
        prompt_cache: Some(PromptCache { read_tokens: 4, write_tokens: 0 }),
        context_window: Some(60),
        ..Behavior::default()
    })
    .await
    .unwrap();
    let (store, _dir) = store(kind).await;
    let clock = Arc::new(ManualClock::new(start()));
    let dropping = ProviderSpec { unknown_params: Some(UnknownParams::Drop), ..provider("mock", &mock) };
    let queue = queue(store, std::slice::from_ref(&dropping), clock.clone(), &config(3));
    let upstream = meshgate_sync::Upstream::new(&config(3), &[dropping], Default::default()).unwrap();
    let price = Target {
        max_tokens_param: "max_completion_tokens".into(),
        cached_input_price_micros_per_mtok: 100_000,
        capabilities: vec!["tools".into(), "reasoning".into()],
        ..mock_price()
    };
    let tool = ToolDefinition {
        name: "lookup_order".into(),
        parameters_json: r#"{"type":"object","properties":{"order_id":{"type":"integer"}},"required":["order_id"]}"#
            .into(),
        ..ToolDefinition::default()
    };
    let mut request = completion("", "where is my order");
    request.sampling = Some(SamplingParams { max_tokens: Some(40), ..SamplingParams::default() });
    request.options = Some(ChatOptions {
        tools: vec![tool],
        reasoning_effort: "low".into(),
        extra_json: r#"{"priority": "batch"}"#.into(),
        ..ChatOptions::default()
    });
    let enqueue = EnqueueRequest { prices: vec![price], request: Some(request.clone()), ..enqueue_request("", "", "") };
    let (created, _) = queue.enqueue(&upstream, enqueue).await.unwrap();
    assert_eq!(queue.dispatcher().run_once().await.unwrap(), 1);
    let done = job(&queue, &created.id).await.to_proto();
    assert_eq!(done.status, JobStatus::Succeeded as i32, "{done:?}");
    assert_eq!(done.finish_reason, "tool_calls");
    assert_eq!(done.tool_calls.len(), 1);
    let call = &done.tool_calls[0];
    assert_eq!(call.function_name, "lookup_order");
    let arguments: serde_json::Value = serde_json::from_str(&call.arguments_json).unwrap();
    assert!(arguments["order_id"].is_i64(), "{arguments}");
    assert!(!done.reasoning_content.is_empty());
    assert_eq!(done.dropped_params, ["priority"]);
    let usage = done.usage.unwrap();
    assert_eq!(usage.cached_prompt_tokens, 4);
    assert!(usage.reasoning_tokens > 0);
    // 1 µ$ a prompt token, 0.1 µ$ a cached one, 2 µ$ a completion token (rounded up).
    let expected = ((usage.prompt_tokens - 4) * 10 + 4 + usage.completion_tokens * 20 + 9) / 10;
    assert_eq!(usage.cost_micros, expected, "{usage:?}");
    let body = mock.last_request().unwrap().json().unwrap();
    assert_eq!(body["max_completion_tokens"], 40, "shaped by the listed target");
    assert_eq!(body["tools"][0]["function"]["name"], "lookup_order");
    assert!(body.get("priority").is_none());

    // The call's result as a second job: text.
    let mut follow_up = request.clone();
    follow_up.messages.push(ChatMessage {
        role: "assistant".into(),
        tool_calls: done.tool_calls.clone(),
        ..ChatMessage::default()
    });
    follow_up.messages.push(ChatMessage {
        role: "tool".into(),
        tool_call_id: call.id.clone(),
        content: "shipped yesterday".into(),
        ..ChatMessage::default()
    });
    let enqueue = EnqueueRequest { request: Some(follow_up), ..enqueue_request("", "", "") };
    let (second, _) = queue.enqueue(&upstream, enqueue).await.unwrap();
    assert_eq!(queue.dispatcher().run_once().await.unwrap(), 1);
    let answered = job(&queue, &second.id).await.to_proto();
    assert_eq!((answered.result.as_str(), answered.finish_reason.as_str()), ("echo: shipped yesterday", "stop"));

    // A prompt the model cannot hold will never fit it: dead at once.
    let long = "word ".repeat(80);
    let (third, _) = queue.enqueue(&upstream, enqueue_request("", "", &long)).await.unwrap();
    assert_eq!(queue.dispatcher().run_once().await.unwrap(), 1);
    let dead = job(&queue, &third.id).await;
    assert_eq!((dead.job_status(), dead.attempts), (JobStatus::Dead, 1));
    assert_eq!(dead.last_error_code, "context_length_exceeded");
    assert!(dead.last_error.starts_with("`messages` does not fit"), "{}", dead.last_error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_jobs_keep_tool_calls_and_usage_details_on_postgres() {
    agent_jobs_keep_tool_calls_and_usage_details(StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_jobs_keep_tool_calls_and_usage_details_on_disk() {
    agent_jobs_keep_tool_calls_and_usage_details(StoreKind::File).await;
}

/// A queue over `store` delivering to the `mock` provider and settling jobs with the quota service
/// at `quota` (which need not be up yet).
fn charging_queue(
    store: Arc<dyn meshgate_sync::JobStore>,
    providers: &[ProviderSpec],
    clock: Arc<ManualClock>,
    cfg: &Config,
    quota: &str,
) -> meshgate_sync::Queue {
    let channel = meshgate_runtime::channel(quota, Duration::from_secs(1)).unwrap();
    let charger = meshgate_sync::Charger::new(
        meshgate_proto::quota::v1::quota_client::QuotaClient::new(channel),
        Duration::from_secs(1),
    );
    let upstream = meshgate_sync::Upstream::new(cfg, providers, Default::default()).unwrap();
    let metrics = meshgate_sync::QueueMetrics::new();
    let dispatcher =
        meshgate_sync::Dispatcher::new(store.clone(), upstream, clock.clone(), cfg.queue.dispatcher(), metrics.clone())
            .charging(charger);
    meshgate_sync::Queue::new(store, dispatcher, clock, cfg.queue.max_attempts as i32, metrics)
}

/// A delivered job whose charge fails is never delivered again: the outcome is kept ("charge
/// pending", spending no attempt even on its last one) and only the charge is retried until it
/// lands — here on a quota service that restarted without the job's reservation, which commits
/// it with the job's principal, once.
async fn a_failed_charge_is_retried_without_a_second_delivery(kind: StoreKind) {
    let mock = MockProvider::start().await.unwrap();
    let (store, _dir) = store(kind).await;
    let clock = Arc::new(ManualClock::new(start()));
    let cfg = config(1);
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let queue = charging_queue(store, &[provider("mock", &mock)], clock.clone(), &cfg, &format!("http://{free}"));
    let upstream = meshgate_sync::Upstream::new(&cfg, &[provider("mock", &mock)], Default::default()).unwrap();
    let (gone, gone_shutdown) = quota_service("127.0.0.1:0".parse().unwrap()).await;
    let reservation = admit(&gone, &principal(), "job-1", 1_000, 5_000).await;
    gone_shutdown.trigger();
    let request = EnqueueRequest { reservation: Some(reservation.clone()), ..enqueue_request("", "mock", "charge me") };
    let (created, _) = queue.enqueue(&upstream, request).await.unwrap();
    assert_eq!(
        (created.reservation_id.as_str(), created.reservation_open),
        (reservation.reservation_id.as_str(), true)
    );

    // Delivered on its one and only attempt; the quota service is not there.
    assert_eq!(queue.dispatcher().run_once().await.unwrap(), 1);
    let pending = job(&queue, &created.id).await;
    assert_eq!((pending.job_status(), pending.attempts), (JobStatus::Queued, 1));
    assert!(pending.to_proto().charge_pending, "{pending:?}");
    assert!(pending.last_error.starts_with("delivered; cannot charge"), "{}", pending.last_error);
    assert_eq!(pending.last_error_code, "service_unavailable");
    assert_eq!(pending.to_proto().result, "echo: charge me", "the delivery's outcome is kept");
    assert_eq!(mock.requests_total(), 1);

    // Not due before the longest backoff; a lease lost while charging is no attempt either.
    assert_eq!(queue.dispatcher().run_once().await.unwrap(), 0);
    clock.advance(Duration::from_secs(30));
    let claimed = queue.store().claim(clock.now(), clock.now(), 10).await.unwrap();
    assert_eq!(claimed.iter().map(|j| j.attempts).collect::<Vec<_>>(), [1]);
    clock.advance(Duration::from_secs(1));

    let (quota, quota_shutdown) = quota_service(free).await;
    assert_eq!(queue.dispatcher().run_once().await.unwrap(), 1);
    let done = job(&queue, &created.id).await;
    assert_eq!((done.job_status(), done.attempts, done.reservation_open), (JobStatus::Succeeded, 1, false));
    let usage = done.to_proto().usage.unwrap();
    assert_eq!(usage.cost_micros, usage.prompt_tokens + 2 * usage.completion_tokens, "{usage:?}");
    for scope in quota_status(&quota).await.scopes {
        assert_eq!(
            (scope.requests_today, scope.used_tokens, scope.used_cost_micros, scope.reserved_tokens),
            (1, usage.total_tokens, usage.cost_micros, 0),
            "{scope:?}"
        );
    }
    assert_eq!(mock.requests_total(), 1, "delivered once");
    quota_shutdown.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_charge_is_retried_without_a_second_delivery_on_postgres() {
    a_failed_charge_is_retried_without_a_second_delivery(StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_charge_is_retried_without_a_second_delivery_on_disk() {
    a_failed_charge_is_retried_without_a_second_delivery(StoreKind::File).await;
}

/// A charging queue over a `kind` store delivering to `spec`, with a quota service of its own,
/// and a submission of `text` holding a reservation of 1,000 tokens and 5,000 µ$ under
/// `request_id`.
struct ReservedSubmission {
    queue: meshgate_sync::Queue,
    upstream: meshgate_sync::Upstream,
    clock: Arc<ManualClock>,
    quota: String,
    quota_shutdown: Shutdown,
    request: EnqueueRequest,
    _dir: Option<tempfile::TempDir>,
}

async fn reserved_submission(kind: StoreKind, spec: ProviderSpec, request_id: &str, text: &str) -> ReservedSubmission {
    let (store, dir) = store(kind).await;
    let clock = Arc::new(ManualClock::new(start()));
    let cfg = config(3);
    let (quota, quota_shutdown) = quota_service("127.0.0.1:0".parse().unwrap()).await;
    let queue = charging_queue(store, std::slice::from_ref(&spec), clock.clone(), &cfg, &quota);
    let upstream = meshgate_sync::Upstream::new(&cfg, &[spec], Default::default()).unwrap();
    let reservation = admit(&quota, &principal(), request_id, 1_000, 5_000).await;
    let request = EnqueueRequest { reservation: Some(reservation), ..enqueue_request("", "mock", text) };
    ReservedSubmission { queue, upstream, clock, quota, quota_shutdown, request, _dir: dir }
}

/// An attempt whose worker stopped without recording it (killed mid-delivery, or its lease lost)
/// may have been served: before the job is delivered again that attempt is charged at the job's
/// estimate, once — unless its provider honours the job id as `Idempotency-Key` and so answers
/// the next attempt with the first one's completion, charged when it is delivered.
async fn an_interrupted_attempt_is_charged_at_the_estimate(kind: StoreKind) {
    for honours in [false, true] {
        let mock = MockProvider::start_with(Behavior { honour_idempotency_keys: honours, ..Behavior::default() })
            .await
            .unwrap();
        let spec = ProviderSpec { honours_idempotency_keys: honours, ..provider("mock", &mock) };
        let ReservedSubmission { queue, upstream, clock, quota, quota_shutdown, request, _dir } =
            reserved_submission(kind, spec, "job-1", "interrupt me").await;
        let (created, _) = queue.enqueue(&upstream, request).await.unwrap();

        // A worker claims the job and dies before recording anything.
        let now = clock.now();
        let claimed = queue.store().claim(now, now + chrono::TimeDelta::seconds(1), 10).await.unwrap();
        assert_eq!(claimed.iter().map(|j| j.interrupted).collect::<Vec<_>>(), [false], "a first claim");
        clock.advance(Duration::from_secs(2));
        assert_eq!(queue.dispatcher().run_once().await.unwrap(), 1);
        let done = job(&queue, &created.id).await;
        assert_eq!((done.job_status(), done.attempts), (JobStatus::Succeeded, 2), "honours {honours}");
        let usage = done.to_proto().usage.unwrap();
        let expected = if honours {
            (usage.total_tokens, usage.cost_micros, 1)
        } else {
            (1_000 + usage.total_tokens, 5_000 + usage.cost_micros, 2)
        };
        for scope in quota_status(&quota).await.scopes {
            assert_eq!(
                (scope.used_tokens, scope.used_cost_micros, scope.requests_today, scope.reserved_tokens),
                (expected.0, expected.1, expected.2, 0),
                "honours {honours}: {scope:?}"
            );
        }
        quota_shutdown.trigger();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_attempt_is_charged_at_the_estimate_on_postgres() {
    an_interrupted_attempt_is_charged_at_the_estimate(StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_attempt_is_charged_at_the_estimate_on_disk() {
    an_interrupted_attempt_is_charged_at_the_estimate(StoreKind::File).await;
}

/// An attempt cut mid-stream was served in part (its prompt and what it streamed): it is charged
/// that, estimated from its length, once, and the delivery that succeeds later on its own — as a
/// chat stream cut the same way is charged.
async fn an_attempt_cut_mid_stream_is_charged_what_it_served(kind: StoreKind) {
    let mock =
        MockProvider::start_with(Behavior { stream_chunks: 4, fail_after_chunks: Some(2), ..Behavior::default() })
            .await
            .unwrap();
    let ReservedSubmission { queue, upstream, clock, quota, quota_shutdown, request, _dir } =
        reserved_submission(kind, provider("mock", &mock), "job-cut", "a longer answer that is cut after two pieces")
            .await;
    let (created, _) = queue.enqueue(&upstream, request).await.unwrap();

    assert_eq!(queue.dispatcher().run_once().await.unwrap(), 1);
    let retried = job(&queue, &created.id).await;
    assert_eq!((retried.job_status(), retried.attempts), (JobStatus::Queued, 1), "{retried:?}");
    let cut = quota_status(&quota).await.scopes;
    let cut_tokens = cut[0].used_tokens;
    assert!(cut_tokens > 0, "the cut attempt is charged: {cut:?}");
    assert!(cut.iter().all(|s| (s.used_tokens, s.requests_today) == (cut_tokens, 1)), "{cut:?}");

    mock.update(|b| b.fail_after_chunks = None);
    clock.advance(Duration::from_secs(60));
    assert_eq!(queue.dispatcher().run_once().await.unwrap(), 1);
    let done = job(&queue, &created.id).await;
    assert_eq!((done.job_status(), done.attempts), (JobStatus::Succeeded, 2));
    let usage = done.to_proto().usage.unwrap();
    for scope in quota_status(&quota).await.scopes {
        assert_eq!(
            (scope.used_tokens, scope.requests_today, scope.reserved_tokens),
            (cut_tokens + usage.total_tokens, 2, 0),
            "{scope:?}"
        );
    }
    quota_shutdown.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_cut_mid_stream_is_charged_what_it_served_on_postgres() {
    an_attempt_cut_mid_stream_is_charged_what_it_served(StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_cut_mid_stream_is_charged_what_it_served_on_disk() {
    an_attempt_cut_mid_stream_is_charged_what_it_served(StoreKind::File).await;
}

/// A submission its caller gives up on before the store answers (the gateway's deadline passing
/// while Postgres is stalled) frees its reservation: no job may ever carry it, and it held the
/// tenant's budget until its TTL (found by the chaos suite's postgres-stall). Should the store
/// still create the job, its delivery is charged directly, once.
async fn an_abandoned_submission_frees_its_reservation(kind: StoreKind) {
    let mock = MockProvider::start().await.unwrap();
    let ReservedSubmission { queue, upstream, quota, quota_shutdown, request, _dir, .. } =
        reserved_submission(kind, provider("mock", &mock), "job-abandoned", "never mind").await;
    // Given up on at the first wait: the store may or may not have the job afterwards. (The
    // on-disk store may answer at once, before there is anything to give up on: then the job
    // exists and its delivery settles the reservation; Postgres always makes it wait.)
    let abandoned = tokio::time::timeout(Duration::from_nanos(1), queue.enqueue(&upstream, request)).await;
    if matches!(kind, StoreKind::Postgres) {
        assert!(abandoned.is_err(), "the submission was not abandoned");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while abandoned.is_err() && quota_status(&quota).await.scopes.iter().any(|s| s.reserved_tokens > 0) {
        assert!(tokio::time::Instant::now() < deadline, "the abandoned submission's reservation is still held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let delivered = queue.dispatcher().run_once().await.unwrap();
    let charged: i64 = if delivered == 1 {
        let job = queue.store().list(PROJECT, JobStatus::Succeeded, 10).await.unwrap().pop().unwrap();
        job.outcome.unwrap().usage.unwrap().total_tokens
    } else {
        0
    };
    for scope in quota_status(&quota).await.scopes {
        assert_eq!((scope.used_tokens, scope.reserved_tokens), (charged, 0), "{scope:?}");
    }
    quota_shutdown.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_submission_frees_its_reservation_on_postgres() {
    an_abandoned_submission_frees_its_reservation(StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_submission_frees_its_reservation_on_disk() {
    an_abandoned_submission_frees_its_reservation(StoreKind::File).await;
}

/// A job holds its admission while queued; a dead letter frees it; a dead letter put back holds
/// its new admission, which delivery commits with the actual usage.
async fn a_dead_letter_frees_its_reservation(kind: StoreKind) {
    let mock = MockProvider::start().await.unwrap();
    let (store, _dir) = store(kind).await;
    let clock = Arc::new(ManualClock::new(start()));
    let cfg = config(8);
    let (quota, quota_shutdown) = quota_service("127.0.0.1:0".parse().unwrap()).await;
    let queue = charging_queue(store, &[provider("mock", &mock)], clock.clone(), &cfg, &quota);
    let upstream = meshgate_sync::Upstream::new(&cfg, &[provider("mock", &mock)], Default::default()).unwrap();
    // What the project holds (both keys below are of it).
    let held = |reserved: (i64, i64)| {
        let quota = quota.clone();
        async move {
            let status = quota_status(&quota).await;
            let project = status.scopes.iter().find(|s| s.scope.as_ref().unwrap().id == PROJECT).unwrap();
            assert_eq!((project.reserved_tokens, project.reserved_cost_micros), reserved, "{project:?}");
        }
    };

    let first = admit(&quota, &principal(), "job-1", 1_000, 5_000).await;
    let request = EnqueueRequest { reservation: Some(first), ..enqueue_request("", "mock", "refused") };
    let (created, _) = queue.enqueue(&upstream, request).await.unwrap();
    held((1_000, 5_000)).await;

    // The provider refuses the request: a dead letter at once, and its hold is freed.
    mock.set_failures(0.0, 400);
    mock.fail_next(1);
    assert_eq!(queue.dispatcher().run_once().await.unwrap(), 1);
    let dead = job(&queue, &created.id).await;
    assert_eq!((dead.job_status(), dead.reservation_open), (JobStatus::Dead, false));
    held((0, 0)).await;

    // Put back under a new admission of another key of the project: it holds the new estimate,
    // and the delivery is charged to that key.
    let mut retrier = principal();
    retrier.key_id = "k2".into();
    let second = admit(&quota, &retrier, "job-1-retry", 600, 3_000).await;
    let retry = RetryJobRequest {
        principal: Some(retrier.clone()),
        reservation: Some(second.clone()),
        ..retry_request(&created.id)
    };
    let outsider = RetryJobRequest {
        principal: Some(meshgate_proto::common::v1::Principal { project_id: "proj-2".into(), ..retrier }),
        ..retry.clone()
    };
    let err = queue.retry(outsider).await.unwrap_err();
    assert_eq!(err.code(), meshgate_runtime::ErrorCode::InvalidRequest, "{err}");
    let revived = queue.retry(retry).await.unwrap();
    assert_eq!((revived.reservation_id.as_str(), revived.reservation_open), (second.reservation_id.as_str(), true));
    assert_eq!((revived.key_id.as_str(), revived.reserved_tokens), ("k2", 600));
    held((600, 3_000)).await;

    assert_eq!(queue.dispatcher().run_once().await.unwrap(), 1);
    let done = job(&queue, &created.id).await;
    assert_eq!((done.job_status(), done.reservation_open), (JobStatus::Succeeded, false));
    let usage = done.to_proto().usage.unwrap();
    let status = quota_status(&quota).await;
    let key = status.scopes.iter().find(|s| s.scope.as_ref().unwrap().id == "k").unwrap();
    assert_eq!((key.used_tokens, key.reserved_tokens), (0, 0), "the first key was not charged");
    held((0, 0)).await;
    let channel = meshgate_runtime::channel(&quota, Duration::from_secs(1)).unwrap();
    let second_key = meshgate_proto::common::v1::Principal { key_id: "k2".into(), ..principal() };
    let status = meshgate_proto::quota::v1::quota_client::QuotaClient::new(channel)
        .status(meshgate_proto::quota::v1::StatusRequest { principal: Some(second_key) })
        .await
        .unwrap()
        .into_inner();
    let key = status.scopes.iter().find(|s| s.scope.as_ref().unwrap().id == "k2").unwrap();
    assert_eq!((key.used_tokens, key.used_cost_micros, key.requests_today), (usage.total_tokens, usage.cost_micros, 1));
    quota_shutdown.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_frees_its_reservation_on_postgres() {
    a_dead_letter_frees_its_reservation(StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_frees_its_reservation_on_disk() {
    a_dead_letter_frees_its_reservation(StoreKind::File).await;
}

/// A job stored before the table kept reservations loads after the migration, without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_queued_before_reservations_still_load_on_postgres() {
    use meshgate_storage::{PostgresConfig, migrate, postgres_client, postgres_pool};
    use meshgate_sync::JobStore as _;
    use prost::Message as _;
    let pool = postgres_pool(&isolated_database_url().await, &PostgresConfig::default()).unwrap();
    migrate(&pool, meshgate_sync::COMPONENT, &meshgate_sync::migrations()[..2]).await.unwrap();
    let id = uuid::Uuid::now_v7();
    postgres_client(&pool)
        .await
        .unwrap()
        .execute(
            "INSERT INTO sync_jobs (id, org_id, project_id, request_hash, request, status, max_attempts, created_at, \
             updated_at, next_attempt_at) VALUES ($1, $2, $3, 'h', $4, 1, 8, now(), now(), now())",
            &[&id, &ORG, &PROJECT, &completion("mock", "old").encode_to_vec()],
        )
        .await
        .unwrap();
    migrate(&pool, meshgate_sync::COMPONENT, meshgate_sync::migrations()).await.unwrap();
    let store = meshgate_sync::PgJobStore::new(pool);
    let old = store.get(&id.to_string(), PROJECT).await.unwrap().unwrap();
    assert_eq!(old.job_status(), JobStatus::Queued);
    assert_eq!((old.reservation_id.as_str(), old.reservation_open, old.reserved_tokens), ("", false, 0));
    assert_eq!(old.to_proto().reservation, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_on_postgres_never_share_a_job_and_expired_leases_come_back() {
    let mock = MockProvider::start().await.unwrap();
    let (store, _) = store(StoreKind::Postgres).await;
    let cfg = config(2);
    let clock = Arc::new(ManualClock::new(start()));
    let queue = queue(store.clone(), &[provider("mock", &mock)], clock.clone(), &cfg);
    let upstream = meshgate_sync::Upstream::new(&cfg, &[provider("mock", &mock)], Default::default()).unwrap();
    for i in 0..200 {
        queue.enqueue(&upstream, enqueue_request(&format!("k{i}"), "mock", "x")).await.unwrap();
    }
    let lease = start() + chrono::TimeDelta::seconds(10);
    let claims = (0..8).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.claim(start(), lease, 40).await.unwrap() })
    });
    let mut seen = HashSet::new();
    for claim in futures::future::join_all(claims).await {
        for job in claim.unwrap() {
            assert!(seen.insert(job.id.clone()), "job {} claimed twice", job.id);
            assert_eq!(job.attempts, 1);
        }
    }
    assert_eq!(seen.len(), 200);
    assert!(store.claim(start(), lease, 10).await.unwrap().is_empty(), "all leased");

    // The workers "died": past the lease, the jobs are claimed again (second and last attempt)...
    let again = store.claim(lease, lease + chrono::TimeDelta::seconds(10), 500).await.unwrap();
    assert_eq!(again.len(), 200);
    assert!(again.iter().all(|j| j.attempts == 2));
    // ...and a stale worker cannot record over the new attempt.
    let stale_token = "00000000-0000-4000-8000-000000000000";
    let finish = meshgate_sync::queue::Finish::Dead { error: "stale".into(), code: "x".into() };
    assert!(!store.finish(&again[0].id, stale_token, finish, lease).await.unwrap());
    // Dying on the last attempt makes a dead letter, not a third attempt.
    let later = lease + chrono::TimeDelta::seconds(20);
    assert!(store.claim(later, later, 500).await.unwrap().is_empty());
    let dead = store.list(PROJECT, JobStatus::Dead, 1000).await.unwrap();
    assert_eq!(dead.len(), 200);
    assert!(dead[0].last_error.contains("interrupted"), "{}", dead[0].last_error);
}

/// A delivery that outlasts its lease keeps it by renewing it: two workers on one store, each
/// polling every 50 ms, never deliver a job twice although every delivery takes four leases.
async fn a_delivery_longer_than_its_lease_keeps_it(kind: StoreKind) {
    let mock = MockProvider::start_with(Behavior { latency: Duration::from_millis(1_200), ..Behavior::default() })
        .await
        .unwrap();
    let (store, _dir) = store(kind).await;
    let mut cfg = config(3);
    cfg.queue.lease_ms = 300;
    cfg.queue.poll_interval_ms = 50;
    let clock: meshgate_storage::SharedClock = Arc::new(meshgate_storage::SystemClock);
    let queues: Vec<_> =
        (0..2).map(|_| queue(store.clone(), &[provider("mock", &mock)], clock.clone(), &cfg)).collect();
    let upstream = meshgate_sync::Upstream::new(&cfg, &[provider("mock", &mock)], Default::default()).unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let (created, _) = queues[0]
            .enqueue(&upstream, enqueue_request(&format!("slow-{i}"), "mock", "take your time"))
            .await
            .unwrap();
        ids.push(created.id);
    }
    let shutdown = Shutdown::new();
    let workers: Vec<_> =
        queues.iter().map(|queue| tokio::spawn(queue.dispatcher().clone().run(shutdown.clone()))).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for id in &ids {
        loop {
            let current = job(&queues[0], id).await;
            if current.job_status() == JobStatus::Succeeded {
                assert_eq!(current.attempts, 1, "one attempt, never taken over: {current:?}");
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "not delivered in time: {current:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    shutdown.trigger();
    for worker in workers {
        worker.await.unwrap();
    }
    assert_eq!(mock.requests_total(), 3, "each job reached the provider once");
    for id in &ids {
        assert_eq!(mock.count_for_idempotency_key(id), 1, "{id}");
    }

    // A lease is renewed only by the token that holds it.
    let (created, _) = queues[0].enqueue(&upstream, enqueue_request("held", "mock", "x")).await.unwrap();
    let now = Utc::now();
    let claimed = store.claim(now, now + chrono::TimeDelta::seconds(1), 10).await.unwrap();
    assert_eq!(claimed.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), [created.id.as_str()], "{claimed:?}");
    let stale = "00000000-0000-4000-8000-000000000000";
    assert!(!store.renew(&created.id, stale, now + chrono::TimeDelta::seconds(60)).await.unwrap());
    assert!(store.renew(&created.id, &claimed[0].lease_token, now + chrono::TimeDelta::seconds(60)).await.unwrap());
    let later = now + chrono::TimeDelta::seconds(30);
    assert!(store.claim(later, later, 10).await.unwrap().is_empty(), "the renewed lease holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_longer_than_its_lease_keeps_it_on_postgres() {
    a_delivery_longer_than_its_lease_keeps_it(StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_longer_than_its_lease_keeps_it_on_disk() {
    a_delivery_longer_than_its_lease_keeps_it(StoreKind::File).await;
}

/// The service over real gRPC with its workers running against the system clock.
struct RunningSync {
    client: SyncClient<meshgate_runtime::MeshChannel>,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), meshgate_sync::Error>>,
}

impl RunningSync {
    async fn start(config: Config) -> Self {
        let listeners = Listeners::ephemeral().await.unwrap();
        let grpc = listeners.grpc_addr();
        let shutdown = Shutdown::new();
        let task = tokio::spawn(meshgate_sync::serve(config, listeners, shutdown.clone()));
        let channel = meshgate_runtime::channel(&format!("http://{grpc}"), Duration::from_secs(1)).unwrap();
        meshgate_runtime::client::wait_serving(&channel, "meshgate.sync.v1.Sync", Duration::from_secs(20))
            .await
            .unwrap();
        Self { client: SyncClient::new(channel), shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(15), self.task).await.unwrap().unwrap().unwrap();
    }
}

async fn grpc_api(kind: StoreKind) {
    let up = MockProvider::start().await.unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let down = ProviderSpec { base_url: format!("http://{closed}/v1"), priority: Some(1), ..provider("down", &up) };
    let mut cfg = config(8);
    cfg.providers = vec![down, provider("up", &up)];
    cfg.queue.poll_interval_ms = 50;
    let dir = tempfile::tempdir().unwrap();
    match kind {
        StoreKind::Postgres => cfg.queue.database_url = Some(isolated_database_url().await),
        StoreKind::File => cfg.queue.path = Some(dir.path().join("queue")),
    }
    let service = RunningSync::start(cfg).await;
    let mut client = service.client.clone();

    // No provider named: the model's providers in fallback order; "down" refuses, "up" answers.
    let response = client.enqueue(enqueue_request("order-7", "", "deliver me later")).await.unwrap();
    assert!(response.metadata().get(IDEMPOTENT_REPLAY_METADATA).is_none());
    let job = response.into_inner();
    assert_eq!(job.status, JobStatus::Queued as i32);
    assert_eq!((job.org_id.as_str(), job.project_id.as_str(), job.idempotency_key.as_str()), (ORG, PROJECT, "order-7"));
    assert_eq!(job.max_attempts, 8);
    let done = wait_for_status(&client, &job.id, JobStatus::Succeeded, Duration::from_secs(20)).await;
    assert_eq!(done.result, "echo: deliver me later");
    assert_eq!(done.provider, "up");
    assert_eq!(done.attempts, 1);
    assert_eq!(up.count_for_idempotency_key(&job.id), 1);

    // The same key and request: the same job, flagged as a replay; another request: a conflict.
    let again = client.enqueue(enqueue_request("order-7", "", "deliver me later")).await.unwrap();
    assert_eq!(again.metadata().get(IDEMPOTENT_REPLAY_METADATA).unwrap(), "true");
    assert_eq!(again.into_inner().id, job.id);
    let conflict = client.enqueue(enqueue_request("order-7", "", "something else")).await.unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);
    assert_eq!(conflict.metadata().get(ERROR_CODE_METADATA).unwrap(), "conflict");
    // The same key in another project is another job.
    let mut elsewhere = enqueue_request("order-7", "", "deliver me later");
    elsewhere.principal.as_mut().unwrap().project_id = "proj-2".into();
    let other = client.enqueue(elsewhere).await.unwrap().into_inner();
    assert_ne!(other.id, job.id);

    // Bad input.
    let too_long = "k".repeat(256);
    for (bad, code) in [
        (enqueue_request("has space", "up", "x"), Code::InvalidArgument),
        (enqueue_request("tab\tkey", "up", "x"), Code::InvalidArgument),
        (enqueue_request(&too_long, "up", "x"), Code::InvalidArgument),
        (EnqueueRequest { principal: None, ..enqueue_request("", "up", "x") }, Code::InvalidArgument),
        (EnqueueRequest { request: None, ..enqueue_request("", "up", "x") }, Code::InvalidArgument),
        (
            EnqueueRequest {
                principal: Some(meshgate_proto::common::v1::Principal { project_id: String::new(), ..principal() }),
                ..enqueue_request("", "up", "x")
            },
            Code::InvalidArgument,
        ),
        (
            EnqueueRequest {
                reservation: Some(meshgate_proto::sync::v1::JobReservation {
                    reservation_id: "rsv\n".into(),
                    ..Default::default()
                }),
                ..enqueue_request("", "up", "x")
            },
            Code::InvalidArgument,
        ),
        (enqueue_request("", "nope", "x"), Code::NotFound),
        (
            EnqueueRequest {
                request: Some(meshgate_proto::sync::v1::CompleteRequest {
                    model: "unknown-model".into(),
                    ..completion("", "x")
                }),
                ..enqueue_request("", "", "x")
            },
            Code::NotFound,
        ),
        (
            EnqueueRequest {
                request: Some(meshgate_proto::sync::v1::CompleteRequest { messages: vec![], ..completion("up", "x") }),
                ..enqueue_request("", "", "x")
            },
            Code::InvalidArgument,
        ),
        (
            EnqueueRequest {
                prices: vec![meshgate_proto::common::v1::Target { input_price_micros_per_mtok: -1, ..mock_price() }],
                ..enqueue_request("", "up", "x")
            },
            Code::InvalidArgument,
        ),
        (EnqueueRequest { prices: vec![mock_price(); 65], ..enqueue_request("", "up", "x") }, Code::InvalidArgument),
    ] {
        let status = client.enqueue(bad).await.unwrap_err();
        assert_eq!(status.code(), code, "{}", status.message());
    }
    for id in [String::new(), "not-a-uuid".into(), uuid::Uuid::now_v7().to_string(), other.id.clone()] {
        let status = client.get_job(GetJobRequest { id: id.clone(), project_id: PROJECT.into() }).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{id:?}");
        let status = client.retry_job(retry_request(&id)).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{id:?}");
    }
    let status = client.retry_job(retry_request(&job.id)).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "only dead letters are retried");
    // No project is not "every project": refused, never read across tenants.
    let status = client.get_job(GetJobRequest { id: job.id.clone(), project_id: String::new() }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    let status = client.list_jobs(ListJobsRequest { project_id: " ".into(), status: 0, limit: 10 }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    let status = client.retry_job(RetryJobRequest { project_id: String::new(), ..retry_request(&job.id) }).await;
    assert_eq!(status.unwrap_err().code(), Code::InvalidArgument);
    let status =
        client.list_jobs(ListJobsRequest { project_id: PROJECT.into(), status: 9, limit: 0 }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let listed = client
        .list_jobs(ListJobsRequest { project_id: PROJECT.into(), status: 0, limit: 10 })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), [job.id.as_str()], "tenancy: one project");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_enqueue_get_list_retry_on_postgres() {
    grpc_api(StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_enqueue_get_list_retry_on_disk() {
    grpc_api(StoreKind::File).await;
}
