//! Routing policies per project, from the router's configuration, a policy file watched for
//! changes, and `ModelRoute` custom resources in Kubernetes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use meshgate_proto::common::v1::Layer;
use meshgate_runtime::Shutdown;
use prometheus::IntCounterVec;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use meshgate_catalog::task::{TASK_NAMES, Task};

/// A cost layer as written in policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LayerName {
    /// Local models, no per-token cost.
    L0,
    /// Cheap cloud models.
    L1,
    /// Standard cloud models.
    L2,
    /// Premium cloud models.
    L3,
}

impl LayerName {
    pub fn layer(self) -> Layer {
        match self {
            LayerName::L0 => Layer::L0Local,
            LayerName::L1 => Layer::L1Cheap,
            LayerName::L2 => Layer::L2Standard,
            LayerName::L3 => Layer::L3Premium,
        }
    }
}

/// Short name of a layer for reasons and headers ("l0".."l3").
pub fn layer_name(layer: Layer) -> &'static str {
    // An undeclared cloud layer is the standard one.
    if layer == Layer::Unspecified { Layer::L2Standard.short_name() } else { layer.short_name() }
}

/// What a project wants for one task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TaskRule {
    /// Target ids ("<provider>/<model>" or "local/<model>") tried first for this task, in order.
    pub prefer: Vec<String>,
    /// Target ids tried after the chosen layer's targets, in order (the fallback chain).
    pub fallback: Vec<String>,
    /// Layer to start from for this task (overrides `default_layer`).
    pub layer: Option<LayerName>,
}

/// The routing policy of a project. Every field is optional: a project's policy is laid over
/// the default policy field by field (maps key by key), so a project states only what differs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RoutePolicy {
    /// Layer to start from when the router chooses the model (default: the cheapest layer with
    /// a fitting target).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_layer: Option<LayerName>,
    /// Highest layer the project may use, fallbacks and escalation included (default l3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_layer: Option<LayerName>,
    /// Largest estimated cost of one request (prompt plus maximum completion tokens at the
    /// target's prices), micro-dollars; dearer targets are left out (default: no cap).
    #[schemars(range(min = 0))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cost_micros: Option<i64>,
    /// Whether the router may serve a request with another model than the one asked for
    /// (default false: only the requested model's targets, then fallbacks and escalation).
    /// Requests for one of `auto_models` always let the router choose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub choose_model: Option<bool>,
    /// Model ids that mean "let the router choose" (default ["auto"]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_models: Option<Vec<String>>,
    /// Add the targets one layer above the primary, for when the lower answer fails (default
    /// true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub escalation: Option<bool>,
    /// Fastest-first: race the first two targets and keep the first to answer (default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub race: Option<bool>,
    /// Rules per task ("code", "math", "creative", "reasoning", "chat").
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tasks: BTreeMap<String, TaskRule>,
    /// Relative traffic shares among equivalent targets (same layer and priority), by target
    /// id; unlisted targets weigh 1, weight 0 takes a target out of the choice.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub weights: BTreeMap<String, u32>,
    /// Larger-context models by model id (LiteLLM's `context_window_fallbacks`): their targets
    /// follow the model's own in the plan, so a request its context window cannot hold, or one
    /// its provider answers with `context_length_exceeded`, is served by them.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub context_window_fallbacks: BTreeMap<String, Vec<String>>,
}

impl RoutePolicy {
    /// This policy laid over `base`: set fields win, maps merge key by key.
    pub fn over(&self, base: &RoutePolicy) -> RoutePolicy {
        let mut tasks = base.tasks.clone();
        tasks.extend(self.tasks.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mut weights = base.weights.clone();
        weights.extend(self.weights.iter().map(|(k, v)| (k.clone(), *v)));
        let mut context_window_fallbacks = base.context_window_fallbacks.clone();
        context_window_fallbacks.extend(self.context_window_fallbacks.iter().map(|(k, v)| (k.clone(), v.clone())));
        RoutePolicy {
            default_layer: self.default_layer.or(base.default_layer),
            max_layer: self.max_layer.or(base.max_layer),
            max_cost_micros: self.max_cost_micros.or(base.max_cost_micros),
            choose_model: self.choose_model.or(base.choose_model),
            auto_models: self.auto_models.clone().or_else(|| base.auto_models.clone()),
            escalation: self.escalation.or(base.escalation),
            race: self.race.or(base.race),
            tasks,
            weights,
            context_window_fallbacks,
        }
    }

    /// Refuses values no request could satisfy.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_cost_micros.is_some_and(|c| c < 0) {
            return Err("max_cost_micros must not be negative".into());
        }
        if let (Some(default), Some(max)) = (self.default_layer, self.max_layer)
            && default > max
        {
            return Err(format!("default_layer {default:?} is above max_layer {max:?}"));
        }
        for (task, rule) in &self.tasks {
            if Task::parse(task).is_none() {
                return Err(format!("unknown task {task:?}; expected {TASK_NAMES}"));
            }
            if let (Some(layer), Some(max)) = (rule.layer, self.max_layer)
                && layer > max
            {
                return Err(format!("tasks.{task}.layer {layer:?} is above max_layer {max:?}"));
            }
        }
        for (model, larger) in &self.context_window_fallbacks {
            if let Some(bad) = larger.iter().find(|m| m.trim().is_empty() || *m == model) {
                return Err(format!(
                    "context_window_fallbacks.{model}: {bad:?} is not another model id (a model cannot be its own fallback)"
                ));
            }
        }
        Ok(())
    }

    pub fn max_layer(&self) -> Layer {
        self.max_layer.unwrap_or(LayerName::L3).layer()
    }

    pub fn escalation(&self) -> bool {
        self.escalation.unwrap_or(true)
    }

    pub fn race(&self) -> bool {
        self.race.unwrap_or(false)
    }

    /// Whether a request for `model` lets the router choose the model.
    pub fn chooses(&self, model: &str) -> bool {
        let auto = match &self.auto_models {
            Some(models) => models.iter().any(|m| m == model),
            None => model == "auto",
        };
        auto || self.choose_model.unwrap_or(false)
    }

    pub fn weight(&self, target_id: &str) -> u32 {
        self.weights.get(target_id).copied().unwrap_or(1)
    }
}

/// The policy file: a default policy and policies per project id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyFile {
    /// Laid over the configuration's policy for every project.
    pub default: RoutePolicy,
    /// Per project id, laid over the default.
    pub projects: BTreeMap<String, RoutePolicy>,
}

impl PolicyFile {
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|err| err.to_string())?;
        file.default.validate().map_err(|err| format!("default: {err}"))?;
        for (project, policy) in &file.projects {
            policy.validate().map_err(|err| format!("projects.{project}: {err}"))?;
        }
        Ok(file)
    }
}

/// A policy from a `ModelRoute` resource, by resource name.
#[derive(Debug, Clone, PartialEq)]
pub struct KubePolicy {
    /// Project id it applies to; `None` applies to every project (a default).
    pub project: Option<String>,
    pub policy: RoutePolicy,
}

/// Every policy source at one moment, swapped whole when one changes.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    /// `[router.policy]` of the configuration: the base of everything.
    pub config: RoutePolicy,
    pub file: Option<PolicyFile>,
    /// `ModelRoute` resources by "<namespace>/<name>".
    pub kube: BTreeMap<String, KubePolicy>,
}

/// A project's effective policy and the sources it was built from.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub policy: RoutePolicy,
    /// For example "default(config) + project:p1(file)".
    pub label: String,
}

impl PolicySet {
    /// The effective policy of `project`: configuration, then the file's default, then the
    /// `ModelRoute` defaults, then the file's project policy, then the project's `ModelRoute`s
    /// (resources in name order), each laid over the previous.
    pub fn resolve(&self, project: &str) -> Resolved {
        let mut policy = self.config.clone();
        let mut label = vec!["default(config)".to_owned()];
        if let Some(file) = &self.file
            && file.default != RoutePolicy::default()
        {
            policy = file.default.over(&policy);
            label.push("default(file)".into());
        }
        for (name, kube) in self.kube.iter().filter(|(_, k)| k.project.is_none()) {
            policy = kube.policy.over(&policy);
            label.push(format!("default(kube:{name})"));
        }
        if let Some(project_policy) = self.file.as_ref().and_then(|f| f.projects.get(project)) {
            policy = project_policy.over(&policy);
            label.push(format!("project:{project}(file)"));
        }
        for (name, kube) in self.kube.iter().filter(|(_, k)| k.project.as_deref() == Some(project)) {
            policy = kube.policy.over(&policy);
            label.push(format!("project:{project}(kube:{name})"));
        }
        Resolved { policy, label: label.join(" + ") }
    }
}

/// The live policy set shared by the decision path and the sources that update it.
#[derive(Debug, Default)]
pub struct PolicyStore {
    set: ArcSwap<PolicySet>,
    /// Serialises updates (reads never wait).
    write: parking_lot::Mutex<()>,
    /// Counts the updates published, for whoever holds plans decided under an older set.
    version: tokio::sync::watch::Sender<u64>,
}

impl PolicyStore {
    pub fn new(config: RoutePolicy) -> Self {
        Self { set: ArcSwap::from_pointee(PolicySet { config, ..Default::default() }), ..Default::default() }
    }

    /// Updates published so far.
    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// [`PolicyStore::version`], changing as each update is published.
    pub fn watch_version(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub fn load(&self) -> Arc<PolicySet> {
        self.set.load_full()
    }

    /// Applies `change` to a copy of the current set and publishes it.
    pub fn update(&self, change: impl FnOnce(&mut PolicySet)) {
        let _guard = self.write.lock();
        let mut next = PolicySet::clone(&self.set.load());
        change(&mut next);
        self.set.store(Arc::new(next));
        self.version.send_modify(|version| *version += 1);
    }
}

/// Reads the policy file now; a missing or invalid file is an error (at startup it stops the
/// router: a typo must not silently route everything by the defaults).
pub fn read_policy_file(path: &Path) -> Result<(String, PolicyFile), String> {
    let text = std::fs::read_to_string(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    let file = PolicyFile::parse(&text).map_err(|err| format!("{}: {err}", path.display()))?;
    Ok((text, file))
}

/// Re-reads the policy file every `every` and publishes it when its text changed. Polling,
/// not inotify: Kubernetes updates mounted ConfigMaps by swapping a symlink, which file
/// watches on the old inode miss. An invalid new version is logged and the last good one kept.
/// Each changed version read counts in `reloads` by outcome ("applied", "invalid"), and each
/// failed read as "unreadable".
pub async fn watch_policy_file(
    store: Arc<PolicyStore>,
    path: PathBuf,
    mut last_text: String,
    every: Duration,
    reloads: IntCounterVec,
    shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(err) => {
                tracing::warn!(path = %path.display(), %err, "cannot read the policy file; keeping the last good policy");
                reloads.with_label_values(&["unreadable"]).inc();
                continue;
            }
        };
        if text == last_text {
            continue;
        }
        match PolicyFile::parse(&text) {
            Ok(file) => {
                tracing::info!(path = %path.display(), projects = file.projects.len(), "policy file reloaded");
                store.update(|set| set.file = Some(file));
                reloads.with_label_values(&["applied"]).inc();
            }
            Err(err) => {
                tracing::error!(path = %path.display(), %err, "invalid policy file; keeping the last good policy");
                reloads.with_label_values(&["invalid"]).inc();
            }
        }
        last_text = text;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_policies_lay_over_defaults_field_by_field() {
        let file = PolicyFile::parse(
            r#"
            [default]
            max_layer = "l2"
            escalation = false
            weights = { "a/m" = 3 }
            [default.tasks.code]
            prefer = ["a/m"]

            [default.context_window_fallbacks]
            small = ["medium"]
            medium = ["large"]

            [projects.p1]
            default_layer = "l0"
            weights = { "b/m" = 0 }
            context_window_fallbacks = { small = ["huge"] }
            [projects.p1.tasks.code]
            prefer = ["b/m"]
            "#,
        )
        .unwrap();
        let config = RoutePolicy { race: Some(true), max_layer: Some(LayerName::L3), ..Default::default() };
        let set = PolicySet { config, file: Some(file), kube: BTreeMap::new() };
        let p1 = set.resolve("p1");
        assert_eq!(p1.label, "default(config) + default(file) + project:p1(file)");
        assert_eq!(p1.policy.max_layer, Some(LayerName::L2), "the file's default beats the configuration");
        assert_eq!(p1.policy.default_layer, Some(LayerName::L0));
        assert!(p1.policy.race(), "unset fields inherit");
        assert!(!p1.policy.escalation());
        assert_eq!((p1.policy.weight("a/m"), p1.policy.weight("b/m"), p1.policy.weight("c/m")), (3, 0, 1));
        assert_eq!(p1.policy.tasks["code"].prefer, ["b/m"]);
        assert_eq!(p1.policy.context_window_fallbacks["small"], ["huge"], "a project's list replaces the default's");
        assert_eq!(p1.policy.context_window_fallbacks["medium"], ["large"], "models it does not name are kept");
        let other = set.resolve("p2");
        assert_eq!(other.policy.default_layer, None);
        assert_eq!(other.policy.tasks["code"].prefer, ["a/m"]);
    }

    #[test]
    fn kube_policies_beat_the_file_and_apply_by_project() {
        let mut kube = BTreeMap::new();
        kube.insert(
            "ns/all".to_owned(),
            KubePolicy { project: None, policy: RoutePolicy { max_cost_micros: Some(10), ..Default::default() } },
        );
        kube.insert(
            "ns/p1".to_owned(),
            KubePolicy {
                project: Some("p1".into()),
                policy: RoutePolicy { max_layer: Some(LayerName::L1), ..Default::default() },
            },
        );
        let file = PolicyFile {
            projects: [("p1".to_owned(), RoutePolicy { max_layer: Some(LayerName::L2), ..Default::default() })].into(),
            ..Default::default()
        };
        let set = PolicySet { config: RoutePolicy::default(), file: Some(file), kube };
        let p1 = set.resolve("p1");
        assert_eq!(p1.policy.max_layer, Some(LayerName::L1));
        assert_eq!(p1.policy.max_cost_micros, Some(10));
        assert_eq!(p1.label, "default(config) + default(kube:ns/all) + project:p1(file) + project:p1(kube:ns/p1)");
        assert_eq!(set.resolve("p2").policy.max_layer, None);
    }

    #[test]
    fn invalid_policies_are_refused_with_their_place() {
        let cases = [
            ("[default]\nmax_cost_micros = -1\n", "default: max_cost_micros"),
            ("[projects.p]\ndefault_layer = \"l3\"\nmax_layer = \"l1\"\n", "projects.p: default_layer"),
            ("[default.tasks.dance]\nprefer = []\n", "unknown task \"dance\""),
            ("[default]\nmax_layer = \"l7\"\n", "unknown variant"),
            ("[default]\nmax_layr = \"l1\"\n", "unknown field"),
            ("[default.context_window_fallbacks]\nm = [\"m\"]\n", "context_window_fallbacks.m: \"m\""),
            ("[default.context_window_fallbacks]\nm = [\"\"]\n", "context_window_fallbacks.m: \"\""),
        ];
        for (text, expected) in cases {
            let err = PolicyFile::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text:?} gave {err:?}");
        }
    }

    #[test]
    fn auto_models_and_choose_model_decide_who_picks_the_model() {
        let default = RoutePolicy::default();
        assert!(default.chooses("auto") && !default.chooses("gpt-4o"));
        let aliases = RoutePolicy { auto_models: Some(vec!["meshgate".into()]), ..Default::default() };
        assert!(aliases.chooses("meshgate") && !aliases.chooses("auto"));
        assert!(RoutePolicy { choose_model: Some(true), ..Default::default() }.chooses("gpt-4o"));
    }
}
