//! The engine against a real ONNX Runtime session on the tiny test models, checked against the
//! references the build script computed with Python onnxruntime.

mod common;

use std::time::Duration;

use futures::StreamExt;
use meshgate_inference::batcher::BatchingConfig;
use meshgate_inference::chat::{ChatTurn, Completion, FinishReason};
use meshgate_inference::engine::{GenerateEvent, GenerateStream};
use meshgate_inference::{Config, Engine, Error, InferenceMetrics};
use meshgate_proto::common::v1::SamplingParams;

async fn engine_with(config: Config) -> (Engine, InferenceMetrics) {
    let metrics = InferenceMetrics::new();
    let engine = Engine::new(config, metrics.clone()).unwrap();
    engine.load_all().await;
    engine.ready().unwrap();
    (engine, metrics)
}

async fn engine() -> Engine {
    engine_with(common::config(&common::models_dir())).await.0
}

fn turns(case: &common::GreedyCase) -> Vec<ChatTurn> {
    case.messages.iter().map(|m| ChatTurn::new(&m.role, &m.content)).collect()
}

fn sampling(max_tokens: usize) -> SamplingParams {
    SamplingParams { max_tokens: Some(max_tokens as i64), ..Default::default() }
}

/// Reads a whole stream: the deltas in order and the final completion.
async fn collect(mut stream: GenerateStream) -> (Vec<String>, Completion) {
    let mut deltas = Vec::new();
    while let Some(event) = stream.next().await {
        match event.unwrap() {
            GenerateEvent::Delta(text) => {
                assert!(!text.is_empty(), "empty deltas are not sent");
                deltas.push(text);
            }
            GenerateEvent::Done(done) => {
                assert!(stream.next().await.is_none(), "Done is the last event");
                return (deltas, done);
            }
        }
    }
    panic!("the stream ended without Done");
}

async fn generate(engine: &Engine, messages: Vec<ChatTurn>, params: SamplingParams) -> (Vec<String>, Completion) {
    collect(engine.generate("tiny-chat", messages, Some(params)).await.unwrap()).await
}

#[tokio::test]
async fn embeddings_are_unit_length_and_match_the_python_reference() {
    let engine = engine().await;
    let (reference, _) = common::reference("tiny-embed");
    let texts: Vec<String> = reference.embeddings.iter().map(|c| c.text.clone()).collect();
    let out = engine.embed("tiny-embed", texts).await.unwrap();
    assert_eq!(out.dims, 32);
    assert_eq!(out.vectors.len(), reference.embeddings.len());
    let expected_tokens: usize = reference.embeddings.iter().map(|c| c.input_ids.len()).sum();
    assert_eq!(out.prompt_tokens, expected_tokens as u64);
    for (vector, case) in out.vectors.iter().zip(&reference.embeddings) {
        assert_eq!(vector.len(), 32);
        let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{}: norm {norm}", case.text);
        let cos = common::cosine(vector, &case.vector);
        assert!(cos >= 0.9999, "{}: cosine to the Python reference {cos}", case.text);
    }
}

#[tokio::test]
async fn a_batch_gives_the_vectors_of_single_calls_whatever_the_padding() {
    let engine = engine().await;
    let texts = vec![
        "the cat sat".to_owned(),
        "hello world good morning thank you please the quick brown fox jumps over the lazy dog".to_owned(),
        "rain".to_owned(),
    ];
    let batch = engine.embed("tiny-embed", texts.clone()).await.unwrap();
    for (text, batched) in texts.iter().zip(&batch.vectors) {
        let single = engine.embed("tiny-embed", vec![text.clone()]).await.unwrap();
        let diff = single.vectors[0].iter().zip(batched).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "{text}: batched and single vectors differ by {diff}");
    }
    // Different texts give different vectors: the model really reads its input.
    assert!(common::cosine(&batch.vectors[0], &batch.vectors[2]) < 0.99);
}

#[tokio::test]
async fn concurrent_requests_are_batched_and_each_gets_its_own_results() {
    let batching = BatchingConfig { max_batch_size: 8, max_wait_us: 2000, queue_capacity: 256 };
    let (engine, metrics) = engine_with(Config { batching, ..common::config(&common::models_dir()) }).await;
    let (reference, _) = common::reference("tiny-embed");
    let cases = &reference.embeddings;
    // 40 requests of one or two reference sentences, all at once.
    let requests: Vec<Vec<usize>> = (0..40)
        .map(|i| if i % 3 == 0 { vec![i % cases.len(), (i + 1) % cases.len()] } else { vec![i % cases.len()] })
        .collect();
    let outs = futures::future::join_all(
        requests.iter().map(|r| engine.embed("tiny-embed", r.iter().map(|&c| cases[c].text.clone()).collect())),
    )
    .await;
    for (request, out) in requests.iter().zip(outs) {
        let out = out.unwrap();
        assert_eq!(out.vectors.len(), request.len());
        for (&c, vector) in request.iter().zip(&out.vectors) {
            let cos = common::cosine(vector, &cases[c].vector);
            assert!(cos >= 0.9999, "{}: cosine {cos}", cases[c].text);
        }
        let tokens: usize = request.iter().map(|&c| cases[c].input_ids.len()).sum();
        assert_eq!(out.prompt_tokens, tokens as u64);
    }
    let texts: usize = requests.iter().map(Vec::len).sum();
    let merged = metrics.batch_requests.with_label_values(&["tiny-embed"]);
    let sizes = metrics.batch_size.with_label_values(&["tiny-embed"]);
    // Every request ran exactly once, and every text, in calls of at most 8 texts.
    assert_eq!(merged.get_sample_sum() as usize, requests.len());
    assert_eq!(sizes.get_sample_sum() as usize, texts);
    let families = prometheus::core::Collector::collect(&sizes);
    let buckets = families[0].get_metric()[0].get_histogram().get_bucket().to_vec();
    let within_8 = buckets.iter().find(|b| b.upper_bound() == 8.0).unwrap();
    assert_eq!(within_8.cumulative_count(), sizes.get_sample_count());
    assert_eq!(metrics.queue_depth.with_label_values(&["tiny-embed"]).get(), 0);
    assert_eq!(engine.queued(), 0);
    assert_eq!(engine.in_flight(), 0);

    let labels =
        futures::future::join_all(cases.iter().map(|c| engine.classify("tiny-classify", vec![c.text.clone()]))).await;
    let batch = engine.classify("tiny-classify", cases.iter().map(|c| c.text.clone()).collect()).await.unwrap();
    for (single, batched) in labels.into_iter().zip(&batch.results) {
        let single = &single.unwrap().results[0].scores;
        assert_eq!(single[0].0, batched.scores[0].0);
        assert!((single[0].1 - batched.scores[0].1).abs() < 1e-5);
    }
}

#[tokio::test]
async fn invalid_batching_settings_are_refused_at_start() {
    let batching = BatchingConfig { max_batch_size: 0, ..BatchingConfig::default() };
    let config = Config { batching, ..common::config(&common::models_dir()) };
    let err = Engine::new(config, InferenceMetrics::new()).err().unwrap();
    assert!(matches!(&err, Error::Config(msg) if msg.contains("max_batch_size")), "{err:?}");
}

#[tokio::test]
async fn inputs_longer_than_the_context_are_truncated() {
    let engine = engine().await;
    let long = "the quick brown fox ".repeat(100);
    let out = engine.embed("tiny-embed", vec![long, "fox".into()]).await.unwrap();
    // 64-token context: [CLS] + 62 words + [SEP]; "fox" is [CLS] fox [SEP].
    assert_eq!(out.prompt_tokens, 64 + 3);
    let norm: f32 = out.vectors[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
}

#[tokio::test]
async fn classification_matches_the_python_reference() {
    let engine = engine().await;
    let (reference, entry) = common::reference("tiny-classify");
    let texts: Vec<String> = reference.classifications.iter().map(|c| c.text.clone()).collect();
    let out = engine.classify("tiny-classify", texts).await.unwrap();
    assert_eq!(out.results.len(), reference.classifications.len());
    for (result, case) in out.results.iter().zip(&reference.classifications) {
        let scores = &result.scores;
        assert_eq!(scores.len(), entry.labels.len());
        let total: f32 = scores.iter().map(|(_, p)| p).sum();
        assert!((total - 1.0).abs() < 1e-4, "{}: probabilities sum to {total}", case.text);
        assert!(scores.windows(2).all(|w| w[0].1 >= w[1].1), "most likely first");
        for (label, p) in scores {
            let i = entry.labels.iter().position(|l| l == label).unwrap();
            assert!(
                (p - case.probabilities[i]).abs() < 1e-4,
                "{}: {label} {p} vs {}",
                case.text,
                case.probabilities[i]
            );
        }
    }
}

#[tokio::test]
async fn greedy_generation_matches_python_onnxruntime_token_for_token() {
    let engine = engine().await;
    let tokenizer = common::tokenizer("tiny-chat");
    let (reference, _) = common::reference("tiny-chat");
    let mut reasons = Vec::new();
    for case in &reference.greedy {
        let (deltas, done) = generate(&engine, turns(case), sampling(case.max_tokens)).await;
        assert_eq!(done.token_ids, case.completion_ids, "prompt {:?}", case.prompt);
        assert_eq!(done.finish_reason.as_str(), case.finish_reason);
        assert_eq!(done.prompt_tokens, case.prompt_ids.len());
        // The end token counts as produced.
        let end = usize::from(done.finish_reason == FinishReason::Stop);
        assert_eq!(done.completion_tokens, case.completion_ids.len() + end);
        // Streamed pieces decode incrementally to exactly the text of the whole sequence.
        assert_eq!(deltas.concat(), tokenizer.decode(&case.completion_ids, true).unwrap());
        assert_eq!(deltas.concat(), done.text);
        reasons.push(done.finish_reason);
    }
    assert!(reasons.contains(&FinishReason::Stop) && reasons.contains(&FinishReason::Length));
}

#[tokio::test]
async fn greedy_generation_is_deterministic_and_concurrent_runs_do_not_interfere() {
    let engine = engine().await;
    let (reference, _) = common::reference("tiny-chat");
    let runs = futures::future::join_all(
        reference
            .greedy
            .iter()
            .chain(&reference.greedy)
            .map(|case| generate(&engine, turns(case), sampling(case.max_tokens))),
    )
    .await;
    let n = reference.greedy.len();
    for (i, case) in reference.greedy.iter().enumerate() {
        assert_eq!(runs[i].1.token_ids, case.completion_ids);
        assert_eq!(runs[i], runs[i + n]);
    }
    assert_eq!(engine.in_flight(), 0);
}

#[tokio::test]
async fn the_same_seed_repeats_its_sample_and_another_seed_differs() {
    let engine = engine().await;
    let (reference, _) = common::reference("tiny-chat");
    let case = &reference.greedy[1];
    let params = |seed| SamplingParams {
        max_tokens: Some(24),
        temperature: Some(1.0),
        top_p: Some(0.95),
        top_k: Some(100),
        seed: Some(seed),
        stop: vec![],
    };
    let (_, a) = generate(&engine, turns(case), params(7)).await;
    let (_, b) = generate(&engine, turns(case), params(7)).await;
    let (_, c) = generate(&engine, turns(case), params(8)).await;
    assert_eq!(a.token_ids, b.token_ids);
    assert_eq!(a.text, b.text);
    assert_ne!(a.token_ids, c.token_ids);
    assert_ne!(a.token_ids, case.completion_ids, "sampling at temperature 1 is not greedy");
}

#[tokio::test]
async fn max_tokens_cuts_the_greedy_sequence() {
    let engine = engine().await;
    let (reference, _) = common::reference("tiny-chat");
    let case = reference.greedy.iter().find(|c| c.finish_reason == "length").unwrap();
    let (_, done) = generate(&engine, turns(case), sampling(5)).await;
    assert_eq!(done.finish_reason, FinishReason::Length);
    assert_eq!(done.completion_tokens, 5);
    assert_eq!(done.token_ids, case.completion_ids[..5]);
}

#[tokio::test]
async fn generation_stops_before_a_stop_sequence() {
    let engine = engine().await;
    let tokenizer = common::tokenizer("tiny-chat");
    let (reference, _) = common::reference("tiny-chat");
    let case = reference.greedy.iter().find(|c| c.finish_reason == "length").unwrap();
    let full = tokenizer.decode(&case.completion_ids, true).unwrap();
    // Two characters from the middle of the greedy text (not a replacement character, which
    // stands for bytes that are not text yet).
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    let (at, stop) = (chars.len() / 2..chars.len() - 1)
        .map(|i| (chars[i].0, format!("{}{}", chars[i].1, chars[i + 1].1)))
        .find(|(_, s)| !s.contains('\u{FFFD}'))
        .unwrap();
    let expected = &full[..full.find(&stop).unwrap()];
    assert!(full.find(&stop).unwrap() <= at);

    let params =
        SamplingParams { max_tokens: Some(case.max_tokens as i64), stop: vec![stop.clone()], ..Default::default() };
    let (deltas, done) = generate(&engine, turns(case), params).await;
    assert_eq!(done.finish_reason, FinishReason::Stop);
    assert_eq!(deltas.concat(), expected, "stop {stop:?}");
    assert_eq!(done.text, expected);
    assert!(done.completion_tokens < case.completion_ids.len());
    assert_eq!(done.token_ids, case.completion_ids[..done.completion_tokens]);
}

#[tokio::test]
async fn max_tokens_beyond_the_context_stops_at_the_context() {
    let engine = engine().await;
    let (reference, entry) = common::reference("tiny-chat");
    let case = &reference.greedy[2];
    let (_, done) = generate(&engine, turns(case), sampling(10_000)).await;
    let room = entry.context_length as usize - case.prompt_ids.len();
    assert!(done.completion_tokens <= room);
    if done.finish_reason == FinishReason::Length {
        assert_eq!(done.completion_tokens, room);
    }
    assert_eq!(done.token_ids[..case.completion_ids.len()], case.completion_ids[..]);
}

#[tokio::test]
async fn bad_requests_get_the_matching_error() {
    let engine = engine().await;
    let user = || vec![ChatTurn::new("user", "hi")];
    let gen_err = |messages, params| {
        let engine = engine.clone();
        async move { engine.generate("tiny-chat", messages, Some(params)).await.err().unwrap() }
    };
    assert!(matches!(gen_err(vec![], sampling(4)).await, Error::InvalidRequest(_)));
    assert!(matches!(gen_err(vec![ChatTurn::new("robot", "x")], sampling(4)).await, Error::InvalidRequest(_)));
    assert!(matches!(gen_err(user(), sampling(0)).await, Error::InvalidRequest(_)));
    let hot = SamplingParams { temperature: Some(-1.0), ..Default::default() };
    assert!(matches!(gen_err(user(), hot).await, Error::InvalidRequest(_)));
    let empty_stop = SamplingParams { stop: vec![String::new()], ..Default::default() };
    assert!(matches!(gen_err(user(), empty_stop).await, Error::InvalidRequest(_)));
    let long = vec![ChatTurn::new("user", "word ".repeat(500))];
    match gen_err(long, sampling(4)).await {
        Error::InvalidRequest(msg) => assert!(msg.contains("context"), "{msg}"),
        other => panic!("{other:?}"),
    }

    assert!(matches!(engine.generate("nope", user(), None).await.err().unwrap(), Error::ModelNotFound(_)));
    assert!(matches!(engine.embed("nope", vec!["x".into()]).await.unwrap_err(), Error::ModelNotFound(_)));
    assert!(matches!(engine.classify("nope", vec!["x".into()]).await.unwrap_err(), Error::ModelNotFound(_)));
    assert!(matches!(engine.embed("", vec!["x".into()]).await.unwrap_err(), Error::InvalidRequest(_)));
    assert!(matches!(engine.embed("tiny-chat", vec!["x".into()]).await.unwrap_err(), Error::WrongTask { .. }));
    assert!(matches!(engine.generate("tiny-embed", user(), None).await.err().unwrap(), Error::WrongTask { .. }));
    assert!(matches!(engine.embed("tiny-embed", vec![]).await.unwrap_err(), Error::InvalidRequest(_)));
    assert!(matches!(
        engine.embed("tiny-embed", vec!["ok".into(), " ".into()]).await.unwrap_err(),
        Error::InvalidRequest(_)
    ));
    let too_many = vec!["x".to_owned(); engine.config().max_batch_inputs + 1];
    assert!(matches!(engine.embed("tiny-embed", too_many).await.unwrap_err(), Error::InvalidRequest(_)));
    assert_eq!(engine.in_flight(), 0);
}

#[tokio::test]
async fn a_dropped_stream_stops_the_generation() {
    let config = Config { stream_buffer: 1, ..common::config(&common::models_dir()) };
    let (engine, metrics) = engine_with(config).await;
    let (reference, _) = common::reference("tiny-chat");
    let case = &reference.greedy[2];
    let mut stream = engine.generate("tiny-chat", turns(case), Some(sampling(100))).await.unwrap();
    assert!(matches!(stream.next().await, Some(Ok(GenerateEvent::Delta(_)))));
    drop(stream);
    // With one buffered chunk the generation cannot have finished: it notices the closed channel.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while engine.in_flight() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the generation kept running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metrics.requests.with_label_values(&["tiny-chat", "chat", "cancelled"]).get(), 1);
    assert_eq!(metrics.requests.with_label_values(&["tiny-chat", "chat", "ok"]).get(), 0);
}

#[tokio::test]
async fn overload_is_refused_and_counted_out() {
    let config = Config { max_in_flight: 1, stream_buffer: 1, ..common::config(&common::models_dir()) };
    let (engine, _) = engine_with(config).await;
    let (reference, _) = common::reference("tiny-chat");
    let case = &reference.greedy[2];
    let mut held = engine.generate("tiny-chat", turns(case), Some(sampling(100))).await.unwrap();
    assert!(matches!(held.next().await, Some(Ok(GenerateEvent::Delta(_)))));
    let err = engine.embed("tiny-embed", vec!["x".into()]).await.unwrap_err();
    assert!(matches!(err, Error::Overloaded(1)), "{err:?}");
    drop(held);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while engine.in_flight() > 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    engine.embed("tiny-embed", vec!["x".into()]).await.unwrap();
}

#[tokio::test]
async fn models_unload_and_load_at_runtime() {
    let engine = engine().await;
    let status = engine.unload("tiny-embed").await.unwrap();
    assert!(!status.loaded);
    match engine.embed("tiny-embed", vec!["x".into()]).await.unwrap_err() {
        Error::ModelUnavailable { reason, .. } => assert!(reason.contains("unloaded"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let status = engine.load("tiny-embed").await.unwrap();
    assert!(status.loaded && status.error.is_none());
    assert_eq!(status.dims, Some(32));
    engine.embed("tiny-embed", vec!["x".into()]).await.unwrap();
    assert!(matches!(engine.load("nope").await.unwrap_err(), Error::ModelNotFound(_)));
}

#[tokio::test]
async fn broken_model_files_are_reported_while_the_others_serve() {
    let dir = common::copy_models();
    std::fs::write(dir.path().join("tiny-chat/model.onnx"), b"not an onnx model").unwrap();
    std::fs::remove_file(dir.path().join("tiny-classify/model.onnx")).unwrap();
    let (engine, _) = engine_with(common::config(dir.path())).await;

    let models = engine.models();
    let by_name = |name: &str| models.iter().find(|m| m.name == name).unwrap().clone();
    let chat = by_name("tiny-chat");
    assert!(!chat.loaded);
    assert!(chat.error.as_deref().unwrap().contains("corrupt"), "{chat:?}");
    let classify = by_name("tiny-classify");
    assert!(classify.error.as_deref().unwrap().contains("missing"), "{classify:?}");
    assert!(by_name("tiny-embed").loaded);

    engine.embed("tiny-embed", vec!["still serving".into()]).await.unwrap();
    match engine.generate("tiny-chat", vec![ChatTurn::new("user", "hi")], None).await.err().unwrap() {
        Error::ModelUnavailable { reason, .. } => assert!(reason.contains("corrupt"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // A retry still fails honestly; the reason stays visible.
    assert!(!engine.load("tiny-chat").await.unwrap().loaded);
}

#[tokio::test]
async fn an_unparseable_model_is_reported_by_onnx_runtime_when_hashes_are_not_checked() {
    let dir = common::copy_models();
    std::fs::write(dir.path().join("tiny-chat/model.onnx"), b"not an onnx model").unwrap();
    let config = Config { verify_sha256: false, ..common::config(dir.path()) };
    let (engine, _) = engine_with(config).await;
    let chat = engine.models().into_iter().find(|m| m.name == "tiny-chat").unwrap();
    assert!(!chat.loaded);
    assert!(chat.error.as_deref().unwrap().contains("cannot load"), "{chat:?}");
    engine.embed("tiny-embed", vec!["x".into()]).await.unwrap();
}

#[tokio::test]
async fn a_missing_manifest_is_an_empty_registry_and_a_broken_one_an_error() {
    let empty = tempfile::tempdir().unwrap();
    let (engine, _) = engine_with(common::config(empty.path())).await;
    assert!(engine.models().is_empty());
    assert!(matches!(engine.embed("tiny-embed", vec!["x".into()]).await.unwrap_err(), Error::ModelNotFound(_)));

    std::fs::write(empty.path().join("manifest.json"), "{not json").unwrap();
    let err = Engine::new(common::config(empty.path()), InferenceMetrics::new()).err().unwrap();
    assert!(matches!(err, Error::Manifest { .. }), "{err:?}");
}
