//! meshgate's inference service: local models on ONNX Runtime (`ort`, loaded dynamically) —
//! chat generation with a KV cache and streaming, sentence embeddings, classification — behind
//! the `meshgate.inference.v1.Inference` gRPC contract.
//!
//! Models come from a manifest (`<models_dir>/manifest.json`, see [`manifest`]). A model that
//! cannot be loaded does not take the service down: it is reported with its reason and requests
//! for it fail with `service_unavailable`.

pub mod batcher;
pub mod cascade;
pub mod chat;
pub mod config;
pub mod embedding_cache;
pub mod encoder;
pub mod engine;
pub mod error;
pub mod first_stage;
pub mod head;
pub mod manifest;
pub mod metrics;
pub mod onnx;
pub mod sampling;
pub mod service;
pub mod text;

#[cfg(test)]
pub(crate) mod testing;

use meshgate_proto::inference::v1::inference_server::InferenceServer;
use meshgate_runtime::{Listeners, ServiceHost, Shutdown};

pub use config::Config;
pub use engine::Engine;
pub use error::Error;
pub use metrics::InferenceMetrics;
pub use service::InferenceService;

/// Serves the inference service until `shutdown`. Health turns SERVING once the start-up model
/// loading has finished (models that failed are reported per model by `ListModels`).
pub async fn serve(config: Config, listeners: Listeners, shutdown: Shutdown) -> Result<(), Error> {
    let host = ServiceHost::new("inference");
    let metrics = InferenceMetrics::new();
    metrics.register(host.metrics());
    let engine = Engine::start(config, metrics)?;
    let probe_engine = engine.clone();
    let probe = move || {
        let ready = probe_engine.ready();
        async move { ready }
    };
    host.run(
        InferenceServer::new(InferenceService::new(engine))
            .max_decoding_message_size(meshgate_runtime::mesh::MAX_MESSAGE_BYTES),
        listeners,
        probe,
        shutdown,
    )
    .await?;
    Ok(())
}
