//! The inference service over real gRPC: `serve` on 127.0.0.1:0 with the tiny test models.

mod common;

use std::time::Duration;

use meshgate_inference::Config;
use meshgate_proto::common::v1::{ChatMessage, SamplingParams};
use meshgate_proto::inference::v1 as pb;
use meshgate_proto::inference::v1::inference_client::InferenceClient;
use meshgate_runtime::{ApiError, ErrorCode, Listeners, Shutdown};
use tonic::transport::Channel;

struct Server {
    client: InferenceClient<Channel>,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), meshgate_inference::Error>>,
}

async fn start(config: Config) -> Server {
    let listeners = Listeners::ephemeral().await.unwrap();
    let addr = listeners.grpc_addr();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(meshgate_inference::serve(config, listeners, shutdown.clone()));
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let health = meshgate_runtime::channel(&format!("http://{addr}"), Duration::from_secs(1)).unwrap();
    meshgate_runtime::client::wait_serving(&health, "meshgate.inference.v1.Inference", Duration::from_secs(30))
        .await
        .unwrap();
    Server { client: InferenceClient::new(channel), shutdown, task }
}

impl Server {
    async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(15), self.task).await.unwrap().unwrap().unwrap();
    }
}

fn messages(case: &common::GreedyCase) -> Vec<ChatMessage> {
    case.messages
        .iter()
        .map(|m| ChatMessage { role: m.role.clone(), content: m.content.clone(), ..Default::default() })
        .collect()
}

#[tokio::test]
async fn generate_streams_deltas_then_finish_reason_and_usage() {
    let server = start(common::config(&common::models_dir())).await;
    let mut client = server.client.clone();
    let tokenizer = common::tokenizer("tiny-chat");
    let (reference, _) = common::reference("tiny-chat");
    for case in &reference.greedy {
        let request = pb::GenerateRequest {
            model: "tiny-chat".into(),
            messages: messages(case),
            sampling: Some(SamplingParams { max_tokens: Some(case.max_tokens as i64), ..Default::default() }),
            request_id: "req-1".into(),
        };
        let mut stream = client.generate(request).await.unwrap().into_inner();
        let mut chunks = Vec::new();
        while let Some(chunk) = stream.message().await.unwrap() {
            chunks.push(chunk);
        }
        let (last, deltas) = chunks.split_last().unwrap();
        assert!(deltas.len() > 1, "text arrives in several chunks");
        assert!(deltas.iter().all(|c| c.finish_reason.is_empty() && c.usage.is_none() && !c.delta.is_empty()));
        let text: String = chunks.iter().map(|c| c.delta.as_str()).collect();
        assert_eq!(text, tokenizer.decode(&case.completion_ids, true).unwrap());
        assert_eq!(last.finish_reason, case.finish_reason);
        let usage = last.usage.unwrap();
        let end = i64::from(case.finish_reason == "stop");
        assert_eq!(usage.prompt_tokens, case.prompt_ids.len() as i64);
        assert_eq!(usage.completion_tokens, case.completion_ids.len() as i64 + end);
        assert_eq!(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens);
        assert_eq!(usage.cost_micros, 0);
    }
    server.stop().await;
}

#[tokio::test]
async fn embed_classify_and_list_models_over_grpc() {
    let server = start(common::config(&common::models_dir())).await;
    let mut client = server.client.clone();
    let (reference, _) = common::reference("tiny-embed");
    let inputs: Vec<String> = reference.embeddings.iter().map(|c| c.text.clone()).collect();
    let out = client.embed(pb::EmbedRequest { model: "tiny-embed".into(), inputs }).await.unwrap().into_inner();
    assert_eq!(out.dims, 32);
    for (embedding, case) in out.embeddings.iter().zip(&reference.embeddings) {
        assert!(common::cosine(&embedding.values, &case.vector) >= 0.9999);
    }
    let tokens: usize = reference.embeddings.iter().map(|c| c.input_ids.len()).sum();
    assert_eq!(out.usage.unwrap().prompt_tokens, tokens as i64);

    let classified = client
        .classify(pb::ClassifyRequest {
            model: "tiny-classify".into(),
            inputs: vec!["the quick brown fox".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let scores = &classified.results[0].scores;
    assert_eq!(scores.len(), 5);
    // A classifier graph of its own is the encoder stage; the answer also lists it by model.
    assert_eq!((classified.results[0].stage.as_str(), classified.results[0].cached), ("encoder", false));
    assert_eq!(classified.by_model.len(), 1);
    assert_eq!(classified.by_model[0].model, "tiny-classify");
    assert!(scores.windows(2).all(|w| w[0].probability >= w[1].probability));

    let listed = client.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner();
    let names: Vec<&str> = listed.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["tiny-chat", "tiny-classify", "tiny-embed"]);
    assert!(listed.models.iter().all(|m| m.loaded && m.error.is_empty()));
    let embed = listed.models.iter().find(|m| m.name == "tiny-embed").unwrap();
    assert_eq!((embed.task.as_str(), embed.dims, embed.context_length), ("embeddings", 32, 64));
    // Load for routing: queues of the encoder models, none for chat, and the admission limit.
    let capacity = Config::default().batching.queue_capacity as i64;
    assert_eq!((embed.queue_depth, embed.queue_capacity), (0, capacity));
    let chat = listed.models.iter().find(|m| m.name == "tiny-chat").unwrap();
    assert_eq!((chat.queue_depth, chat.queue_capacity), (0, 0));
    assert_eq!(listed.in_flight, 0);
    assert_eq!(listed.queued, 0);
    assert_eq!(listed.max_in_flight, Config::default().max_in_flight as i64);
    server.stop().await;
}

#[tokio::test]
async fn errors_carry_the_shared_code() {
    let server = start(common::config(&common::models_dir())).await;
    let mut client = server.client.clone();
    let status = client.embed(pb::EmbedRequest { model: "nope".into(), inputs: vec!["x".into()] }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(ApiError::from_status(&status).code, ErrorCode::ModelNotFound);

    let status = client.embed(pb::EmbedRequest { model: "tiny-embed".into(), inputs: vec![] }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    let status =
        client.generate(pb::GenerateRequest { model: "tiny-chat".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("messages"), "{}", status.message());

    let unloaded = client.load(pb::LoadRequest { model: "tiny-chat".into(), unload: true }).await.unwrap().into_inner();
    assert!(!unloaded.model.unwrap().loaded);
    let request = pb::GenerateRequest {
        model: "tiny-chat".into(),
        messages: vec![ChatMessage { role: "user".into(), content: "hi".into(), ..Default::default() }],
        ..Default::default()
    };
    let status = client.generate(request.clone()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(ApiError::from_status(&status).code, ErrorCode::Unavailable);
    let loaded = client.load(pb::LoadRequest { model: "tiny-chat".into(), unload: false }).await.unwrap().into_inner();
    assert!(loaded.model.unwrap().loaded);
    client.generate(request).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_goes_away_stops_its_generation() {
    let config = Config { stream_buffer: 1, ..common::config(&common::models_dir()) };
    let server = start(config).await;
    let mut client = server.client.clone();
    let (reference, _) = common::reference("tiny-chat");
    let case = &reference.greedy[2];
    let request = pb::GenerateRequest {
        model: "tiny-chat".into(),
        messages: messages(case),
        sampling: Some(SamplingParams { max_tokens: Some(100), ..Default::default() }),
        request_id: String::new(),
    };
    let mut stream = client.generate(request).await.unwrap().into_inner();
    assert!(!stream.message().await.unwrap().unwrap().delta.is_empty());
    drop(stream);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listed = client.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner();
        if listed.in_flight == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the generation kept running for a gone client");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_corrupt_model_leaves_the_service_serving_the_others() {
    let dir = common::copy_models();
    std::fs::write(dir.path().join("tiny-chat/model.onnx"), b"garbage").unwrap();
    let server = start(common::config(dir.path())).await;
    let mut client = server.client.clone();
    let listed = client.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner();
    let chat = listed.models.iter().find(|m| m.name == "tiny-chat").unwrap();
    assert!(!chat.loaded);
    assert!(chat.error.contains("corrupt"), "{}", chat.error);
    let request = pb::GenerateRequest {
        model: "tiny-chat".into(),
        messages: vec![ChatMessage { role: "user".into(), content: "hi".into(), ..Default::default() }],
        ..Default::default()
    };
    let status = client.generate(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("corrupt"), "{}", status.message());
    client.embed(pb::EmbedRequest { model: "tiny-embed".into(), inputs: vec!["fine".into()] }).await.unwrap();
    server.stop().await;
}
