//! The vocabulary of the policy: rules (one per detector), their categories, severities and the
//! actions a project can attach to them. Names are stable snake_case strings: they appear in
//! project configuration (JSONB), in 422 errors and in security events.

use serde::{Deserialize, Serialize};

/// One detector. Its name is what a project configures and what a blocked request reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// OpenAI API keys: `sk-…`, `sk-proj-…`, `sk-svcacct-…`, `sk-admin-…`.
    OpenaiKey,
    /// Anthropic API keys: `sk-ant-…`.
    AnthropicKey,
    /// GitHub tokens: `ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_` and fine-grained `github_pat_`.
    GithubToken,
    /// GitLab personal access tokens: `glpat-…`.
    GitlabToken,
    /// AWS access key ids: `AKIA…` / `ASIA…` (20 characters).
    AwsAccessKeyId,
    /// AWS secret access keys, recognised only in context (`aws_secret_access_key = …` and the like),
    /// since a bare 40-character base64 string is indistinguishable from any other hash.
    AwsSecretKey,
    /// Slack tokens: `xoxb-`, `xoxp-`, `xoxa-`, `xoxr-`, `xoxs-`, `xoxe-`, and app tokens `xapp-`.
    SlackToken,
    /// Stripe live keys: `sk_live_…`, `rk_live_…`.
    StripeKey,
    /// PEM private keys (`-----BEGIN … PRIVATE KEY-----`), up to the END line; an unterminated
    /// block runs to the end of the text or to the first `--` (which no PEM body contains).
    PrivateKey,
    /// JSON Web Tokens (three base64url segments, header and payload starting with `eyJ`).
    Jwt,
    /// E-mail addresses.
    Email,
    /// US social security numbers written with separators (`123-45-6789`, `123 45 6789`).
    UsSsn,
    /// Payment card numbers: known issuer prefixes and lengths, Luhn-valid.
    CardNumber,
    /// A keyword of the project's blocked list.
    BlockedKeyword,
    /// A destructive shell command (fork bomb, `dd` onto a disk, `mkfs`, `rm -rf /`, `chmod -R 777 /`,
    /// `curl … | sh`).
    UnsafeShell,
    /// A prompt-injection attempt, scored by a classifier or by the heuristic.
    PromptInjection,
}

impl Rule {
    /// Every rule, in declaration order.
    pub const ALL: &'static [Rule] = &[
        Rule::OpenaiKey,
        Rule::AnthropicKey,
        Rule::GithubToken,
        Rule::GitlabToken,
        Rule::AwsAccessKeyId,
        Rule::AwsSecretKey,
        Rule::SlackToken,
        Rule::StripeKey,
        Rule::PrivateKey,
        Rule::Jwt,
        Rule::Email,
        Rule::UsSsn,
        Rule::CardNumber,
        Rule::BlockedKeyword,
        Rule::UnsafeShell,
        Rule::PromptInjection,
    ];

    /// The rule's configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::OpenaiKey => "openai_key",
            Rule::AnthropicKey => "anthropic_key",
            Rule::GithubToken => "github_token",
            Rule::GitlabToken => "gitlab_token",
            Rule::AwsAccessKeyId => "aws_access_key_id",
            Rule::AwsSecretKey => "aws_secret_key",
            Rule::SlackToken => "slack_token",
            Rule::StripeKey => "stripe_key",
            Rule::PrivateKey => "private_key",
            Rule::Jwt => "jwt",
            Rule::Email => "email",
            Rule::UsSsn => "us_ssn",
            Rule::CardNumber => "card_number",
            Rule::BlockedKeyword => "blocked_keyword",
            Rule::UnsafeShell => "unsafe_shell",
            Rule::PromptInjection => "prompt_injection",
        }
    }

    pub fn category(self) -> Category {
        match self {
            Rule::OpenaiKey
            | Rule::AnthropicKey
            | Rule::GithubToken
            | Rule::GitlabToken
            | Rule::AwsAccessKeyId
            | Rule::AwsSecretKey
            | Rule::SlackToken
            | Rule::StripeKey
            | Rule::PrivateKey
            | Rule::Jwt => Category::Secret,
            Rule::Email | Rule::UsSsn | Rule::CardNumber => Category::Pii,
            Rule::BlockedKeyword => Category::BlockedKeyword,
            Rule::UnsafeShell => Category::UnsafeShell,
            Rule::PromptInjection => Category::PromptInjection,
        }
    }

    pub fn severity(self) -> Severity {
        match self {
            Rule::PrivateKey | Rule::AwsSecretKey | Rule::StripeKey => Severity::Critical,
            Rule::OpenaiKey
            | Rule::AnthropicKey
            | Rule::GithubToken
            | Rule::GitlabToken
            | Rule::AwsAccessKeyId
            | Rule::SlackToken
            | Rule::Jwt
            | Rule::UsSsn
            | Rule::CardNumber
            | Rule::UnsafeShell
            | Rule::PromptInjection => Severity::High,
            Rule::BlockedKeyword => Severity::Medium,
            Rule::Email => Severity::Low,
        }
    }

    /// The action a rule takes when the project does not configure one: secrets and sensitive PII
    /// are redacted (the request still works, the secret never reaches a provider), e-mail addresses
    /// are only flagged (they are routine in prompts), keywords and destructive shell are blocked.
    /// Injection attempts are flagged: on held-out data of other origins the classifier misses
    /// too many and flags too many benign prompts for a block by default
    /// (`scripts/models/DATA.md`); a project that accepts that sets `block`.
    pub fn default_action(self) -> Action {
        match self.category() {
            Category::Secret => Action::Redact,
            Category::Pii if self == Rule::Email => Action::Flag,
            Category::Pii => Action::Redact,
            Category::PromptInjection => Action::Flag,
            Category::BlockedKeyword | Category::UnsafeShell => Action::Block,
        }
    }

    /// Whether the rule also runs on model output (injection is a property of inputs only).
    pub fn scans_output(self) -> bool {
        self != Rule::PromptInjection
    }

    /// Index into per-rule tables.
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The family a rule belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Secret,
    Pii,
    BlockedKeyword,
    UnsafeShell,
    PromptInjection,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Secret => "secret",
            Category::Pii => "pii",
            Category::BlockedKeyword => "blocked_keyword",
            Category::UnsafeShell => "unsafe_shell",
            Category::PromptInjection => "prompt_injection",
        }
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How bad a finding is; drives the risk score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    /// Contribution of one finding of this severity to the risk score (0–100).
    pub fn weight(self) -> f64 {
        match self {
            Severity::Low => 15.0,
            Severity::Medium => 40.0,
            Severity::High => 70.0,
            Severity::Critical => 90.0,
        }
    }
}

/// What happens when a rule fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Refuse the request (422 naming the rule).
    Block,
    /// Mask the match before the text goes anywhere, keeping a short non-secret hint.
    Redact,
    /// Let the text through unchanged and record a finding.
    Flag,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Redact => "redact",
            Action::Flag => "flag",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
