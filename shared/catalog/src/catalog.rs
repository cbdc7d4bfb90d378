//! The catalog: validated providers and declared model facts, and the resolved profile of every
//! model a target can serve, with the defaults for what nobody declared.

use std::collections::{BTreeMap, BTreeSet};

use meshgate_proto::common::v1::{Layer, Target, TargetKind};

use crate::env::resolve_providers;
use crate::error::CatalogError;
use crate::model::{Capability, MaxTokensParam, ModelFacts, Prices, parse_layer};
use crate::provider::{ProviderKind, ProviderSpec};

/// Host of OpenAI's own API, whose chat models all take `max_completion_tokens`.
const OPENAI_API_HOST: &str = "api.openai.com";

/// What a cloud model nobody described is assumed to do: the chat APIs of OpenAI-compatible
/// providers and Anthropic take tools, images and a JSON schema on their current models.
const CLOUD_DEFAULT_CAPABILITIES: [Capability; 3] = [Capability::Tools, Capability::Vision, Capability::JsonSchema];

/// Providers and model facts, validated.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// In fallback order.
    providers: Vec<ProviderSpec>,
    models: BTreeMap<String, ModelFacts>,
    default_price: Option<Prices>,
}

/// Everything known about a model as one target serves it: declared facts, else defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelProfile {
    pub layer: Layer,
    /// The prices charged (zero where nothing is declared and no default price is set).
    pub prices: Prices,
    /// Whether input and output prices are declared (or come from the default price); an
    /// unpriced cloud model is served at no cost, which `meshgate check-config` refuses unless
    /// the operator allows it.
    pub priced: bool,
    /// Context window in tokens (0: unknown).
    pub context_window: i64,
    /// Largest completion (0: unknown).
    pub max_output_tokens: i64,
    pub capabilities: BTreeSet<Capability>,
    /// Whether `capabilities` are known (declared, or a local model's) rather than the defaults
    /// assumed of a cloud model nobody described.
    pub capabilities_known: bool,
    pub max_tokens_param: MaxTokensParam,
    /// Declared tasks (empty: any).
    pub tasks: Vec<String>,
}

impl ModelProfile {
    pub fn has(&self, capability: Capability) -> bool {
        self.capabilities.contains(&capability)
    }

    /// Whether the model may serve a request needing `capability`: it has it, or the request
    /// asks a reasoning effort of a cloud model nobody described (whether it reasons is then
    /// the provider's to say; tools, vision and JSON schema are assumed, audio is not).
    pub fn may_serve(&self, capability: Capability) -> bool {
        self.has(capability) || (capability == Capability::Reasoning && !self.capabilities_known)
    }

    /// The first of `needed` the model may not serve.
    pub fn lacks(&self, needed: &[Capability]) -> Option<Capability> {
        needed.iter().copied().find(|c| !self.may_serve(*c))
    }

    /// The wire target `id` (`<provider>/<model>`) with this profile's layer, prices, limits and
    /// capabilities.
    pub fn target(&self, id: String, kind: TargetKind, provider: &str, model: &str) -> Target {
        Target {
            id,
            kind: kind as i32,
            provider: provider.to_owned(),
            model: model.to_owned(),
            layer: self.layer as i32,
            input_price_micros_per_mtok: self.prices.input_price_micros_per_mtok,
            output_price_micros_per_mtok: self.prices.output_price_micros_per_mtok,
            context_window: self.context_window,
            cached_input_price_micros_per_mtok: self.prices.cached_input_price_micros_per_mtok,
            cache_write_price_micros_per_mtok: self.prices.cache_write_price_micros_per_mtok,
            capabilities: self.capabilities.iter().map(|c| c.as_str().to_owned()).collect(),
            max_output_tokens: self.max_output_tokens,
            max_tokens_param: self.max_tokens_param.as_str().to_owned(),
        }
    }
}

/// A cloud target without prices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpriced {
    pub provider: String,
    pub model: String,
}

impl Catalog {
    /// The configuration file's providers merged with the environment's `vars` (see
    /// [`resolve_providers`]), and the declared facts of `models`, each validated.
    pub fn resolve<I, K, V>(
        file: &[ProviderSpec],
        vars: I,
        models: &BTreeMap<String, ModelFacts>,
        default_price: Option<Prices>,
    ) -> Result<Self, CatalogError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let providers = resolve_providers(file, vars)?;
        for (model, facts) in models {
            facts.validate(model)?;
        }
        if let Some(prices) = &default_price {
            prices.validate()?;
        }
        Ok(Self { providers, models: models.clone(), default_price })
    }

    /// Every provider in fallback order.
    pub fn providers(&self) -> &[ProviderSpec] {
        &self.providers
    }

    /// The provider called `name` (lower case).
    pub fn provider(&self, name: &str) -> Option<&ProviderSpec> {
        self.providers.iter().find(|p| p.name == name)
    }

    /// The providers serving `model`, in fallback order.
    pub fn serving<'a>(&'a self, model: &'a str) -> impl Iterator<Item = &'a ProviderSpec> + 'a {
        self.providers.iter().filter(move |p| p.serves(model))
    }

    /// Every model id some provider serves, sorted, each once.
    pub fn cloud_models(&self) -> Vec<&str> {
        let models: BTreeSet<&str> = self.providers.iter().flat_map(|p| p.models.iter().map(String::as_str)).collect();
        models.into_iter().collect()
    }

    /// The declared facts of `model`, if any.
    pub fn facts(&self, model: &str) -> Option<&ModelFacts> {
        self.models.get(model)
    }

    /// `model` as `provider` serves it. Undeclared: layer l2; the default price, else no price;
    /// capabilities tools, vision and json_schema (and reasoning left to the provider, see
    /// [`ModelProfile::may_serve`]); the completion limit in
    /// `max_completion_tokens` at OpenAI's own API and in `max_tokens` elsewhere.
    pub fn cloud_profile(&self, provider: &ProviderSpec, model: &str) -> ModelProfile {
        let facts = self.models.get(model).cloned().unwrap_or_default();
        let default = self.default_price;
        let input = facts.input_price_micros_per_mtok.or(default.map(|d| d.input_price_micros_per_mtok));
        let output = facts.output_price_micros_per_mtok.or(default.map(|d| d.output_price_micros_per_mtok));
        let prices = Prices {
            input_price_micros_per_mtok: input.unwrap_or(0),
            output_price_micros_per_mtok: output.unwrap_or(0),
            cached_input_price_micros_per_mtok: facts
                .cached_input_price_micros_per_mtok
                .or(default.map(|d| d.cached_input_price_micros_per_mtok))
                .unwrap_or(0),
            cache_write_price_micros_per_mtok: facts
                .cache_write_price_micros_per_mtok
                .or(default.map(|d| d.cache_write_price_micros_per_mtok))
                .unwrap_or(0),
        };
        let official_openai =
            provider.kind == ProviderKind::Openai && provider.host().as_deref() == Some(OPENAI_API_HOST);
        let max_tokens_param = facts.max_tokens_param.unwrap_or(if official_openai {
            MaxTokensParam::MaxCompletionTokens
        } else {
            MaxTokensParam::MaxTokens
        });
        ModelProfile {
            layer: facts.layer.as_deref().and_then(parse_layer).unwrap_or(Layer::L2Standard),
            prices,
            priced: input.is_some() && output.is_some(),
            context_window: facts.context_window.unwrap_or(0),
            max_output_tokens: facts.max_output_tokens.unwrap_or(0),
            capabilities_known: facts.capabilities.is_some(),
            capabilities: match facts.capabilities {
                Some(declared) => declared.into_iter().collect(),
                None => CLOUD_DEFAULT_CAPABILITIES.into_iter().collect(),
            },
            max_tokens_param,
            tasks: facts.tasks,
        }
    }

    /// A local model the inference service serves with `context_length` (0: unknown, then the
    /// declared window). Always layer l0 and free; no capabilities, since the inference service
    /// generates text only.
    pub fn local_profile(&self, model: &str, context_length: i64) -> ModelProfile {
        let facts = self.models.get(model);
        let declared_window = facts.and_then(|f| f.context_window).unwrap_or(0);
        ModelProfile {
            layer: Layer::L0Local,
            prices: Prices::default(),
            priced: true,
            context_window: if context_length > 0 { context_length } else { declared_window },
            max_output_tokens: facts.and_then(|f| f.max_output_tokens).unwrap_or(0),
            capabilities: BTreeSet::new(),
            capabilities_known: true,
            max_tokens_param: MaxTokensParam::MaxTokens,
            tasks: facts.map(|f| f.tasks.clone()).unwrap_or_default(),
        }
    }

    /// Every cloud target whose model has no input or output price, even from the default.
    pub fn unpriced(&self) -> Vec<Unpriced> {
        self.providers
            .iter()
            .flat_map(|provider| provider.models.iter().map(move |model| (provider, model)))
            .filter(|(provider, model)| !self.cloud_profile(provider, model).priced)
            .map(|(provider, model)| Unpriced { provider: provider.name.clone(), model: model.clone() })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_ENV: [(&str, &str); 0] = [];

    fn provider(name: &str, kind: ProviderKind, base_url: &str, models: &[&str]) -> ProviderSpec {
        ProviderSpec {
            name: name.into(),
            kind,
            base_url: base_url.into(),
            models: models.iter().map(|m| m.to_string()).collect(),
            ..ProviderSpec::default()
        }
    }

    fn build(models: &[(&str, ModelFacts)], default_price: Option<Prices>) -> Catalog {
        let providers = [
            provider("openai", ProviderKind::Openai, "https://api.openai.com/v1", &["gpt", "o-mini"]),
            provider("vllm", ProviderKind::Openai, "http://10.0.0.5:8000/v1", &["gpt", "llama"]),
            provider("claude", ProviderKind::Anthropic, "https://api.anthropic.com/v1", &["sonnet"]),
        ];
        let models = models.iter().map(|(m, f)| ((*m).to_owned(), f.clone())).collect();
        Catalog::resolve(&providers, NO_ENV, &models, default_price).unwrap()
    }

    #[test]
    fn declared_facts_fill_the_target() {
        let facts = ModelFacts {
            layer: Some("l3".into()),
            input_price_micros_per_mtok: Some(2_000_000),
            output_price_micros_per_mtok: Some(8_000_000),
            cached_input_price_micros_per_mtok: Some(500_000),
            cache_write_price_micros_per_mtok: Some(2_500_000),
            context_window: Some(200_000),
            max_output_tokens: Some(100_000),
            capabilities: Some(vec![Capability::Reasoning, Capability::Tools]),
            max_tokens_param: Some(MaxTokensParam::MaxTokens),
            tasks: vec!["reasoning".into()],
        };
        let catalog = build(&[("o-mini", facts)], None);
        let openai = catalog.provider("openai").unwrap();
        let profile = catalog.cloud_profile(openai, "o-mini");
        assert!(profile.priced && profile.has(Capability::Tools) && !profile.has(Capability::Vision));
        assert_eq!(profile.max_tokens_param, MaxTokensParam::MaxTokens, "the declaration beats the provider default");
        let target = profile.target("openai/o-mini".into(), TargetKind::Cloud, "openai", "o-mini");
        assert_eq!(
            target,
            Target {
                id: "openai/o-mini".into(),
                kind: TargetKind::Cloud as i32,
                provider: "openai".into(),
                model: "o-mini".into(),
                layer: Layer::L3Premium as i32,
                input_price_micros_per_mtok: 2_000_000,
                output_price_micros_per_mtok: 8_000_000,
                context_window: 200_000,
                cached_input_price_micros_per_mtok: 500_000,
                cache_write_price_micros_per_mtok: 2_500_000,
                capabilities: vec!["tools".into(), "reasoning".into()],
                max_output_tokens: 100_000,
                max_tokens_param: "max_tokens".into(),
            }
        );
    }

    #[test]
    fn undescribed_cloud_models_take_tools_vision_and_json_schema_and_the_provider_s_length_parameter() {
        let catalog = build(&[], None);
        for (provider, model, param) in [
            ("openai", "gpt", MaxTokensParam::MaxCompletionTokens),
            ("vllm", "gpt", MaxTokensParam::MaxTokens),
            ("claude", "sonnet", MaxTokensParam::MaxTokens),
        ] {
            let profile = catalog.cloud_profile(catalog.provider(provider).unwrap(), model);
            let names: Vec<_> = profile.capabilities.iter().map(|c| c.as_str()).collect();
            assert_eq!(names, ["tools", "vision", "json_schema"], "{provider}/{model}");
            assert_eq!(profile.max_tokens_param, param, "{provider}/{model}");
            assert_eq!((profile.layer, profile.context_window, profile.priced), (Layer::L2Standard, 0, false));
        }
        let none = build(&[("llama", ModelFacts { capabilities: Some(vec![]), ..Default::default() })], None);
        assert!(none.cloud_profile(none.provider("vllm").unwrap(), "llama").capabilities.is_empty(), "[] says none");
    }

    #[test]
    fn a_reasoning_effort_is_left_to_undescribed_cloud_models_and_refused_by_declared_ones() {
        let declared = ModelFacts { capabilities: Some(vec![Capability::Tools]), ..Default::default() };
        let catalog = build(&[("llama", declared)], None);
        let vllm = catalog.provider("vllm").unwrap();
        let undescribed = catalog.cloud_profile(vllm, "gpt");
        let described = catalog.cloud_profile(vllm, "llama");
        let local = catalog.local_profile("tiny", 64);
        let needs = [Capability::Tools, Capability::Reasoning];
        assert_eq!(undescribed.lacks(&needs), None);
        assert!(!undescribed.has(Capability::Reasoning), "not advertised, only not refused");
        assert_eq!(undescribed.lacks(&[Capability::Audio]), Some(Capability::Audio));
        assert_eq!(described.lacks(&needs), Some(Capability::Reasoning));
        assert_eq!(local.lacks(&[Capability::Reasoning]), Some(Capability::Reasoning));
    }

    #[test]
    fn local_models_are_free_l0_and_capable_of_nothing() {
        let facts = ModelFacts {
            layer: Some("l2".into()),
            input_price_micros_per_mtok: Some(9),
            context_window: Some(4096),
            capabilities: Some(vec![Capability::Tools]),
            tasks: vec!["chat".into()],
            ..Default::default()
        };
        let catalog = build(&[("tiny", facts)], Some(Prices { input_price_micros_per_mtok: 5, ..Prices::default() }));
        let reported = catalog.local_profile("tiny", 2048);
        assert_eq!(
            (reported.layer, reported.prices, reported.context_window),
            (Layer::L0Local, Prices::default(), 2048)
        );
        assert!(reported.capabilities.is_empty() && reported.priced);
        assert_eq!(reported.tasks, ["chat"]);
        assert_eq!(catalog.local_profile("tiny", 0).context_window, 4096, "the declared window when none is reported");
        assert_eq!(catalog.local_profile("other", 0).context_window, 0);
    }

    #[test]
    fn unpriced_cloud_models_are_listed_unless_a_default_price_covers_them() {
        let priced = ModelFacts {
            input_price_micros_per_mtok: Some(0),
            output_price_micros_per_mtok: Some(0),
            ..Default::default()
        };
        let half = ModelFacts { input_price_micros_per_mtok: Some(3), ..Default::default() };
        let catalog = build(&[("gpt", priced.clone()), ("llama", half.clone())], None);
        let unpriced: Vec<String> = catalog.unpriced().iter().map(|u| format!("{}/{}", u.provider, u.model)).collect();
        assert_eq!(unpriced, ["claude/sonnet", "openai/o-mini", "vllm/llama"], "a declared 0 is a price");

        let default = Prices { input_price_micros_per_mtok: 7, output_price_micros_per_mtok: 11, ..Prices::default() };
        let catalog = build(&[("gpt", priced), ("llama", half)], Some(default));
        assert!(catalog.unpriced().is_empty());
        let llama = catalog.cloud_profile(catalog.provider("vllm").unwrap(), "llama");
        assert_eq!((llama.prices.input_price_micros_per_mtok, llama.prices.output_price_micros_per_mtok), (3, 11));
        let gpt = catalog.cloud_profile(catalog.provider("openai").unwrap(), "gpt");
        assert_eq!((gpt.prices.input_price_micros_per_mtok, gpt.prices.output_price_micros_per_mtok), (0, 0));
    }

    #[test]
    fn lookups_and_bad_facts() {
        let catalog = build(&[], None);
        let serving: Vec<&str> = catalog.serving("gpt").map(|p| p.name.as_str()).collect();
        assert_eq!(serving, ["openai", "vllm"]);
        assert_eq!(catalog.cloud_models(), ["gpt", "llama", "o-mini", "sonnet"]);
        assert!(catalog.provider("nope").is_none() && catalog.facts("gpt").is_none());

        let bad = BTreeMap::from([("m".to_owned(), ModelFacts { layer: Some("l7".into()), ..Default::default() })]);
        let err = Catalog::resolve(&[], NO_ENV, &bad, None).unwrap_err();
        assert!(matches!(err, CatalogError::InvalidModel { field: "layer", .. }), "{err}");
        let negative = Prices { input_price_micros_per_mtok: -1, ..Prices::default() };
        assert!(Catalog::resolve(&[], NO_ENV, &BTreeMap::new(), Some(negative)).is_err());
    }
}
