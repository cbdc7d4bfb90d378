//! OpenAI's Chat Completions format, both as the edge speaks it to clients ([`ingress`]) and as
//! meshgate speaks it to OpenAI-compatible providers ([`provider`]).

pub mod ingress;
pub mod provider;
