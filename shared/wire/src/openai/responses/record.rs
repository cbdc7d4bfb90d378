//! Stored responses (`store: true`): the [`ResponseRecord`] the gateway keeps per project, what
//! `GET /v1/responses/{id}` answers from it, and how a request with `previous_response_id`
//! continues its conversation ([`ResponsesRequest::continue_from`]).

use serde::{Deserialize, Serialize};

use super::reply::{ResponseError, ResponseMeta, failed_response_json, response_json};
use super::request::ResponsesRequest;
use super::stored::{StoredMessage, StoredToolCall, StoredUsage};
use crate::canonical::Answer;
use crate::error::WireError;
use crate::origin::MessageOrigin;

/// Version of the record's layout, for readers of records written by other versions.
pub const RECORD_VERSION: u32 = 1;

/// One stored response: the conversation as the model saw it and the answer it gave. Serialized
/// as JSON (serde) by the gateway's store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseRecord {
    pub version: u32,
    /// The response's id, time, model and what it repeats of its request.
    pub meta: ResponseMeta,
    /// The conversation the answer continues: the previous responses' conversations and answers,
    /// then this request's input. The instructions are not part of it (they are not carried
    /// over to the next response).
    pub conversation: Vec<StoredMessage>,
    pub answer: StoredAnswer,
    /// `completed`, `incomplete` or `failed`.
    pub status: String,
    /// Why the response failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ResponseError>,
}

/// An [`Answer`] as kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredAnswer {
    /// The model that served it.
    pub model: String,
    #[serde(default)]
    pub content: String,
    #[serde(default)]
    pub refusal: String,
    #[serde(default)]
    pub reasoning: String,
    #[serde(default)]
    pub tool_calls: Vec<StoredToolCall>,
    #[serde(default)]
    pub finish_reason: String,
    #[serde(default)]
    pub usage: Option<StoredUsage>,
}

impl From<&Answer> for StoredAnswer {
    fn from(answer: &Answer) -> Self {
        Self {
            model: answer.model.clone(),
            content: answer.content.clone(),
            refusal: answer.refusal.clone(),
            reasoning: answer.reasoning.clone(),
            tool_calls: answer.tool_calls.iter().map(StoredToolCall::from).collect(),
            finish_reason: answer.finish_reason.clone(),
            usage: answer.usage.as_ref().map(StoredUsage::from),
        }
    }
}

impl StoredAnswer {
    /// The answer as it was folded (its logprobs are not kept).
    pub fn to_answer(&self) -> Answer {
        let mut answer = Answer::default();
        answer.model.clone_from(&self.model);
        answer.content.clone_from(&self.content);
        answer.refusal.clone_from(&self.refusal);
        answer.reasoning.clone_from(&self.reasoning);
        answer.tool_calls = self.tool_calls.iter().map(Into::into).collect();
        answer.finish_reason.clone_from(&self.finish_reason);
        answer.usage = self.usage.map(Into::into);
        answer
    }

    /// The answer as the assistant message a next response replays.
    fn message(&self) -> StoredMessage {
        StoredMessage {
            role: "assistant".into(),
            content: self.content.clone(),
            tool_calls: self.tool_calls.clone(),
            refusal: self.refusal.clone(),
            reasoning_content: self.reasoning.clone(),
            ..StoredMessage::default()
        }
    }
}

/// The request's conversation without its instructions.
fn conversation_of(request: &ResponsesRequest) -> Vec<StoredMessage> {
    let skip = usize::from(request.instructions.is_some());
    request.chat.messages.iter().skip(skip).map(StoredMessage::from).collect()
}

impl ResponseRecord {
    /// The record of `request` answered with `answer`.
    pub fn new(request: &ResponsesRequest, meta: ResponseMeta, answer: &Answer) -> Self {
        let status = match answer.finish_reason_or_default() {
            "length" | "content_filter" => "incomplete",
            _ => "completed",
        };
        Self {
            version: RECORD_VERSION,
            meta,
            conversation: conversation_of(request),
            answer: StoredAnswer::from(answer),
            status: status.to_owned(),
            error: None,
        }
    }

    /// The record of `request` that failed with `error` (`code` from the error-code table) after
    /// producing `answer` (possibly nothing).
    pub fn failed(request: &ResponsesRequest, meta: ResponseMeta, answer: &Answer, error: ResponseError) -> Self {
        Self {
            version: RECORD_VERSION,
            meta,
            conversation: conversation_of(request),
            answer: StoredAnswer::from(answer),
            status: "failed".to_owned(),
            error: Some(error),
        }
    }

    /// The `response` object, as the request that made it was answered.
    pub fn response_json(&self) -> Vec<u8> {
        let answer = self.answer.to_answer();
        match &self.error {
            Some(error) => failed_response_json(&self.meta, &answer, error),
            None => response_json(&self.meta, &answer),
        }
    }

    /// The conversation a response continuing this one starts from: this one's and its answer.
    /// A failed response adds nothing of its own answer.
    pub fn continued_conversation(&self) -> Vec<StoredMessage> {
        let mut messages = self.conversation.clone();
        if self.error.is_none() {
            messages.push(self.answer.message());
        }
        messages
    }
}

impl ResponsesRequest {
    /// Joins the conversation of `previous` (the response named by `previous_response_id`,
    /// read by the caller from the caller's project) before this request's input, after its
    /// instructions, and checks the whole: a tool result of the input may answer a call of the
    /// previous response.
    pub fn continue_from(&mut self, previous: &ResponseRecord) -> Result<(), WireError> {
        let earlier = previous.continued_conversation();
        let at = usize::from(self.instructions.is_some());
        let count = earlier.len();
        self.chat.messages.splice(at..at, earlier.iter().map(Into::into));
        let origins = (0..count).map(|_| MessageOrigin::of("previous_response_id", ""));
        self.origins.messages.splice(at..at, origins);
        self.check(false)
    }
}
