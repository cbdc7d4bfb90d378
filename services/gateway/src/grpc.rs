//! The gRPC facade of the edge (`meshgate.gateway.v1.Gateway`): the same request path as the
//! HTTP edge, authenticated by `authorization: Bearer <key>` metadata — before the request message
//! is read, whose size is bounded by the gateway's body limit. Chat responses carry the caller's
//! budget in the same `x-meshgate-quota-*` initial metadata as the HTTP headers.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use meshgate_proto::common::v1::Usage;
use meshgate_proto::gateway::v1::gateway_server::{Gateway, GatewayServer};
use meshgate_proto::gateway::v1::{
    ChatChunk, ChatRequest, EmbedRequest, EmbedResponse, ListModelsRequest, ListModelsResponse, ModelInfo,
};
use meshgate_runtime::{ApiError, ErrorCode};
use meshgate_wire::ChatRequest as CanonicalChat;
use meshgate_wire::openai::embeddings::{EmbeddingInput, EmbeddingsRequest, EncodingFormat};
use tonic::{Request, Response, Status};

use crate::admission::{Admission, RequestFacts};
use crate::auth::{Authenticator, Caller};
use crate::client_addr::TrustedProxies;
use crate::concurrency::TenantCaps;
use crate::guard::RISK_SCORE;
use crate::settings::{ProjectSettings, SettingsCache};
use crate::tenancy::EndpointScope;

/// The gRPC gateway service.
#[derive(Clone)]
pub struct GatewayService {
    /// Limits, allowed models and screening, shared with the HTTP edge.
    pub admission: Admission,
    pub auth: Authenticator,
    /// The gateway's body limit, applied to gRPC requests by their encoded size.
    pub max_body_bytes: usize,
    pub settings: SettingsCache,
    /// Open streams per key and project, shared with the HTTP edge.
    pub streams: TenantCaps,
    /// Proxies whose `x-forwarded-for` names the client.
    pub proxies: TrustedProxies,
}

impl GatewayService {
    /// The server: requests authenticated before their message is decoded, messages no larger
    /// than the gateway's body limit.
    pub fn into_server(self) -> Authenticated {
        let (auth, proxies, limit) = (self.auth.clone(), self.proxies.clone(), self.max_body_bytes);
        let server = GatewayServer::new(self).max_decoding_message_size(limit);
        Authenticated { auth, proxies, server }
    }

    /// The caller [`Authenticated`] found, required to be allowed `endpoint`.
    fn caller<T>(request: &Request<T>, endpoint: EndpointScope) -> Result<Caller, Status> {
        let caller = request.extensions().get::<Caller>().cloned().ok_or_else(|| {
            ApiError::new(ErrorCode::Unauthenticated, "the request was not authenticated").to_status()
        })?;
        caller.require(endpoint).map_err(|err| err.to_status())?;
        Ok(caller)
    }
}

/// The gateway's gRPC server behind authentication: a request without a valid key is refused
/// from its metadata alone, before any of its body is read or decoded.
#[derive(Clone)]
pub struct Authenticated {
    auth: Authenticator,
    proxies: TrustedProxies,
    server: GatewayServer<GatewayService>,
}

impl tonic::server::NamedService for Authenticated {
    const NAME: &'static str = <GatewayServer<GatewayService> as tonic::server::NamedService>::NAME;
}

impl tower::Service<http::Request<tonic::body::Body>> for Authenticated {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower::Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.server, cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let (auth, proxies) = (self.auth.clone(), self.proxies.clone());
        // The clone is ready only after poll_ready; swap so the ready one serves this call.
        let clone = self.server.clone();
        let mut server = std::mem::replace(&mut self.server, clone);
        Box::pin(async move {
            let header = request.headers().get("authorization").and_then(|v| v.to_str().ok());
            let forwarded_for = request.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok());
            let peer = request
                .extensions()
                .get::<tonic::transport::server::TcpConnectInfo>()
                .and_then(|info| info.remote_addr())
                .map(|addr| proxies.client(addr.ip(), forwarded_for));
            match auth.authenticate(header, peer).await {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                    tower::Service::call(&mut server, request).await
                }
                Err(err) => Ok(err.to_status().into_http()),
            }
        })
    }
}

/// Applies the project's body limit to a gRPC request by its encoded size.
fn check_size<M: prost::Message>(settings: &ProjectSettings, message: &M, gateway: usize) -> Result<(), ApiError> {
    let limit = settings.max_body_bytes(gateway);
    if message.encoded_len() > limit {
        return Err(ApiError::new(ErrorCode::PayloadTooLarge, format!("request exceeds {limit} bytes")));
    }
    Ok(())
}

type ChatStream = Pin<Box<dyn Stream<Item = Result<ChatChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Gateway for GatewayService {
    type ChatStream = ChatStream;

    async fn chat(&self, request: Request<ChatRequest>) -> Result<Response<Self::ChatStream>, Status> {
        let started = Instant::now();
        let caller = Self::caller(&request, EndpointScope::Chat)?;
        let settings = self.settings.get(&caller.principal.project_id).await.map_err(|err| err.to_status())?;
        check_size(&settings, request.get_ref(), self.max_body_bytes).map_err(|err| err.to_status())?;
        // The gateway's own id keys quota and traces, as on the HTTP edge.
        let request_id = uuid::Uuid::now_v7().to_string();
        let trace_id = meshgate_runtime::telemetry::trace_id(&tracing::Span::current());
        let headers = meshgate_policy::sanitize_headers(&request.metadata().clone().into_headers());
        let body = request.into_inner();
        let mut chat = CanonicalChat {
            model: body.model,
            messages: body.messages,
            sampling: body.sampling.unwrap_or_default(),
            options: body.options.unwrap_or_default(),
            stream: true,
            include_usage: true,
        };
        // The checks the HTTP edge's parser runs, with the same field names.
        chat.check().map_err(|err| crate::openai::wire_error(err).to_status())?;
        let facts =
            RequestFacts { request_id: request_id.clone(), trace_id, started, headers, unforwarded: Vec::new() };
        let call = self.admission.chat(&caller, &settings, chat, facts).await.map_err(|err| err.to_status())?;
        let risk = call.security.risk;
        let requested = call.chat.model.clone();
        // Every gRPC chat streams: the slot is held by the response stream until it ends.
        let slot = self.streams.open(&call.principal).map_err(|err| err.to_status())?;
        let reply = self.admission.orchestrator.chat(call).await.map_err(|err| err.to_status())?;
        let model = if reply.target.model.is_empty() { requested } else { reply.target.model.clone() };
        let routing: Vec<(&'static str, String)> =
            reply.routing_headers().into_iter().map(|(name, value)| (name, value.to_owned())).collect();
        let quota = reply.quota;
        let chunks = reply.chunks.map(move |chunk| {
            let _held = &slot;
            chunk
                .map(|chunk| {
                    let chunk = chunk.completion;
                    ChatChunk {
                        request_id: request_id.clone(),
                        model: if chunk.model.is_empty() { model.clone() } else { chunk.model },
                        delta: chunk.delta,
                        finish_reason: chunk.finish_reason,
                        usage: chunk.usage,
                        tool_calls: chunk.tool_calls,
                        tool_call_deltas: chunk.tool_call_deltas,
                        refusal_delta: chunk.refusal_delta,
                        reasoning_delta: chunk.reasoning_delta,
                    }
                })
                .map_err(|err: ApiError| err.to_status())
        });
        let mut response = Response::new(Box::pin(chunks) as Self::ChatStream);
        // The prompt's risk: metadata leaves before the reply is scanned.
        response.metadata_mut().insert(RISK_SCORE, u16::from(risk).into());
        for (name, value) in quota.headers().into_iter().chain(routing) {
            if let Ok(value) = value.parse() {
                response.metadata_mut().insert(name, value);
            }
        }
        Ok(response)
    }

    async fn embed(&self, request: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        let started = Instant::now();
        let caller = Self::caller(&request, EndpointScope::Embeddings)?;
        let settings = self.settings.get(&caller.principal.project_id).await.map_err(|err| err.to_status())?;
        check_size(&settings, request.get_ref(), self.max_body_bytes).map_err(|err| err.to_status())?;
        let request_id = uuid::Uuid::now_v7().to_string();
        let trace_id = meshgate_runtime::telemetry::trace_id(&tracing::Span::current());
        let body = request.into_inner();
        let request = EmbeddingsRequest {
            model: body.model,
            input: EmbeddingInput::Texts(body.inputs),
            dimensions: None,
            encoding_format: EncodingFormat::Float,
            user: String::new(),
            extra_json: String::new(),
        };
        let call = self
            .admission
            .embeddings(&caller, &settings, request, (request_id, trace_id, started))
            .map_err(|err| err.to_status())?;
        let risk = call.risk;
        let embedded = self.admission.orchestrator.embed(call).await.map_err(|err| err.to_status())?;
        let data = embedded
            .vectors
            .into_iter()
            .zip(0..)
            .map(|(values, index)| meshgate_proto::gateway::v1::Embedding { index, values })
            .collect();
        let usage =
            Usage { prompt_tokens: embedded.prompt_tokens, total_tokens: embedded.prompt_tokens, ..Usage::default() };
        let mut response = Response::new(EmbedResponse { model: embedded.target.model, data, usage: Some(usage) });
        response.metadata_mut().insert(RISK_SCORE, u16::from(risk).into());
        for (name, value) in embedded.budget.headers() {
            if let Ok(value) = value.parse() {
                response.metadata_mut().insert(name, value);
            }
        }
        Ok(response)
    }

    async fn list_models(&self, request: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        Self::caller(&request, EndpointScope::Models)?;
        let targets = self.admission.orchestrator.models().await.map_err(|err| err.to_status())?;
        let models =
            targets.into_iter().map(|(t, tasks)| ModelInfo { id: t.model, owned_by: t.provider, tasks }).collect();
        Ok(Response::new(ListModelsResponse { models }))
    }
}
