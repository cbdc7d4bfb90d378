//! The detectors. One ASCII-case-insensitive Aho-Corasick pass over the text finds every anchor
//! literal (`sk-`, `ghp_`, `-----BEGIN`, `@`, `chmod`, `ignore`, a keyword's first word, …); only at
//! those positions does the rule's anchored regex or hand-written check run. Card numbers and
//! SSNs have no literal, so one byte loop over digit runs handles both. A 2 KB prompt therefore
//! costs one automaton pass, one digit pass and a handful of anchored matches, whatever the number
//! of rules.
//!
//! Every match starts at a "boundary": the byte before it is not `[A-Za-z0-9_]` (so `task-…` never
//! yields an OpenAI key). The streaming scanner relies on this to pick its hold-back candidates.

mod digits;

use std::sync::LazyLock;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use regex_automata::meta::Regex;
use regex_automata::{Anchored, Input};

use crate::rules::Rule;

/// A raw match: byte span in the scanned text, and how many leading bytes are a public,
/// non-secret hint (the token prefix, the PEM header) that redaction may keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Hit {
    pub start: usize,
    pub end: usize,
    pub rule: Rule,
    pub hint: usize,
    /// Where the text that decided the match begins: `start`, except for context-dependent rules
    /// (`aws_secret_access_key = <value>` masks only the value but needs the key name).
    pub anchor: usize,
}

/// A heuristic prompt-injection signal (a phrase and its weight in [0, 1]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Signal {
    pub start: usize,
    pub end: usize,
    pub weight: f32,
}

/// Which rules run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RuleMask([bool; Rule::ALL.len()]);

impl RuleMask {
    pub fn from_fn(f: impl Fn(Rule) -> bool) -> Self {
        let mut mask = [false; Rule::ALL.len()];
        for &rule in Rule::ALL {
            mask[rule.index()] = f(rule);
        }
        Self(mask)
    }

    pub fn has(&self, rule: Rule) -> bool {
        self.0[rule.index()]
    }

    pub fn rules(&self) -> impl Iterator<Item = Rule> + '_ {
        Rule::ALL.iter().copied().filter(|r| self.has(*r))
    }
}

/// `[A-Za-z0-9_]`: bytes a match may not directly follow or (for fixed-length tokens) precede.
pub(crate) fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

pub(crate) fn boundary_before(hay: &[u8], at: usize) -> bool {
    at == 0 || !is_word_byte(hay[at - 1])
}

fn boundary_after(hay: &[u8], at: usize) -> bool {
    hay.get(at).is_none_or(|b| !is_word_byte(*b))
}

/// Shell paths end at a space, a quote or an operator, not at `.`/`-` (`rm -rf /.cache` is not `/`).
fn shell_boundary_after(hay: &[u8], at: usize) -> bool {
    hay.get(at).is_none_or(|b| !(is_word_byte(*b) || matches!(b, b'.' | b'-' | b'/')))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Anchor {
    OpenAi,
    GithubClassic,
    GithubPat,
    Gitlab,
    AwsKeyId,
    AwsSecret,
    Slack,
    SlackApp,
    Stripe,
    Pem,
    Jwt,
    At,
    Shell(Shell),
    Injection(usize),
}

/// Whether a shell pattern's match ends where a command word ends (`rm -rf /` but not `/tmp`).
type EndCheck = fn(&[u8], usize) -> bool;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shell {
    ForkBomb,
    Dd,
    Mkfs,
    Rm,
    Chmod,
    CurlPipe,
}

/// Prompt-injection phrases: anchors (lowercase; matched case-insensitively), the anchored
/// pattern that must follow, and its weight. Weights combine as independent evidence
/// (`1 - Π(1 - w)`), so one unmistakable phrase ("ignore all previous instructions", 0.9) crosses
/// the default 0.8 threshold alone while a weaker one ("reveal your system prompt", 0.6) needs a
/// second signal.
const INJECTION_PHRASES: &[(&[&str], &str, f32)] = &[
    (
        &["ignore", "disregard", "forget", "skip"],
        r"(?i)(?:ignore|disregard|forget|skip)\s+(?:(?:all|any|every|the|your|my|of|these|those)\s+)*(?:previous|prior|above|earlier|preceding|foregoing|system|original|initial)\s+(?:instructions?|prompts?|rules|directions|directives|guidelines|messages?|context|commands?)",
        0.9,
    ),
    (&["forget"], r"(?i)forget\s+(?:everything|all)\s+(?:you\s+(?:were|have\s+been)\s+told|above|before)", 0.85),
    (
        &["reveal", "print", "show", "repeat", "output", "display", "leak", "tell me", "what is your", "what are your"],
        r"(?i)(?:reveal|print|show|repeat|output|display|leak|tell\s+me|what\s+(?:is|are))\s+(?:me\s+)?(?:(?:your|the)\s+(?:(?:full|entire|original|hidden|secret|initial|exact)\s+)*(?:system\s+prompt|system\s+message|initial\s+prompt|developer\s+message)|your\s+(?:(?:full|entire|original|hidden|secret|initial|exact)\s+)*instructions)",
        0.6,
    ),
    (
        &["you are now"],
        r"(?i)you\s+are\s+now\s+(?:in\s+)?(?:an?\s+)?(?:DAN|developer\s+mode|jailbroken|unrestricted|unfiltered|uncensored|evil)",
        0.85,
    ),
    (
        &["do anything now", "developer mode", "jailbreak", "dan mode"],
        r"(?i)do\s+anything\s+now|developer\s+mode\s+(?:enabled|activated|on)|jailbreak(?:ed|ing|s)?|dan\s+mode",
        0.6,
    ),
    (
        &["act as", "behave as", "pretend"],
        r"(?i)(?:act|behave)\s+as\s+(?:if\s+you\s+(?:have|had)\s+no\s+(?:rules|restrictions|guidelines|filters)|an?\s+(?:unrestricted|unfiltered|uncensored|jailbroken)\b)|pretend\s+(?:that\s+)?you\s+(?:are|have)\s+(?:no\s+(?:rules|restrictions|guidelines|filters)|not\s+bound|an?\s+(?:unrestricted|unfiltered|uncensored|evil))",
        0.6,
    ),
    (
        &["bypass", "override", "circumvent", "disable"],
        r"(?i)(?:bypass|override|circumvent|disable)\s+(?:(?:your|the|all|any|its)\s+)*(?:(?:safety|content|security|moderation)\s+)?(?:filters?|guardrails?|restrictions|safeguards|safety\s+rules|policies)",
        0.6,
    ),
    (&["<|im_start|>", "[system]", "### system"], r"(?i)<\|im_start\|>\s*system|\[system\]|###\s*system\s*:", 0.5),
];

/// The built-in detectors, compiled once per process.
struct Builtin {
    anchors: AhoCorasick,
    kinds: Vec<Anchor>,
    openai: Regex,
    anthropic: Regex,
    github_classic: Regex,
    github_pat: Regex,
    gitlab: Regex,
    aws_key_id: Regex,
    aws_secret: Regex,
    slack: Regex,
    slack_app: Regex,
    stripe: Regex,
    pem: Regex,
    jwt: Regex,
    fork_bomb: Regex,
    dd: Regex,
    mkfs: Regex,
    rm: Regex,
    chmod: Regex,
    pipe_to_shell: Regex,
    injection: Vec<(Regex, f32)>,
}

fn regex(pattern: &str) -> Regex {
    // The patterns are constants of this file; a typo is a bug caught by every test.
    Regex::new(pattern).unwrap_or_else(|e| panic!("built-in policy pattern {pattern:?} does not compile: {e}"))
}

static BUILTIN: LazyLock<Builtin> = LazyLock::new(|| {
    let mut patterns: Vec<String> = Vec::new();
    let mut kinds = Vec::new();
    let mut add = |literals: &[&str], kind: Anchor| {
        for literal in literals {
            patterns.push((*literal).to_owned());
            kinds.push(kind);
        }
    };
    add(&["sk-"], Anchor::OpenAi);
    add(&["ghp_", "gho_", "ghu_", "ghs_", "ghr_"], Anchor::GithubClassic);
    add(&["github_pat_"], Anchor::GithubPat);
    add(&["glpat-"], Anchor::Gitlab);
    add(&["akia", "asia"], Anchor::AwsKeyId);
    add(
        &["aws_secret", "aws-secret", "awssecret", "secret_access", "secret-access", "secretaccess"],
        Anchor::AwsSecret,
    );
    add(&["xox"], Anchor::Slack);
    add(&["xapp-"], Anchor::SlackApp);
    add(&["sk_live_", "rk_live_"], Anchor::Stripe);
    add(&["-----begin"], Anchor::Pem);
    add(&["eyj"], Anchor::Jwt);
    add(&["@"], Anchor::At);
    add(&[":(", ": ("], Anchor::Shell(Shell::ForkBomb));
    add(&["dd ", "dd\t"], Anchor::Shell(Shell::Dd));
    add(&["mkfs"], Anchor::Shell(Shell::Mkfs));
    add(&["rm ", "rm\t"], Anchor::Shell(Shell::Rm));
    add(&["chmod"], Anchor::Shell(Shell::Chmod));
    add(&["curl", "wget"], Anchor::Shell(Shell::CurlPipe));
    for (i, (literals, _, _)) in INJECTION_PHRASES.iter().enumerate() {
        add(literals, Anchor::Injection(i));
    }
    let anchors = AhoCorasickBuilder::new()
        .ascii_case_insensitive(true)
        .match_kind(MatchKind::Standard)
        .build(&patterns)
        .unwrap_or_else(|e| panic!("built-in policy anchors do not compile: {e}"));
    Builtin {
        anchors,
        kinds,
        openai: regex(r"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"),
        anthropic: regex(r"sk-ant-[A-Za-z0-9_-]{32,}"),
        github_classic: regex(r"gh[pousr]_[A-Za-z0-9]{36}"),
        github_pat: regex(r"github_pat_[A-Za-z0-9_]{40,}"),
        gitlab: regex(r"glpat-[A-Za-z0-9_-]{20,}"),
        aws_key_id: regex(r"A[KS]IA[A-Z0-9]{16}"),
        aws_secret: regex(AWS_SECRET_PATTERN),
        slack: regex(r"xox[abeoprs](?:\.xox[a-z])?-[A-Za-z0-9-]{10,}"),
        slack_app: regex(r"xapp-[A-Za-z0-9-]{20,}"),
        stripe: regex(r"[sr]k_live_[A-Za-z0-9]{20,}"),
        pem: regex(
            r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----(?:\s|\\[nr])*(?:[A-Za-z-]+:[^\r\n\\]*(?:\s|\\[nr])+)*[A-Za-z0-9+/=]{32}(?:[^-]|-[^-])*(?:-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----)?",
        ),
        jwt: regex(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}"),
        fork_bomb: regex(r":\s*\(\s*\)\s*\{\s*:\s*\|\s*:\s*&\s*\}\s*;\s*:"),
        dd: regex(DD_PATTERN),
        mkfs: regex(r"mkfs(?:\.[a-z0-9]+)?\s+(?:-[^\s]+\s+(?:[^\s/-][^\s]*\s+)?)*/dev/[a-z]"),
        rm: regex(
            r"rm\s+(?:-[A-Za-z]*(?:r[A-Za-z]*f|f[A-Za-z]*r|R[A-Za-z]*f|f[A-Za-z]*R)[A-Za-z]*|-[rR]\s+-f|-f\s+-[rR]|--recursive\s+--force|--force\s+--recursive)\s+(?:--no-preserve-root\s+)?(?:/\*?|~/?|\$HOME/?)",
        ),
        chmod: regex(r"chmod\s+(?:-[A-Za-z]*R[A-Za-z]*|--recursive)\s+(?:-[A-Za-z]+\s+)*0?777\s+/\*?"),
        pipe_to_shell: regex(r"(?:curl|wget)\s[^\n|;&]{0,200}\|\s*(?:sudo\s+)?(?:ba|z|da|k)?sh"),
        injection: INJECTION_PHRASES.iter().map(|(_, pattern, weight)| (regex(pattern), *weight)).collect(),
    }
});

const AWS_SECRET_PATTERN: &str =
    r#"(?i:(?:aws[_-]?)?secret[_-]?(?:access[_-]?)?key)["']?\s*(?::|=>|=|\s)\s*["']?[A-Za-z0-9/+]{40}"#;
const DD_PATTERN: &str = r"dd\s+(?:[a-z]+=[^\s;|&]+\s+)*of=/dev/(?:sd[a-z]|nvme[0-9]|hd[a-z]|vd[a-z]|xvd[a-z]|mmcblk[0-9]|disk[0-9]|md[0-9]|mapper/)";

/// Patterns whose language contains every prefix of every output-scannable match, per rule: the
/// streaming scanner holds text back while one of them is still alive at the end of its buffer.
pub(crate) fn liveness_patterns(rule: Rule) -> &'static [&'static str] {
    match rule {
        Rule::OpenaiKey | Rule::AnthropicKey => &[r"sk-[A-Za-z0-9_-]*"],
        Rule::GithubToken => &[r"gh[pousr]_[A-Za-z0-9]*", r"github_pat_[A-Za-z0-9_]*"],
        Rule::GitlabToken => &[r"glpat-[A-Za-z0-9_-]*"],
        Rule::AwsAccessKeyId => &[r"A[KS]IA[A-Z0-9]*"],
        Rule::AwsSecretKey => {
            &[r#"(?i:(?:aws[_-]?)?secret[_-]?(?:access[_-]?)?key)["']?\s*(?::|=>|=|\s)\s*["']?[A-Za-z0-9/+]*"#]
        }
        Rule::SlackToken => &[r"xox[abeoprs](?:\.xox[a-z])?-[A-Za-z0-9-]*", r"xapp-[A-Za-z0-9-]*"],
        Rule::StripeKey => &[r"[sr]k_live_[A-Za-z0-9]*"],
        Rule::PrivateKey => &[
            r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----(?:[^-]|-[^-])*-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----",
        ],
        Rule::Jwt => &[r"eyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){0,2}"],
        Rule::Email => &[r"[A-Za-z0-9._%+-]+(?:@[A-Za-z0-9.-]*)?"],
        Rule::UsSsn | Rule::CardNumber => &[r"[0-9](?:[ -]?[0-9]){0,22}[.,-]?"],
        Rule::UnsafeShell => &[
            r":\s*\(\s*\)\s*\{\s*:\s*\|\s*:\s*&\s*\}\s*;\s*:",
            r"dd\s+(?:[a-z]+=[^\s;|&]+\s+)*of=/dev/[a-z0-9/]*",
            r"mkfs(?:\.[a-z0-9]+)?\s+(?:-[^\s]+\s+(?:[^\s/-][^\s]*\s+)?)*/dev/[a-z0-9]*",
            r"rm\s+(?:-[-A-Za-z]*\s+)+(?:/|~|\$HOME)[/*]*",
            r"chmod\s+(?:-[-A-Za-z]*\s+)+0?777\s+/\*?",
            r"(?:curl|wget)\s[^\n|;&]{0,200}(?:\|\s*(?:sudo\s+)?(?:ba|z|da|k)?s?h?)?",
        ],
        // Keywords are per engine (see `Keywords::liveness_patterns`); injection never runs on output.
        Rule::BlockedKeyword | Rule::PromptInjection => &[],
    }
}

/// A project's blocked keywords: matched by their first word through Aho-Corasick, then word by
/// word (ASCII case-insensitive, any whitespace run between words).
#[derive(Debug)]
pub(crate) struct Keywords {
    anchors: AhoCorasick,
    /// Per anchor: the keywords (as word lists) that start with it.
    candidates: Vec<Vec<Vec<String>>>,
}

impl Keywords {
    pub fn new(keywords: &[String]) -> Option<Self> {
        let mut firsts: Vec<String> = Vec::new();
        let mut candidates: Vec<Vec<Vec<String>>> = Vec::new();
        for keyword in keywords {
            let words: Vec<String> = keyword.split_whitespace().map(str::to_owned).collect();
            let Some(first) = words.first() else { continue };
            match firsts.iter().position(|f| f.eq_ignore_ascii_case(first)) {
                Some(i) => candidates[i].push(words),
                None => {
                    firsts.push(first.clone());
                    candidates.push(vec![words]);
                }
            }
        }
        if firsts.is_empty() {
            return None;
        }
        // Longest first, so that `rm -rf /*` wins over `rm -rf /` at the same position.
        for list in &mut candidates {
            list.sort_by_key(|words| std::cmp::Reverse(words.iter().map(String::len).sum::<usize>() + words.len()));
        }
        let anchors = AhoCorasickBuilder::new()
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::Standard)
            .build(&firsts)
            .ok()?;
        Some(Self { anchors, candidates })
    }

    /// The end of a keyword starting at `at`, if one does.
    fn match_at(&self, hay: &str, anchor: usize, at: usize) -> Option<usize> {
        let bytes = hay.as_bytes();
        'keywords: for words in &self.candidates[anchor] {
            let mut pos = at;
            for (i, word) in words.iter().enumerate() {
                if i > 0 {
                    let ws = hay[pos..].len() - hay[pos..].trim_start().len();
                    if ws == 0 {
                        continue 'keywords;
                    }
                    pos += ws;
                }
                let end = pos + word.len();
                if end > bytes.len() || !bytes[pos..end].eq_ignore_ascii_case(word.as_bytes()) {
                    continue 'keywords;
                }
                pos = end;
            }
            if hay.is_char_boundary(pos) && boundary_after(bytes, pos) {
                return Some(pos);
            }
        }
        None
    }

    pub fn liveness_patterns(&self) -> Vec<String> {
        self.candidates
            .iter()
            .flatten()
            .map(|words| {
                let escaped: Vec<String> = words.iter().map(|w| regex_syntax_escape(w)).collect();
                format!("(?i:{})", escaped.join(r"\s+"))
            })
            .collect()
    }
}

fn regex_syntax_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if c.is_ascii_punctuation() || c == ' ' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Everything a scan needs: the built-ins plus the project's keywords.
#[derive(Debug)]
pub(crate) struct Detectors {
    pub keywords: Option<Keywords>,
}

impl Detectors {
    pub fn new(keywords: &[String]) -> Self {
        LazyLock::force(&BUILTIN);
        Self { keywords: Keywords::new(keywords) }
    }

    /// Finds every enabled rule's matches starting at or after `from` in `hay`, and (when
    /// `PromptInjection` is enabled) the heuristic injection signals. Bytes before `from` are
    /// context only (boundary checks). Hits come out sorted and deduplicated.
    pub fn detect(&self, hay: &str, from: usize, mask: &RuleMask, hits: &mut Vec<Hit>, signals: &mut Vec<Signal>) {
        let builtin = &*BUILTIN;
        let bytes = hay.as_bytes();
        let scan = &hay[from..];
        for m in builtin.anchors.find_overlapping_iter(scan) {
            let at = from + m.start();
            if !boundary_before(bytes, at) && builtin.kinds[m.pattern().as_usize()] != Anchor::At {
                continue;
            }
            builtin.verify(builtin.kinds[m.pattern().as_usize()], hay, at, from, mask, hits, signals);
        }
        if mask.has(Rule::BlockedKeyword)
            && let Some(keywords) = &self.keywords
        {
            for m in keywords.anchors.find_overlapping_iter(scan) {
                let at = from + m.start();
                if boundary_before(bytes, at)
                    && let Some(end) = keywords.match_at(hay, m.pattern().as_usize(), at)
                {
                    hits.push(Hit { start: at, end, rule: Rule::BlockedKeyword, hint: 0, anchor: at });
                }
            }
        }
        if mask.has(Rule::UsSsn) || mask.has(Rule::CardNumber) {
            digits::scan(bytes, from, mask, hits);
        }
        hits.sort_unstable();
        hits.dedup();
    }
}

impl Builtin {
    #[allow(clippy::too_many_arguments)]
    fn verify(
        &self,
        kind: Anchor,
        hay: &str,
        at: usize,
        from: usize,
        mask: &RuleMask,
        hits: &mut Vec<Hit>,
        signals: &mut Vec<Signal>,
    ) {
        let bytes = hay.as_bytes();
        let find = |re: &Regex| re.search(&Input::new(hay).range(at..).anchored(Anchored::Yes)).map(|m| m.end());
        let mut push = |rule: Rule, end: usize, hint: usize| hits.push(Hit { start: at, end, rule, hint, anchor: at });
        match kind {
            Anchor::OpenAi => {
                if hay[at..].starts_with("sk-ant-") {
                    if mask.has(Rule::AnthropicKey)
                        && let Some(end) = find(&self.anthropic)
                        && looks_random(&bytes[at + 7..end], 3)
                    {
                        push(Rule::AnthropicKey, end, 7);
                    }
                } else if mask.has(Rule::OpenaiKey)
                    && let Some(end) = find(&self.openai)
                {
                    let hint = ["sk-proj-", "sk-svcacct-", "sk-admin-"]
                        .iter()
                        .find(|p| hay[at..].starts_with(**p))
                        .map_or(3, |p| p.len());
                    if end - at - hint >= 32 && looks_random(&bytes[at + hint..end], 3) {
                        push(Rule::OpenaiKey, end, hint);
                    }
                }
            }
            Anchor::GithubClassic => {
                if mask.has(Rule::GithubToken)
                    && let Some(end) = find(&self.github_classic)
                    && boundary_after(bytes, end)
                    && looks_random(&bytes[at + 4..end], 2)
                {
                    push(Rule::GithubToken, end, 4);
                }
            }
            Anchor::GithubPat => {
                if mask.has(Rule::GithubToken)
                    && let Some(end) = find(&self.github_pat)
                    && looks_random(&bytes[at + 11..end], 2)
                {
                    push(Rule::GithubToken, end, 11);
                }
            }
            Anchor::Gitlab => {
                if mask.has(Rule::GitlabToken)
                    && let Some(end) = find(&self.gitlab)
                    && looks_random(&bytes[at + 6..end], 2)
                {
                    push(Rule::GitlabToken, end, 6);
                }
            }
            Anchor::AwsKeyId => {
                if mask.has(Rule::AwsAccessKeyId)
                    && let Some(end) = find(&self.aws_key_id)
                    && boundary_after(bytes, end)
                    && looks_random(&bytes[at + 4..end], 1)
                {
                    push(Rule::AwsAccessKeyId, end, 4);
                }
            }
            Anchor::AwsSecret => {
                if mask.has(Rule::AwsSecretKey)
                    && let Some(end) = find(&self.aws_secret)
                    && !bytes.get(end).is_some_and(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'+' | b'='))
                    && looks_random(&bytes[end - 40..end], 3)
                {
                    // Only the 40-character value is the secret; the key name before it stays.
                    hits.push(Hit { start: end - 40, end, rule: Rule::AwsSecretKey, hint: 0, anchor: at });
                }
            }
            Anchor::Slack | Anchor::SlackApp => {
                let re = if kind == Anchor::Slack { &self.slack } else { &self.slack_app };
                if mask.has(Rule::SlackToken)
                    && let Some(end) = find(re)
                    && let Some(dash) = hay[at..end].find('-')
                    && bytes[at + dash + 1..end].iter().any(u8::is_ascii_digit)
                    && looks_random(&bytes[at + dash + 1..end], 2)
                {
                    push(Rule::SlackToken, end, dash + 1);
                }
            }
            Anchor::Stripe => {
                if mask.has(Rule::StripeKey)
                    && let Some(end) = find(&self.stripe)
                    && looks_random(&bytes[at + 8..end], 2)
                {
                    push(Rule::StripeKey, end, 8);
                }
            }
            Anchor::Pem => {
                if mask.has(Rule::PrivateKey)
                    && let Some(end) = find(&self.pem)
                {
                    // The header (`-----BEGIN RSA PRIVATE KEY-----`) says what leaked without leaking it.
                    let header = hay[at + 10..end].find("-----").map_or(0, |i| i + 15);
                    push(Rule::PrivateKey, end, header);
                }
            }
            Anchor::Jwt => {
                if mask.has(Rule::Jwt)
                    && let Some(end) = find(&self.jwt)
                    && boundary_after(bytes, end)
                {
                    push(Rule::Jwt, end, 3);
                }
            }
            Anchor::At => {
                if mask.has(Rule::Email)
                    && let Some((start, end)) = email_around(bytes, at)
                    && start >= from
                {
                    hits.push(Hit { start, end, rule: Rule::Email, hint: 0, anchor: start });
                }
            }
            Anchor::Shell(shell) => {
                if !mask.has(Rule::UnsafeShell) {
                    return;
                }
                let (re, end_check): (&Regex, EndCheck) = match shell {
                    Shell::ForkBomb => (&self.fork_bomb, |_, _| true),
                    Shell::Dd => (&self.dd, |_, _| true),
                    Shell::Mkfs => (&self.mkfs, |_, _| true),
                    Shell::Rm => (&self.rm, shell_boundary_after),
                    Shell::Chmod => (&self.chmod, shell_boundary_after),
                    Shell::CurlPipe => (&self.pipe_to_shell, boundary_after),
                };
                if let Some(end) = find(re)
                    && end_check(bytes, end)
                {
                    push(Rule::UnsafeShell, end, 0);
                }
            }
            Anchor::Injection(i) => {
                if mask.has(Rule::PromptInjection) {
                    let (re, weight) = &self.injection[i];
                    if let Some(end) = find(re) {
                        signals.push(Signal { start: at, end, weight: *weight });
                    }
                }
            }
        }
    }
}

/// Rejects placeholders: a real token body mixes at least `classes` of (lowercase, uppercase,
/// digits), has varied characters and does not spell out a placeholder word.
fn looks_random(body: &[u8], classes: usize) -> bool {
    let lower = body.iter().any(u8::is_ascii_lowercase);
    let upper = body.iter().any(u8::is_ascii_uppercase);
    let digit = body.iter().any(u8::is_ascii_digit);
    if usize::from(lower) + usize::from(upper) + usize::from(digit) < classes {
        return false;
    }
    let mut seen = [false; 256];
    let mut distinct = 0;
    for &b in body {
        if !seen[usize::from(b)] {
            seen[usize::from(b)] = true;
            distinct += 1;
        }
    }
    if distinct < (body.len() / 3).clamp(6, 12) {
        return false;
    }
    const PLACEHOLDERS: &[&[u8]] =
        &[b"example", b"your", b"xxxx", b"placeholder", b"redacted", b"dummy", b"replace", b"insert", b"changeme"];
    !PLACEHOLDERS.iter().any(|p| contains_ignore_case(body, p))
}

fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

fn is_local_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-')
}

fn is_domain_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-')
}

/// The e-mail address around the `@` at `at`: a local part of up to 64 bytes, a domain of at
/// least two labels whose last one is alphabetic. The scp-like `git@host:path` form is not an
/// address. Reserved example domains (`example.com`) are still addresses: the detector cannot
/// know whether a real person hides behind one, and the default action for e-mail is only `flag`.
fn email_around(bytes: &[u8], at: usize) -> Option<(usize, usize)> {
    let mut start = at;
    while start > 0 && at - start < 64 && is_local_byte(bytes[start - 1]) {
        start -= 1;
    }
    if start > 0 && is_local_byte(bytes[start - 1]) {
        return None;
    }
    while start < at && bytes[start] == b'.' {
        start += 1;
    }
    if start == at {
        return None;
    }
    let mut end = at + 1;
    while end < bytes.len() && end - at <= 253 && is_domain_byte(bytes[end]) {
        end += 1;
    }
    while end > at + 1 && matches!(bytes[end - 1], b'.' | b'-') {
        end -= 1;
    }
    let domain = &bytes[at + 1..end];
    let labels: Vec<&[u8]> = domain.split(|b| *b == b'.').collect();
    let tld = labels.last()?;
    let valid = labels.len() >= 2
        && labels.iter().all(|l| !l.is_empty() && l.len() <= 63 && l[0] != b'-' && l[l.len() - 1] != b'-')
        && tld.len() >= 2
        && tld.iter().all(u8::is_ascii_alphabetic);
    if !valid || bytes.get(end).is_some_and(|b| is_word_byte(*b)) {
        return None;
    }
    if &bytes[start..at] == b"git" && bytes.get(end) == Some(&b':') {
        return None;
    }
    Some((start, end))
}
