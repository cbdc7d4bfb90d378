//! Classifier cascades on the tiny test models (`target/test-models/cascade`, built by
//! `scripts/make-test-models.py` as `scripts/fetch-models.sh` builds the real ones): the first
//! stage and the head agree with Python, several classifiers share one encoder pass, embeddings
//! are cached by content, and the gRPC contract carries it all.

mod common;

use std::time::Duration;

use meshgate_inference::cascade::Stage;
use meshgate_inference::config::BatchingConfig;
use meshgate_inference::manifest::{Manifest, ModelEntry};
use meshgate_inference::{Config, Engine, InferenceMetrics};
use meshgate_proto::inference::v1 as pb;
use meshgate_proto::inference::v1::inference_client::InferenceClient;
use meshgate_runtime::{Listeners, Shutdown};
use tonic::transport::Channel;

const CLASSIFIERS: [&str; 2] = ["tiny-guard", "tiny-topic"];

async fn engine(config: Config) -> (Engine, InferenceMetrics) {
    let metrics = InferenceMetrics::new();
    let engine = Engine::new(config, metrics.clone()).unwrap();
    engine.load_all().await;
    for status in engine.models() {
        assert!(status.loaded, "{}: {:?}", status.name, status.error);
    }
    (engine, metrics)
}

fn entries() -> Vec<ModelEntry> {
    Manifest::load(&common::cascade_dir().join("manifest.json")).unwrap().models
}

fn reference(name: &str) -> (Vec<common::CascadeCase>, ModelEntry) {
    let entry = entries().into_iter().find(|e| e.name == name).unwrap();
    let reference = common::reference_in(&common::cascade_dir(), &entry).unwrap();
    assert!(!reference.cascade.is_empty());
    (reference.cascade, entry)
}

/// Encoder session calls so far (one per batch of texts).
fn encoder_runs(metrics: &InferenceMetrics) -> u64 {
    metrics.batch_size.with_label_values(&["tiny-encoder"]).get_sample_count()
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4)
}

#[tokio::test]
async fn each_stage_matches_python_and_settles_what_python_settles() {
    let (engine, metrics) = engine(common::config(&common::cascade_dir())).await;
    for name in CLASSIFIERS {
        let (cases, entry) = reference(name);
        let texts: Vec<String> = cases.iter().map(|c| c.text.clone()).collect();
        let out = engine.classify(name, texts).await.unwrap();
        assert_eq!(out.model, name);
        for (result, case) in out.results.iter().zip(&cases) {
            assert_eq!(result.stage.as_str(), case.stage, "{name}: {}", case.text);
            let mut by_label = vec![0.0; entry.labels.len()];
            for (label, p) in &result.scores {
                by_label[entry.labels.iter().position(|l| l == label).unwrap()] = *p;
            }
            assert!(
                close(&by_label, &case.probabilities),
                "{name}: {}: {by_label:?} vs {:?}",
                case.text,
                case.probabilities
            );
            assert!(result.scores.windows(2).all(|w| w[0].1 >= w[1].1), "most likely first");
        }
        let settled = cases.iter().filter(|c| c.stage == "first_stage").count() as u64;
        assert_eq!(metrics.classify_stage.with_label_values(&[name, "first_stage"]).get(), settled);
        assert_eq!(metrics.classify_stage.with_label_values(&[name, "encoder"]).get(), cases.len() as u64 - settled);
    }
}

#[tokio::test]
async fn classifiers_sharing_an_encoder_share_one_pass_and_answer_as_they_do_alone() {
    let batching = BatchingConfig { max_batch_size: 16, ..BatchingConfig::default() };
    let config = Config { classification_cache_entries: 0, batching, ..common::config(&common::cascade_dir()) };
    let (engine, metrics) = engine(config).await;
    let (cases, _) = reference("tiny-guard");
    let texts: Vec<String> = cases.iter().map(|c| c.text.clone()).collect();
    assert!(texts.len() <= 16, "one batch holds them all");

    let alone: Vec<_> = futures::future::join_all(CLASSIFIERS.map(|name| engine.classify(name, texts.clone())))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let runs = encoder_runs(&metrics);
    let models: Vec<String> = CLASSIFIERS.iter().map(|n| n.to_string()).chain(["tiny-guard".into()]).collect();
    let together = engine.classify_many(&models, texts.clone()).await.unwrap();
    // One encoder pass over the texts either classifier left to it; a name given twice runs once.
    assert_eq!(encoder_runs(&metrics) - runs, 1);
    assert_eq!(together.iter().map(|o| o.model.as_str()).collect::<Vec<_>>(), CLASSIFIERS);
    for (joint, single) in together.iter().zip(&alone) {
        for (a, b) in joint.results.iter().zip(&single.results) {
            assert_eq!((a.stage, &a.scores[0].0), (b.stage, &b.scores[0].0));
            assert!((a.scores[0].1 - b.scores[0].1).abs() < 1e-5);
        }
        assert_eq!(joint.prompt_tokens, single.prompt_tokens);
    }

    // Texts every classifier settles in its first stage never reach the encoder.
    let settled_by_both: Vec<String> = texts
        .iter()
        .enumerate()
        .filter(|(i, _)| alone.iter().all(|o| o.results[*i].stage == Stage::FirstStage))
        .map(|(_, t)| t.clone())
        .collect();
    assert!(!settled_by_both.is_empty(), "the reference has texts both first stages settle");
    let runs = encoder_runs(&metrics);
    engine.classify_many(&models, settled_by_both).await.unwrap();
    assert_eq!(encoder_runs(&metrics), runs);
}

#[tokio::test]
async fn embeddings_are_cached_by_content_and_the_cache_is_bounded() {
    let config = Config { classification_cache_entries: 4, ..common::config(&common::cascade_dir()) };
    let (engine, metrics) = engine(config).await;
    let (cases, _) = reference("tiny-guard");
    let to_encoder: Vec<String> = cases.iter().filter(|c| c.stage == "encoder").map(|c| c.text.clone()).collect();
    assert!(to_encoder.len() >= 2);
    let pair = to_encoder[..2].to_vec();

    let first = engine.classify("tiny-guard", pair.clone()).await.unwrap();
    assert!(first.results.iter().all(|r| r.stage == Stage::Encoder && !r.cached));
    let runs = encoder_runs(&metrics);
    // The other classifier reads the same embeddings: cached, no encoder run.
    let topic = engine.classify("tiny-topic", pair.clone()).await.unwrap();
    let again = engine.classify("tiny-guard", pair.clone()).await.unwrap();
    assert_eq!(encoder_runs(&metrics), runs);
    assert!(again.results.iter().all(|r| r.stage == Stage::Encoder && r.cached));
    assert_eq!(
        again.results.iter().map(|r| &r.scores).collect::<Vec<_>>(),
        first.results.iter().map(|r| &r.scores).collect::<Vec<_>>()
    );
    let hits = metrics.embedding_cache.with_label_values(&["tiny-encoder", "hit"]).get();
    let topic_hits = topic.results.iter().filter(|r| r.cached).count() as u64;
    assert_eq!(hits, topic_hits + 2);

    // A text differing by one character is another text.
    let changed = engine.classify("tiny-guard", vec![format!("{} ", pair[0])]).await.unwrap();
    assert!(!changed.results[0].cached);

    // Many distinct texts later, the first ones were evicted: the cache holds at most 4.
    let many: Vec<String> = (0..12).map(|i| format!("zebra {i} xylophone {i}")).collect();
    engine.classify("tiny-guard", many).await.unwrap();
    let later = engine.classify("tiny-guard", vec![pair[0].clone()]).await.unwrap();
    assert!(later.results.iter().all(|r| r.stage == Stage::FirstStage || !r.cached));
}

#[tokio::test]
async fn a_cascade_without_its_encoder_is_reported_not_loaded() {
    // The encoder's graph is missing: the encoder fails, and so do its classifiers, with the reason.
    let copy = common::copy_models();
    std::fs::remove_file(copy.path().join("cascade/tiny-encoder/model.onnx")).unwrap();
    let engine = Engine::new(common::config(&copy.path().join("cascade")), InferenceMetrics::new()).unwrap();
    engine.load_all().await;
    let guard = engine.models().into_iter().find(|m| m.name == "tiny-guard").unwrap();
    assert!(!guard.loaded);
    let reason = guard.error.unwrap();
    assert!(reason.contains("tiny-encoder") && reason.contains("missing"), "{reason}");
    let err = engine.classify("tiny-guard", vec!["hello".into()]).await.unwrap_err();
    assert_eq!(err.code(), meshgate_runtime::ErrorCode::Unavailable);
}

#[tokio::test]
async fn grpc_classify_names_several_models_and_says_what_settled_each_result() {
    let listeners = Listeners::ephemeral().await.unwrap();
    let addr = listeners.grpc_addr();
    let shutdown = Shutdown::new();
    let task =
        tokio::spawn(meshgate_inference::serve(common::config(&common::cascade_dir()), listeners, shutdown.clone()));
    let health = meshgate_runtime::channel(&format!("http://{addr}"), Duration::from_secs(1)).unwrap();
    meshgate_runtime::client::wait_serving(&health, "meshgate.inference.v1.Inference", Duration::from_secs(30))
        .await
        .unwrap();
    let mut client = InferenceClient::new(Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy());
    let (cases, _) = reference("tiny-guard");
    let inputs: Vec<String> = cases.iter().map(|c| c.text.clone()).collect();

    let request =
        pb::ClassifyRequest { model: "tiny-guard".into(), inputs: inputs.clone(), models: vec!["tiny-topic".into()] };
    let response = client.classify(request).await.unwrap().into_inner();
    let names: Vec<&str> = response.by_model.iter().map(|m| m.model.as_str()).collect();
    assert_eq!(names, CLASSIFIERS);
    assert_eq!(response.results, response.by_model[0].results);
    for (result, case) in response.results.iter().zip(&cases) {
        assert_eq!(result.stage, case.stage, "{}", case.text);
        assert_eq!(result.scores.len(), 2);
    }
    assert!(response.by_model[1].results.iter().all(|r| r.scores.len() == 3 && !r.stage.is_empty()));

    // `model` may be left empty when `models` names them.
    let request =
        pb::ClassifyRequest { model: String::new(), inputs: inputs.clone(), models: vec!["tiny-topic".into()] };
    let response = client.classify(request).await.unwrap().into_inner();
    assert_eq!(response.by_model.len(), 1);
    assert_eq!(response.results.len(), inputs.len());
    // The second call found every embedding the first computed.
    let encoder_results: Vec<&pb::Classification> = response.results.iter().filter(|r| r.stage == "encoder").collect();
    assert!(!encoder_results.is_empty() && encoder_results.iter().all(|r| r.cached));

    // No model at all, an unknown one, or a model of another task: invalid requests, named.
    let status =
        client.classify(pb::ClassifyRequest { inputs: inputs.clone(), ..Default::default() }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let unknown =
        pb::ClassifyRequest { model: "tiny-guard".into(), inputs: inputs.clone(), models: vec!["nope".into()] };
    let status = client.classify(unknown).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert!(status.message().contains("nope"), "{}", status.message());
    let wrong = pb::ClassifyRequest { model: "tiny-encoder".into(), inputs, models: vec![] };
    assert_eq!(client.classify(wrong).await.unwrap_err().code(), tonic::Code::InvalidArgument);

    shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(15), task).await.unwrap().unwrap().unwrap();
}
