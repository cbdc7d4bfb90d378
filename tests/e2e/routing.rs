//! The router's plan carried out at the edge: every reply names its target, layer and task;
//! fastest-first races two targets and charges only the winner; an empty answer from a cheap
//! layer goes one layer up.

use std::time::Duration;

use futures::StreamExt;
use meshgate_proto::common::v1::ChatMessage;
use meshgate_proto::gateway::v1::ChatRequest;
use meshgate_proto::gateway::v1::gateway_client::GatewayClient;
use meshgate_proto::router::v1::router_client::RouterClient;
use meshgate_proto::router::v1::{DecideRequest, RouteRequest};
use meshgate_router::ModelFacts;
use meshgate_tests::{ADMIN_KEY, CLOUD_MODEL, MeshOptions, TestMesh, chat_body};
use serde_json::{Value, json};

const TASKS: [&str; 5] = ["code", "math", "creative", "reasoning", "chat"];
const PREMIUM_MODEL: &str = "mock-premium";

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("no {name} header"))
}

fn request_id(response: &reqwest::Response) -> String {
    header(response, "x-meshgate-request-id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_name_their_target_layer_and_task_and_the_trace_keeps_the_reasons() {
    let mesh = TestMesh::start().await;

    let response = mesh.chat(chat_body(CLOUD_MODEL, "Write a Python function that sorts a list")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-meshgate-target"), "alpha/mock-gpt");
    assert_eq!(header(&response, "x-meshgate-layer"), "l2", "cloud models are l2 unless declared");
    let task = header(&response, "x-meshgate-task").to_owned();
    assert!(TASKS.contains(&task.as_str()), "{task}");
    let trace = mesh.trace(&request_id(&response)).await;
    assert_eq!(trace.task, task);
    assert!(!trace.routing_reasons.is_empty(), "the decision's reasons are traced");
    assert!(!trace.routing_reason.is_empty());

    let mut body = chat_body(CLOUD_MODEL, "stream a poem");
    body["stream"] = json!(true);
    let response = mesh.chat(body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-meshgate-target"), "alpha/mock-gpt");
    assert_eq!(header(&response, "x-meshgate-layer"), "l2");
    assert!(TASKS.contains(&header(&response, "x-meshgate-task")));

    let mut client = GatewayClient::new(mesh.channel("gateway"));
    let mut request = tonic::Request::new(ChatRequest {
        model: CLOUD_MODEL.into(),
        messages: vec![ChatMessage { role: "user".into(), content: "over grpc".into(), ..Default::default() }],
        sampling: None,
        options: None,
    });
    request.metadata_mut().insert("authorization", format!("Bearer {ADMIN_KEY}").parse().unwrap());
    let response = client.chat(request).await.unwrap();
    assert_eq!(response.metadata().get("x-meshgate-target").unwrap(), "alpha/mock-gpt");
    assert_eq!(response.metadata().get("x-meshgate-layer").unwrap(), "l2");
    assert!(TASKS.contains(&response.metadata().get("x-meshgate-task").unwrap().to_str().unwrap()));
    let chunks: Vec<_> = response.into_inner().collect().await;
    assert!(chunks.iter().all(Result::is_ok));
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastest_first_keeps_the_first_answer_cancels_the_other_and_charges_only_the_winner() {
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(|config| {
            config.router.policy.race = Some(true);
            // Room for the slow racer to answer alone when the fast one fails, even on a busy machine.
            config.gateway.target_timeout_ms = 5_000;
        }),
        ..Default::default()
    })
    .await;
    // alpha is the router's first choice but answers late.
    mesh.alpha.set_latency(Duration::from_millis(1_000));

    let response = mesh.chat(chat_body(CLOUD_MODEL, "race me")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-meshgate-target"), "beta/mock-gpt");
    let id = request_id(&response);
    let body: Value = response.json().await.unwrap();
    let charged = body["usage"]["total_tokens"].as_i64().unwrap();

    let trace = mesh.trace(&id).await;
    let status_of = |target: &str| trace.calls.iter().find(|c| c.target_id == target).map(|c| c.status.clone());
    assert_eq!(status_of("beta/mock-gpt").as_deref(), Some("ok"));
    assert_eq!(status_of("alpha/mock-gpt").as_deref(), Some("cancelled"), "{:?}", trace.calls);
    let loser = trace.calls.iter().find(|c| c.target_id == "alpha/mock-gpt").unwrap();
    assert!(loser.usage.is_none(), "the loser is never charged");
    assert_eq!(trace.usage.unwrap().total_tokens, charged, "the trace charges the winner's usage alone");
    assert_eq!(trace.served_target, "beta/mock-gpt");

    // The loser's call was dropped while alpha held its answer: alpha sees its client leave, and
    // the call never completes.
    for _ in 0..200 {
        if mesh.alpha.stats().abandoned == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(mesh.alpha.stats().abandoned, 1, "the cancelled call reached alpha and was dropped");
    assert_eq!(mesh.alpha.count_for_request_id(&id), 1);
    assert_eq!(mesh.beta.count_for_request_id(&id), 1);
    assert_eq!(mesh.alpha.stats().completions, 0, "the cancelled call produced no completion");

    let metrics = mesh.http.get(format!("{}/metrics", mesh.admin_url("gateway"))).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    for outcome in ["ok", "cancelled"] {
        let series = format!(
            "meshgate_model_call_duration_seconds_count{{layer=\"l2\",model=\"{CLOUD_MODEL}\",outcome=\"{outcome}\",service=\"gateway\"}} 1"
        );
        assert!(metrics.contains(&series), "no {series} in the gateway's metrics");
    }
    assert!(metrics.contains("meshgate_cost_micros_total{model=\"mock-gpt\",project=\"default\",service=\"gateway\"}"));

    // When the faster racer fails, the slower one still serves.
    mesh.beta.set_failures(1.0, 500);
    let response = mesh.chat(chat_body(CLOUD_MODEL, "race again")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-meshgate-target"), "alpha/mock-gpt");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_answer_from_a_cheap_layer_is_escalated_one_layer_up() {
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(|config| {
            // alpha serves the requested model at l1; beta serves a premium model at l2.
            config.sync.providers[1].models = vec![PREMIUM_MODEL.into()];
            let facts = |layer: &str| ModelFacts { layer: Some(layer.into()), ..Default::default() };
            config.router.models.insert(CLOUD_MODEL.into(), facts("l1"));
            config.router.models.insert(PREMIUM_MODEL.into(), facts("l2"));
        }),
        ..Default::default()
    })
    .await;

    let response = mesh.chat(chat_body(CLOUD_MODEL, "a usable answer")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-meshgate-target"), "alpha/mock-gpt");
    assert_eq!(header(&response, "x-meshgate-layer"), "l1");

    mesh.alpha.update(|behavior| behavior.empty_replies = true);
    let response = mesh.chat(chat_body(CLOUD_MODEL, "think hard")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-meshgate-target"), "beta/mock-premium");
    assert_eq!(header(&response, "x-meshgate-layer"), "l2");
    let id = request_id(&response);
    let body: Value = response.json().await.unwrap();
    assert!(!body["choices"][0]["message"]["content"].as_str().unwrap().is_empty(), "{body}");
    let trace = mesh.trace(&id).await;
    let statuses: Vec<(&str, &str)> = trace.calls.iter().map(|c| (c.target_id.as_str(), c.status.as_str())).collect();
    assert_eq!(statuses, [("alpha/mock-gpt", "error"), ("beta/mock-premium", "ok")]);
    assert!(trace.calls[0].error.as_ref().unwrap().message.contains("without any content"));

    // A stream's first piece is the client's at once: nothing to escalate, the answer stays.
    let mut body = chat_body(CLOUD_MODEL, "think hard, streamed");
    body["stream"] = json!(true);
    let response = mesh.chat(body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-meshgate-target"), "alpha/mock-gpt");
    mesh.stop().await;
}

/// Sends `text` to the cloud model until the gateway serves it with a plan it held (the watch of
/// the router's epoch opens a moment after the mesh starts); returns that response.
async fn until_a_held_plan_serves(mesh: &TestMesh, text: &str) -> reqwest::Response {
    for _ in 0..100 {
        let response = mesh.chat(chat_body(CLOUD_MODEL, text)).await;
        assert_eq!(response.status(), 200);
        let trace = mesh.trace(&request_id(&response)).await;
        if trace.routing_reasons.first().is_some_and(|r| r.contains("plan reused")) {
            return response;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let response = mesh.chat(chat_body(CLOUD_MODEL, text)).await;
    let trace = mesh.trace(&request_id(&response)).await;
    panic!("no request was served with a held plan: {:?}", trace.routing_reasons);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_like_one_already_planned_waits_on_no_router_call_until_the_routing_changes() {
    let mesh = TestMesh::start().await;
    let router = mesh.admin_url("router");
    let decisions = || mesh.metric(&router, "meshgate_router_decisions_total", &[]);
    until_a_held_plan_serves(&mesh, "hello there").await;

    // Held plans serve other texts; the task is still each request's own, labelled by the
    // router's task classifier as the router labels it, and the router decides nothing.
    let before = decisions().await;
    let texts = ["Write a haiku about autumn leaves", "Solve the equation 3x + 7 = 22", "Refactor this Rust code"];
    let mut labels = Vec::new();
    for text in texts {
        let response = mesh.chat(chat_body(CLOUD_MODEL, text)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-meshgate-target"), "alpha/mock-gpt");
        let task = header(&response, "x-meshgate-task").to_owned();
        let trace = mesh.trace(&request_id(&response)).await;
        assert_eq!(trace.task, task);
        let reason = &trace.routing_reasons[0];
        assert!(reason.starts_with(&format!("task {task} from classifier:tiny-classify")), "{reason}");
        assert!(reason.contains("plan reused from the router's decision in epoch"), "{reason}");
        assert!(
            trace.routing_reason.starts_with(&format!("task {task}; alpha/mock-gpt (l2) first")),
            "{}",
            trace.routing_reason
        );
        labels.push(task);
    }
    assert_eq!(decisions().await, before, "no request asked the router");
    let mut router = RouterClient::new(mesh.channel_as("gateway", "router"));
    for (text, label) in texts.iter().zip(&labels) {
        let route = RouteRequest { model: CLOUD_MODEL.into(), task: "chat".into(), ..Default::default() };
        let messages = vec![ChatMessage { role: "user".into(), content: (*text).into(), ..Default::default() }];
        let decide = DecideRequest { request: Some(route), messages, task_hint: String::new() };
        let plan = router.decide(decide).await.unwrap().into_inner();
        assert_eq!(&plan.task, label, "the router labels {text:?} alike");
    }

    // alpha fails: the failure drops the held plans, the router decides again, and once alpha's
    // breaker opens no held plan sends a request to it first.
    mesh.alpha.set_failures(1.0, 500);
    let mut served_by_beta_first = false;
    for _ in 0..100 {
        let response = mesh.chat(chat_body(CLOUD_MODEL, "hello again")).await;
        assert_eq!(response.status(), 200, "beta serves what alpha fails");
        let trace = mesh.trace(&request_id(&response)).await;
        if trace.calls.len() == 1 && trace.calls[0].target_id == "beta/mock-gpt" {
            served_by_beta_first = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served_by_beta_first, "alpha's breaker never opened");
    assert!(decisions().await > before + texts.len() as f64, "the router decided again after the failure");
    let alpha_calls = mesh.alpha.requests_total();
    for _ in 0..5 {
        let response = mesh.chat(chat_body(CLOUD_MODEL, "and again")).await;
        assert_eq!(header(&response, "x-meshgate-target"), "beta/mock-gpt");
    }
    assert_eq!(mesh.alpha.requests_total(), alpha_calls, "an open breaker's target is not called first");
    mesh.alpha.set_failures(0.0, 500);
    mesh.stop().await;
}
