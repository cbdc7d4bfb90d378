//! Replays the task classifier's evaluation set (`eval/tasks.jsonl`) against the real task
//! classifier served by a real inference service on loopback:
//! 1. classification latency: `Classify` on the inference service, and `Decide` end to end
//!    (router → inference → plan) against `Decide` with a task hint (no classification);
//! 2. cost: every prompt routed with a realistic catalog and policy versus always served by a
//!    premium model, with the share of requests per layer; for the classifier, the keyword
//!    heuristic and the true labels (an oracle).
//!
//! `cargo bench -p meshgate-router --bench replay` (needs `scripts/fetch-models.sh`'s models in
//! `MESHGATE_TEST_REAL_MODELS_DIR` or `models/`, and `ORT_DYLIB_PATH`).

#[path = "../tests/common/eval.rs"]
mod eval;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshgate_catalog::{Catalog, ProviderSpec};
use meshgate_proto::common::v1::{ChatMessage, Layer, Principal};
use meshgate_proto::inference::v1::ClassifyRequest;
use meshgate_proto::inference::v1::inference_client::InferenceClient;
use meshgate_proto::router::v1::router_client::RouterClient;
use meshgate_proto::router::v1::{DecideRequest, Outcome, RouteRequest};
use meshgate_router::policy::layer_name;
use meshgate_router::{
    BreakerConfig, Config, LocalModel, ModelFacts, PolicyFile, PolicyStore, RouterCore, Task, TaskClassifier,
};
use meshgate_runtime::{ListenConfig, Listeners, Shutdown};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// Completion tokens an answer of each task typically takes (the cost replay's assumption).
fn completion_tokens(task: Task) -> i64 {
    match task {
        Task::Chat => 150,
        Task::Creative => 450,
        Task::Math => 350,
        Task::Code => 600,
        Task::Reasoning => 550,
    }
}

/// A cloud model with its list prices per million input / output tokens, micro-dollars.
struct Model {
    provider: &'static str,
    name: &'static str,
    layer: &'static str,
    input: i64,
    output: i64,
    tasks: &'static [&'static str],
}

const fn model(
    provider: &'static str,
    name: &'static str,
    layer: &'static str,
    input: i64,
    output: i64,
    tasks: &'static [&'static str],
) -> Model {
    Model { provider, name, layer, input, output, tasks }
}

const CATALOG: [Model; 6] = [
    model("openai", "gpt-4o-mini", "l1", 150_000, 600_000, &[]),
    model("anthropic", "claude-3-5-haiku", "l1", 800_000, 4_000_000, &["chat", "creative", "code"]),
    model("openai", "gpt-4o", "l2", 2_500_000, 10_000_000, &[]),
    model("anthropic", "claude-sonnet-4", "l2", 3_000_000, 15_000_000, &[]),
    model("openai", "o1", "l3", 15_000_000, 60_000_000, &["code", "math", "reasoning"]),
    model("anthropic", "claude-opus-4", "l3", 15_000_000, 75_000_000, &[]),
];
/// The premium model the baseline sends everything to.
const PREMIUM: (i64, i64) = (15_000_000, 75_000_000);
/// A local chat model (SmolLM2-360M-Instruct, what `fetch-models.sh --with-chat` provides), for
/// small talk only.
const LOCAL: &str = "smollm2-360m-instruct";

const POLICY: &str = r#"
[default.tasks.code]
layer = "l2"
[default.tasks.reasoning]
layer = "l2"
[default.tasks.math]
layer = "l1"
[default.tasks.creative]
layer = "l1"
"#;

fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    format!("p50 {:?}  p99 {:?}  max {:?}  (n = {})", at(0.50), at(0.99), at(1.0), samples.len())
}

fn messages(text: &str) -> Vec<ChatMessage> {
    let message =
        |role: &str, content: &str| ChatMessage { role: role.into(), content: content.into(), ..Default::default() };
    vec![message("system", eval::SYSTEM), message("user", text)]
}

fn route_request() -> RouteRequest {
    RouteRequest {
        request_id: "replay".into(),
        principal: Some(Principal { project_id: "app".into(), ..Default::default() }),
        model: "auto".into(),
        prompt_tokens: 0,
        max_tokens: 1024,
        stream: true,
        task: "chat".into(),
        capabilities: Vec::new(),
    }
}

fn micros(cost: i128) -> String {
    format!("${:.4}", cost as f64 / 1e6)
}

/// The two cloud providers of [`CATALOG`], equal in priority.
fn providers() -> Vec<ProviderSpec> {
    ["openai", "anthropic"]
        .iter()
        .map(|provider| ProviderSpec {
            name: (*provider).into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            models: CATALOG.iter().filter(|m| m.provider == *provider).map(|m| m.name.to_owned()).collect(),
            priority: Some(0),
            ..Default::default()
        })
        .collect()
}

async fn listeners() -> (Listeners, String) {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let listeners = Listeners::bind(&ListenConfig { grpc: any, admin: any, http: None }).await.unwrap();
    let url = format!("http://{}", listeners.grpc_addr());
    (listeners, url)
}

/// Routes every example and prints the cost against always-premium and the share per layer.
async fn replay_cost(name: &str, classifier: TaskClassifier, examples: &[eval::Example], oracle: bool) {
    let mut facts: BTreeMap<String, ModelFacts> = CATALOG
        .iter()
        .map(|m| {
            let facts = ModelFacts {
                layer: Some(m.layer.into()),
                input_price_micros_per_mtok: Some(m.input),
                output_price_micros_per_mtok: Some(m.output),
                context_window: Some(128_000),
                tasks: m.tasks.iter().map(|t| t.to_string()).collect(),
                ..Default::default()
            };
            (m.name.to_owned(), facts)
        })
        .collect();
    facts.insert(LOCAL.into(), ModelFacts { tasks: vec!["chat".into()], ..Default::default() });
    let policies = Arc::new(PolicyStore::new(Default::default()));
    let file = PolicyFile::parse(POLICY).unwrap();
    policies.update(|set| set.file = Some(file));
    let catalog = Catalog::resolve(&providers(), std::iter::empty::<(String, String)>(), &facts, None).unwrap();
    let core = RouterCore::new(Arc::new(catalog), BreakerConfig::default(), policies, classifier);
    core.set_local_models(vec![LocalModel { name: LOCAL.into(), task: "chat".into(), context_length: 8192 }]);

    let mut rng = StdRng::seed_from_u64(7);
    let (mut routed, mut premium) = (0i128, 0i128);
    let mut layers: BTreeMap<String, usize> = BTreeMap::new();
    let mut predicted = Vec::with_capacity(examples.len());
    for example in examples {
        let hint = if oracle { example.task.as_str() } else { "" };
        let features = core.features(&route_request(), &messages(&example.text), hint).await.unwrap();
        predicted.push(features.task.as_ref().map_or(Task::Chat, |t| t.task));
        let plan = core.plan(&features, Instant::now(), &mut rng).unwrap();
        let target = plan.targets[0].target.as_ref().unwrap();
        let (prompt, completion) = (i128::from(features.prompt_tokens), i128::from(completion_tokens(example.task)));
        routed += (prompt * i128::from(target.input_price_micros_per_mtok)
            + completion * i128::from(target.output_price_micros_per_mtok))
            / 1_000_000;
        premium += (prompt * i128::from(PREMIUM.0) + completion * i128::from(PREMIUM.1)) / 1_000_000;
        let layer = Layer::try_from(target.layer).unwrap_or(Layer::Unspecified);
        *layers.entry(layer_name(layer).to_uppercase()).or_default() += 1;
        let outcome = Outcome {
            target_id: target.id.clone(),
            ok: true,
            latency_us: 800_000,
            primary: true,
            ..Default::default()
        };
        core.report(&outcome, Instant::now());
    }
    let shares: Vec<String> = ["L0", "L1", "L2", "L3"]
        .iter()
        .map(|l| format!("{l} {:.0}%", 100.0 * *layers.get(*l).unwrap_or(&0) as f64 / examples.len() as f64))
        .collect();
    let (rows, table) = eval::per_class(examples, &predicted);
    let correct: usize = rows.iter().map(|r| r.1).sum();
    if !oracle {
        println!("tasks from {name}:\n{table}");
    }
    println!(
        "cost, tasks from {name:<10} ({:>3}/{} right): routed {} vs always-premium {} = {:.1}% of premium; per layer {}",
        correct,
        examples.len(),
        micros(routed),
        micros(premium),
        100.0 * routed as f64 / premium as f64,
        shares.join(", ")
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let models_dir = meshgate_test_support::real_models_dir();
    let examples = eval::examples();
    let inference_shutdown = Shutdown::new();
    let (inference_listeners, inference_url) = listeners().await;
    let inference_config = meshgate_inference::Config {
        models_dir,
        ort_dylib_path: Some(meshgate_test_support::ort_dylib()),
        ..Default::default()
    };
    let inference =
        tokio::spawn(meshgate_inference::serve(inference_config, inference_listeners, inference_shutdown.clone()));
    let channel = meshgate_runtime::channel(&inference_url, Duration::from_secs(2)).unwrap();
    let mut classify = InferenceClient::new(channel.clone());
    let request = |text: &str| ClassifyRequest {
        model: "task-classifier".into(),
        inputs: vec![meshgate_catalog::task::classified_text(&messages(text))],
        ..Default::default()
    };
    while classify.classify(request("hello")).await.is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 1. Classification latency, one request at a time (what one routed request waits).
    let rounds = 4;
    let mut samples = Vec::new();
    for round in 0..=rounds {
        for example in &examples {
            let start = Instant::now();
            classify.classify(request(&example.text)).await.unwrap();
            if round > 0 {
                samples.push(start.elapsed());
            }
        }
    }
    println!("Classify over loopback gRPC (real task classifier):       {}", percentiles(samples));

    let (router_listeners, router_url) = listeners().await;
    let config = Config {
        inference_endpoint: Some(inference_url),
        classifier_model: Some("task-classifier".into()),
        classifier_timeout_ms: 1_000,
        providers: providers(),
        ..Default::default()
    };
    let shutdown = Shutdown::new();
    let router = tokio::spawn(meshgate_router::serve(config, router_listeners, shutdown.clone()));
    let mut client = RouterClient::new(meshgate_runtime::channel(&router_url, Duration::from_secs(2)).unwrap());
    for hinted in [false, true] {
        let mut samples = Vec::new();
        for round in 0..=rounds {
            for example in &examples {
                let decide = DecideRequest {
                    request: Some(route_request()),
                    messages: messages(&example.text),
                    task_hint: if hinted { example.task.as_str().into() } else { String::new() },
                };
                let start = Instant::now();
                let plan = client.decide(decide).await.unwrap().into_inner();
                if round > 0 {
                    samples.push(start.elapsed());
                }
                assert!(hinted || plan.task_source == "classifier:task-classifier", "{:?}", plan.reasons);
            }
        }
        let what = if hinted {
            "Decide with a task hint (no classification):        "
        } else {
            "Decide with classification (router → inference → plan): "
        };
        println!("{what}{}", percentiles(samples));
    }

    // 2. Cost of the replayed mix.
    let pinned = |timeout| {
        TaskClassifier::new(Some(InferenceClient::new(channel.clone())), Some("task-classifier".into()), timeout)
    };
    replay_cost("classifier", pinned(Duration::from_secs(1)), &examples, false).await;
    replay_cost("heuristic", TaskClassifier::heuristic_only(), &examples, false).await;
    replay_cost("true label", TaskClassifier::heuristic_only(), &examples, true).await;

    shutdown.trigger();
    router.await.unwrap().unwrap();
    inference_shutdown.trigger();
    inference.await.unwrap().unwrap();
}
