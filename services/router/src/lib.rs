//! The router: turns a request's features (task, sizes, needed capabilities, streaming) and its
//! project's policy into an ordered, explained plan of targets, and learns per-target health
//! from reported outcomes so failing or slow targets move back.
//!
//! Modules, each depending only on those listed before it (the task classes and their heuristic
//! are the catalog's, shared with the gateway): [`health`], [`error`],
//! [`policy`], [`targets`] (the catalog's targets and the local models), [`request`] (a
//! request's features), [`classifier`] (task classification), [`config`], [`decide`] (the
//! plan), [`discovery`] (Kubernetes), [`metrics`], [`state`] (the shared state), [`service`]
//! (gRPC), [`local_models`] (the inference service's models); [`serve`] wires them.

pub mod classifier;
pub mod config;
pub mod decide;
pub mod discovery;
pub mod error;
pub mod health;
pub mod local_models;
pub mod metrics;
pub mod policy;
pub mod request;
pub mod service;
pub mod state;
pub mod targets;

use std::sync::Arc;
use std::time::Duration;

use meshgate_proto::inference::v1::inference_client::InferenceClient;
use meshgate_proto::router::v1::router_server::RouterServer;
use meshgate_runtime::{Listeners, ServiceHost, Shutdown};

pub use classifier::TaskClassifier;
pub use config::{Config, KubeConfig};
pub use error::Error;
pub use health::{BreakerConfig, HealthBook};
pub use meshgate_catalog::ModelFacts;
pub use meshgate_catalog::task::{Task, TaskGuess};
pub use policy::{PolicyFile, PolicyStore, RoutePolicy};
pub use request::Features;
pub use service::RouterService;
pub use state::RouterCore;
pub use targets::{Entry, LocalModel, Targets};

/// Runs the router until `shutdown`, with providers from `config` and the environment.
pub async fn serve(config: Config, listeners: Listeners, shutdown: Shutdown) -> Result<(), Error> {
    let catalog = Arc::new(config.catalog(meshgate_catalog::process_env())?);
    for unpriced in catalog.unpriced() {
        tracing::warn!(
            provider = %unpriced.provider,
            model = %unpriced.model,
            "no price for this cloud model: it is served at no cost (meshgate check-config refuses this \
             unless [router] allow_unpriced_models or default_price says otherwise)"
        );
    }
    let host = ServiceHost::new("router");
    let policies = Arc::new(PolicyStore::new(config.policy.clone()));
    if let Some(path) = &config.policy_file {
        let (text, file) = policy::read_policy_file(path).map_err(Error::Config)?;
        policies.update(|set| set.file = Some(file));
        let reloads = metrics::policy_file_reloads();
        host.metrics().register(Box::new(reloads.clone()));
        tokio::spawn(policy::watch_policy_file(
            policies.clone(),
            path.clone(),
            text,
            Duration::from_millis(config.policy_poll_ms.max(50)),
            reloads,
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
    let core = Arc::new(
        RouterCore::new(catalog, config.breaker, policies, classifier)
            .with_plan_reuse(Duration::from_millis(config.plan_reuse_ms)),
    );
    if let Some(client) = inference {
        tokio::spawn(local_models::refresh(
            core.clone(),
            client,
            Duration::from_millis(config.local_refresh_ms.max(100)),
            shutdown.clone(),
        ));
    }
    if config.kubernetes.enabled {
        let client = kube::Client::try_default().await.map_err(|err| Error::Kube(err.to_string()))?;
        core.spawn_kube_watches(client, &config.kubernetes, shutdown.clone());
    }
    core.register_metrics(host.metrics());
    // Routing needs nothing but its own state: cloud plans work while inference is down.
    host.run(RouterServer::new(RouterService::new(core)), listeners, || async { Ok(()) }, shutdown).await?;
    Ok(())
}
