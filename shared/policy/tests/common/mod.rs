//! Test helpers: realistic fake credentials generated from a seeded RNG (no real secret is ever
//! committed), and a one-call scan.

#![allow(dead_code)] // Each test binary uses its own subset.

use meshgate_policy::{Message, PolicyConfig, PolicyEngine, Rule};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const BASE62: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
pub const BASE64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
pub const BASE64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
pub const BASE32: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn random(rng: &mut StdRng, alphabet: &[u8], len: usize) -> String {
    loop {
        let s: String = (0..len).map(|_| char::from(alphabet[rng.random_range(0..alphabet.len())])).collect();
        // Real tokens mix classes; regenerate the rare draw that does not, so tests are not flaky
        // by construction rather than by luck.
        let classes = [
            s.bytes().any(|b| b.is_ascii_lowercase()),
            s.bytes().any(|b| b.is_ascii_uppercase()),
            s.bytes().any(|b| b.is_ascii_digit()),
        ];
        let wanted = [
            alphabet.iter().any(u8::is_ascii_lowercase),
            alphabet.iter().any(u8::is_ascii_uppercase),
            alphabet.iter().any(u8::is_ascii_digit),
        ];
        // Short strings cannot always mix every class; they are only used as filler.
        if classes == wanted || len < 8 {
            return s;
        }
    }
}

/// A secret as it would appear in text, the rule that must find it, and its public prefix (kept
/// by redaction as a hint).
pub struct Sample {
    pub rule: Rule,
    pub text: String,
    pub public_prefix: &'static str,
}

impl Sample {
    /// The part that must never appear anywhere.
    pub fn secret_part(&self) -> &str {
        &self.text[self.public_prefix.len()..]
    }
}

pub fn pem_body(rng: &mut StdRng, lines: usize) -> String {
    (0..lines).map(|_| random(rng, BASE64, 64)).collect::<Vec<_>>().join("\n")
}

/// One sample of every secret kind.
pub fn secrets(seed: u64) -> Vec<Sample> {
    let mut r = rng(seed);
    let r = &mut r;
    vec![
        Sample { rule: Rule::OpenaiKey, text: format!("sk-{}", random(r, BASE62, 48)), public_prefix: "sk-" },
        Sample {
            rule: Rule::OpenaiKey,
            text: format!("sk-proj-{}", random(r, BASE64URL, 156)),
            public_prefix: "sk-proj-",
        },
        Sample {
            rule: Rule::OpenaiKey,
            text: format!("sk-svcacct-{}", random(r, BASE64URL, 100)),
            public_prefix: "sk-svcacct-",
        },
        Sample {
            rule: Rule::AnthropicKey,
            text: format!("sk-ant-api03-{}", random(r, BASE64URL, 93)),
            public_prefix: "sk-ant-",
        },
        Sample { rule: Rule::GithubToken, text: format!("ghp_{}", random(r, BASE62, 36)), public_prefix: "ghp_" },
        Sample { rule: Rule::GithubToken, text: format!("gho_{}", random(r, BASE62, 36)), public_prefix: "gho_" },
        Sample {
            rule: Rule::GithubToken,
            text: format!("github_pat_{}_{}", random(r, BASE62, 22), random(r, BASE62, 59)),
            public_prefix: "github_pat_",
        },
        Sample { rule: Rule::GitlabToken, text: format!("glpat-{}", random(r, BASE62, 20)), public_prefix: "glpat-" },
        Sample { rule: Rule::AwsAccessKeyId, text: format!("AKIA{}", random(r, BASE32, 16)), public_prefix: "AKIA" },
        Sample { rule: Rule::AwsAccessKeyId, text: format!("ASIA{}", random(r, BASE32, 16)), public_prefix: "ASIA" },
        Sample {
            rule: Rule::SlackToken,
            text: format!(
                "xoxb-{}-{}-{}",
                r.random_range(1_000_000_000_000u64..9_999_999_999_999),
                r.random_range(1_000_000_000_000u64..9_999_999_999_999),
                random(r, BASE62, 24)
            ),
            public_prefix: "xoxb-",
        },
        Sample {
            rule: Rule::SlackToken,
            text: format!(
                "xoxp-{}-{}-{}-{}",
                r.random_range(1_000_000_000u64..9_999_999_999),
                r.random_range(1_000_000_000u64..9_999_999_999),
                r.random_range(1_000_000_000u64..9_999_999_999),
                random(r, b"0123456789abcdef", 32)
            ),
            public_prefix: "xoxp-",
        },
        Sample { rule: Rule::StripeKey, text: format!("sk_live_{}", random(r, BASE62, 24)), public_prefix: "sk_live_" },
        Sample { rule: Rule::StripeKey, text: format!("rk_live_{}", random(r, BASE62, 99)), public_prefix: "rk_live_" },
        Sample {
            rule: Rule::PrivateKey,
            text: format!("-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----", pem_body(r, 12)),
            public_prefix: "-----BEGIN RSA PRIVATE KEY-----",
        },
        Sample {
            rule: Rule::PrivateKey,
            text: format!("-----BEGIN OPENSSH PRIVATE KEY-----\n{}\n-----END OPENSSH PRIVATE KEY-----", pem_body(r, 6)),
            public_prefix: "-----BEGIN OPENSSH PRIVATE KEY-----",
        },
        Sample {
            rule: Rule::Jwt,
            text: format!(
                "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ{}.{}",
                random(r, BASE64URL, 60),
                random(r, BASE64URL, 43)
            ),
            public_prefix: "eyJ",
        },
    ]
}

/// The rules a default-policy scan of one user message reports, in order.
pub fn rules_in(engine: &PolicyEngine, text: &str) -> Vec<Rule> {
    engine.scan_prompt(&[Message::new("user", text)]).findings.iter().map(|f| f.rule).collect()
}

pub fn default_engine() -> PolicyEngine {
    PolicyEngine::new(PolicyConfig::default()).expect("the default policy compiles")
}

/// An engine whose every rule redacts (injection flags, since it cannot be redacted), on prompts
/// and output.
pub fn redacting_engine() -> PolicyEngine {
    let mut rules = serde_json::Map::new();
    for rule in Rule::ALL {
        let action = if *rule == Rule::PromptInjection { "flag" } else { "redact" };
        rules.insert(rule.as_str().to_owned(), serde_json::json!({ "action": action }));
    }
    PolicyEngine::from_json(&serde_json::json!({ "rules": rules, "output": { "action": "redact" } }))
        .expect("a redact-everything policy compiles")
}
