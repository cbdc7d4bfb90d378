//! The router's configuration (`[router]`, `MESHGATE_ROUTER__*`) and its validation.

use std::collections::BTreeMap;
use std::path::PathBuf;

use meshgate_catalog::task::{TASK_NAMES, Task};
use meshgate_catalog::{Catalog, ModelFacts, Prices, ProviderSpec};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::health::BreakerConfig;
use crate::policy::RoutePolicy;

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
    /// Declared facts per model id: layer, prices, context window, output limit, capabilities,
    /// length parameter, tasks (see `meshgate_catalog::ModelFacts`).
    pub models: BTreeMap<String, ModelFacts>,
    /// The price of a cloud model whose facts declare none (unset: such a model has no price).
    pub default_price: Option<Prices>,
    /// Accept cloud models without a price (served at no cost). Off: `meshgate check-config`
    /// refuses them, so a model is never free by omission.
    pub allow_unpriced_models: bool,
    /// Cloud providers; `MESHGATE_PROVIDER_<NAME>_*` add to and override these (see
    /// `meshgate_catalog`, shared with the sync service so both agree).
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
    /// How long a plan that depends on nothing but the request's project, model, kind, streaming,
    /// capabilities and context range may serve other such requests at a gateway that watches
    /// the routing epoch (`WatchRouting`), which drops it at once when anything it depends on
    /// changes; 0 makes every request ask.
    pub plan_reuse_ms: u64,
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
            default_price: None,
            allow_unpriced_models: false,
            providers: Vec::new(),
            policy: RoutePolicy::default(),
            policy_file: None,
            policy_poll_ms: 1_000,
            kubernetes: KubeConfig::default(),
            plan_reuse_ms: 1_000,
        }
    }
}

impl Config {
    /// What `meshgate check-config` checks: everything [`Config::catalog`] checks with the
    /// process environment's providers, and that every cloud model has a price (or the operator
    /// allows unpriced ones).
    pub fn validate(&self) -> Result<(), Error> {
        let catalog = self.catalog(meshgate_catalog::process_env())?;
        self.check_prices(&catalog)
    }

    /// The catalog of this configuration with the providers of `vars` (the environment), after
    /// checking every setting the router refuses to start with: providers, model facts and
    /// their tasks, the breaker and the base policy.
    pub fn catalog<I, K, V>(&self, vars: I) -> Result<Catalog, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let catalog = Catalog::resolve(&self.providers, vars, &self.models, self.default_price)?;
        for (model, facts) in &self.models {
            if let Some(task) = facts.tasks.iter().find(|t| Task::parse(t).is_none()) {
                return Err(Error::Config(format!(
                    "models.{model}.tasks: unknown task {task:?}; expected {TASK_NAMES}"
                )));
            }
        }
        self.breaker.validate().map_err(Error::Config)?;
        self.policy.validate().map_err(|err| Error::Config(format!("policy: {err}")))?;
        Ok(catalog)
    }

    /// Refuses cloud models without a price unless `allow_unpriced_models`.
    pub fn check_prices(&self, catalog: &Catalog) -> Result<(), Error> {
        let unpriced = catalog.unpriced();
        if unpriced.is_empty() || self.allow_unpriced_models {
            return Ok(());
        }
        let targets: Vec<String> = unpriced.iter().map(|u| format!("{}/{}", u.provider, u.model)).collect();
        Err(Error::Config(format!(
            "no price for {}: set models.<id>.input_price_micros_per_mtok and output_price_micros_per_mtok, \
             or default_price, or allow_unpriced_models = true to serve them at no cost",
            targets.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use meshgate_catalog::Capability;

    use super::*;

    const NO_ENV: [(&str, &str); 0] = [];

    fn provider(name: &str, models: &[&str]) -> ProviderSpec {
        ProviderSpec {
            name: name.into(),
            base_url: format!("http://{name}.test/v1"),
            models: models.iter().map(|m| m.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn providers_come_from_config_and_environment() {
        let config = Config { providers: vec![provider("b", &["m"])], ..Default::default() };
        let env = [("MESHGATE_PROVIDER_A_BASE_URL", "http://127.0.0.1:2/v1"), ("MESHGATE_PROVIDER_A_MODELS", "m,n")];
        let catalog = config.catalog(env).unwrap();
        let names: Vec<_> = catalog.providers().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(catalog.providers()[0].models, ["m", "n"]);
    }

    #[test]
    fn config_rejects_bad_providers_facts_tasks_breakers_and_policies() {
        let bad =
            Config { providers: vec![ProviderSpec { name: "x".into(), ..Default::default() }], ..Default::default() };
        assert!(bad.catalog(NO_ENV).unwrap_err().to_string().contains("base URL is required"));
        let with_facts = |facts: ModelFacts| Config { models: [("m".to_owned(), facts)].into(), ..Default::default() };
        let layer = with_facts(ModelFacts { layer: Some("l9".into()), ..Default::default() });
        assert!(layer.catalog(NO_ENV).unwrap_err().to_string().contains("models.m.layer: unknown layer"));
        let task = with_facts(ModelFacts { tasks: vec!["dance".into()], ..Default::default() });
        assert!(task.catalog(NO_ENV).unwrap_err().to_string().contains("models.m.tasks"));
        let price = with_facts(ModelFacts { output_price_micros_per_mtok: Some(-3), ..Default::default() });
        assert!(price.catalog(NO_ENV).unwrap_err().to_string().contains("models.m.output_price_micros_per_mtok"));
        let breaker = Config { breaker: BreakerConfig { window: 0, ..Default::default() }, ..Default::default() };
        assert!(breaker.catalog(NO_ENV).unwrap_err().to_string().contains("breaker.window"));
        let policy =
            Config { policy: RoutePolicy { max_cost_micros: Some(-5), ..Default::default() }, ..Default::default() };
        assert!(policy.catalog(NO_ENV).unwrap_err().to_string().contains("policy: max_cost_micros"));
    }

    #[test]
    fn unpriced_cloud_models_are_refused_unless_allowed_or_defaulted() {
        let priced = ModelFacts {
            input_price_micros_per_mtok: Some(150_000),
            output_price_micros_per_mtok: Some(600_000),
            capabilities: Some(vec![Capability::Tools]),
            ..Default::default()
        };
        let config = Config {
            providers: vec![provider("a", &["mini", "free"]), provider("b", &["mini"])],
            models: [("mini".to_owned(), priced)].into(),
            ..Default::default()
        };
        let catalog = config.catalog(NO_ENV).unwrap();
        let err = config.check_prices(&catalog).unwrap_err().to_string();
        assert!(err.contains("no price for a/free:") && !err.contains("mini"), "{err}");
        assert!(err.contains("allow_unpriced_models"), "the message says how to fix it: {err}");

        let allowed = Config { allow_unpriced_models: true, ..config.clone() };
        allowed.check_prices(&allowed.catalog(NO_ENV).unwrap()).unwrap();
        let default = Prices { input_price_micros_per_mtok: 1, output_price_micros_per_mtok: 2, ..Prices::default() };
        let defaulted = Config { default_price: Some(default), ..config };
        defaulted.check_prices(&defaulted.catalog(NO_ENV).unwrap()).unwrap();
    }

    #[test]
    fn the_config_file_takes_facts_prices_and_fallbacks() {
        let config: Config = toml::from_str(
            r#"
            allow_unpriced_models = false
            default_price = { input_price_micros_per_mtok = 5000000, output_price_micros_per_mtok = 15000000 }
            [models.gpt-4o]
            layer = "l2"
            input_price_micros_per_mtok = 2500000
            output_price_micros_per_mtok = 10000000
            cached_input_price_micros_per_mtok = 1250000
            context_window = 128000
            max_output_tokens = 16384
            capabilities = ["tools", "vision", "json_schema"]
            max_tokens_param = "max_completion_tokens"
            [policy.context_window_fallbacks]
            gpt-4o-mini = ["gpt-4o"]
            "#,
        )
        .unwrap();
        assert_eq!(config.models["gpt-4o"].max_output_tokens, Some(16384));
        assert_eq!(config.default_price.unwrap().output_price_micros_per_mtok, 15_000_000);
        assert_eq!(config.policy.context_window_fallbacks["gpt-4o-mini"], ["gpt-4o"]);
        let err = toml::from_str::<Config>("[models.m]\ncapabilities = [\"x-ray\"]\n").unwrap_err().to_string();
        assert!(err.contains("x-ray"), "{err}");
    }
}
