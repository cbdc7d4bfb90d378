//! The router: turns a request's features (task, sizes, streaming) and its project's policy
//! into an ordered, explained plan of targets, and learns per-target health from reported
//! outcomes so failing or slow targets move back.

pub mod catalog;
pub mod decide;
pub mod discovery;
pub mod features;
pub mod health;
pub mod metrics;
pub mod policy;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use meshgate_proto::common::v1::Layer;
use meshgate_proto::inference::v1::inference_client::InferenceClient;
use meshgate_proto::inference::v1::{ClassifyRequest, ListModelsRequest};
use meshgate_proto::router::v1::router_server::{Router, RouterServer};
use meshgate_proto::router::v1::{
    DecideRequest, ListTargetsRequest, ListTargetsResponse, Outcome, OutcomeBatch, ReportOutcomeResponse, RoutePlan,
    RouteRequest, StepRole, TargetState,
};
use meshgate_runtime::{ErrorCode, Listeners, ServiceHost, Shutdown};
use meshgate_sync::providers::{ProviderSpec, resolve_providers};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

pub use catalog::{Catalog, CloudProvider, Entry, LocalModel, ModelFacts};
pub use decide::Features;
pub use features::{Task, TaskClassifier, TaskGuess};
pub use health::{BreakerConfig, HealthBook};
pub use policy::{PolicyFile, PolicyStore, RoutePolicy};

/// Router configuration (`[router]`, `MESHGATE_ROUTER__*`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Inference service whose local models become L0 targets and whose task classifier
    /// classifies prompts; unset means cloud only, with the heuristic classifier.
    pub inference_endpoint: Option<String>,
    /// How often local models are re-read from the inference service.
    pub local_refresh_ms: u64,
    /// Inference model that classifies tasks; unset means the first loaded classification model
    /// of the inference service whose labels are the five tasks (asked once per model).
    pub classifier_model: Option<String>,
    /// Longest wait for the classifier before the heuristic decides instead.
    pub classifier_timeout_ms: u64,
    /// Circuit breaker settings.
    pub breaker: BreakerConfig,
    /// Declared layer, prices, context window and tasks per model id.
    pub models: BTreeMap<String, ModelFacts>,
    /// Cloud providers; `MESHGATE_PROVIDER_<NAME>_*` add to and override these (see
    /// `meshgate_sync::providers`, shared with the sync service so both agree).
    pub providers: Vec<ProviderSpec>,
    /// The base routing policy of every project (the policy file and `ModelRoute`s lay theirs
    /// over it).
    pub policy: RoutePolicy,
    /// Policy file (TOML: `[default]` and `[projects.<id>]`), re-read when it changes.
    pub policy_file: Option<PathBuf>,
    /// How often the policy file is checked for changes.
    pub policy_poll_ms: u64,
    /// Kubernetes discovery.
    pub kubernetes: KubeConfig,
}

/// What the router watches in Kubernetes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubeConfig {
    /// Watch `ModelRoute`s (and the inference EndpointSlices when `inference_service` is set),
    /// with the in-cluster service account or the local kubeconfig.
    pub enabled: bool,
    /// Namespace watched (default: the client's, i.e. the pod's own namespace).
    pub namespace: Option<String>,
    /// Service of the inference replicas, whose EndpointSlices are watched; with none ready,
    /// local targets leave the plans until one is.
    pub inference_service: Option<String>,
    /// Watch `ModelRoute`s in every namespace instead of `namespace` only.
    pub all_namespaces: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            inference_endpoint: None,
            local_refresh_ms: 5_000,
            classifier_model: None,
            classifier_timeout_ms: 200,
            breaker: BreakerConfig::default(),
            models: BTreeMap::new(),
            providers: Vec::new(),
            policy: RoutePolicy::default(),
            policy_file: None,
            policy_poll_ms: 1_000,
            kubernetes: KubeConfig::default(),
        }
    }
}

/// Errors of the router service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no provider or local model serves model {0:?}")]
    UnknownModel(String),
    #[error("no target may serve this request: {detail}")]
    NoEligibleTarget {
        detail: String,
        /// Whether the project's policy (layer, cost, task, weight) ruled targets out, rather
        /// than the request's size alone.
        by_policy: bool,
    },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("invalid router configuration: {0}")]
    Config(String),
    #[error("cannot reach Kubernetes: {0}")]
    Kube(String),
    #[error(transparent)]
    Serve(#[from] meshgate_runtime::ServeError),
}

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::UnknownModel(_) => ErrorCode::ModelNotFound,
            Error::NoEligibleTarget { by_policy: true, .. } => ErrorCode::PolicyViolation,
            Error::NoEligibleTarget { by_policy: false, .. } | Error::InvalidRequest(_) | Error::Config(_) => {
                ErrorCode::InvalidRequest
            }
            Error::Kube(_) => ErrorCode::Unavailable,
            Error::Serve(_) => ErrorCode::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        err.code().status(err.to_string())
    }
}

/// The routing state shared by the gRPC handlers and the background refreshers and watchers.
pub struct RouterCore {
    cloud: Vec<CloudProvider>,
    facts: BTreeMap<String, ModelFacts>,
    catalog: ArcSwap<Catalog>,
    local: parking_lot::Mutex<Vec<LocalModel>>,
    health: HealthBook,
    policies: Arc<PolicyStore>,
    classifier: TaskClassifier,
    replicas: Arc<discovery::Replicas>,
    decisions: prometheus::IntCounterVec,
}

impl RouterCore {
    pub fn new(
        cloud: Vec<CloudProvider>,
        facts: BTreeMap<String, ModelFacts>,
        breaker: BreakerConfig,
        policies: Arc<PolicyStore>,
        classifier: TaskClassifier,
    ) -> Self {
        let catalog = Catalog::build(&cloud, &[], &facts);
        Self {
            cloud,
            facts,
            catalog: ArcSwap::from_pointee(catalog),
            local: parking_lot::Mutex::default(),
            health: HealthBook::new(breaker),
            policies,
            classifier,
            replicas: Arc::default(),
            decisions: metrics::decisions(),
        }
    }

    /// Registers the router's metrics (decisions, breaker states) in the service's registry.
    pub fn register_metrics(self: &Arc<Self>, registry: &meshgate_runtime::Metrics) {
        registry.register(Box::new(self.decisions.clone()));
        registry.register(Box::new(metrics::BreakerGauge::new(self.clone())));
    }

    pub fn policies(&self) -> &Arc<PolicyStore> {
        &self.policies
    }

    /// Replaces the local models; rebuilds the catalog only when they changed.
    pub fn set_local_models(&self, models: Vec<LocalModel>) {
        let mut local = self.local.lock();
        if *local != models {
            tracing::info!(models = ?models.iter().map(|m| &m.name).collect::<Vec<_>>(), "local models changed");
            self.catalog.store(Arc::new(Catalog::build(&self.cloud, &models, &self.facts)));
            *local = models;
        }
    }

    /// The features of a request: validated sizes, and for chat its task from the hint, the
    /// classifier or the heuristic (`messages` empty: no text, so "chat" from the request).
    pub async fn features(
        &self,
        request: &RouteRequest,
        messages: &[meshgate_proto::common::v1::ChatMessage],
        hint: &str,
    ) -> Result<Features, Error> {
        let model = request.model.trim();
        if model.is_empty() {
            return Err(Error::InvalidRequest("model must not be empty".into()));
        }
        let kind = match request.task.as_str() {
            "" | "chat" => "chat",
            "embeddings" => "embeddings",
            other => return Err(Error::InvalidRequest(format!("unknown task {other:?}; expected chat or embeddings"))),
        };
        if request.prompt_tokens < 0 || request.max_tokens < 0 {
            return Err(Error::InvalidRequest("prompt_tokens and max_tokens must not be negative".into()));
        }
        let prompt_tokens =
            if request.prompt_tokens == 0 { features::estimate_tokens(messages) } else { request.prompt_tokens };
        let task = if kind == "embeddings" {
            None
        } else if !hint.is_empty() {
            let task = Task::parse(hint).ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "unknown task hint {hint:?}; expected code, math, creative, reasoning or chat"
                ))
            })?;
            Some(TaskGuess { task, confidence: 1.0, source: "hint".into(), note: None })
        } else if messages.is_empty() {
            Some(TaskGuess {
                task: Task::Chat,
                confidence: 1.0,
                source: "request".into(),
                note: Some("no prompt text".into()),
            })
        } else {
            Some(self.classifier.classify(&features::classified_text(messages)).await)
        };
        Ok(Features {
            kind,
            model: model.to_owned(),
            project: request.principal.as_ref().map(|p| p.project_id.clone()).unwrap_or_default(),
            task,
            prompt_tokens,
            max_tokens: request.max_tokens,
            stream: request.stream,
        })
    }

    /// The plan for `features` at time `now`; the primary (both racers with `race`) counts as
    /// in flight until its outcome is reported.
    pub fn plan(&self, features: &Features, now: Instant, rng: &mut impl rand::Rng) -> Result<RoutePlan, Error> {
        let catalog = self.catalog.load();
        let policy = self.policies.load().resolve(&features.project);
        let inputs = decide::Inputs {
            catalog: &catalog,
            policy: &policy,
            features,
            health: &self.health,
            local_replicas: self.replicas.get(),
            now,
        };
        let plan = decide::decide(&inputs, rng)?;
        if let Some(first) = plan.targets.first().and_then(|s| s.target.as_ref()) {
            let layer = Layer::try_from(first.layer).unwrap_or(Layer::L2Standard);
            self.decisions.with_label_values(&[first.id.as_str(), policy::layer_name(layer)]).inc();
        }
        let racers = if plan.race { 2 } else { 1 };
        for step in plan.targets.iter().take(racers).filter(|s| s.role == StepRole::Primary as i32) {
            if let Some(target) = &step.target {
                self.health.start(&target.id, now);
            }
        }
        Ok(plan)
    }

    /// Records an outcome. A primary's outcome ends the call the plan counted in flight.
    /// Failures the request or its client caused (a bad request, a client that went away, a
    /// racer cancelled because the other won) say nothing about the target's health.
    pub fn report(&self, outcome: &Outcome, now: Instant) {
        if outcome.primary {
            self.health.finish(&outcome.target_id);
        }
        if !outcome.ok && ErrorCode::parse(&outcome.error_code).is_some_and(ErrorCode::is_client_caused) {
            return;
        }
        let latency = Duration::from_micros(outcome.latency_us.max(0) as u64);
        self.health.record(&outcome.target_id, outcome.ok, latency, now);
    }

    pub fn states(&self, now: Instant) -> Vec<TargetState> {
        self.catalog
            .load()
            .all()
            .map(|entry| {
                let health = self.health.get(&entry.target.id);
                TargetState {
                    target: Some(entry.target.clone()),
                    ewma_latency_us: health.ewma_latency_us as i64,
                    successes: health.successes as i64,
                    failures: health.failures as i64,
                    consecutive_failures: i64::from(health.consecutive_failures),
                    circuit_open: health.is_open(now),
                    error_rate: health.error_rate(),
                    in_flight: health.in_flight(now) as i64,
                    breaker: health.state(now).as_str().into(),
                    tasks: entry.tasks.clone(),
                }
            })
            .collect()
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct RouterService {
    core: Arc<RouterCore>,
}

impl RouterService {
    pub fn new(core: Arc<RouterCore>) -> Self {
        Self { core }
    }

    async fn decide(
        &self,
        request: &RouteRequest,
        messages: &[meshgate_proto::common::v1::ChatMessage],
        hint: &str,
    ) -> Result<RoutePlan, Error> {
        let features = self.core.features(request, messages, hint).await?;
        let plan = self.core.plan(&features, Instant::now(), &mut rand::rng())?;
        tracing::debug!(
            request_id = %request.request_id,
            task = %plan.task,
            policy = %plan.policy,
            reasons = ?plan.reasons,
            "{}",
            plan.explanation
        );
        Ok(plan)
    }
}

#[tonic::async_trait]
impl Router for RouterService {
    async fn route(&self, request: Request<RouteRequest>) -> Result<Response<RoutePlan>, Status> {
        Ok(Response::new(self.decide(request.get_ref(), &[], "").await?))
    }

    async fn decide(&self, request: Request<DecideRequest>) -> Result<Response<RoutePlan>, Status> {
        let request = request.into_inner();
        let Some(route) = &request.request else {
            return Err(ErrorCode::InvalidRequest.status("request must be set"));
        };
        Ok(Response::new(RouterService::decide(self, route, &request.messages, request.task_hint.trim()).await?))
    }

    async fn report_outcome(&self, request: Request<Outcome>) -> Result<Response<ReportOutcomeResponse>, Status> {
        let outcome = request.into_inner();
        if outcome.target_id.is_empty() {
            return Err(ErrorCode::InvalidRequest.status("target_id must not be empty"));
        }
        self.core.report(&outcome, Instant::now());
        Ok(Response::new(ReportOutcomeResponse {}))
    }

    async fn report_outcomes(&self, request: Request<OutcomeBatch>) -> Result<Response<ReportOutcomeResponse>, Status> {
        let batch = request.into_inner();
        if batch.outcomes.iter().any(|o| o.target_id.is_empty()) {
            return Err(ErrorCode::InvalidRequest.status("every outcome needs a target_id"));
        }
        let now = Instant::now();
        for outcome in &batch.outcomes {
            self.core.report(outcome, now);
        }
        Ok(Response::new(ReportOutcomeResponse {}))
    }

    async fn list_targets(&self, _: Request<ListTargetsRequest>) -> Result<Response<ListTargetsResponse>, Status> {
        Ok(Response::new(ListTargetsResponse { targets: self.core.states(Instant::now()) }))
    }
}

/// Cloud providers of the configuration merged with the environment `vars`, validated along
/// with the rest of the configuration.
pub fn cloud_providers<I, K, V>(config: &Config, vars: I) -> Result<Vec<CloudProvider>, Error>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let specs = resolve_providers(&config.providers, vars).map_err(|err| Error::Config(err.to_string()))?;
    let providers = specs
        .iter()
        .map(|spec| CloudProvider {
            name: spec.name.clone(),
            models: spec.models.clone(),
            priority: i64::from(spec.rank().0),
        })
        .collect();
    for (model, facts) in &config.models {
        if let Some(layer) = &facts.layer
            && catalog::parse_layer(layer).is_none()
        {
            return Err(Error::Config(format!("unknown layer {layer:?}; expected l0, l1, l2 or l3")));
        }
        if let Some(task) = facts.tasks.iter().find(|t| Task::parse(t).is_none()) {
            return Err(Error::Config(format!(
                "models.{model}.tasks: unknown task {task:?}; expected code, math, creative, reasoning or chat"
            )));
        }
    }
    config.breaker.validate().map_err(Error::Config)?;
    config.policy.validate().map_err(|err| Error::Config(format!("policy: {err}")))?;
    Ok(providers)
}

/// Runs the router until `shutdown`, with providers from `config` and the environment.
pub async fn serve(config: Config, listeners: Listeners, shutdown: Shutdown) -> Result<(), Error> {
    let providers = cloud_providers(&config, std::env::vars())?;
    let policies = Arc::new(PolicyStore::new(config.policy.clone()));
    if let Some(path) = &config.policy_file {
        let (text, file) = policy::read_policy_file(path).map_err(Error::Config)?;
        policies.update(|set| set.file = Some(file));
        tokio::spawn(policy::watch_policy_file(
            policies.clone(),
            path.clone(),
            text,
            Duration::from_millis(config.policy_poll_ms.max(50)),
            shutdown.clone(),
        ));
    }
    let inference = match &config.inference_endpoint {
        Some(endpoint) => Some(InferenceClient::new(
            listeners.channel(endpoint, Duration::from_secs(2)).map_err(|err| Error::Config(err.to_string()))?,
        )),
        None => None,
    };
    let classifier = TaskClassifier::new(
        inference.clone(),
        config.classifier_model.clone(),
        Duration::from_millis(config.classifier_timeout_ms.max(1)),
    );
    let core =
        Arc::new(RouterCore::new(providers, config.models.clone(), config.breaker, policies.clone(), classifier));
    if let Some(client) = inference {
        tokio::spawn(refresh_local_models(
            core.clone(),
            client,
            Duration::from_millis(config.local_refresh_ms.max(100)),
            shutdown.clone(),
        ));
    }
    if config.kubernetes.enabled {
        start_kube_watches(&config.kubernetes, &core, shutdown.clone()).await?;
    }
    let host = ServiceHost::new("router");
    core.register_metrics(host.metrics());
    // Routing needs nothing but its own state: cloud plans work while inference is down.
    host.run(RouterServer::new(RouterService::new(core)), listeners, || async { Ok(()) }, shutdown).await?;
    Ok(())
}

async fn start_kube_watches(config: &KubeConfig, core: &Arc<RouterCore>, shutdown: Shutdown) -> Result<(), Error> {
    let client = kube::Client::try_default().await.map_err(|err| Error::Kube(err.to_string()))?;
    core.spawn_kube_watches(client, config, shutdown);
    Ok(())
}

impl RouterCore {
    /// Starts watching, with `client`, the `ModelRoute`s (into the policies) and, when
    /// `config.inference_service` is set, its EndpointSlices (into the ready local replicas).
    pub fn spawn_kube_watches(self: &Arc<Self>, client: kube::Client, config: &KubeConfig, shutdown: Shutdown) {
        let namespace = config.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
        let routes_namespace = (!config.all_namespaces).then(|| namespace.clone());
        tracing::info!(namespace = %namespace, all_namespaces = config.all_namespaces, "watching ModelRoutes");
        tokio::spawn(discovery::watch_model_routes(
            client.clone(),
            routes_namespace,
            self.policies.clone(),
            shutdown.clone(),
        ));
        if let Some(service) = &config.inference_service {
            tracing::info!(namespace = %namespace, service = %service, "watching inference EndpointSlices");
            tokio::spawn(discovery::watch_inference_endpoints(
                client,
                namespace,
                service.clone(),
                self.replicas.clone(),
                shutdown,
            ));
        }
    }
}

async fn refresh_local_models(
    core: Arc<RouterCore>,
    mut client: InferenceClient<meshgate_runtime::MeshChannel>,
    every: Duration,
    shutdown: Shutdown,
) {
    let mut reachable = true;
    let mut verdicts = HashMap::new();
    loop {
        match client.list_models(ListModelsRequest {}).await {
            Ok(response) => {
                let models: Vec<LocalModel> = response
                    .into_inner()
                    .models
                    .into_iter()
                    .filter(|m| m.loaded)
                    .map(|m| LocalModel { name: m.name, task: m.task, context_length: m.context_length })
                    .collect();
                if !core.classifier.is_pinned() {
                    let found = find_task_classifier(&mut client, &models, &mut verdicts).await;
                    core.classifier.set_discovered(found);
                }
                core.set_local_models(models);
                if !reachable {
                    tracing::info!("inference service reachable again");
                }
                reachable = true;
            }
            Err(status) => {
                // Keep the last known models: a blip must not drop L0 targets from every plan;
                // failed calls to them reach the breaker instead.
                if reachable {
                    tracing::warn!(%status, "cannot list local models; keeping the last known set");
                }
                reachable = false;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The first loaded classification model whose labels are the router's tasks. The registry
/// has no "task classifier" kind and a model's name is no contract, so each classification
/// model is asked once and judged by the labels it answers with; a model that cannot answer
/// now is asked again on the next refresh.
async fn find_task_classifier(
    client: &mut InferenceClient<meshgate_runtime::MeshChannel>,
    models: &[LocalModel],
    verdicts: &mut HashMap<String, bool>,
) -> Option<String> {
    for model in models.iter().filter(|m| m.task == "classification" || m.task == features::CLASSIFIER_TASK) {
        let fits = match verdicts.get(&model.name) {
            Some(fits) => *fits,
            None => {
                let request = ClassifyRequest { model: model.name.clone(), inputs: vec!["hello".into()] };
                let Ok(response) = client.classify(request).await else { continue };
                let labels: Vec<String> = response
                    .into_inner()
                    .results
                    .into_iter()
                    .next()
                    .map(|r| r.scores.into_iter().map(|s| s.label).collect())
                    .unwrap_or_default();
                let fits = features::labels_are_tasks(&labels);
                tracing::info!(model = %model.name, ?labels, task_classifier = fits, "classification model probed");
                verdicts.insert(model.name.clone(), fits);
                fits
            }
        };
        if fits {
            return Some(model.name.clone());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn core() -> RouterCore {
        let cloud = vec![
            CloudProvider { name: "b".into(), models: vec!["gpt".into()], priority: 0 },
            CloudProvider { name: "a".into(), models: vec!["gpt".into()], priority: 0 },
        ];
        let breaker = BreakerConfig { failure_threshold: 2, open_ms: 60_000, ..Default::default() };
        let policies = Arc::new(PolicyStore::new(RoutePolicy::default()));
        RouterCore::new(cloud, BTreeMap::new(), breaker, policies, TaskClassifier::heuristic_only())
    }

    async fn ids(core: &RouterCore, model: &str, now: Instant) -> Vec<String> {
        let request = RouteRequest { model: model.into(), ..Default::default() };
        let features = core.features(&request, &[], "").await.unwrap();
        let plan = core.plan(&features, now, &mut StdRng::seed_from_u64(1)).unwrap();
        plan.targets.iter().map(|t| t.target.as_ref().unwrap().id.clone()).collect()
    }

    #[tokio::test]
    async fn client_caused_failures_do_not_open_the_circuit() {
        let core = core();
        let now = Instant::now();
        for code in ["client_closed", "invalid_request", "client_closed"] {
            let outcome =
                Outcome { target_id: "a/gpt".into(), ok: false, error_code: code.into(), ..Default::default() };
            core.report(&outcome, now);
        }
        assert_eq!(ids(&core, "gpt", now).await, ["a/gpt", "b/gpt"]);
        let state = core.states(now).into_iter().find(|s| s.target.as_ref().unwrap().id == "a/gpt").unwrap();
        assert_eq!((state.failures, state.breaker.as_str()), (0, "closed"));
    }

    #[tokio::test]
    async fn local_models_lead_and_classifiers_serve_no_chat() {
        let core = core();
        core.set_local_models(vec![
            LocalModel { name: "gpt".into(), task: "chat".into(), context_length: 0 },
            LocalModel { name: "tasks".into(), task: "classification".into(), context_length: 0 },
        ]);
        assert_eq!(ids(&core, "gpt", Instant::now()).await, ["local/gpt", "a/gpt", "b/gpt"]);
        assert!(core.catalog.load().targets_for("chat", "tasks").is_empty());
    }

    #[tokio::test]
    async fn decisions_and_open_breakers_are_exported_under_the_dashboard_names() {
        let core = Arc::new(core());
        let registry = meshgate_runtime::Metrics::new("router");
        core.register_metrics(&registry);
        let now = Instant::now();
        for _ in 0..2 {
            assert_eq!(ids(&core, "gpt", now).await[0], "a/gpt");
            core.report(&Outcome { target_id: "a/gpt".into(), ok: true, primary: true, ..Default::default() }, now);
        }
        for _ in 0..2 {
            core.report(
                &Outcome { target_id: "b/gpt".into(), error_code: "upstream_error".into(), ..Default::default() },
                now,
            );
        }
        let text = registry.render();
        let line = |prefix: &str| text.lines().find(|l| l.starts_with(prefix)).map(str::to_owned);
        let decisions = line("meshgate_router_decisions_total{").unwrap();
        assert!(decisions.contains("target=\"a/gpt\"") && decisions.contains("layer=\"l2\""), "{decisions}");
        assert!(decisions.ends_with(" 2"), "{decisions}");
        let open = |target: &str| {
            text.lines()
                .find(|l| l.starts_with("meshgate_router_breaker_open{") && l.contains(&format!("target=\"{target}\"")))
                .unwrap_or_else(|| panic!("no breaker series for {target} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!((open("a/gpt").as_str(), open("b/gpt").as_str()), ("0", "1"));
    }

    #[tokio::test]
    async fn reported_latency_steers_two_choices_among_equivalent_targets() {
        let provider = |name: &str| CloudProvider { name: name.into(), models: vec!["m".into()], priority: 0 };
        let policies = Arc::new(PolicyStore::new(RoutePolicy::default()));
        let core = RouterCore::new(
            vec![provider("a"), provider("b"), provider("slow")],
            BTreeMap::new(),
            BreakerConfig::default(),
            policies,
            TaskClassifier::heuristic_only(),
        );
        let latency = |id: &str| if id == "slow/m" { 2_000_000 } else { 100_000 };
        let outcome = |id: &str| Outcome {
            target_id: id.into(),
            ok: true,
            primary: true,
            latency_us: latency(id),
            ..Default::default()
        };
        let now = Instant::now();
        for id in ["a/m", "b/m", "slow/m"] {
            core.report(&outcome(id), now);
        }
        let mut rng = StdRng::seed_from_u64(3);
        let mut leaders = BTreeMap::<String, usize>::new();
        let request = RouteRequest { model: "m".into(), ..Default::default() };
        let features = core.features(&request, &[], "").await.unwrap();
        for _ in 0..300 {
            let plan = core.plan(&features, now, &mut rng).unwrap();
            let first = plan.targets[0].target.as_ref().unwrap().id.clone();
            // The call ends as reported, so calls in flight do not pile up on one target.
            core.report(&outcome(&first), now);
            *leaders.entry(first).or_default() += 1;
        }
        assert_eq!(leaders.get("slow/m"), None, "the slow target loses every comparison: {leaders:?}");
        assert!(leaders["a/m"] >= 100 && leaders["b/m"] >= 100, "equal targets share the traffic: {leaders:?}");
        let slow = core.states(now).into_iter().find(|s| s.target.as_ref().unwrap().id == "slow/m").unwrap();
        assert_eq!((slow.in_flight, slow.ewma_latency_us), (0, 2_000_000));
    }

    const NO_ENV: [(&str, &str); 0] = [];

    #[test]
    fn providers_come_from_config_and_environment() {
        let file = ProviderSpec {
            name: "b".into(),
            base_url: "http://127.0.0.1:1/v1".into(),
            models: vec!["m".into()],
            ..Default::default()
        };
        let config = Config { providers: vec![file], ..Default::default() };
        let env = [("MESHGATE_PROVIDER_A_BASE_URL", "http://127.0.0.1:2/v1"), ("MESHGATE_PROVIDER_A_MODELS", "m,n")];
        let providers = cloud_providers(&config, env).unwrap();
        let names: Vec<_> = providers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(providers[0].models, ["m", "n"]);
    }

    #[test]
    fn config_rejects_bad_providers_layers_tasks_breakers_and_policies() {
        let bad =
            Config { providers: vec![ProviderSpec { name: "x".into(), ..Default::default() }], ..Default::default() };
        assert!(cloud_providers(&bad, NO_ENV).is_err(), "a provider without a base URL");
        let with_facts = |facts: ModelFacts| Config { models: [("m".to_owned(), facts)].into(), ..Default::default() };
        let layer = with_facts(ModelFacts { layer: Some("l9".into()), ..Default::default() });
        assert!(cloud_providers(&layer, NO_ENV).unwrap_err().to_string().contains("unknown layer"));
        let task = with_facts(ModelFacts { tasks: vec!["dance".into()], ..Default::default() });
        assert!(cloud_providers(&task, NO_ENV).unwrap_err().to_string().contains("models.m.tasks"));
        let breaker = Config { breaker: BreakerConfig { window: 0, ..Default::default() }, ..Default::default() };
        assert!(cloud_providers(&breaker, NO_ENV).unwrap_err().to_string().contains("breaker.window"));
        let policy =
            Config { policy: RoutePolicy { max_cost_micros: Some(-5), ..Default::default() }, ..Default::default() };
        assert!(cloud_providers(&policy, NO_ENV).unwrap_err().to_string().contains("policy: max_cost_micros"));
    }
}
