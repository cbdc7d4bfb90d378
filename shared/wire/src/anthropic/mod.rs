//! Anthropic's Messages format, as meshgate speaks it to Anthropic ([`provider`]).

pub mod provider;
