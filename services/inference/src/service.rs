//! The `meshgate.inference.v1.Inference` gRPC service over the [`Engine`].

use std::pin::Pin;

use futures::{Stream, StreamExt};
use meshgate_proto::common::v1::Usage;
use meshgate_proto::inference::v1 as pb;
use meshgate_proto::inference::v1::inference_server::Inference;
use tonic::{Request, Response, Status};

use crate::cascade::Classified;
use crate::chat::ChatTurn;
use crate::engine::{Engine, GenerateEvent, ModelStatus};

/// gRPC front of the engine.
#[derive(Clone)]
pub struct InferenceService {
    engine: Engine,
}

impl InferenceService {
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }
}

fn local_model(status: ModelStatus) -> pb::LocalModel {
    pb::LocalModel {
        name: status.name,
        task: status.task.as_str().to_owned(),
        loaded: status.loaded,
        error: status.error.unwrap_or_default(),
        dims: status.dims.map_or(0, |d| d as i32),
        context_length: i64::from(status.context_length),
        queue_depth: status.queue_depth as i64,
        queue_capacity: status.queue_capacity as i64,
    }
}

fn classification(result: Classified) -> pb::Classification {
    pb::Classification {
        scores: result.scores.into_iter().map(|(label, probability)| pb::LabelScore { label, probability }).collect(),
        stage: result.stage.as_str().to_owned(),
        cached: result.cached,
    }
}

fn usage(prompt: u64, completion: u64) -> Usage {
    Usage {
        prompt_tokens: prompt as i64,
        completion_tokens: completion as i64,
        total_tokens: (prompt + completion) as i64,
        ..Usage::default()
    }
}

type GenerateChunks = Pin<Box<dyn Stream<Item = Result<pb::GenerateChunk, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = GenerateChunks;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let request = request.into_inner();
        let messages = request.messages.into_iter().map(|m| ChatTurn { role: m.role, content: m.content }).collect();
        let events = self.engine.generate(&request.model, messages, request.sampling).await?;
        let chunks = events.map(|event| match event {
            Ok(GenerateEvent::Delta(delta)) => Ok(pb::GenerateChunk { delta, ..Default::default() }),
            Ok(GenerateEvent::Done(done)) => Ok(pb::GenerateChunk {
                delta: String::new(),
                finish_reason: done.finish_reason.as_str().to_owned(),
                usage: Some(usage(done.prompt_tokens as u64, done.completion_tokens as u64)),
            }),
            Err(err) => Err(Status::from(err)),
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn embed(&self, request: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        let request = request.into_inner();
        let out = self.engine.embed(&request.model, request.inputs).await?;
        Ok(Response::new(pb::EmbedResponse {
            embeddings: out.vectors.into_iter().map(|values| pb::Embedding { values }).collect(),
            dims: out.dims as i32,
            usage: Some(usage(out.prompt_tokens, 0)),
        }))
    }

    async fn classify(&self, request: Request<pb::ClassifyRequest>) -> Result<Response<pb::ClassifyResponse>, Status> {
        let request = request.into_inner();
        let models: Vec<String> =
            std::iter::once(request.model).filter(|m| !m.is_empty()).chain(request.models).collect();
        let outputs = self.engine.classify_many(&models, request.inputs).await?;
        let by_model: Vec<pb::ModelClassifications> = outputs
            .into_iter()
            .map(|out| pb::ModelClassifications {
                model: out.model,
                results: out.results.into_iter().map(classification).collect(),
            })
            .collect();
        let results = by_model.first().map(|m| m.results.clone()).unwrap_or_default();
        Ok(Response::new(pb::ClassifyResponse { results, by_model }))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(pb::ListModelsResponse {
            models: self.engine.models().into_iter().map(local_model).collect(),
            in_flight: self.engine.in_flight() as i64,
            max_in_flight: self.engine.config().max_in_flight as i64,
            queued: self.engine.queued() as i64,
        }))
    }

    async fn load(&self, request: Request<pb::LoadRequest>) -> Result<Response<pb::LoadResponse>, Status> {
        let request = request.into_inner();
        let status = if request.unload {
            self.engine.unload(&request.model).await?
        } else {
            self.engine.load(&request.model).await?
        };
        Ok(Response::new(pb::LoadResponse { model: Some(local_model(status)) }))
    }
}
