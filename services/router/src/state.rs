//! The routing state shared by the gRPC handlers and the background refreshers and watchers:
//! the catalog's targets (with the local models of the moment), live health, policies and the
//! task classifier.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use meshgate_catalog::Catalog;
use meshgate_catalog::task::{TASK_NAMES, Task, TaskGuess, classified_text};
use meshgate_proto::common::v1::{ChatMessage, Layer};
use meshgate_proto::router::v1::{Outcome, PlanReuse, RoutePlan, RouteRequest, StepRole, TargetState};
use meshgate_runtime::{ErrorCode, Shutdown};

use crate::classifier::TaskClassifier;
use crate::config::KubeConfig;
use crate::decide::{self, Inputs};
use crate::discovery::{self, Replicas};
use crate::error::Error;
use crate::health::{BreakerConfig, BreakerState, HealthBook};
use crate::metrics::{self, BreakerGauge};
use crate::policy::{self, PolicyStore};
use crate::request::Features;
use crate::targets::{LocalModel, Targets};

/// The routing state of one router.
pub struct RouterCore {
    catalog: Arc<Catalog>,
    targets: ArcSwap<Targets>,
    local: parking_lot::Mutex<Vec<LocalModel>>,
    health: HealthBook,
    policies: Arc<PolicyStore>,
    classifier: TaskClassifier,
    replicas: Arc<Replicas>,
    decisions: prometheus::IntCounterVec,
    /// Reads of the inference service's models: asked for by a plan that found no target
    /// (a model loaded since the last read is served at once), counted as they complete.
    local_reads: LocalReads,
    /// Changes of the targets and of breaker states; with the policies' and the replicas'
    /// versions, the routing epoch (see [`RouterCore::epoch`]).
    changes: tokio::sync::watch::Sender<u64>,
    /// A random id of this router process: epochs of different processes are unrelated.
    instance: u64,
    /// How long a reusable plan may serve other requests (zero: plans are never reused).
    plan_reuse: Duration,
}

/// Waits for the routing epoch of a [`RouterCore`] to change.
pub struct EpochWatch {
    changes: tokio::sync::watch::Receiver<u64>,
    policies: tokio::sync::watch::Receiver<u64>,
    replicas: tokio::sync::watch::Receiver<u64>,
}

impl EpochWatch {
    /// Resolves at the next change of anything a plan depends on.
    pub async fn changed(&mut self) {
        // The senders live as long as the core, which outlives every watch of it.
        tokio::select! {
            _ = self.changes.changed() => {}
            _ = self.policies.changed() => {}
            _ = self.replicas.changed() => {}
        }
    }
}

/// Reads of the local models on demand: a wish, and a count of finished reads to wait on.
struct LocalReads {
    /// Whether anything reads them (a router without an inference service never does).
    active: std::sync::atomic::AtomicBool,
    wanted: tokio::sync::Notify,
    done: tokio::sync::watch::Sender<u64>,
}

impl RouterCore {
    pub fn new(
        catalog: Arc<Catalog>,
        breaker: BreakerConfig,
        policies: Arc<PolicyStore>,
        classifier: TaskClassifier,
    ) -> Self {
        let targets = Targets::build(&catalog, &[]);
        Self {
            catalog,
            targets: ArcSwap::from_pointee(targets),
            local: parking_lot::Mutex::default(),
            health: HealthBook::new(breaker),
            policies,
            classifier,
            replicas: Arc::default(),
            decisions: metrics::decisions(),
            local_reads: LocalReads {
                active: std::sync::atomic::AtomicBool::new(false),
                wanted: tokio::sync::Notify::new(),
                done: tokio::sync::watch::Sender::new(0),
            },
            changes: tokio::sync::watch::Sender::new(0),
            instance: rand::random(),
            plan_reuse: Duration::ZERO,
        }
    }

    /// Lets plans that do not depend on the request's text, on loads or on probes serve other
    /// requests for `ttl`, within an epoch (see `RoutePlan.reuse`).
    pub fn with_plan_reuse(mut self, ttl: Duration) -> Self {
        self.plan_reuse = ttl;
        self
    }

    /// This process's id and its routing epoch: grows whenever anything a plan depends on
    /// changes (targets, local models, policies, ready replicas, a breaker opening or closing).
    pub fn epoch(&self) -> (u64, u64) {
        let epoch = *self.changes.borrow() + self.policies.version() + self.replicas.changes();
        (self.instance, epoch)
    }

    /// Something a plan depends on changed here: plans held elsewhere are stale.
    fn new_epoch(&self) {
        self.changes.send_modify(|changes| *changes += 1);
    }

    /// A watch of the routing epoch.
    pub fn watch_epoch(&self) -> EpochWatch {
        EpochWatch {
            changes: self.changes.subscribe(),
            policies: self.policies.watch_version(),
            replicas: self.replicas.watch_changes(),
        }
    }

    /// For the reader of the local models: resolves when a plan asks for a fresh read.
    pub async fn local_read_wanted(&self) {
        self.local_reads.wanted.notified().await;
    }

    /// For the reader of the local models: one read finished (whether or not it succeeded); from
    /// the first on, plans may ask for more.
    pub fn local_read_done(&self) {
        self.local_reads.active.store(true, std::sync::atomic::Ordering::Release);
        self.local_reads.done.send_modify(|reads| *reads += 1);
    }

    /// Asks the reader for a fresh read of the local models and waits for it, at most `limit`;
    /// concurrent askers share one read. False when nothing reads them.
    pub async fn read_local_models(&self, limit: Duration) -> bool {
        if !self.local_reads.active.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        let mut done = self.local_reads.done.subscribe();
        done.mark_unchanged();
        self.local_reads.wanted.notify_one();
        tokio::time::timeout(limit, done.changed()).await.is_ok_and(|changed| changed.is_ok())
    }

    /// Registers the router's metrics (decisions, breaker states) in the service's registry.
    pub fn register_metrics(self: &Arc<Self>, registry: &meshgate_runtime::Metrics) {
        registry.register(Box::new(self.decisions.clone()));
        let core = self.clone();
        let states = move || {
            let now = Instant::now();
            let not_closed = |id: &str| core.health.get(id).state(now) != BreakerState::Closed;
            core.targets.load().all().map(|e| (e.target.id.clone(), not_closed(&e.target.id))).collect()
        };
        registry.register(Box::new(BreakerGauge::new(Box::new(states))));
    }

    pub fn policies(&self) -> &Arc<PolicyStore> {
        &self.policies
    }

    pub fn classifier(&self) -> &TaskClassifier {
        &self.classifier
    }

    /// Sets the task classifier found among the local models (a held plan names the classifier
    /// its reusers label tasks with, so a change is a new epoch).
    pub fn set_discovered_classifier(&self, model: Option<String>) {
        if self.classifier.set_discovered(model) {
            self.new_epoch();
        }
    }

    /// Replaces the local models; rebuilds the targets only when they changed.
    pub fn set_local_models(&self, models: Vec<LocalModel>) {
        let mut local = self.local.lock();
        if *local != models {
            tracing::info!(models = ?models.iter().map(|m| &m.name).collect::<Vec<_>>(), "local models changed");
            self.targets.store(Arc::new(Targets::build(&self.catalog, &models)));
            *local = models;
            self.new_epoch();
        }
    }

    /// The features of a request: validated sizes and needs, and for chat its task from the
    /// hint, the classifier or the heuristic (`messages` empty: no text, so "chat" from the
    /// request).
    pub async fn features(
        &self,
        request: &RouteRequest,
        messages: &[ChatMessage],
        hint: &str,
    ) -> Result<Features, Error> {
        let mut features = Features::from_request(request, messages)?;
        if features.kind == "embeddings" {
            return Ok(features);
        }
        features.task = Some(if !hint.is_empty() {
            let task = Task::parse(hint)
                .ok_or_else(|| Error::InvalidRequest(format!("unknown task hint {hint:?}; expected {TASK_NAMES}")))?;
            TaskGuess { task, confidence: 1.0, source: "hint".into(), note: None }
        } else if messages.is_empty() {
            TaskGuess {
                task: Task::Chat,
                confidence: 1.0,
                source: "request".into(),
                note: Some("no prompt text".into()),
            }
        } else {
            self.classifier.classify(&classified_text(messages)).await
        });
        Ok(features)
    }

    /// The plan for `features` at time `now`; the primary (both racers with `race`) counts as
    /// in flight until its outcome is reported.
    pub fn plan(&self, features: &Features, now: Instant, rng: &mut impl rand::Rng) -> Result<RoutePlan, Error> {
        // Read before the inputs: a change while deciding makes the plan's epoch already past.
        let (instance, epoch) = self.epoch();
        let targets = self.targets.load();
        let policy = self.policies.load().resolve(&features.project);
        let inputs = Inputs {
            targets: &targets,
            policy: &policy,
            features,
            health: &self.health,
            local_replicas: self.replicas.get(),
            now,
        };
        let mut plan = decide::decide(&inputs, rng)?;
        plan.reuse = match plan.reuse.take() {
            Some(reuse) if !self.plan_reuse.is_zero() => Some(PlanReuse {
                router_instance: instance,
                epoch,
                ttl_ms: u32::try_from(self.plan_reuse.as_millis()).unwrap_or(u32::MAX),
                task_classifier: self.classifier.active_model().map(|m| m.to_string()).unwrap_or_default(),
                classifier_timeout_ms: u32::try_from(self.classifier.timeout().as_millis()).unwrap_or(u32::MAX),
                ..reuse
            }),
            _ => None,
        };
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
    /// racer cancelled because the other won) and context overflows (the model's limit) say
    /// nothing about the target's health.
    pub fn report(&self, outcome: &Outcome, now: Instant) {
        if outcome.primary {
            self.health.finish(&outcome.target_id);
        }
        if !outcome.ok && ErrorCode::parse(&outcome.error_code).is_some_and(ErrorCode::spares_the_target) {
            return;
        }
        let latency = Duration::from_micros(outcome.latency_us.max(0) as u64);
        if self.health.record(&outcome.target_id, outcome.ok, latency, now) {
            self.new_epoch();
        }
    }

    /// Every target with its live state.
    pub fn states(&self, now: Instant) -> Vec<TargetState> {
        self.targets
            .load()
            .all_with_kind()
            .map(|(kind, entry)| {
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
                    tasks: entry.profile.tasks.clone(),
                    kind: kind.to_owned(),
                }
            })
            .collect()
    }

    /// Starts watching, with `client`, the `ModelRoute`s (into the policies) and, when
    /// `config.inference_service` is set, its EndpointSlices (into the ready local replicas).
    pub fn spawn_kube_watches(&self, client: kube::Client, config: &KubeConfig, shutdown: Shutdown) {
        discovery::spawn_watches(client, config, self.policies.clone(), self.replicas.clone(), shutdown);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use meshgate_catalog::ProviderSpec;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::policy::RoutePolicy;

    /// `providers` serving `model`, of equal priority.
    fn catalog(providers: &[&str], model: &str) -> Arc<Catalog> {
        let specs: Vec<ProviderSpec> = providers
            .iter()
            .map(|name| ProviderSpec {
                name: (*name).into(),
                base_url: format!("http://{name}.test/v1"),
                models: vec![model.into()],
                priority: Some(0),
                ..Default::default()
            })
            .collect();
        let env = std::iter::empty::<(String, String)>();
        Arc::new(Catalog::resolve(&specs, env, &BTreeMap::new(), None).unwrap())
    }

    fn core() -> RouterCore {
        let breaker = BreakerConfig { failure_threshold: 2, open_ms: 60_000, ..Default::default() };
        let policies = Arc::new(PolicyStore::new(RoutePolicy::default()));
        RouterCore::new(catalog(&["b", "a"], "gpt"), breaker, policies, TaskClassifier::heuristic_only())
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
        for code in ["client_closed", "invalid_request", "context_length_exceeded", "client_closed"] {
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
        assert!(core.targets.load().targets_for("chat", "tasks").is_empty());
    }

    #[tokio::test]
    async fn listed_targets_carry_the_catalog_s_capabilities() {
        let core = core();
        core.set_local_models(vec![LocalModel { name: "tiny".into(), task: "chat".into(), context_length: 64 }]);
        let states = core.states(Instant::now());
        let capabilities = |id: &str| {
            let state = states.iter().find(|s| s.target.as_ref().unwrap().id == id).unwrap();
            state.target.as_ref().unwrap().capabilities.clone()
        };
        assert_eq!(capabilities("a/gpt"), ["tools", "vision", "json_schema"]);
        assert!(capabilities("local/tiny").is_empty());
        let request = RouteRequest { model: "tiny".into(), capabilities: vec!["tools".into()], ..Default::default() };
        let features = core.features(&request, &[], "").await.unwrap();
        let refused = core.plan(&features, Instant::now(), &mut StdRng::seed_from_u64(1)).unwrap_err();
        assert_eq!(refused.code(), ErrorCode::InvalidRequest, "{refused}");
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
        let policies = Arc::new(PolicyStore::new(RoutePolicy::default()));
        let core = RouterCore::new(
            catalog(&["a", "b", "slow"], "m"),
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
}
