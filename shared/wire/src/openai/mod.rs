//! OpenAI's formats: Chat Completions, both as the edge speaks it to clients ([`ingress`]) and
//! as meshgate speaks it to OpenAI-compatible providers ([`provider`]); the Responses API
//! ([`responses`]); the legacy text completions ([`completions`]); embeddings ([`embeddings`]).

pub mod completions;
pub mod embeddings;
pub mod ingress;
pub mod provider;
pub mod responses;
