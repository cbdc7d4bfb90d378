//! Anthropic's Messages format, both as the edge speaks it to clients ([`ingress`]) and as
//! meshgate speaks it to Anthropic ([`provider`]).

pub mod ingress;
pub mod provider;
