//! The policy engine: one per project policy, cheap to share (`Arc`) and to reuse across requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use meshgate_runtime::{ApiError, ErrorCode};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{OutputAction, PolicyConfig};
use crate::detect::{Detectors, Hit, RuleMask, Signal};
use crate::injection::{InjectionClassifier, InjectionSource, heuristic_score, role_is_untrusted};
use crate::liveness::Liveness;
use crate::rules::{Action, Category, Rule, Severity};

/// One message of a request, as the engine sees it.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

impl<'a> Message<'a> {
    pub fn new(role: &'a str, content: &'a str) -> Self {
        Self { role, content }
    }
}

/// A rule that fired. It locates the match but never carries the matched text, so findings can be
/// logged, traced and stored as they are.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub rule: Rule,
    pub category: Category,
    pub severity: Severity,
    pub action: Action,
    /// Index of the message the span is in (always 0 for output).
    pub message: usize,
    /// Byte offsets `[start, end)` into that message's text (or into the whole output stream),
    /// always on UTF-8 character boundaries.
    pub start: usize,
    pub end: usize,
    /// Injection score in [0, 1], for `prompt_injection` findings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Forward the messages as they are (there may still be flagged findings).
    Allow,
    /// Forward after replacing the listed messages' content.
    Redact(Vec<RedactedMessage>),
    /// Refuse the request; `rule` is the most severe blocking rule.
    Block { rule: Rule },
}

/// A message whose content must be replaced before the request leaves the gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct RedactedMessage {
    pub index: usize,
    pub content: String,
}

/// The result of scanning a request's prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanOutcome {
    pub findings: Vec<Finding>,
    pub decision: Decision,
    /// 0 (nothing found) to 100.
    pub risk: u8,
    /// How prompt injection was scored; `None` when the rule is disabled or was not reached
    /// (the request was already blocked).
    pub injection: Option<InjectionSource>,
}

impl ScanOutcome {
    /// The 422 the edge answers a blocked request with. It names the rule and its category, never
    /// the matched text, and carries the rule in the `x-meshgate-policy-rule` header.
    pub fn block_error(&self) -> Option<ApiError> {
        match self.decision {
            Decision::Block { rule } => Some(
                ApiError::new(
                    ErrorCode::PolicyViolation,
                    format!("request blocked by security policy rule `{rule}` ({})", rule.category()),
                )
                .with_header("x-meshgate-policy-rule", rule.as_str()),
            ),
            _ => None,
        }
    }
}

/// The result of scanning a complete (non-streamed) reply.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputScan {
    pub findings: Vec<Finding>,
    /// The reply with matches masked, when the project redacts output and something matched.
    pub redacted: Option<String>,
    pub risk: u8,
}

/// A compiled project policy.
#[derive(Clone)]
pub struct PolicyEngine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PolicyEngine {
    // The compiled automata are large and say nothing the configuration does not.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

struct Inner {
    config: PolicyConfig,
    detectors: Detectors,
    prompt_mask: RuleMask,
    output_mask: RuleMask,
    liveness: Option<Arc<Liveness>>,
    scanned: ScanCache,
}

/// Texts of at least this many bytes have their detections kept by content digest (shorter ones
/// cost less to scan than to look up).
const CACHED_MESSAGE_BYTES: usize = 128;
/// Detections kept per engine at most (the oldest half goes when it is full).
const CACHED_MESSAGES: usize = 4096;

/// What the detectors found in a prompt message, by the SHA-256 of its text. An agent resends
/// its whole conversation — system prompt, tool results, earlier turns — with every request, so
/// most of a long prompt was scanned before under the same policy; the engine is per policy, so
/// a changed policy starts with an empty cache. The digest is cryptographic: no crafted text can
/// reuse another text's (clean) result.
#[derive(Default)]
struct ScanCache {
    entries: Mutex<ScanEntries>,
}

/// The cached detections, each with its insertion number (the oldest are dropped first).
#[derive(Default)]
struct ScanEntries {
    inserted: u64,
    by_digest: HashMap<[u8; 32], (u64, Arc<Detected>)>,
}

/// The detectors' hits and injection signals in one message.
struct Detected {
    hits: Vec<Hit>,
    signals: Vec<Signal>,
}

impl ScanCache {
    fn get(&self, key: &[u8; 32]) -> Option<Arc<Detected>> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.by_digest.get(key).map(|(_, detected)| detected.clone())
    }

    fn insert(&self, key: [u8; 32], detected: Arc<Detected>) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.by_digest.len() >= CACHED_MESSAGES {
            let cutoff = entries.inserted - (CACHED_MESSAGES as u64) / 2;
            entries.by_digest.retain(|_, (seq, _)| *seq >= cutoff);
        }
        let seq = entries.inserted;
        entries.by_digest.insert(key, (seq, detected));
        entries.inserted += 1;
    }
}

impl PolicyEngine {
    /// Validates and compiles a policy.
    pub fn new(config: PolicyConfig) -> Result<Self, crate::PolicyError> {
        config.validate()?;
        let prompt_mask = RuleMask::from_fn(|rule| config.is_enabled(rule));
        let output_mask =
            RuleMask::from_fn(|rule| config.output.enabled && rule.scans_output() && config.is_enabled(rule));
        let detectors = Detectors::new(&config.blocked_keywords);
        let liveness = Liveness::build(&output_mask, detectors.keywords.as_ref())
            .map_err(crate::PolicyError::InvalidConfig)?
            .map(Arc::new);
        let scanned = ScanCache::default();
        Ok(Self { inner: Arc::new(Inner { config, detectors, prompt_mask, output_mask, liveness, scanned }) })
    }

    /// Parses a project's stored policy (JSONB) and compiles it.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, crate::PolicyError> {
        Self::new(PolicyConfig::from_json(value)?)
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.inner.config
    }

    /// Scans a prompt, scoring injection with the heuristic.
    pub fn scan_prompt(&self, messages: &[Message<'_>]) -> ScanOutcome {
        let (mut findings, mut hits, signals) = self.detect_messages(messages);
        let injection = self.inner.prompt_mask.has(Rule::PromptInjection).then(|| {
            self.push_heuristic(messages, &signals, &mut findings);
            InjectionSource::Heuristic
        });
        self.decide(messages, findings, &mut hits, injection)
    }

    /// Scans a prompt, scoring injection with `classifier` (user and tool messages only), and with
    /// the heuristic if the classifier fails. The classifier is not called when another rule
    /// already blocks the request. Callers bound its latency (e.g. `tokio::time::timeout` inside
    /// their implementation, answering an error on expiry).
    pub async fn scan_prompt_with(
        &self,
        messages: &[Message<'_>],
        classifier: &dyn InjectionClassifier,
    ) -> ScanOutcome {
        let (mut findings, mut hits, signals) = self.detect_messages(messages);
        let blocked = findings.iter().any(|f| f.action == Action::Block);
        let mut injection = None;
        if self.inner.prompt_mask.has(Rule::PromptInjection) && !blocked {
            let scored: Vec<usize> = (0..messages.len())
                .filter(|&i| role_is_untrusted(messages[i].role) && !messages[i].content.trim().is_empty())
                .collect();
            let inputs: Vec<&str> = scored.iter().map(|&i| messages[i].content).collect();
            let answer = if inputs.is_empty() { Ok(Vec::new()) } else { classifier.classify(&inputs).await };
            match answer {
                Ok(scores) if scores.len() == inputs.len() && scores.iter().all(|s| s.is_finite()) => {
                    let threshold = self.inner.config.injection.threshold;
                    let action = self.inner.config.action(Rule::PromptInjection);
                    for (&i, &score) in scored.iter().zip(&scores) {
                        if score >= threshold {
                            findings.push(finding(
                                Rule::PromptInjection,
                                action,
                                i,
                                0,
                                messages[i].content.len(),
                                Some(score.clamp(0.0, 1.0)),
                            ));
                        }
                    }
                    injection = Some(InjectionSource::Classifier);
                }
                _ => {
                    self.push_heuristic(messages, &signals, &mut findings);
                    injection = Some(InjectionSource::HeuristicFallback);
                }
            }
        }
        self.decide(messages, findings, &mut hits, injection)
    }

    /// Scans a complete reply (the text of a JSON completion's choice).
    pub fn scan_output(&self, text: &str) -> OutputScan {
        let mut hits = Vec::new();
        self.inner.detectors.detect(text, 0, &self.inner.output_mask, &mut hits, &mut Vec::new());
        let action = self.output_action();
        let findings: Vec<Finding> = hits.iter().map(|h| finding(h.rule, action, 0, h.start, h.end, None)).collect();
        let redacted = (action == Action::Redact && !hits.is_empty()).then(|| redact(text, &hits));
        OutputScan { risk: risk_score(&findings), findings, redacted }
    }

    /// The output rules' liveness automaton, shared by the engine's stream scanners.
    pub(crate) fn liveness(&self) -> Option<Arc<Liveness>> {
        self.inner.liveness.clone()
    }

    pub(crate) fn output_action(&self) -> Action {
        match self.inner.config.output.action {
            OutputAction::Flag => Action::Flag,
            OutputAction::Redact => Action::Redact,
        }
    }

    pub(crate) fn detect_output(&self, hay: &str, from: usize, hits: &mut Vec<Hit>) {
        self.inner.detectors.detect(hay, from, &self.inner.output_mask, hits, &mut Vec::new());
    }

    pub(crate) fn output_enabled(&self) -> bool {
        self.inner.output_mask.rules().next().is_some()
    }

    /// Per message: findings and raw hits of the span rules, and injection signals.
    fn detect_messages(&self, messages: &[Message<'_>]) -> (Vec<Finding>, Vec<Vec<Hit>>, Vec<Vec<Signal>>) {
        let mut findings = Vec::new();
        let mut all_hits = Vec::with_capacity(messages.len());
        let mut all_signals = Vec::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            let (hits, mut signals) = self.detect_prompt_text(message.content);
            if !role_is_untrusted(message.role) {
                signals.clear();
            }
            findings.extend(
                hits.iter().map(|h| finding(h.rule, self.inner.config.action(h.rule), i, h.start, h.end, None)),
            );
            all_hits.push(hits);
            all_signals.push(signals);
        }
        (findings, all_hits, all_signals)
    }

    /// The detectors' hits and signals in one prompt text; long texts from the cache when they
    /// were scanned before.
    fn detect_prompt_text(&self, text: &str) -> (Vec<Hit>, Vec<Signal>) {
        let detect = || {
            let (mut hits, mut signals) = (Vec::new(), Vec::new());
            self.inner.detectors.detect(text, 0, &self.inner.prompt_mask, &mut hits, &mut signals);
            (hits, signals)
        };
        if text.len() < CACHED_MESSAGE_BYTES {
            return detect();
        }
        let key: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        if let Some(found) = self.inner.scanned.get(&key) {
            return (found.hits.clone(), found.signals.clone());
        }
        let (hits, signals) = detect();
        self.inner.scanned.insert(key, Arc::new(Detected { hits: hits.clone(), signals: signals.clone() }));
        (hits, signals)
    }

    fn push_heuristic(&self, messages: &[Message<'_>], signals: &[Vec<Signal>], findings: &mut Vec<Finding>) {
        let threshold = self.inner.config.injection.threshold;
        let action = self.inner.config.action(Rule::PromptInjection);
        for (i, signals) in signals.iter().enumerate().take(messages.len()) {
            if let Some((score, start, end)) = heuristic_score(signals)
                && score >= threshold
            {
                findings.push(finding(Rule::PromptInjection, action, i, start, end, Some(score)));
            }
        }
    }

    fn decide(
        &self,
        messages: &[Message<'_>],
        findings: Vec<Finding>,
        hits: &mut [Vec<Hit>],
        injection: Option<InjectionSource>,
    ) -> ScanOutcome {
        let risk = risk_score(&findings);
        let blocking = findings
            .iter()
            .filter(|f| f.action == Action::Block)
            .max_by_key(|f| (f.severity, std::cmp::Reverse((f.message, f.start))));
        let decision = if let Some(block) = blocking {
            Decision::Block { rule: block.rule }
        } else {
            let mut redacted = Vec::new();
            for (index, hits) in hits.iter_mut().enumerate() {
                hits.retain(|h| self.inner.config.action(h.rule) == Action::Redact);
                if !hits.is_empty() {
                    redacted.push(RedactedMessage { index, content: redact(messages[index].content, hits) });
                }
            }
            if redacted.is_empty() { Decision::Allow } else { Decision::Redact(redacted) }
        };
        ScanOutcome { findings, decision, risk, injection }
    }
}

pub(crate) fn finding(
    rule: Rule,
    action: Action,
    message: usize,
    start: usize,
    end: usize,
    score: Option<f32>,
) -> Finding {
    Finding { rule, category: rule.category(), severity: rule.severity(), action, message, start, end, score }
}

/// Combines findings as independent evidence: `100 · (1 − Π(1 − wᵢ/100))`, where `wᵢ` is the
/// severity weight (15 low, 40 medium, 70 high, 90 critical), scaled by the score for injection
/// findings. One critical secret gives 90, two high findings 91, a lone e-mail address 15.
pub fn risk_score(findings: &[Finding]) -> u8 {
    let miss: f64 = findings
        .iter()
        .map(|f| {
            let weight = f.severity.weight() * f.score.map_or(1.0, f64::from);
            1.0 - weight / 100.0
        })
        .product();
    // Bounded to [0, 100] by construction; the cast cannot truncate.
    (100.0 * (1.0 - miss)).round().clamp(0.0, 100.0) as u8
}

/// Masks `hits` in `text` (hits sorted by start). Overlapping hits merge into one region labelled
/// with the first one's rule; a region keeps its first hit's public hint (`sk-proj-…`) only.
pub(crate) fn redact(text: &str, hits: &[Hit]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    let mut i = 0;
    while i < hits.len() {
        let first = hits[i];
        let mut end = first.end;
        i += 1;
        while i < hits.len() && hits[i].start < end {
            end = end.max(hits[i].end);
            i += 1;
        }
        let start = first.start.max(last);
        out.push_str(&text[last..start]);
        if first.start == start && first.hint > 0 && first.hint < end - start {
            out.push_str(&text[start..start + first.hint]);
            out.push('…');
        }
        out.push_str("[REDACTED:");
        out.push_str(first.rule.as_str());
        out.push(']');
        last = end.max(last);
    }
    out.push_str(&text[last..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;

    fn cached(engine: &PolicyEngine) -> usize {
        engine.inner.scanned.entries.lock().unwrap().by_digest.len()
    }

    #[test]
    fn a_long_message_scanned_before_answers_alike_and_a_changed_one_is_scanned_again() {
        let engine = PolicyEngine::new(PolicyConfig::default()).unwrap();
        let history = "The tool returned the list of open tickets as expected. ".repeat(20);
        let first = engine.scan_prompt(&[Message::new("user", &history)]);
        let again = engine.scan_prompt(&[Message::new("system", "be brief"), Message::new("user", &history)]);
        assert_eq!(first.decision, Decision::Allow);
        assert_eq!((again.decision, again.risk), (first.decision.clone(), first.risk));
        assert_eq!(cached(&engine), 1, "the long message is kept once, the short one never");

        // One character more, and a secret in it: a new digest, scanned, redacted.
        let leaked = format!("{history}token ghp_QZXW0123456789abcdef0123456789abcdef");
        let outcome = engine.scan_prompt(&[Message::new("user", &leaked)]);
        assert!(outcome.findings.iter().any(|f| f.rule == Rule::GithubToken), "{:?}", outcome.findings);
        assert!(matches!(outcome.decision, Decision::Redact(_)), "{:?}", outcome.decision);
        let repeated = engine.scan_prompt(&[Message::new("user", &leaked)]);
        assert_eq!(repeated.findings, outcome.findings, "a cached secret is found again");
        assert_eq!(cached(&engine), 2);
    }

    #[test]
    fn the_cache_stays_within_its_bound() {
        let engine = PolicyEngine::new(PolicyConfig::default()).unwrap();
        let filler = "x".repeat(CACHED_MESSAGE_BYTES);
        for i in 0..CACHED_MESSAGES + 100 {
            engine.scan_prompt(&[Message::new("user", &format!("{i} {filler}"))]);
        }
        assert!(cached(&engine) <= CACHED_MESSAGES, "{}", cached(&engine));
        assert!(cached(&engine) >= CACHED_MESSAGES / 2);
    }
}
