//! The router: turns a request's model and features into an ordered plan of targets, and keeps
//! per-target health from reported outcomes so failing targets move to the back of the plan.

pub mod catalog;
pub mod health;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use meshgate_proto::common::v1::Target;
use meshgate_proto::inference::v1::inference_client::InferenceClient;
use meshgate_proto::router::v1::router_server::{Router, RouterServer};
use meshgate_proto::router::v1::{
    ListTargetsRequest, ListTargetsResponse, Outcome, OutcomeBatch, PlannedTarget, ReportOutcomeResponse, RoutePlan,
    RouteRequest, TargetState,
};
use meshgate_runtime::{ErrorCode, Listeners, ServiceHost, Shutdown};
use meshgate_sync::providers::{ProviderSpec, resolve_providers};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

pub use catalog::{Catalog, CloudProvider, LocalModel, ModelFacts};
pub use health::{BreakerConfig, HealthBook};

/// Router configuration (`[router]`, `MESHGATE_ROUTER__*`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Inference service whose local models become L0 targets; unset means cloud only.
    pub inference_endpoint: Option<String>,
    /// How often local models are re-read from the inference service.
    pub local_refresh_ms: u64,
    /// Circuit breaker settings.
    pub breaker: BreakerConfig,
    /// Declared layer, prices and context window per model id.
    pub models: BTreeMap<String, ModelFacts>,
    /// Cloud providers; `MESHGATE_PROVIDER_<NAME>_*` add to and override these (see
    /// `meshgate_sync::providers`, shared with the sync service so both agree).
    pub providers: Vec<ProviderSpec>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            inference_endpoint: None,
            local_refresh_ms: 5_000,
            breaker: BreakerConfig::default(),
            models: BTreeMap::new(),
            providers: Vec::new(),
        }
    }
}

/// Errors of the router service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no provider or local model serves model {0:?}")]
    UnknownModel(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("invalid router configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Serve(#[from] meshgate_runtime::ServeError),
}

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::UnknownModel(_) => ErrorCode::ModelNotFound,
            Error::InvalidRequest(_) | Error::Config(_) => ErrorCode::InvalidRequest,
            Error::Serve(_) => ErrorCode::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        err.code().status(err.to_string())
    }
}

/// The routing state shared by the gRPC handlers and the local-model refresher.
pub struct RouterCore {
    cloud: Vec<CloudProvider>,
    facts: BTreeMap<String, ModelFacts>,
    catalog: ArcSwap<Catalog>,
    local: parking_lot::Mutex<Vec<LocalModel>>,
    health: HealthBook,
}

impl RouterCore {
    pub fn new(cloud: Vec<CloudProvider>, facts: BTreeMap<String, ModelFacts>, breaker: BreakerConfig) -> Self {
        let catalog = Catalog::build(&cloud, &[], &facts);
        Self {
            cloud,
            facts,
            catalog: ArcSwap::from_pointee(catalog),
            local: parking_lot::Mutex::default(),
            health: HealthBook::new(breaker),
        }
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

    /// The ordered plan for one request at time `now`.
    pub fn plan(&self, request: &RouteRequest, now: Instant) -> Result<RoutePlan, Error> {
        let model = request.model.trim();
        if model.is_empty() {
            return Err(Error::InvalidRequest("model must not be empty".into()));
        }
        let task = match request.task.as_str() {
            "" | "chat" => "chat",
            "embeddings" => "embeddings",
            other => return Err(Error::InvalidRequest(format!("unknown task {other:?}; expected chat or embeddings"))),
        };
        let catalog = self.catalog.load();
        let candidates = catalog.targets_for(task, model);
        if candidates.is_empty() {
            return Err(Error::UnknownModel(model.to_owned()));
        }
        let needed = request.prompt_tokens.saturating_add(request.max_tokens.max(0));
        let fits: Vec<&Target> =
            candidates.iter().filter(|t| t.context_window == 0 || needed <= t.context_window).collect();
        if fits.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "the request needs about {needed} tokens of context; no target of {model:?} has that much"
            )));
        }
        // Healthy targets keep their preference order; open circuits go last, as a last resort.
        let (healthy, open): (Vec<&Target>, Vec<&Target>) =
            fits.into_iter().partition(|t| self.health.admit(&t.id, now));
        let mut targets = Vec::with_capacity(healthy.len() + open.len());
        for (position, target) in healthy.iter().enumerate() {
            let reason = if position == 0 { "preferred: first healthy target" } else { "fallback" };
            targets.push(PlannedTarget { target: Some((*target).clone()), reason: reason.into() });
        }
        for target in &open {
            targets.push(PlannedTarget { target: Some((*target).clone()), reason: "circuit open: last resort".into() });
        }
        let explanation = format!(
            "{} target(s) for {task} model {model:?}: {} healthy, {} with open circuit",
            targets.len(),
            healthy.len(),
            open.len()
        );
        Ok(RoutePlan { targets, task: task.into(), explanation })
    }

    /// Records an outcome. Failures the request or its client caused (a bad request, a client
    /// that went away) say nothing about the target and are not counted.
    pub fn report(&self, outcome: &Outcome, now: Instant) {
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
            .map(|target| {
                let health = self.health.get(&target.id);
                TargetState {
                    target: Some(target.clone()),
                    ewma_latency_us: health.ewma_latency_us as i64,
                    successes: health.successes as i64,
                    failures: health.failures as i64,
                    consecutive_failures: i64::from(health.consecutive_failures),
                    circuit_open: health.is_open(now),
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
}

#[tonic::async_trait]
impl Router for RouterService {
    async fn route(&self, request: Request<RouteRequest>) -> Result<Response<RoutePlan>, Status> {
        Ok(Response::new(self.core.plan(request.get_ref(), Instant::now())?))
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

/// Cloud providers of the configuration merged with the environment `vars`, validated.
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
    for facts in config.models.values() {
        if let Some(layer) = &facts.layer
            && catalog::parse_layer(layer).is_none()
        {
            return Err(Error::Config(format!("unknown layer {layer:?}; expected l0, l1, l2 or l3")));
        }
    }
    Ok(providers)
}

/// Runs the router until `shutdown`, with providers from `config` and the environment.
pub async fn serve(config: Config, listeners: Listeners, shutdown: Shutdown) -> Result<(), Error> {
    let providers = cloud_providers(&config, std::env::vars())?;
    let core = Arc::new(RouterCore::new(providers, config.models.clone(), config.breaker));
    if let Some(endpoint) = &config.inference_endpoint {
        let channel = meshgate_runtime::channel(endpoint, Duration::from_secs(2))
            .map_err(|err| Error::Config(err.to_string()))?;
        tokio::spawn(refresh_local_models(
            core.clone(),
            InferenceClient::new(channel),
            Duration::from_millis(config.local_refresh_ms.max(100)),
            shutdown.clone(),
        ));
    }
    let host = ServiceHost::new("router");
    // Routing needs nothing but its own state: cloud plans work while inference is down.
    host.run(RouterServer::new(RouterService::new(core)), listeners, || async { Ok(()) }, shutdown).await?;
    Ok(())
}

async fn refresh_local_models(
    core: Arc<RouterCore>,
    mut client: InferenceClient<meshgate_runtime::MeshChannel>,
    every: Duration,
    shutdown: Shutdown,
) {
    let mut reachable = true;
    loop {
        match client.list_models(meshgate_proto::inference::v1::ListModelsRequest {}).await {
            Ok(response) => {
                let models = response
                    .into_inner()
                    .models
                    .into_iter()
                    .filter(|m| m.loaded)
                    .map(|m| LocalModel { name: m.name, task: m.task, context_length: m.context_length })
                    .collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn core() -> RouterCore {
        let cloud = vec![
            CloudProvider { name: "b".into(), models: vec!["gpt".into()], priority: 0 },
            CloudProvider { name: "a".into(), models: vec!["gpt".into()], priority: 0 },
        ];
        RouterCore::new(cloud, BTreeMap::new(), BreakerConfig { failure_threshold: 2, open_ms: 60_000 })
    }

    fn request(model: &str) -> RouteRequest {
        RouteRequest { model: model.into(), ..Default::default() }
    }

    fn ids(plan: &RoutePlan) -> Vec<String> {
        plan.targets.iter().map(|t| t.target.as_ref().unwrap().id.clone()).collect()
    }

    #[test]
    fn plans_in_name_order_and_rejects_unknown_models() {
        let core = core();
        let plan = core.plan(&request("gpt"), Instant::now()).unwrap();
        assert_eq!(ids(&plan), ["a/gpt", "b/gpt"]);
        assert!(matches!(core.plan(&request("nope"), Instant::now()), Err(Error::UnknownModel(_))));
        assert!(matches!(core.plan(&request(" "), Instant::now()), Err(Error::InvalidRequest(_))));
        let bad_task = RouteRequest { task: "dance".into(), ..request("gpt") };
        assert!(matches!(core.plan(&bad_task, Instant::now()), Err(Error::InvalidRequest(_))));
    }

    #[test]
    fn failing_target_moves_last_until_it_recovers() {
        let core = core();
        let now = Instant::now();
        for _ in 0..2 {
            core.report(&Outcome { target_id: "a/gpt".into(), ok: false, latency_us: 10, ..Default::default() }, now);
        }
        assert_eq!(ids(&core.plan(&request("gpt"), now).unwrap()), ["b/gpt", "a/gpt"]);
        let state = core.states(now).into_iter().find(|s| s.target.as_ref().unwrap().id == "a/gpt").unwrap();
        assert!(state.circuit_open);
        assert_eq!(state.failures, 2);
        let later = now + Duration::from_secs(61);
        core.report(&Outcome { target_id: "a/gpt".into(), ok: true, latency_us: 10, ..Default::default() }, later);
        assert_eq!(ids(&core.plan(&request("gpt"), later).unwrap()), ["a/gpt", "b/gpt"]);
    }

    #[test]
    fn client_caused_failures_do_not_open_the_circuit() {
        let core = core();
        let now = Instant::now();
        for code in ["client_closed", "invalid_request", "client_closed"] {
            let outcome =
                Outcome { target_id: "a/gpt".into(), ok: false, error_code: code.into(), ..Default::default() };
            core.report(&outcome, now);
        }
        assert_eq!(ids(&core.plan(&request("gpt"), now).unwrap()), ["a/gpt", "b/gpt"]);
    }

    #[test]
    fn local_models_lead_the_plan_once_reported() {
        let core = core();
        core.set_local_models(vec![LocalModel { name: "gpt".into(), task: "chat".into(), context_length: 0 }]);
        assert_eq!(ids(&core.plan(&request("gpt"), Instant::now()).unwrap()), ["local/gpt", "a/gpt", "b/gpt"]);
    }

    #[test]
    fn context_window_excludes_too_small_targets() {
        let mut facts = BTreeMap::new();
        facts.insert("gpt".to_owned(), ModelFacts { context_window: 100, ..Default::default() });
        let cloud = vec![CloudProvider { name: "a".into(), models: vec!["gpt".into()], priority: 0 }];
        let core = RouterCore::new(cloud, facts, BreakerConfig::default());
        let big = RouteRequest { prompt_tokens: 90, max_tokens: 20, ..request("gpt") };
        assert!(matches!(core.plan(&big, Instant::now()), Err(Error::InvalidRequest(_))));
        let small = RouteRequest { prompt_tokens: 50, max_tokens: 20, ..request("gpt") };
        assert_eq!(ids(&core.plan(&small, Instant::now()).unwrap()), ["a/gpt"]);
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
    fn config_rejects_bad_providers_and_layers() {
        let bad =
            Config { providers: vec![ProviderSpec { name: "x".into(), ..Default::default() }], ..Default::default() };
        assert!(cloud_providers(&bad, NO_ENV).is_err(), "a provider without a base URL");
        let mut models = BTreeMap::new();
        models.insert("m".to_owned(), ModelFacts { layer: Some("l9".into()), ..Default::default() });
        assert!(cloud_providers(&Config { models, ..Default::default() }, NO_ENV).is_err());
    }
}
