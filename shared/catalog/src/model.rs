//! What an operator declares about a model id: its cost layer, prices, limits, capabilities and
//! how it takes its length limit. Undeclared facts get the defaults of [`crate::Catalog`].

use meshgate_proto::common::v1::Layer;
use serde::{Deserialize, Serialize};

use crate::error::CatalogError;

/// What a model does beyond text, as targets advertise it and requests need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    /// Function calling: `tools`, `tool_choice`, assistant `tool_calls`.
    Tools,
    /// Image parts in the conversation.
    Vision,
    /// Audio parts in the conversation.
    Audio,
    /// Structured output following a JSON schema (`response_format: json_schema`).
    JsonSchema,
    /// A reasoning model (`reasoning_effort`, reasoning tokens).
    Reasoning,
}

impl Capability {
    pub const ALL: [Capability; 5] =
        [Capability::Tools, Capability::Vision, Capability::Audio, Capability::JsonSchema, Capability::Reasoning];

    /// The name in configuration, `Target.capabilities` and `RouteRequest.capabilities`.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Tools => "tools",
            Capability::Vision => "vision",
            Capability::Audio => "audio",
            Capability::JsonSchema => "json_schema",
            Capability::Reasoning => "reasoning",
        }
    }

    pub fn parse(name: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

/// The body field an OpenAI-compatible model takes its completion limit in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxTokensParam {
    /// `max_tokens`: what vLLM, Ollama and most OpenAI-compatible servers read.
    MaxTokens,
    /// `max_completion_tokens`: what OpenAI's own API reads (its reasoning models refuse
    /// `max_tokens`).
    MaxCompletionTokens,
}

impl MaxTokensParam {
    pub fn as_str(self) -> &'static str {
        match self {
            MaxTokensParam::MaxTokens => "max_tokens",
            MaxTokensParam::MaxCompletionTokens => "max_completion_tokens",
        }
    }
}

/// Declared facts about a model id (`[router] models.<id>`). Every field is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelFacts {
    /// Cost layer: "l0", "l1", "l2" or "l3" (default "l2" for cloud models; local models are
    /// always l0).
    pub layer: Option<String>,
    /// Price per million prompt tokens, micro-dollars.
    pub input_price_micros_per_mtok: Option<i64>,
    /// Price per million completion tokens (reasoning included), micro-dollars.
    pub output_price_micros_per_mtok: Option<i64>,
    /// Price per million prompt tokens read from the provider's cache (unset: the input price).
    pub cached_input_price_micros_per_mtok: Option<i64>,
    /// Price per million prompt tokens written to the provider's cache (unset: 1.25 × input).
    pub cache_write_price_micros_per_mtok: Option<i64>,
    /// Context window in tokens (unset: unknown, never a reason to leave the model out).
    pub context_window: Option<i64>,
    /// Largest completion the model produces.
    pub max_output_tokens: Option<i64>,
    /// What the model does beyond text; unset: the defaults of its kind (see
    /// [`crate::Catalog::cloud_profile`]), set: exactly these (`[]` says none).
    pub capabilities: Option<Vec<Capability>>,
    /// How an OpenAI-compatible model takes its completion limit (unset: by provider).
    pub max_tokens_param: Option<MaxTokensParam>,
    /// Tasks the model is good at ("code", "math", "creative", "reasoning", "chat"); empty means
    /// any. When the router chooses the model, a request of another task does not go to it.
    pub tasks: Vec<String>,
}

impl ModelFacts {
    /// Refuses values no model has; `model` names the entry in the error.
    pub fn validate(&self, model: &str) -> Result<(), CatalogError> {
        let invalid = |field, reason: String| CatalogError::InvalidModel { model: model.to_owned(), field, reason };
        if model.trim().is_empty() || model.trim() != model {
            return Err(invalid("id", "a model id is not empty and has no surrounding spaces".into()));
        }
        if let Some(layer) = &self.layer
            && parse_layer(layer).is_none()
        {
            return Err(invalid("layer", format!("unknown layer {layer:?}; expected l0, l1, l2 or l3")));
        }
        for (field, price) in [
            ("input_price_micros_per_mtok", self.input_price_micros_per_mtok),
            ("output_price_micros_per_mtok", self.output_price_micros_per_mtok),
            ("cached_input_price_micros_per_mtok", self.cached_input_price_micros_per_mtok),
            ("cache_write_price_micros_per_mtok", self.cache_write_price_micros_per_mtok),
        ] {
            if let Some(price) = price.filter(|p| *p < 0) {
                return Err(invalid(field, format!("must not be negative, not {price}")));
            }
        }
        for (field, limit) in [("context_window", self.context_window), ("max_output_tokens", self.max_output_tokens)] {
            if let Some(limit) = limit.filter(|l| *l < 1) {
                return Err(invalid(field, format!("must be at least 1, not {limit}")));
            }
        }
        if let (Some(output), Some(window)) = (self.max_output_tokens, self.context_window)
            && output > window
        {
            return Err(invalid("max_output_tokens", format!("{output} is above the context window of {window}")));
        }
        Ok(())
    }
}

/// The price a model nobody priced is charged at (`[router] default_price`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    /// Per million prompt tokens, micro-dollars.
    pub input_price_micros_per_mtok: i64,
    /// Per million completion tokens, micro-dollars.
    pub output_price_micros_per_mtok: i64,
    /// Per million prompt tokens read from a cache (0: the input price).
    #[serde(default)]
    pub cached_input_price_micros_per_mtok: i64,
    /// Per million prompt tokens written to a cache (0: 1.25 × the input price).
    #[serde(default)]
    pub cache_write_price_micros_per_mtok: i64,
}

impl Prices {
    pub fn validate(&self) -> Result<(), CatalogError> {
        for (field, price) in [
            ("input_price_micros_per_mtok", self.input_price_micros_per_mtok),
            ("output_price_micros_per_mtok", self.output_price_micros_per_mtok),
            ("cached_input_price_micros_per_mtok", self.cached_input_price_micros_per_mtok),
            ("cache_write_price_micros_per_mtok", self.cache_write_price_micros_per_mtok),
        ] {
            if price < 0 {
                return Err(CatalogError::InvalidDefaultPrice {
                    field,
                    reason: format!("must not be negative, not {price}"),
                });
            }
        }
        Ok(())
    }
}

/// Parses a layer name ("l0".."l3", or "local", "cheap", "standard", "premium").
pub fn parse_layer(name: &str) -> Option<Layer> {
    match name.to_ascii_lowercase().as_str() {
        "l0" | "local" => Some(Layer::L0Local),
        "l1" | "cheap" => Some(Layer::L1Cheap),
        "l2" | "standard" => Some(Layer::L2Standard),
        "l3" | "premium" => Some(Layer::L3Premium),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_parse_from_toml_and_refuse_unknown_names() {
        let facts: ModelFacts = toml::from_str(
            r#"
            layer = "l3"
            input_price_micros_per_mtok = 2000000
            cached_input_price_micros_per_mtok = 500000
            capabilities = ["tools", "json_schema", "reasoning"]
            max_tokens_param = "max_completion_tokens"
            "#,
        )
        .unwrap();
        assert_eq!(facts.capabilities, Some(vec![Capability::Tools, Capability::JsonSchema, Capability::Reasoning]));
        assert_eq!(facts.max_tokens_param, Some(MaxTokensParam::MaxCompletionTokens));
        assert_eq!(facts.output_price_micros_per_mtok, None, "an undeclared price stays undeclared");
        for (text, word) in [
            ("capabilities = [\"telepathy\"]", "telepathy"),
            ("max_tokens_param = \"max_new_tokens\"", "max_new_tokens"),
            ("context_windw = 5", "context_windw"),
        ] {
            let err = toml::from_str::<ModelFacts>(text).unwrap_err().to_string();
            assert!(err.contains(word), "{text}: {err}");
        }
        for capability in Capability::ALL {
            assert_eq!(Capability::parse(capability.as_str()), Some(capability));
        }
    }

    #[test]
    fn validation_names_the_model_and_the_field() {
        let cases = [
            (ModelFacts { layer: Some("l9".into()), ..Default::default() }, "models.m.layer: unknown layer"),
            (
                ModelFacts { cached_input_price_micros_per_mtok: Some(-1), ..Default::default() },
                "models.m.cached_input_price_micros_per_mtok: must not be negative",
            ),
            (
                ModelFacts { context_window: Some(0), ..Default::default() },
                "models.m.context_window: must be at least 1",
            ),
            (
                ModelFacts { context_window: Some(100), max_output_tokens: Some(200), ..Default::default() },
                "models.m.max_output_tokens: 200 is above the context window of 100",
            ),
        ];
        for (facts, expected) in cases {
            let err = facts.validate("m").unwrap_err().to_string();
            assert!(err.starts_with(expected), "{err}");
        }
        assert!(ModelFacts::default().validate(" m").is_err(), "surrounding spaces");
        let fine = ModelFacts {
            layer: Some("premium".into()),
            input_price_micros_per_mtok: Some(0),
            context_window: Some(100),
            max_output_tokens: Some(100),
            ..Default::default()
        };
        fine.validate("m").unwrap();
    }

    #[test]
    fn default_prices_need_input_and_output() {
        let err = toml::from_str::<Prices>("input_price_micros_per_mtok = 1").unwrap_err().to_string();
        assert!(err.contains("output_price_micros_per_mtok"), "{err}");
        let prices: Prices =
            toml::from_str("input_price_micros_per_mtok = 1\noutput_price_micros_per_mtok = 2").unwrap();
        assert_eq!((prices.cached_input_price_micros_per_mtok, prices.cache_write_price_micros_per_mtok), (0, 0));
        let negative = Prices { output_price_micros_per_mtok: -2, ..prices };
        assert!(negative.validate().unwrap_err().to_string().starts_with("default_price.output_price_micros_per_mtok"));
    }
}
