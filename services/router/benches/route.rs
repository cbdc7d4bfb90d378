//! Route latency without classification: the decision alone (in process), and a `Decide` call
//! with a task hint over loopback gRPC. `cargo bench -p meshgate-router --bench route`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshgate_catalog::Catalog;
use meshgate_catalog::ProviderSpec;
use meshgate_proto::common::v1::{ChatMessage, Principal};
use meshgate_proto::router::v1::router_client::RouterClient;
use meshgate_proto::router::v1::{DecideRequest, Outcome, RouteRequest};
use meshgate_router::{
    BreakerConfig, Config, LocalModel, ModelFacts, PolicyFile, PolicyStore, RouterCore, TaskClassifier,
};
use meshgate_runtime::{ListenConfig, Listeners, Shutdown};

const PROVIDERS: [&str; 6] = ["openai", "anthropic", "mistral", "groq", "together", "azure"];
const MODELS: [(&str, &str, i64, i64); 4] = [
    ("mini", "l1", 150_000, 600_000),
    ("std", "l2", 2_500_000, 10_000_000),
    ("pro", "l3", 15_000_000, 75_000_000),
    ("code", "l1", 200_000, 800_000),
];
const POLICY: &str = r#"
[default]
max_cost_micros = 50000
[default.tasks.code]
prefer = ["openai/code", "local/coder"]
fallback = ["anthropic/std"]
[projects.p]
choose_model = true
weights = { "groq/mini" = 3 }
"#;

fn facts() -> BTreeMap<String, ModelFacts> {
    MODELS
        .iter()
        .map(|(name, layer, input, output)| {
            let tasks = if *name == "code" { vec!["code".to_owned()] } else { Vec::new() };
            let facts = ModelFacts {
                layer: Some((*layer).into()),
                input_price_micros_per_mtok: Some(*input),
                output_price_micros_per_mtok: Some(*output),
                context_window: Some(128_000),
                tasks,
                ..Default::default()
            };
            ((*name).to_owned(), facts)
        })
        .collect()
}

fn providers() -> Vec<ProviderSpec> {
    PROVIDERS
        .iter()
        .enumerate()
        .map(|(i, name)| ProviderSpec {
            name: (*name).into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            models: MODELS.iter().map(|m| m.0.to_owned()).collect(),
            priority: Some((i / 2) as i32),
            ..Default::default()
        })
        .collect()
}

fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    format!("p50 {:?}  p99 {:?}  max {:?}  (n = {})", at(0.50), at(0.99), at(1.0), samples.len())
}

fn request(i: usize) -> RouteRequest {
    RouteRequest {
        request_id: format!("r{i}"),
        principal: Some(Principal {
            project_id: if i.is_multiple_of(2) { "p".into() } else { "q".into() },
            ..Default::default()
        }),
        model: if i.is_multiple_of(3) { "auto".into() } else { "std".into() },
        prompt_tokens: 200 + (i as i64 % 1000),
        max_tokens: 512,
        stream: i.is_multiple_of(2),
        task: "chat".into(),
        capabilities: Vec::new(),
    }
}

const HINTS: [&str; 5] = ["code", "math", "creative", "reasoning", "chat"];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // In process: the decision with its features, policy resolution and live state.
    let catalog = Catalog::resolve(&providers(), std::iter::empty::<(String, String)>(), &facts(), None).unwrap();
    let policies = Arc::new(PolicyStore::new(Default::default()));
    let file = PolicyFile::parse(POLICY).unwrap();
    policies.update(|set| set.file = Some(file));
    let core = RouterCore::new(Arc::new(catalog), BreakerConfig::default(), policies, TaskClassifier::heuristic_only());
    core.set_local_models(vec![
        LocalModel { name: "chat".into(), task: "chat".into(), context_length: 2048 },
        LocalModel { name: "coder".into(), task: "chat".into(), context_length: 4096 },
    ]);
    let mut rng = rand::rng();
    let mut samples = Vec::with_capacity(100_000);
    for i in 0..110_000 {
        let features = core.features(&request(i), &[], HINTS[i % 5]).await.unwrap();
        let start = Instant::now();
        let plan = core.plan(&features, Instant::now(), &mut rng).unwrap();
        let elapsed = start.elapsed();
        // Outcomes keep the live state moving (latency, in flight, breakers) as in production.
        let target = plan.targets[0].target.as_ref().unwrap().id.clone();
        core.report(
            &Outcome {
                target_id: target,
                ok: !i.is_multiple_of(50),
                latency_us: 1000 + (i as i64 % 700),
                primary: true,
                ..Default::default()
            },
            Instant::now(),
        );
        if i >= 10_000 {
            samples.push(elapsed);
        }
    }
    println!("decision (in process, 26 targets):      {}", percentiles(samples));

    // Over gRPC on loopback: Decide with a task hint, so no classification.
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let listeners = Listeners::bind(&ListenConfig { grpc: any, admin: any, http: None }).await.unwrap();
    let url = format!("http://{}", listeners.grpc_addr());
    let config = Config { providers: providers(), models: facts(), ..Default::default() };
    let shutdown = Shutdown::new();
    let server = tokio::spawn(meshgate_router::serve(config, listeners, shutdown.clone()));
    let mut client = RouterClient::new(meshgate_runtime::channel(&url, Duration::from_secs(2)).unwrap());
    let messages = vec![ChatMessage { role: "user".into(), content: "hello there".into(), ..Default::default() }];
    let mut samples = Vec::with_capacity(20_000);
    for i in 0..22_000 {
        let decide =
            DecideRequest { request: Some(request(i)), messages: messages.clone(), task_hint: HINTS[i % 5].into() };
        let start = Instant::now();
        client.decide(decide).await.unwrap();
        if i >= 2_000 {
            samples.push(start.elapsed());
        }
    }
    println!("Decide over loopback gRPC (task hint):  {}", percentiles(samples));
    shutdown.trigger();
    server.await.unwrap().unwrap();
}
