//! meshgate end to end: the whole mesh booted on ephemeral ports against real Postgres, Redis,
//! ONNX Runtime and the mock providers. One test binary for every area, so the stack is linked
//! once rather than once per file.

mod agents;
mod analytics;
mod apis;
mod attacks;
mod cloud;
mod embeddings;
mod identity;
mod jobs;
mod leases;
mod mesh;
mod otel;
mod quota;
mod routing;
mod tenancy;
