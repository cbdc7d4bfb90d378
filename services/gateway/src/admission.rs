//! One admission for every way a request arrives (HTTP, gRPC, a queued job): the project's limits,
//! the models the key and the project allow, and the security policy's screening, whose redacted
//! text is what leaves the gateway. A chat request that passes becomes the request path's
//! [`ChatCall`]; one a rule blocks is refused with its trace recorded (a security event).

use std::sync::Arc;
use std::time::Instant;

use meshgate_policy::SanitizedHeaders;
use meshgate_runtime::{ApiError, ErrorCode};
use meshgate_wire::ChatRequest;
use meshgate_wire::openai::embeddings::{EmbeddingInput, EmbeddingsRequest};

use crate::auth::Caller;
use crate::guard::{Guard, Security};
use crate::openai::{ChatLimits, check_limits};
use crate::orchestrator::{AllowedModels, ChatCall, EmbedCall, Orchestrator};
use crate::settings::ProjectSettings;

/// Texts one embeddings request may carry at most (OpenAI's limit, as the wire parser holds it).
pub const MAX_EMBEDDING_INPUTS: usize = meshgate_wire::openai::embeddings::MAX_INPUTS;

/// What an admitted request needs of the gateway.
#[derive(Clone)]
pub struct Admission {
    pub orchestrator: Arc<Orchestrator>,
    pub guard: Guard,
    /// The gateway's ceilings; a project's limits may only lower them.
    pub limits: ChatLimits,
}

/// Facts about a request that are not in its body.
pub struct RequestFacts {
    /// The gateway's own id of the request (keys quota and the trace).
    pub request_id: String,
    pub trace_id: String,
    pub started: Instant,
    /// The request's headers with credentials removed, for the trace.
    pub headers: SanitizedHeaders,
    /// What the client's wire format carried that no provider receives, for the trace.
    pub unforwarded: Vec<String>,
}

/// An embeddings request that may run: its model and its (redacted) inputs.
impl Admission {
    /// Admits a checked chat request (`ChatRequest::check`, which parsing runs) of `caller` in a
    /// project with `settings`.
    pub async fn chat(
        &self,
        caller: &Caller,
        settings: &ProjectSettings,
        mut chat: ChatRequest,
        facts: RequestFacts,
    ) -> Result<ChatCall, ApiError> {
        check_limits(&chat, settings.chat_limits(self.limits))?;
        caller.require_model(&chat.model)?;
        settings.check_model(&chat.model)?;
        // From here on `chat` holds what may leave the gateway: redacted where the policy says so.
        let screened = self.guard.screen_chat(&settings.policy, &mut chat).await;
        let security = Security {
            engine: Some(settings.policy.clone()),
            prompt: screened.outcome.findings,
            risk: screened.outcome.risk,
            headers: facts.headers,
            tools_offered: chat.options.tools.iter().map(|tool| tool.name.clone()).collect(),
        };
        let call = ChatCall {
            request_id: facts.request_id,
            trace_id: facts.trace_id,
            principal: caller.principal.clone(),
            allowed: AllowedModels::new([caller.scopes.models.as_slice(), settings.limits.allowed_models.as_slice()]),
            chat,
            started: facts.started,
            security,
            unforwarded: facts.unforwarded,
        };
        match screened.blocked {
            Some(err) => {
                self.orchestrator.refuse(&call, err.clone());
                Err(err)
            }
            None => Ok(call),
        }
    }

    /// Admits a parsed embeddings request of `caller` (the wire parser checked its shape): the
    /// models the key and the project allow, then the policy over its texts, which are data for
    /// an encoder that follows no instructions, so every rule but prompt injection applies. Token
    /// ids are no text meshgate can read and are not scanned (as the bytes of a `data:` image
    /// are not).
    pub fn embeddings(
        &self,
        caller: &Caller,
        settings: &ProjectSettings,
        mut request: EmbeddingsRequest,
        (request_id, trace_id, started): (String, String, Instant),
    ) -> Result<EmbedCall, ApiError> {
        request.model = request.model.trim().to_owned();
        if request.model.is_empty() {
            return Err(ApiError::new(ErrorCode::InvalidRequest, "model is required"));
        }
        caller.require_model(&request.model)?;
        settings.check_model(&request.model)?;
        let mut risk = 0;
        if let EmbeddingInput::Texts(texts) = &mut request.input {
            check_inputs(texts)?;
            let screened = self.guard.screen_inputs(&settings.policy, texts);
            if let Some(err) = screened.blocked {
                return Err(err);
            }
            risk = screened.outcome.risk;
        }
        Ok(EmbedCall {
            request_id,
            trace_id,
            principal: caller.principal.clone(),
            allowed: AllowedModels::new([caller.scopes.models.as_slice(), settings.limits.allowed_models.as_slice()]),
            request,
            started,
            risk,
        })
    }
}

/// 1 to [`MAX_EMBEDDING_INPUTS`] texts, none empty.
fn check_inputs(inputs: &[String]) -> Result<(), ApiError> {
    let invalid = |message: String| ApiError::new(ErrorCode::InvalidRequest, message);
    if inputs.is_empty() || inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(invalid(format!("input must hold 1 to {MAX_EMBEDDING_INPUTS} texts")));
    }
    if let Some(i) = inputs.iter().position(String::is_empty) {
        return Err(invalid(format!("input[{i}] is an empty string")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_inputs_are_one_to_the_limit_and_never_empty() {
        let texts = |n: usize| vec!["x".to_owned(); n];
        check_inputs(&texts(1)).unwrap();
        check_inputs(&texts(MAX_EMBEDDING_INPUTS)).unwrap();
        for bad in [texts(0), texts(MAX_EMBEDDING_INPUTS + 1), vec!["a".into(), String::new()]] {
            assert_eq!(check_inputs(&bad).unwrap_err().code, ErrorCode::InvalidRequest, "{} inputs", bad.len());
        }
        assert!(check_inputs(&["a".into(), String::new()]).unwrap_err().message.contains("input[1]"));
    }
}
