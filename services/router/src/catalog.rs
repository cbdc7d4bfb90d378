//! What can serve which model: cloud providers (from configuration and the environment) and the
//! local models the inference service reports.

use std::collections::BTreeMap;

use meshgate_proto::common::v1::{Layer, Target, TargetKind};
use serde::{Deserialize, Serialize};

/// A cloud provider as the router sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudProvider {
    /// Lower-case provider name.
    pub name: String,
    /// Model ids it serves.
    pub models: Vec<String>,
    /// Lower is tried first; ties go by name.
    pub priority: i64,
}

/// Declared facts about a model id, from configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelFacts {
    /// Cost layer: "l0", "l1", "l2" or "l3" (default "l2" for cloud models).
    pub layer: Option<String>,
    /// Price per million prompt tokens, micro-dollars.
    pub input_price_micros_per_mtok: i64,
    /// Price per million completion tokens, micro-dollars.
    pub output_price_micros_per_mtok: i64,
    /// Context window in tokens (0 = unknown).
    pub context_window: i64,
    /// Tasks the model is good at ("code", "math", "creative", "reasoning", "chat"); empty means
    /// any. When the router chooses the model, a request of another task does not go to it.
    pub tasks: Vec<String>,
}

/// A local model reported by the inference service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalModel {
    pub name: String,
    /// "chat", "embeddings" or "classification".
    pub task: String,
    pub context_length: i64,
}

/// Parses a layer name; unknown names are a configuration error.
pub fn parse_layer(name: &str) -> Option<Layer> {
    match name.to_ascii_lowercase().as_str() {
        "l0" | "local" => Some(Layer::L0Local),
        "l1" | "cheap" => Some(Layer::L1Cheap),
        "l2" | "standard" => Some(Layer::L2Standard),
        "l3" | "premium" => Some(Layer::L3Premium),
        _ => None,
    }
}

/// A target with what the router needs beyond the wire `Target`.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub target: Target,
    /// Declared tasks (empty = any).
    pub tasks: Vec<String>,
    /// Declared preference among targets of one layer: lower first (the provider's priority; 0
    /// for local models). Targets of one layer and one rank are equivalent for load balancing.
    pub rank: i64,
}

impl Entry {
    pub fn layer(&self) -> Layer {
        Layer::try_from(self.target.layer).unwrap_or(Layer::L2Standard)
    }

    /// Whether the target is declared fit for `task`.
    pub fn serves_task(&self, task: &str) -> bool {
        self.tasks.is_empty() || self.tasks.iter().any(|t| t == task)
    }
}

/// An immutable snapshot of every target, swapped whole when local models change.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Targets per (kind, requested model id), in configured preference order.
    by_model: BTreeMap<(String, String), Vec<Entry>>,
}

impl Catalog {
    /// Builds the catalog: local models first (free, on this machine), then cloud providers by
    /// priority and name.
    pub fn build(cloud: &[CloudProvider], local: &[LocalModel], facts: &BTreeMap<String, ModelFacts>) -> Self {
        let mut by_model: BTreeMap<(String, String), Vec<Entry>> = BTreeMap::new();
        for model in local.iter().filter(|m| m.task == "chat" || m.task == "embeddings") {
            let target = Target {
                id: format!("local/{}", model.name),
                kind: TargetKind::Local as i32,
                provider: "local".into(),
                model: model.name.clone(),
                layer: Layer::L0Local as i32,
                input_price_micros_per_mtok: 0,
                output_price_micros_per_mtok: 0,
                context_window: model.context_length,
                ..Target::default()
            };
            let tasks = facts.get(&model.name).map(|f| f.tasks.clone()).unwrap_or_default();
            by_model.entry((model.task.clone(), model.name.clone())).or_default().push(Entry {
                target,
                tasks,
                rank: 0,
            });
        }
        let mut providers: Vec<&CloudProvider> = cloud.iter().collect();
        providers.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
        for provider in providers {
            for model in &provider.models {
                let fact = facts.get(model).cloned().unwrap_or_default();
                let layer = fact.layer.as_deref().and_then(parse_layer).unwrap_or(Layer::L2Standard);
                let target = Target {
                    id: format!("{}/{}", provider.name, model),
                    kind: TargetKind::Cloud as i32,
                    provider: provider.name.clone(),
                    model: model.clone(),
                    layer: layer as i32,
                    input_price_micros_per_mtok: fact.input_price_micros_per_mtok,
                    output_price_micros_per_mtok: fact.output_price_micros_per_mtok,
                    context_window: fact.context_window,
                    ..Target::default()
                };
                let entry = Entry { target, tasks: fact.tasks, rank: provider.priority };
                by_model.entry(("chat".to_owned(), model.clone())).or_default().push(entry);
            }
        }
        Self { by_model }
    }

    /// Targets able to serve `model` for `kind` ("chat" or "embeddings"), in preference order.
    pub fn targets_for(&self, kind: &str, model: &str) -> &[Entry] {
        self.by_model.get(&(kind.to_owned(), model.to_owned())).map(Vec::as_slice).unwrap_or_default()
    }

    /// Every target of `kind`, each once.
    pub fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.by_model.iter().filter(move |((k, _), _)| k == kind).flat_map(|(_, entries)| entries)
    }

    /// The target with this id, if any.
    pub fn find(&self, target_id: &str) -> Option<&Entry> {
        self.all().find(|e| e.target.id == target_id)
    }

    /// Every target, each once.
    pub fn all(&self) -> impl Iterator<Item = &Entry> {
        self.by_model.values().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(name: &str, priority: i64, models: &[&str]) -> CloudProvider {
        CloudProvider { name: name.into(), priority, models: models.iter().map(|m| m.to_string()).collect() }
    }

    #[test]
    fn local_first_then_priority_then_name() {
        let cloud = [provider("zeta", 0, &["m"]), provider("alpha", 0, &["m"]), provider("first", -1, &["m"])];
        let local = [LocalModel { name: "m".into(), task: "chat".into(), context_length: 2048 }];
        let catalog = Catalog::build(&cloud, &local, &BTreeMap::new());
        let ids: Vec<_> = catalog.targets_for("chat", "m").iter().map(|e| e.target.id.as_str()).collect();
        assert_eq!(ids, ["local/m", "first/m", "alpha/m", "zeta/m"]);
        assert!(catalog.targets_for("chat", "other").is_empty());
    }

    #[test]
    fn facts_set_layer_and_prices() {
        let mut facts = BTreeMap::new();
        facts.insert(
            "m".to_owned(),
            ModelFacts {
                layer: Some("l3".into()),
                input_price_micros_per_mtok: 5,
                output_price_micros_per_mtok: 7,
                context_window: 9,
                tasks: vec!["code".into()],
            },
        );
        let catalog = Catalog::build(&[provider("p", 0, &["m"])], &[], &facts);
        let entry = &catalog.targets_for("chat", "m")[0];
        assert!(entry.serves_task("code") && !entry.serves_task("math"));
        assert_eq!(catalog.find("p/m"), Some(entry));
        let target = &entry.target;
        assert_eq!(target.layer, Layer::L3Premium as i32);
        assert_eq!(
            (target.input_price_micros_per_mtok, target.output_price_micros_per_mtok, target.context_window),
            (5, 7, 9)
        );
    }

    #[test]
    fn embedding_models_serve_only_embeddings() {
        let local = [LocalModel { name: "e".into(), task: "embeddings".into(), context_length: 128 }];
        let catalog = Catalog::build(&[provider("p", 0, &["e"])], &local, &BTreeMap::new());
        let embed: Vec<_> = catalog.targets_for("embeddings", "e").iter().map(|e| e.target.id.as_str()).collect();
        let chat: Vec<_> = catalog.targets_for("chat", "e").iter().map(|e| e.target.id.as_str()).collect();
        assert_eq!(embed, ["local/e"]);
        assert_eq!(chat, ["p/e"]);
    }

    #[test]
    fn classifiers_are_not_chat_targets() {
        let local = [LocalModel { name: "c".into(), task: "classification".into(), context_length: 0 }];
        assert!(Catalog::build(&[], &local, &BTreeMap::new()).targets_for("chat", "c").is_empty());
    }
}
