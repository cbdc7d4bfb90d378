//! What can serve which model: the cloud targets of the catalog and the local models the
//! inference service reports, each with its facts, in one snapshot swapped whole when local
//! models change.

use std::collections::BTreeMap;

use meshgate_catalog::{Capability, Catalog, ModelProfile};
use meshgate_proto::common::v1::{Layer, Target, TargetKind};

/// A local model reported by the inference service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalModel {
    pub name: String,
    /// "chat", "embeddings" or "classification".
    pub task: String,
    pub context_length: i64,
}

/// A target with what the router needs beyond the wire `Target`.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub target: Target,
    /// Declared preference among targets of one layer: lower first (the provider's priority; 0
    /// for local models). Targets of one layer and one rank are equivalent for load balancing.
    pub rank: i64,
    /// What the catalog says of the target's model (its tasks, its capabilities).
    pub profile: ModelProfile,
}

impl Entry {
    pub fn layer(&self) -> Layer {
        Layer::try_from(self.target.layer).unwrap_or(Layer::L2Standard)
    }

    /// Whether the target is declared fit for `task`.
    pub fn serves_task(&self, task: &str) -> bool {
        self.profile.tasks.is_empty() || self.profile.tasks.iter().any(|t| t == task)
    }

    /// The first of `needed` the target's model may not serve.
    pub fn lacks(&self, needed: &[Capability]) -> Option<Capability> {
        self.profile.lacks(needed)
    }
}

/// An immutable snapshot of every target.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    /// Targets per (kind, requested model id), in configured preference order.
    by_model: BTreeMap<(String, String), Vec<Entry>>,
}

impl Targets {
    /// Builds the snapshot: local models first (free, on this machine), then the catalog's
    /// providers by priority and name.
    pub fn build(catalog: &Catalog, local: &[LocalModel]) -> Self {
        let mut by_model: BTreeMap<(String, String), Vec<Entry>> = BTreeMap::new();
        for model in local.iter().filter(|m| m.task == "chat" || m.task == "embeddings") {
            let profile = catalog.local_profile(&model.name, model.context_length);
            let target = profile.target(format!("local/{}", model.name), TargetKind::Local, "local", &model.name);
            let entry = Entry { target, rank: 0, profile };
            by_model.entry((model.task.clone(), model.name.clone())).or_default().push(entry);
        }
        for provider in catalog.providers() {
            let kinds = [("chat", &provider.models), ("embeddings", &provider.embedding_models)];
            for (kind, model) in kinds.into_iter().flat_map(|(kind, models)| models.iter().map(move |m| (kind, m))) {
                let profile = catalog.cloud_profile(provider, model);
                let id = format!("{}/{}", provider.name, model);
                let target = profile.target(id, TargetKind::Cloud, &provider.name, model);
                let rank = i64::from(provider.rank().0);
                let entry = Entry { target, rank, profile };
                by_model.entry((kind.to_owned(), model.clone())).or_default().push(entry);
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

    /// Every target with what it serves ("chat" or "embeddings").
    pub fn all_with_kind(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.by_model.iter().flat_map(|((kind, _), entries)| entries.iter().map(move |e| (kind.as_str(), e)))
    }
}

#[cfg(test)]
mod tests {
    use meshgate_catalog::{ModelFacts, ProviderSpec};

    use super::*;

    fn provider(name: &str, priority: i32, models: &[&str]) -> ProviderSpec {
        ProviderSpec {
            name: name.into(),
            base_url: format!("http://{name}.test/v1"),
            priority: Some(priority),
            models: models.iter().map(|m| m.to_string()).collect(),
            ..Default::default()
        }
    }

    fn catalog(providers: &[ProviderSpec], facts: &[(&str, ModelFacts)]) -> Catalog {
        let facts = facts.iter().map(|(m, f)| ((*m).to_owned(), f.clone())).collect();
        Catalog::resolve(providers, std::iter::empty::<(String, String)>(), &facts, None).unwrap()
    }

    #[test]
    fn local_first_then_priority_then_name() {
        let cloud = [provider("zeta", 0, &["m"]), provider("alpha", 0, &["m"]), provider("first", -1, &["m"])];
        let local = [LocalModel { name: "m".into(), task: "chat".into(), context_length: 2048 }];
        let targets = Targets::build(&catalog(&cloud, &[]), &local);
        let ids: Vec<_> = targets.targets_for("chat", "m").iter().map(|e| e.target.id.as_str()).collect();
        assert_eq!(ids, ["local/m", "first/m", "alpha/m", "zeta/m"]);
        assert!(targets.targets_for("chat", "other").is_empty());
    }

    #[test]
    fn facts_set_layer_prices_limits_and_capabilities() {
        let facts = ModelFacts {
            layer: Some("l3".into()),
            input_price_micros_per_mtok: Some(5),
            output_price_micros_per_mtok: Some(7),
            cached_input_price_micros_per_mtok: Some(2),
            context_window: Some(9),
            max_output_tokens: Some(8),
            capabilities: Some(vec![Capability::Tools]),
            tasks: vec!["code".into()],
            ..Default::default()
        };
        let targets = Targets::build(&catalog(&[provider("p", 0, &["m"])], &[("m", facts)]), &[]);
        let entry = &targets.targets_for("chat", "m")[0];
        assert!(entry.serves_task("code") && !entry.serves_task("math"));
        assert_eq!(targets.find("p/m"), Some(entry));
        assert_eq!(entry.lacks(&[Capability::Tools]), None);
        assert_eq!(entry.lacks(&[Capability::Tools, Capability::Vision]), Some(Capability::Vision));
        let target = &entry.target;
        assert_eq!(target.layer, Layer::L3Premium as i32);
        assert_eq!(
            (
                target.input_price_micros_per_mtok,
                target.output_price_micros_per_mtok,
                target.cached_input_price_micros_per_mtok,
                target.context_window,
                target.max_output_tokens
            ),
            (5, 7, 2, 9, 8)
        );
        assert_eq!(target.capabilities, ["tools"]);
    }

    #[test]
    fn local_models_are_l0_and_take_no_tools() {
        let local = [LocalModel { name: "tiny".into(), task: "chat".into(), context_length: 2048 }];
        let targets = Targets::build(&catalog(&[], &[]), &local);
        let entry = &targets.targets_for("chat", "tiny")[0];
        assert_eq!((entry.layer(), entry.target.context_window), (Layer::L0Local, 2048));
        assert_eq!(entry.lacks(&[Capability::Tools]), Some(Capability::Tools));
        assert!(entry.target.capabilities.is_empty());
    }

    #[test]
    fn embedding_models_serve_only_embeddings() {
        let local = [LocalModel { name: "e".into(), task: "embeddings".into(), context_length: 128 }];
        let targets = Targets::build(&catalog(&[provider("p", 0, &["e"])], &[]), &local);
        let embed: Vec<_> = targets.targets_for("embeddings", "e").iter().map(|e| e.target.id.as_str()).collect();
        let chat: Vec<_> = targets.targets_for("chat", "e").iter().map(|e| e.target.id.as_str()).collect();
        assert_eq!(embed, ["local/e"]);
        assert_eq!(chat, ["p/e"]);
    }

    #[test]
    fn cloud_embedding_models_follow_local_ones_by_priority() {
        let local = [LocalModel { name: "e".into(), task: "embeddings".into(), context_length: 128 }];
        let mut second = provider("b", 1, &["gpt"]);
        second.embedding_models = vec!["e".into(), "text-embedding-3-small".into()];
        let mut first = provider("a", 0, &[]);
        first.embedding_models = vec!["text-embedding-3-small".into()];
        let targets = Targets::build(&catalog(&[second, first], &[]), &local);
        let ids = |kind: &str, model: &str| -> Vec<String> {
            targets.targets_for(kind, model).iter().map(|e| e.target.id.clone()).collect()
        };
        assert_eq!(ids("embeddings", "e"), ["local/e", "b/e"]);
        assert_eq!(
            ids("embeddings", "text-embedding-3-small"),
            ["a/text-embedding-3-small", "b/text-embedding-3-small"]
        );
        assert!(ids("chat", "text-embedding-3-small").is_empty());
        assert_eq!(ids("chat", "gpt"), ["b/gpt"]);
    }

    #[test]
    fn classifiers_are_not_chat_targets() {
        let local = [LocalModel { name: "c".into(), task: "classification".into(), context_length: 0 }];
        assert!(Targets::build(&catalog(&[], &[]), &local).targets_for("chat", "c").is_empty());
    }
}
