//! Per-project policy configuration, stored as JSONB in `projects` and validated on write.
//!
//! ```json
//! {
//!   "enabled": true,
//!   "rules": { "email": { "action": "redact" }, "jwt": { "enabled": false } },
//!   "blocked_keywords": ["DROP TABLE", "rm -rf /"],
//!   "injection": { "threshold": 0.8 },
//!   "output": { "enabled": true, "action": "flag" }
//! }
//! ```
//! Every field is optional; an empty object is the default policy (see [`Rule::default_action`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::PolicyError;
use crate::rules::{Action, Rule};

/// Keywords blocked when a project does not list its own.
pub const DEFAULT_BLOCKED_KEYWORDS: &[&str] =
    &["DROP TABLE", "DROP DATABASE", "TRUNCATE TABLE", "rm -rf /", "rm -rf /*", "rm -rf ~", "mkfs.ext4 /dev/sda"];

/// Bounds that keep a project's keyword list from turning the scanner into a denial of service.
pub const MAX_KEYWORDS: usize = 1_000;
pub const MAX_KEYWORD_LEN: usize = 200;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Master switch: a disabled policy finds nothing and allows everything.
    pub enabled: bool,
    /// Overrides of the per-rule defaults; rules not listed keep theirs.
    pub rules: BTreeMap<Rule, RuleSetting>,
    /// Matched case-insensitively, with any run of whitespace where the keyword has a space, and
    /// never inside a word (`rm -rf /` does not match `rm -rf /tmp/x`).
    pub blocked_keywords: Vec<String>,
    pub injection: InjectionConfig,
    pub output: OutputConfig,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            rules: BTreeMap::new(),
            blocked_keywords: DEFAULT_BLOCKED_KEYWORDS.iter().map(|k| (*k).to_owned()).collect(),
            injection: InjectionConfig::default(),
            output: OutputConfig::default(),
        }
    }
}

/// One rule's override.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSetting {
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// `None` keeps the rule's default action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
}

fn enabled_by_default() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InjectionConfig {
    /// Score in [0, 1] from which a message counts as an injection attempt; the same threshold
    /// applies to the classifier's probability and to the heuristic score.
    pub threshold: f32,
}

impl Default for InjectionConfig {
    fn default() -> Self {
        Self { threshold: 0.8 }
    }
}

/// Output scanning of model replies (JSON and streamed). It runs every enabled rule except
/// prompt injection; blocking a reply that is already being streamed is not possible, so the
/// choice is between flagging and redacting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    pub enabled: bool,
    pub action: OutputAction,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self { enabled: true, action: OutputAction::Flag }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputAction {
    Flag,
    Redact,
}

impl PolicyConfig {
    /// Parses a project's stored policy (JSON), rejecting unknown fields and invalid values.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, PolicyError> {
        // serde would also accept a JSON array as a struct (fields by position).
        if !value.is_object() {
            return Err(PolicyError::InvalidConfig("the security policy must be a JSON object".into()));
        }
        let config: Self =
            serde::Deserialize::deserialize(value).map_err(|e| PolicyError::InvalidConfig(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the invariants serde cannot express.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let threshold = self.injection.threshold;
        if !threshold.is_finite() || !(0.0..=1.0).contains(&threshold) {
            return Err(PolicyError::InvalidConfig(format!(
                "injection.threshold must be within [0, 1], got {threshold}"
            )));
        }
        if self.action(Rule::PromptInjection) == Action::Redact {
            return Err(PolicyError::InvalidConfig(
                "rules.prompt_injection.action cannot be `redact`: an injection attempt has no span to mask; use `block` or `flag`"
                    .into(),
            ));
        }
        if self.blocked_keywords.len() > MAX_KEYWORDS {
            return Err(PolicyError::InvalidConfig(format!("blocked_keywords holds at most {MAX_KEYWORDS} entries")));
        }
        for (i, keyword) in self.blocked_keywords.iter().enumerate() {
            if keyword.trim().is_empty() {
                return Err(PolicyError::InvalidConfig(format!("blocked_keywords[{i}] is empty")));
            }
            if keyword.len() > MAX_KEYWORD_LEN {
                return Err(PolicyError::InvalidConfig(format!(
                    "blocked_keywords[{i}] is longer than {MAX_KEYWORD_LEN} bytes"
                )));
            }
        }
        Ok(())
    }

    /// Whether a rule runs on prompts.
    pub fn is_enabled(&self, rule: Rule) -> bool {
        self.enabled
            && self.rules.get(&rule).is_none_or(|s| s.enabled)
            && (rule != Rule::BlockedKeyword || !self.blocked_keywords.is_empty())
    }

    /// The action a rule takes on prompts.
    pub fn action(&self, rule: Rule) -> Action {
        self.rules.get(&rule).and_then(|s| s.action).unwrap_or_else(|| rule.default_action())
    }
}
