//! Embeddings at providers: `POST <base_url>/embeddings` in OpenAI's format (the Anthropic API has
//! none), always asked for float vectors ([`meshgate_wire::openai::embeddings`] writes the body and
//! reads the answer). An embedding call has no partial answer, so every retryable failure is
//! retried as a completion that failed before its first chunk would be.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use meshgate_catalog::ProviderKind;
use meshgate_proto::sync::v1::{EmbedRequest, EmbedResponse, Vector};
use meshgate_wire::ProviderModel;
use meshgate_wire::openai::embeddings::{self as wire, EmbeddingInput, EmbeddingsRequest, EncodingFormat};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderValue};

use super::{
    BodyFailure, MAX_REQUEST_ID_LEN, Provider, Upstream, error_chain, failed_answer, read_body, send_error,
    timeout_error, unknown_params,
};
use crate::error::Error;

impl Upstream {
    /// Embeds the request's texts or token lists at its provider: request errors (an unknown
    /// provider, one without embeddings, bad inputs) at once, provider failures after the retries
    /// the provider allows.
    pub async fn embed(&self, request: EmbedRequest) -> Result<EmbedResponse, Error> {
        let name = request.provider.trim().to_ascii_lowercase();
        if name.is_empty() {
            return Err(Error::InvalidRequest("provider is required".into()));
        }
        let provider =
            self.inner.providers.get(&name).cloned().ok_or_else(|| Error::UnknownProvider(request.provider.clone()))?;
        if provider.spec.kind == ProviderKind::Anthropic {
            return Err(Error::InvalidRequest(format!(
                "provider '{name}' speaks the Anthropic Messages API, which has no embeddings"
            )));
        }
        let (call, body) = EmbedCall::new(self, provider, request)?;
        let started = Instant::now();
        let result = call.run(body).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(err) => {
                tracing::warn!(provider = %call.provider.spec.name, model = %call.model_label, code = %err.code(), error = %err, "upstream embeddings call failed");
                err.code().as_str()
            }
        };
        let status = call.status.load(Ordering::Relaxed);
        self.inner.metrics.record_call(&call.provider.spec.name, &call.model_label, status, outcome, started.elapsed());
        result
    }
}

/// One embeddings call and what its attempts share.
struct EmbedCall<'a> {
    upstream: &'a Upstream,
    provider: Arc<Provider>,
    request_id: String,
    /// How many vectors the answer must hold.
    inputs: usize,
    dropped: Vec<String>,
    model_label: String,
    timeout: Duration,
    first_byte_timeout: Duration,
    status: AtomicU16,
}

impl<'a> EmbedCall<'a> {
    /// Checks `request` and writes its body.
    fn new(upstream: &'a Upstream, provider: Arc<Provider>, request: EmbedRequest) -> Result<(Self, Bytes), Error> {
        if request.request_id.len() > MAX_REQUEST_ID_LEN || HeaderValue::from_str(&request.request_id).is_err() {
            return Err(Error::InvalidRequest(format!(
                "request_id must be at most {MAX_REQUEST_ID_LEN} visible ASCII characters"
            )));
        }
        if request.timeout_ms < 0 {
            return Err(Error::InvalidRequest(format!("timeout_ms must not be negative (got {})", request.timeout_ms)));
        }
        if request.model.trim().is_empty() {
            return Err(Error::InvalidRequest("model is required".into()));
        }
        let input = match (request.texts.is_empty(), request.tokens.is_empty()) {
            (false, true) => EmbeddingInput::Texts(request.texts),
            (true, false) => EmbeddingInput::Tokens(request.tokens.into_iter().map(|t| t.ids).collect()),
            _ => return Err(Error::InvalidRequest("exactly one of texts and tokens must be given".into())),
        };
        let empty = match &input {
            EmbeddingInput::Texts(texts) => texts.iter().any(String::is_empty),
            EmbeddingInput::Tokens(lists) => lists.iter().any(Vec::is_empty),
        };
        if empty || input.len() > wire::MAX_INPUTS {
            return Err(Error::InvalidRequest(format!("1 to {} inputs, none empty", wire::MAX_INPUTS)));
        }
        let inputs = input.len();
        let embeddings = EmbeddingsRequest {
            model: request.model.clone(),
            input,
            dimensions: (request.dimensions > 0).then_some(request.dimensions),
            encoding_format: EncodingFormat::Float,
            user: request.user,
            extra_json: request.extra_json,
        };
        let model = ProviderModel { unknown_params: unknown_params(&provider.spec), ..ProviderModel::default() };
        let body = wire::provider_body(&embeddings, &request.model, &model)
            .map_err(|err| Error::from_wire(&provider.spec.name, err))?;
        let timeout = match request.timeout_ms {
            0 => provider.timeout,
            ms => Duration::from_millis(ms.unsigned_abs()),
        };
        let model_label = if provider.spec.serves_embeddings(&request.model) { request.model } else { "other".into() };
        let call = Self {
            upstream,
            request_id: if request.request_id.is_empty() {
                uuid::Uuid::new_v4().to_string()
            } else {
                request.request_id
            },
            inputs,
            dropped: body.dropped,
            model_label,
            timeout,
            first_byte_timeout: provider.first_byte_timeout.min(timeout),
            status: AtomicU16::new(0),
            provider,
        };
        Ok((call, Bytes::from(body.body)))
    }

    fn name(&self) -> &str {
        &self.provider.spec.name
    }

    fn timeout_error(&self, first_byte: bool) -> Error {
        timeout_error(self.name(), first_byte, self.first_byte_timeout, self.timeout)
    }

    /// Every attempt, with the waits between them.
    async fn run(&self, body: Bytes) -> Result<EmbedResponse, Error> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut retries = 0;
        loop {
            let err = match self.attempt(body.clone(), deadline).await {
                Ok(answer) => return Ok(answer),
                Err(err) => err,
            };
            let Some(wait) = self.upstream.inner.retry_delay(self.provider.max_retries, &err, retries, deadline) else {
                return Err(err);
            };
            tracing::debug!(provider = %self.name(), error = %err, ?wait, retry = retries + 1, "retrying upstream embeddings call");
            self.upstream
                .inner
                .metrics
                .retries
                .with_label_values(&[self.name(), &self.model_label, err.code().as_str()])
                .inc();
            tokio::time::sleep(wait).await;
            retries += 1;
        }
    }

    /// One request and its answer, read whole.
    async fn attempt(&self, body: Bytes, deadline: tokio::time::Instant) -> Result<EmbedResponse, Error> {
        let first_byte_deadline = (tokio::time::Instant::now() + self.first_byte_timeout).min(deadline);
        let mut builder = self
            .provider
            .client
            .post(self.provider.spec.embeddings_url())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .header("x-request-id", &self.request_id)
            .body(body);
        if let Some((name, value)) = &self.provider.auth {
            builder = builder.header(name, value.clone());
        }
        let response = tokio::time::timeout_at(first_byte_deadline, builder.send())
            .await
            .map_err(|_| self.timeout_error(true))?
            .map_err(|err| send_error(self.name(), &err))?;
        let status = response.status();
        self.status.store(status.as_u16(), Ordering::Relaxed);
        if !status.is_success() {
            return Err(failed_answer(&self.provider.spec, response, deadline).await);
        }
        let max = self.upstream.inner.max_embeddings_bytes;
        let body = read_body(response, max, deadline).await.map_err(|failure| match failure {
            BodyFailure::TooLarge => {
                Error::Protocol { provider: self.name().to_owned(), message: format!("the answer exceeds {max} bytes") }
            }
            BodyFailure::Timeout => self.timeout_error(false),
            BodyFailure::Broken(err) => {
                Error::StreamBroken { provider: self.name().to_owned(), message: error_chain(&err) }
            }
        })?;
        let answer = wire::decode_embeddings(&body, self.inputs).map_err(|err| Error::from_wire(self.name(), err))?;
        Ok(EmbedResponse {
            vectors: answer.vectors.into_iter().map(|values| Vector { values }).collect(),
            usage: Some(answer.usage),
            model: answer.model,
            dropped_params: self.dropped.clone(),
        })
    }
}
