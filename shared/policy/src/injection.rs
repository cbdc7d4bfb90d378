//! Prompt-injection scoring. The gateway backs [`InjectionClassifier`] with the inference service's
//! `Classify` call; when no classifier is configured, or it fails, the engine falls back to the
//! heuristic: a fixed list of phrase patterns (override instructions, system-prompt extraction,
//! jailbreak personas, guardrail bypass, chat-template spoofing) with weights that combine as
//! independent evidence, `score = 1 - Π(1 - weight)`. The same per-project threshold applies to
//! both scores.

use async_trait::async_trait;

use crate::detect::Signal;
use crate::error::PolicyError;

/// Scores texts for prompt injection.
#[async_trait]
pub trait InjectionClassifier: Send + Sync {
    /// Probability in [0, 1] that each input is an injection attempt, one per input, in order.
    async fn classify(&self, inputs: &[&str]) -> Result<Vec<f32>, PolicyError>;
}

/// Where a request's injection verdict came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InjectionSource {
    Classifier,
    /// No classifier was given.
    Heuristic,
    /// A classifier was given but failed or answered out of shape.
    HeuristicFallback,
}

/// Roles whose text is authored by the end user or by tools the user controls. The system and
/// developer prompts belong to the application and assistant turns to the model, so injection is
/// not scored there.
pub fn role_is_untrusted(role: &str) -> bool {
    !matches!(role, "system" | "developer" | "assistant")
}

/// The heuristic score of one text's signals and the span of its strongest phrase.
pub(crate) fn heuristic_score(signals: &[Signal]) -> Option<(f32, usize, usize)> {
    let strongest = signals.iter().max_by(|a, b| a.weight.total_cmp(&b.weight))?;
    let miss: f32 = signals.iter().map(|s| 1.0 - s.weight).product();
    Some(((1.0 - miss).clamp(0.0, 1.0), strongest.start, strongest.end))
}
