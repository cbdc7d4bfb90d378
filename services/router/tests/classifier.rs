//! The task comes from the inference service's classifier: a real inference service on port 0
//! running the tiny five-label classifier built by `scripts/make-test-models.py`.

use std::net::SocketAddr;
use std::time::Duration;

use meshgate_catalog::ProviderSpec;
use meshgate_proto::common::v1::ChatMessage;
use meshgate_proto::inference::v1::ClassifyRequest;
use meshgate_proto::inference::v1::inference_client::InferenceClient;
use meshgate_proto::router::v1::router_client::RouterClient;
use meshgate_proto::router::v1::{DecideRequest, RouteRequest};
use meshgate_router::Config;
use meshgate_runtime::{ListenConfig, Listeners, Shutdown};
use meshgate_test_support::{models_dir, ort_dylib};

async fn listeners() -> (Listeners, String) {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let listeners = Listeners::bind(&ListenConfig { grpc: any, admin: any, http: None }).await.unwrap();
    let url = format!("http://{}", listeners.grpc_addr());
    (listeners, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inference_classifier_sets_the_task_and_the_heuristic_takes_over_when_it_goes() {
    let shutdown = Shutdown::new();
    let inference_shutdown = Shutdown::new();
    let (inference_listeners, inference_url) = listeners().await;
    let inference_config = meshgate_inference::Config {
        models_dir: models_dir(),
        ort_dylib_path: Some(ort_dylib()),
        intra_op_threads: 1,
        ..Default::default()
    };
    let inference =
        tokio::spawn(meshgate_inference::serve(inference_config, inference_listeners, inference_shutdown.clone()));

    let (router_listeners, router_url) = listeners().await;
    let config = Config {
        inference_endpoint: Some(inference_url.clone()),
        classifier_model: Some("tiny-classify".into()),
        classifier_timeout_ms: 10_000,
        providers: vec![ProviderSpec {
            name: "p".into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            models: vec!["gpt".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    let router = tokio::spawn(meshgate_router::serve(config, router_listeners, shutdown.clone()));

    let text = "Write a function that sorts a list";
    // What the classifier itself answers for the text the router classifies (the last user
    // message): the model has random weights, so its label is the reference, not the meaning.
    let mut classifier =
        InferenceClient::new(meshgate_runtime::channel(&inference_url, Duration::from_secs(2)).unwrap());
    let mut expected = None;
    for _ in 0..200 {
        let request =
            ClassifyRequest { model: "tiny-classify".into(), inputs: vec![text.into()], ..Default::default() };
        if let Ok(response) = classifier.classify(request).await {
            expected = Some(response.into_inner().results[0].scores[0].clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expected = expected.expect("the inference service classifies");

    let mut client = RouterClient::new(meshgate_runtime::channel(&router_url, Duration::from_secs(2)).unwrap());
    let decide = || DecideRequest {
        request: Some(RouteRequest { model: "gpt".into(), max_tokens: 10, ..Default::default() }),
        messages: vec![ChatMessage { role: "user".into(), content: text.into(), ..Default::default() }],
        task_hint: String::new(),
    };
    let plan = client.decide(decide()).await.unwrap().into_inner();
    assert_eq!(plan.task_source, "classifier:tiny-classify");
    assert_eq!(plan.task, expected.label);
    assert_eq!(plan.task_confidence, expected.probability);

    // Inference goes away: the heuristic classifies, and says why.
    inference_shutdown.trigger();
    inference.await.unwrap().unwrap();
    let plan = client.decide(decide()).await.unwrap().into_inner();
    assert_eq!(plan.task_source, "heuristic");
    assert_eq!(plan.task, "code");
    assert!(plan.reasons[0].contains("classifier tiny-classify failed"), "{:?}", plan.reasons);

    shutdown.trigger();
    router.await.unwrap().unwrap();
}
