//! The router served over real gRPC on port 0: decisions with their explanations, learning
//! from outcomes, bad input, and the policy file reloaded without a restart.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use meshgate_catalog::{Capability, ProviderSpec};
use meshgate_proto::common::v1::{ChatMessage, Layer, Principal};
use meshgate_proto::router::v1::router_client::RouterClient;
use meshgate_proto::router::v1::{
    DecideRequest, ListTargetsRequest, Outcome, OutcomeBatch, RoutePlan, RouteRequest, RoutingEpoch, StepRole,
    TargetState, WatchRoutingRequest,
};
use meshgate_router::{Config, ModelFacts, RoutePolicy};
use meshgate_runtime::{ListenConfig, Listeners, MeshChannel, Shutdown};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Router {
    client: RouterClient<MeshChannel>,
    admin: SocketAddr,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), meshgate_router::Error>>,
}

impl Router {
    async fn start(config: Config) -> Self {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let listeners = Listeners::bind(&ListenConfig { grpc: any, admin: any, http: None }).await.unwrap();
        let url = format!("http://{}", listeners.grpc_addr());
        let admin = listeners.admin_addr();
        let shutdown = Shutdown::new();
        let task = tokio::spawn(meshgate_router::serve(config, listeners, shutdown.clone()));
        let client = RouterClient::new(meshgate_runtime::channel(&url, Duration::from_secs(2)).unwrap());
        Self { client, admin, shutdown, task }
    }

    /// A router with [`config`] and a policy file of `text`, re-read every 20 ms (write it with
    /// [`write`]); the directory holding it lives as long as the returned guard.
    async fn with_policy_file(text: &str) -> (Self, tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        write(&path, text);
        let config = Config { policy_file: Some(path.clone()), policy_poll_ms: 20, ..config() };
        (Self::start(config).await, dir, path)
    }

    /// The value of the series of metric `name` carrying the label `label` (`key="value"`), 0
    /// when absent.
    async fn metric(&self, name: &str, label: &str) -> f64 {
        let mut stream = tokio::net::TcpStream::connect(self.admin).await.unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        body.lines()
            .filter(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with('{')) && line.contains(label))
            .find_map(|line| line.rsplit(' ').next())
            .map_or(0.0, |value| value.trim().parse().unwrap())
    }

    async fn stop(self) {
        self.shutdown.trigger();
        self.task.await.unwrap().unwrap();
    }

    async fn decide(&self, model: &str, project: &str, prompt: &str) -> Result<RoutePlan, tonic::Status> {
        self.decide_needing(model, project, prompt, &[]).await
    }

    async fn decide_needing(
        &self,
        model: &str,
        project: &str,
        prompt: &str,
        capabilities: &[&str],
    ) -> Result<RoutePlan, tonic::Status> {
        let request = RouteRequest {
            request_id: "r1".into(),
            principal: Some(Principal { project_id: project.into(), ..Default::default() }),
            model: model.into(),
            prompt_tokens: 0,
            max_tokens: 100,
            stream: true,
            task: "chat".into(),
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
        };
        let messages = vec![ChatMessage { role: "user".into(), content: prompt.into(), ..Default::default() }];
        let decide = DecideRequest { request: Some(request), messages, task_hint: String::new() };
        self.client.clone().decide(decide).await.map(tonic::Response::into_inner)
    }

    async fn state(&self, target: &str) -> TargetState {
        let targets = self.client.clone().list_targets(ListTargetsRequest {}).await.unwrap().into_inner().targets;
        targets.into_iter().find(|t| t.target.as_ref().unwrap().id == target).unwrap()
    }
}

fn provider(name: &str, models: &[&str]) -> ProviderSpec {
    ProviderSpec {
        name: name.into(),
        base_url: "http://127.0.0.1:9/v1".into(),
        models: models.iter().map(|m| m.to_string()).collect(),
        ..Default::default()
    }
}

fn config() -> Config {
    let facts = |layer: &str, input, output| ModelFacts {
        layer: Some(layer.into()),
        input_price_micros_per_mtok: Some(input),
        output_price_micros_per_mtok: Some(output),
        context_window: Some(100_000),
        ..Default::default()
    };
    let mut config = Config {
        providers: vec![provider("cheap", &["mini"]), provider("std", &["gpt"]), provider("alt", &["gpt"])],
        ..Default::default()
    };
    config.models.insert("mini".into(), facts("l1", 150_000, 600_000));
    config.models.insert("gpt".into(), facts("l2", 2_500_000, 10_000_000));
    config.breaker.failure_threshold = 3;
    config
}

fn ids(plan: &RoutePlan) -> Vec<&str> {
    plan.targets.iter().map(|t| t.target.as_ref().unwrap().id.as_str()).collect()
}

#[tokio::test]
async fn decisions_are_explained_and_outcomes_move_failing_targets_back() {
    let config = Config { policy: RoutePolicy { race: Some(true), ..Default::default() }, ..config() };
    let router = Router::start(config).await;

    let plan = router.decide("auto", "p", "Write a haiku about the sea").await.unwrap();
    assert_eq!(plan.task, "creative");
    assert_eq!(plan.task_source, "heuristic", "no inference service: the heuristic classifies");
    assert!(plan.reasons[0].contains("no inference service"), "{:?}", plan.reasons);
    assert_eq!(ids(&plan), ["cheap/mini", "alt/gpt", "std/gpt"]);
    assert_eq!(plan.layer, Layer::L1Cheap as i32);
    assert!(plan.race, "the policy races and two healthy targets exist");
    let roles: Vec<i32> = plan.targets.iter().map(|t| t.role).collect();
    assert_eq!(roles, [StepRole::Primary as i32, StepRole::Primary as i32, StepRole::Escalation as i32]);
    assert!(plan.required_context > 100, "the prompt was estimated from the messages");

    // Both racers count as in flight; the loser's cancellation only ends its call.
    assert_eq!(router.state("cheap/mini").await.in_flight, 1);
    assert_eq!(router.state("alt/gpt").await.in_flight, 1);
    let outcome = |target: &str, ok: bool, code: &str, primary: bool| Outcome {
        target_id: target.into(),
        ok,
        latency_us: 1000,
        completion_tokens: 5,
        error_code: code.into(),
        primary,
    };
    let batch = vec![outcome("cheap/mini", true, "", true), outcome("alt/gpt", false, "client_closed", true)];
    router.client.clone().report_outcomes(OutcomeBatch { outcomes: batch }).await.unwrap();
    let alt = router.state("alt/gpt").await;
    assert_eq!((alt.in_flight, alt.failures, alt.breaker.as_str()), (0, 0, "closed"));

    // Three upstream failures open mini's breaker: it becomes the last resort.
    let failures = (0..3).map(|_| outcome("cheap/mini", false, "upstream_error", false)).collect();
    router.client.clone().report_outcomes(OutcomeBatch { outcomes: failures }).await.unwrap();
    let mini = router.state("cheap/mini").await;
    assert_eq!(mini.breaker, "open");
    assert!(mini.circuit_open);
    assert_eq!(mini.error_rate, 0.75);
    let plan = router.decide("auto", "p", "Write a haiku about the sea").await.unwrap();
    assert_eq!(ids(&plan), ["alt/gpt", "std/gpt", "cheap/mini"]);
    assert_eq!(plan.targets[2].role, StepRole::LastResort as i32);
    router.stop().await;
}

#[tokio::test]
async fn bad_requests_get_matching_statuses() {
    let router = Router::start(config()).await;
    let code = |result: Result<RoutePlan, tonic::Status>| result.unwrap_err().code();
    assert_eq!(code(router.decide(" ", "p", "hi").await), tonic::Code::InvalidArgument);
    assert_eq!(code(router.decide("nope", "p", "hi").await), tonic::Code::NotFound);
    let mut client = router.client.clone();
    let empty = client.decide(DecideRequest::default()).await.unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    let hint = DecideRequest {
        request: Some(RouteRequest { model: "gpt".into(), ..Default::default() }),
        task_hint: "dance".into(),
        ..Default::default()
    };
    let bad_hint = client.decide(hint).await.unwrap_err();
    assert_eq!(bad_hint.code(), tonic::Code::InvalidArgument);
    assert!(bad_hint.message().contains("unknown task hint"), "{}", bad_hint.message());
    let negative = RouteRequest { model: "gpt".into(), prompt_tokens: -1, ..Default::default() };
    assert_eq!(client.route(negative).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let no_target = client.report_outcome(Outcome::default()).await.unwrap_err();
    assert_eq!(no_target.code(), tonic::Code::InvalidArgument);
    // Route without text still plans, with the task from the request.
    let plan = client.route(RouteRequest { model: "gpt".into(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!((plan.task.as_str(), plan.task_source.as_str()), ("chat", "request"));
    router.stop().await;
}

#[tokio::test]
async fn needed_capabilities_and_context_fallbacks_shape_the_plan_over_grpc() {
    let mut config = config();
    config.providers.push(provider("big", &["long"]));
    config.models.get_mut("mini").unwrap().capabilities = Some(vec![Capability::Tools]);
    config.models.insert(
        "long".into(),
        ModelFacts {
            layer: Some("l2".into()),
            input_price_micros_per_mtok: Some(3_000_000),
            output_price_micros_per_mtok: Some(12_000_000),
            context_window: Some(1_000_000),
            ..Default::default()
        },
    );
    config.policy.context_window_fallbacks.insert("gpt".into(), vec!["long".into()]);
    let router = Router::start(config).await;

    // mini takes tools but no images: an image request starts a layer up.
    let tools = router.decide_needing("auto", "p", "hi", &["tools"]).await.unwrap();
    assert_eq!(ids(&tools)[0], "cheap/mini");
    let image = router.decide_needing("auto", "p", "hi", &["tools", "vision"]).await.unwrap();
    assert_ne!(ids(&image)[0], "cheap/mini");
    let mini = image.rejected.iter().find(|r| r.target_id == "cheap/mini").unwrap();
    assert_eq!(mini.reason, "lacks capability vision (has: tools)");
    let refused = router.decide_needing("mini", "p", "hi", &["audio"]).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{}", refused.message());
    let unknown = router.decide_needing("gpt", "p", "hi", &["x-ray"]).await.unwrap_err();
    assert!(unknown.message().contains("unknown capability \"x-ray\""), "{}", unknown.message());

    // gpt's larger-context fallback follows it, and serves alone what gpt cannot hold.
    let short = router.decide("gpt", "p", "hi").await.unwrap();
    assert_eq!(*ids(&short).last().unwrap(), "big/long");
    let huge = "word ".repeat(120_000);
    let long = router.decide("gpt", "p", &huge).await.unwrap();
    assert_eq!(ids(&long), ["big/long"]);

    // The listing carries each target's facts.
    let listed = router.state("cheap/mini").await.target.unwrap();
    assert_eq!((listed.capabilities, listed.input_price_micros_per_mtok), (vec!["tools".to_owned()], 150_000));
    router.stop().await;
}

fn write(path: &Path, text: &str) {
    // Write then rename, as editors and ConfigMap updates do: the watcher never reads half a file.
    let staging = path.with_extension("tmp");
    std::fs::write(&staging, text).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

async fn eventually_plan(router: &Router, what: &str, check: impl Fn(&Result<RoutePlan, tonic::Status>) -> bool) {
    for _ in 0..500 {
        if check(&router.decide("gpt", "p", "hello").await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the policy file change never applied: {what}");
}

#[tokio::test]
async fn the_policy_file_reloads_without_a_restart_and_keeps_the_last_good_version() {
    let (router, _dir, path) = Router::with_policy_file("[projects.p]\nmax_layer = \"l1\"\n").await;

    let refused = router.decide("gpt", "p", "hello").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{}", refused.message());
    assert!(refused.message().contains("above the policy's maximum l1"), "{}", refused.message());
    assert!(router.decide("gpt", "other", "hello").await.is_ok(), "other projects are not limited");

    write(&path, "[projects.p]\nmax_layer = \"l2\"\nchoose_model = true\n");
    eventually_plan(&router, "l2 allowed, the router chooses", |r| {
        r.as_ref().is_ok_and(|plan| plan.policy == "default(config) + project:p(file)" && ids(plan)[0] == "cheap/mini")
    })
    .await;

    // An invalid version is refused; the last good one stays in force until a valid one comes.
    let invalid = || router.metric("meshgate_router_policy_file_reloads_total", "outcome=\"invalid\"");
    assert_eq!(invalid().await, 0.0);
    write(&path, "[projects.p]\nmax_layer = \"l9\"\n");
    for _ in 0..500 {
        if invalid().await == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(invalid().await, 1.0, "the watcher read the invalid version");
    assert_eq!(ids(&router.decide("gpt", "p", "hello").await.unwrap())[0], "cheap/mini");
    write(&path, "[projects.p]\nchoose_model = false\nescalation = false\n");
    eventually_plan(&router, "back to the requested model", |r| {
        r.as_ref().is_ok_and(|plan| ids(plan) == ["alt/gpt", "std/gpt"])
    })
    .await;
    router.stop().await;
}

#[tokio::test]
async fn an_invalid_policy_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    write(&path, "[projects.p]\nmax_layr = \"l1\"\n");
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let listeners = Listeners::bind(&ListenConfig { grpc: any, admin: any, http: None }).await.unwrap();
    let config = Config { policy_file: Some(path), ..config() };
    let err = meshgate_router::serve(config, listeners, Shutdown::new()).await.unwrap_err();
    assert!(err.to_string().contains("unknown field `max_layr`"), "{err}");
}

#[tokio::test]
async fn the_routing_epoch_is_pushed_as_breakers_and_policies_change_and_reusable_plans_carry_it() {
    let (router, _dir, path) = Router::with_policy_file("[projects.p]\nescalation = false\n").await;
    async fn next(epochs: &mut tonic::Streaming<RoutingEpoch>) -> RoutingEpoch {
        let next = tokio::time::timeout(Duration::from_secs(5), epochs.message()).await;
        next.expect("an epoch within 5 s").unwrap().expect("the stream stays open")
    }
    let mut epochs = router.client.clone().watch_routing(WatchRoutingRequest {}).await.unwrap().into_inner();
    let first = next(&mut epochs).await;

    // One target, no escalation: the plan holds for any request of this shape.
    let plan = router.decide("mini", "p", "hello").await.unwrap();
    let reuse = plan.reuse.expect("a plan of one healthy target is reusable");
    assert_eq!((reuse.router_instance, reuse.epoch), (first.router_instance, first.epoch));
    assert_eq!((reuse.ttl_ms, reuse.context_above, reuse.context_up_to), (1_000, -1, 100_000));
    // Two equivalent targets compared by load, a model the router chooses by task: never.
    assert!(router.decide("gpt", "p", "hello").await.unwrap().reuse.is_none());
    assert!(router.decide("auto", "p", "hello").await.unwrap().reuse.is_none());

    // A breaker opening is a new epoch, and a plan with an open breaker is not reusable.
    let failure =
        || Outcome { target_id: "cheap/mini".into(), error_code: "upstream_error".into(), ..Default::default() };
    router
        .client
        .clone()
        .report_outcomes(OutcomeBatch { outcomes: vec![failure(), failure(), failure()] })
        .await
        .unwrap();
    let second = next(&mut epochs).await;
    assert!(second.epoch > first.epoch && second.router_instance == first.router_instance);
    assert!(router.decide("mini", "p", "hello").await.unwrap().reuse.is_none());

    // So is a policy change.
    write(&path, "[projects.p]\nescalation = false\nmax_layer = \"l2\"\n");
    let third = next(&mut epochs).await;
    assert!(third.epoch > second.epoch, "{third:?} after {second:?}");
    router.stop().await;
}
