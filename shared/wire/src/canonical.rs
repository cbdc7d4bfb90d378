//! The canonical request every client format parses into, its checks (the same whether it came
//! as OpenAI JSON or over gRPC), and the [`Answer`] a stream of [`CompleteChunk`]s folds into
//! (for JSON replies and traces).

use std::collections::{BTreeMap, HashSet};

use meshgate_proto::common::v1 as pb;
use meshgate_proto::common::v1::content_part::Part;
use meshgate_proto::sync::v1::CompleteChunk;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::WireError;
use crate::text::{check_identifier, check_image_url, check_json_object, check_text};

/// A chat request in the mesh's terms, whichever wire format it arrived in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    /// Roles are `system`, `user`, `assistant` and `tool` (`developer` arrives as `system`).
    pub messages: Vec<pb::ChatMessage>,
    pub sampling: pb::SamplingParams,
    pub options: pb::ChatOptions,
    /// Answer as a stream of events rather than one document.
    pub stream: bool,
    /// Streamed answers end with a usage chunk.
    pub include_usage: bool,
}

/// What a request needs of a model beyond text (`RouteRequest.capabilities`).
pub mod capability {
    pub const TOOLS: &str = "tools";
    pub const VISION: &str = "vision";
    pub const AUDIO: &str = "audio";
    pub const JSON_SCHEMA: &str = "json_schema";
    pub const REASONING: &str = "reasoning";
}

impl ChatRequest {
    /// The capabilities a target's model must have to serve this request: tools when it offers
    /// any, vision for an image part, audio for an audio part, json_schema for structured
    /// output, reasoning for a reasoning effort. Sorted, without repeats.
    pub fn capabilities(&self) -> Vec<&'static str> {
        let mut needed = Vec::new();
        if !self.options.tools.is_empty() {
            needed.push(capability::TOOLS);
        }
        let parts = self.messages.iter().flat_map(|m| &m.parts).filter_map(|p| p.part.as_ref());
        let (mut vision, mut audio) = (false, false);
        for part in parts {
            match part {
                Part::ImageUrl(_) => vision = true,
                Part::InputAudio(_) => audio = true,
                Part::Text(_) | Part::File(_) => {}
            }
        }
        if vision {
            needed.push(capability::VISION);
        }
        if audio {
            needed.push(capability::AUDIO);
        }
        let schema = pb::response_format::Kind::JsonSchema as i32;
        if self.options.response_format.as_ref().is_some_and(|f| f.kind == schema) {
            needed.push(capability::JSON_SCHEMA);
        }
        if !matches!(self.options.reasoning_effort.as_str(), "" | "none") {
            needed.push(capability::REASONING);
        }
        needed.sort_unstable();
        needed
    }
}

/// OpenAI's limits on `metadata`: pairs, key and value length.
const MAX_METADATA_PAIRS: usize = 16;
const MAX_METADATA_KEY_CHARS: usize = 64;
const MAX_METADATA_VALUE_CHARS: usize = 512;
/// OpenAI's limit on stop sequences.
const MAX_STOP_SEQUENCES: usize = 4;
/// OpenAI's limit on choices.
const MAX_CHOICES: i32 = 128;
/// Reasoning efforts a request may ask for.
pub const REASONING_EFFORTS: [&str; 6] = ["none", "minimal", "low", "medium", "high", "xhigh"];

impl ChatRequest {
    /// Checks a request however it arrived, and normalises what has two spellings (`developer`
    /// is the newer name of `system`; the model id is trimmed). Errors name the field as the
    /// OpenAI format spells it (`messages[2].content[1].image_url.url`, `tools[0].function.name`),
    /// which the gRPC contract mirrors. Limits that depend on the project (message count,
    /// `max_tokens` cap) are the caller's.
    pub fn check(&mut self) -> Result<(), WireError> {
        self.check_with(false)
    }

    /// `json_verified`: the JSON documents were parsed already (by the edge's own parser).
    pub(crate) fn check_with(&mut self, json_verified: bool) -> Result<(), WireError> {
        self.check_conversation(json_verified, false)
    }

    /// [`ChatRequest::check_with`]; `continued`: the conversation continues one stored elsewhere
    /// (the Responses API's `previous_response_id`), so a tool result may answer a call made
    /// there, checked once the two are joined.
    pub(crate) fn check_conversation(&mut self, json_verified: bool, continued: bool) -> Result<(), WireError> {
        let trimmed = self.model.trim();
        if trimmed.len() != self.model.len() {
            self.model = trimmed.to_owned();
        }
        check_identifier(|| "model".into(), &self.model, false)?;
        if self.messages.is_empty() && !continued {
            return Err(WireError::invalid("messages", "must contain at least one message"));
        }
        let mut calls_made: HashSet<&str> = HashSet::new();
        for (index, message) in self.messages.iter_mut().enumerate() {
            check_message(index, message)?;
            for call in &message.tool_calls {
                calls_made.insert(&call.id);
            }
            if message.role == "tool" && !continued && !calls_made.contains(message.tool_call_id.as_str()) {
                return Err(WireError::invalid(
                    format!("messages[{index}].tool_call_id"),
                    format!("is {:?}, which no earlier assistant message's tool_calls has", message.tool_call_id),
                ));
            }
        }
        check_sampling(&self.sampling)?;
        check_options(&self.options, json_verified)
    }
}

fn check_message(index: usize, message: &mut pb::ChatMessage) -> Result<(), WireError> {
    let field = |name: &str| format!("messages[{index}].{name}");
    if message.role == "developer" {
        message.role = "system".into();
    }
    if !matches!(message.role.as_str(), "system" | "user" | "assistant" | "tool") {
        return Err(WireError::invalid(
            field("role"),
            format!("is {:?}; expected system, developer, user, assistant or tool", message.role),
        ));
    }
    if !message.parts.is_empty() && !message.content.is_empty() {
        // The contract keeps all of a message's content in one place: the text leads the parts.
        let text = std::mem::take(&mut message.content);
        message.parts.insert(0, pb::ContentPart { part: Some(Part::Text(text)) });
    }
    let role = message.role.as_str();
    check_identifier(|| field("name"), &message.name, true)?;
    check_text(|| field("content"), &message.content)?;
    for (part_index, part) in message.parts.iter().enumerate() {
        check_part(index, part_index, role, part)?;
    }
    if role != "assistant" {
        let misplaced = [
            ("refusal", message.refusal.is_empty()),
            ("reasoning_content", message.reasoning_content.is_empty()),
            ("tool_calls", message.tool_calls.is_empty()),
        ];
        if let Some((name, _)) = misplaced.iter().find(|(_, empty)| !empty) {
            return Err(WireError::invalid(field(name), "belongs to assistant messages only"));
        }
    }
    check_text(|| field("refusal"), &message.refusal)?;
    check_text(|| field("reasoning_content"), &message.reasoning_content)?;
    for (call_index, call) in message.tool_calls.iter().enumerate() {
        let call_field = |name: &str| field(&format!("tool_calls[{call_index}].{name}"));
        check_identifier(|| call_field("id"), &call.id, false)?;
        if !matches!(call.r#type.as_str(), "" | "function") {
            return Err(WireError::invalid(
                call_field("type"),
                format!("is {:?}; only function calls are supported", call.r#type),
            ));
        }
        check_identifier(|| call_field("function.name"), &call.function_name, false)?;
        check_text(|| call_field("function.arguments"), &call.arguments_json)?;
    }
    if role == "tool" {
        check_identifier(|| field("tool_call_id"), &message.tool_call_id, false)?;
    } else if !message.tool_call_id.is_empty() {
        return Err(WireError::invalid(field("tool_call_id"), "belongs to tool messages only"));
    }
    Ok(())
}

/// Whether a message of `role` may carry a part of `kind`.
fn part_allowed(role: &str, part: &Part) -> bool {
    match (role, part) {
        (_, Part::Text(_)) => true,
        ("user", _) => true,
        // Tool results may carry images (screenshots of computer-use agents, charts).
        ("tool", Part::ImageUrl(_)) => true,
        _ => false,
    }
}

fn part_kind(part: &Part) -> &'static str {
    match part {
        Part::Text(_) => "text",
        Part::ImageUrl(_) => "image_url",
        Part::InputAudio(_) => "input_audio",
        Part::File(_) => "file",
    }
}

fn check_part(index: usize, part_index: usize, role: &str, part: &pb::ContentPart) -> Result<(), WireError> {
    let field = |name: &str| format!("messages[{index}].content[{part_index}].{name}");
    let Some(part) = &part.part else {
        return Err(WireError::invalid(format!("messages[{index}].content[{part_index}]"), "is empty"));
    };
    if !part_allowed(role, part) {
        return Err(WireError::invalid(
            field("type"),
            format!("is {:?}, which a {role} message does not take", part_kind(part)),
        ));
    }
    match part {
        Part::Text(text) => check_text(|| field("text"), text),
        Part::ImageUrl(image) => {
            check_image_url(|| field("image_url.url"), &image.url)?;
            if !matches!(image.detail.as_str(), "" | "auto" | "low" | "high") {
                return Err(WireError::invalid(field("image_url.detail"), "must be auto, low or high"));
            }
            Ok(())
        }
        Part::InputAudio(audio) => {
            if audio.data.is_empty() {
                return Err(WireError::invalid(field("input_audio.data"), "must not be empty"));
            }
            check_text(|| field("input_audio.data"), &audio.data)?;
            check_identifier(|| field("input_audio.format"), &audio.format, false)
        }
        Part::File(file) => {
            if file.file_id.is_empty() && file.file_data.is_empty() {
                return Err(WireError::invalid(field("file"), "needs a file_id or file_data"));
            }
            check_identifier(|| field("file.file_id"), &file.file_id, true)?;
            check_identifier(|| field("file.filename"), &file.filename, true)?;
            check_text(|| field("file.file_data"), &file.file_data)
        }
    }
}

fn check_range(field: impl FnOnce() -> String, value: Option<f32>, min: f32, max: f32) -> Result<(), WireError> {
    match value {
        Some(v) if !(min..=max).contains(&v) => {
            Err(WireError::invalid(field(), format!("must be between {min} and {max}")))
        }
        _ => Ok(()),
    }
}

fn check_sampling(sampling: &pb::SamplingParams) -> Result<(), WireError> {
    if let Some(max) = sampling.max_tokens
        && max < 1
    {
        return Err(WireError::invalid("max_tokens", "must be at least 1"));
    }
    check_range(|| "temperature".into(), sampling.temperature, 0.0, 2.0)?;
    if let Some(p) = sampling.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(WireError::invalid("top_p", "must be in (0, 1]"));
    }
    if let Some(k) = sampling.top_k
        && k < 0
    {
        return Err(WireError::invalid("top_k", "must not be negative"));
    }
    if sampling.stop.len() > MAX_STOP_SEQUENCES {
        return Err(WireError::invalid("stop", format!("takes at most {MAX_STOP_SEQUENCES} sequences")));
    }
    for (i, sequence) in sampling.stop.iter().enumerate() {
        if sequence.is_empty() {
            return Err(WireError::invalid(format!("stop[{i}]"), "must not be empty"));
        }
        check_text(|| format!("stop[{i}]"), sequence)?;
    }
    Ok(())
}

fn check_options(options: &pb::ChatOptions, json_verified: bool) -> Result<(), WireError> {
    use pb::tool_choice::Mode;
    let mut names: HashSet<&str> = HashSet::with_capacity(options.tools.len());
    for (index, tool) in options.tools.iter().enumerate() {
        let field = |name: &str| format!("tools[{index}].function.{name}");
        check_identifier(|| field("name"), &tool.name, false)?;
        if !names.insert(&tool.name) {
            return Err(WireError::invalid(
                field("name"),
                format!("repeats the name {:?} of an earlier tool", tool.name),
            ));
        }
        check_text(|| field("description"), &tool.description)?;
        if !tool.parameters_json.is_empty() {
            check_json_object(|| field("parameters"), &tool.parameters_json, json_verified)?;
        }
    }
    if let Some(choice) = &options.tool_choice {
        match Mode::try_from(choice.mode) {
            Ok(Mode::Unspecified | Mode::Auto | Mode::None) => {}
            Ok(Mode::Required) if options.tools.is_empty() => {
                return Err(WireError::invalid("tool_choice", "requires a tool, but the request offers none"));
            }
            Ok(Mode::Required) => {}
            Ok(Mode::Function) if !names.contains(choice.function_name.as_str()) => {
                return Err(WireError::invalid(
                    "tool_choice.function.name",
                    format!("is {:?}, which is not among the tools", choice.function_name),
                ));
            }
            Ok(Mode::Function) => {}
            Err(_) => return Err(WireError::invalid("tool_choice", format!("has an unknown mode {}", choice.mode))),
        }
    }
    if let Some(format) = &options.response_format {
        use pb::response_format::Kind;
        match Kind::try_from(format.kind) {
            Ok(Kind::JsonSchema) => {
                check_identifier(|| "response_format.json_schema.name".into(), &format.name, false)?;
                check_text(|| "response_format.json_schema.description".into(), &format.description)?;
                if !format.schema_json.is_empty() {
                    check_json_object(
                        || "response_format.json_schema.schema".into(),
                        &format.schema_json,
                        json_verified,
                    )?;
                }
            }
            Ok(_) => {}
            Err(_) => {
                return Err(WireError::invalid("response_format.type", format!("has an unknown kind {}", format.kind)));
            }
        }
    }
    if !options.reasoning_effort.is_empty() && !REASONING_EFFORTS.contains(&options.reasoning_effort.as_str()) {
        return Err(WireError::invalid("reasoning_effort", format!("must be one of {}", REASONING_EFFORTS.join(", "))));
    }
    if let Some(n) = options.n
        && !(1..=MAX_CHOICES).contains(&n)
    {
        return Err(WireError::invalid("n", format!("must be between 1 and {MAX_CHOICES}")));
    }
    if let Some(k) = options.top_logprobs {
        if !(0..=20).contains(&k) {
            return Err(WireError::invalid("top_logprobs", "must be between 0 and 20"));
        }
        if options.logprobs != Some(true) {
            return Err(WireError::invalid("top_logprobs", "needs `logprobs: true`"));
        }
    }
    check_range(|| "frequency_penalty".into(), options.frequency_penalty, -2.0, 2.0)?;
    check_range(|| "presence_penalty".into(), options.presence_penalty, -2.0, 2.0)?;
    for (token, bias) in &options.logit_bias {
        if token.is_empty() || token.len() > 20 || !token.bytes().all(|b| b.is_ascii_digit()) {
            return Err(WireError::invalid(format!("logit_bias.{token}"), "must be keyed by token ids (integers)"));
        }
        check_range(|| format!("logit_bias.{token}"), Some(*bias), -100.0, 100.0)?;
    }
    check_identifier(|| "user".into(), &options.user, true)?;
    if options.metadata.len() > MAX_METADATA_PAIRS {
        return Err(WireError::invalid("metadata", format!("takes at most {MAX_METADATA_PAIRS} pairs")));
    }
    for (key, value) in &options.metadata {
        if key.chars().count() > MAX_METADATA_KEY_CHARS || key.chars().any(char::is_control) {
            return Err(WireError::invalid(
                format!("metadata.{key}"),
                format!("keys are at most {MAX_METADATA_KEY_CHARS} characters without control characters"),
            ));
        }
        if value.chars().count() > MAX_METADATA_VALUE_CHARS {
            return Err(WireError::invalid(
                format!("metadata.{key}"),
                format!("values are at most {MAX_METADATA_VALUE_CHARS} characters"),
            ));
        }
        check_text(|| format!("metadata.{key}"), value)?;
    }
    check_identifier(|| "service_tier".into(), &options.service_tier, true)?;
    if !options.extra_json.is_empty() && !json_verified {
        check_json_object(|| "extra_json".into(), &options.extra_json, false)?;
    }
    Ok(())
}

/// A whole answer, folded from its chunks in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answer {
    /// The model that served the answer (the first chunk that names one).
    pub model: String,
    pub content: String,
    pub refusal: String,
    pub reasoning: String,
    /// The tool calls, in index order: the assembled calls of the last chunk when it carries
    /// them, else the calls assembled from their streamed pieces.
    pub tool_calls: Vec<pb::ToolCall>,
    /// As the provider gave it (OpenAI's names); empty until the last chunk.
    pub finish_reason: String,
    pub usage: Option<pb::Usage>,
    /// The answer's token logprobs, when the request asked for them.
    pub logprobs: Option<Logprobs>,
    /// Tool calls as their pieces arrived, by index.
    streamed_calls: BTreeMap<i32, pb::ToolCall>,
    /// Whether `tool_calls` mirrors `streamed_calls`, in index order (no chunk gave the assembled
    /// calls since the last piece). Each piece then extends its mirror in place rather than the
    /// calls being copied again, which made an answer's cost grow with the square of its
    /// streamed arguments.
    mirrors_streamed: bool,
}

/// The logprobs of an answer: one entry per token of the content and of the refusal, each the
/// provider's JSON object (`token`, `logprob`, `bytes`, `top_logprobs`) as it sent it.
#[derive(Debug, Clone, Default)]
pub struct Logprobs {
    pub content: Vec<Box<RawValue>>,
    pub refusal: Vec<Box<RawValue>>,
}

impl PartialEq for Logprobs {
    fn eq(&self, other: &Self) -> bool {
        let same = |a: &[Box<RawValue>], b: &[Box<RawValue>]| a.iter().map(|v| v.get()).eq(b.iter().map(|v| v.get()));
        same(&self.content, &other.content) && same(&self.refusal, &other.refusal)
    }
}

/// A chunk's `logprobs_json`: the choice's logprobs object.
#[derive(Deserialize)]
struct ChunkLogprobs {
    #[serde(default)]
    content: Option<Vec<Box<RawValue>>>,
    #[serde(default)]
    refusal: Option<Vec<Box<RawValue>>>,
}

impl Answer {
    /// Folds one chunk in. A `logprobs_json` that is not a logprobs object is ignored (it came
    /// from the provider and was already relayed as is).
    pub fn push(&mut self, chunk: &CompleteChunk) {
        if self.model.is_empty() && !chunk.model.is_empty() {
            self.model.clone_from(&chunk.model);
        }
        self.content.push_str(&chunk.delta);
        self.refusal.push_str(&chunk.refusal_delta);
        self.reasoning.push_str(&chunk.reasoning_delta);
        if !chunk.tool_call_deltas.is_empty() && !self.mirrors_streamed {
            // The first pieces, or pieces after a chunk that gave the assembled calls: the calls
            // are the streamed ones from here on.
            self.tool_calls = self.streamed_calls.values().cloned().collect();
            self.mirrors_streamed = true;
        }
        for delta in &chunk.tool_call_deltas {
            let new_call = || pb::ToolCall { r#type: "function".into(), ..pb::ToolCall::default() };
            // The call's place in index order (the calls of one answer are few).
            let at = self.streamed_calls.range(..delta.index).count();
            if !self.streamed_calls.contains_key(&delta.index) {
                self.tool_calls.insert(at, new_call());
            }
            apply_delta(self.streamed_calls.entry(delta.index).or_insert_with(new_call), delta);
            apply_delta(&mut self.tool_calls[at], delta);
        }
        if !chunk.tool_calls.is_empty() {
            self.tool_calls.clone_from(&chunk.tool_calls);
            self.mirrors_streamed = false;
        }
        if !chunk.finish_reason.is_empty() {
            self.finish_reason.clone_from(&chunk.finish_reason);
        }
        if chunk.usage.is_some() {
            self.usage.clone_from(&chunk.usage);
        }
        if !chunk.logprobs_json.is_empty()
            && let Ok(piece) = serde_json::from_str::<ChunkLogprobs>(&chunk.logprobs_json)
        {
            let logprobs = self.logprobs.get_or_insert_with(Logprobs::default);
            logprobs.content.extend(piece.content.unwrap_or_default());
            logprobs.refusal.extend(piece.refusal.unwrap_or_default());
        }
    }

    /// The finish reason to report: the provider's, else `tool_calls` when the answer calls
    /// tools, else `stop`.
    pub fn finish_reason_or_default(&self) -> &str {
        match self.finish_reason.as_str() {
            "" if !self.tool_calls.is_empty() => "tool_calls",
            "" => "stop",
            reason => reason,
        }
    }
}

/// One streamed piece of a tool call folded into the call: its id once, name and arguments
/// appended.
fn apply_delta(call: &mut pb::ToolCall, delta: &pb::ToolCallDelta) {
    if call.id.is_empty() {
        call.id.clone_from(&delta.id);
    }
    call.function_name.push_str(&delta.function_name);
    call.arguments_json.push_str(&delta.arguments_delta);
}

impl FromIterator<CompleteChunk> for Answer {
    fn from_iter<I: IntoIterator<Item = CompleteChunk>>(chunks: I) -> Self {
        let mut answer = Answer::default();
        for chunk in chunks {
            answer.push(&chunk);
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(index: i32, id: &str, name: &str, arguments: &str) -> pb::ToolCallDelta {
        pb::ToolCallDelta { index, id: id.into(), function_name: name.into(), arguments_delta: arguments.into() }
    }

    #[test]
    fn answers_fold_text_tools_logprobs_and_usage() {
        let chunks = vec![
            CompleteChunk {
                delta: "Hel".into(),
                model: "served".into(),
                reasoning_delta: "think".into(),
                logprobs_json:
                    r#"{"content":[{"token":"Hel","logprob":-0.1,"bytes":[72],"top_logprobs":[]}],"refusal":null}"#
                        .into(),
                ..Default::default()
            },
            CompleteChunk {
                delta: "lo".into(),
                model: "other".into(),
                tool_call_deltas: vec![delta(1, "call_b", "b", "{\"y\""), delta(0, "call_a", "a", "")],
                ..Default::default()
            },
            CompleteChunk {
                tool_call_deltas: vec![delta(0, "", "", "{}"), delta(1, "", "", ":2}")],
                ..Default::default()
            },
            CompleteChunk {
                finish_reason: "tool_calls".into(),
                usage: Some(pb::Usage { prompt_tokens: 3, completion_tokens: 4, ..Default::default() }),
                ..Default::default()
            },
        ];
        let answer: Answer = chunks.into_iter().collect();
        assert_eq!(
            (answer.model.as_str(), answer.content.as_str(), answer.reasoning.as_str()),
            ("served", "Hello", "think")
        );
        let calls: Vec<_> = answer
            .tool_calls
            .iter()
            .map(|c| (c.id.as_str(), c.function_name.as_str(), c.arguments_json.as_str()))
            .collect();
        assert_eq!(calls, [("call_a", "a", "{}"), ("call_b", "b", "{\"y\":2}")]);
        assert_eq!(answer.finish_reason_or_default(), "tool_calls");
        assert_eq!(answer.usage.as_ref().unwrap().completion_tokens, 4);
        let logprobs = answer.logprobs.unwrap();
        assert_eq!(logprobs.content.len(), 1);
        assert!(logprobs.refusal.is_empty());
    }

    #[test]
    fn the_last_chunks_assembled_calls_win() {
        let mut answer = Answer::default();
        answer.push(&CompleteChunk { tool_call_deltas: vec![delta(0, "c", "f", "{\"a\"")], ..Default::default() });
        let whole = pb::ToolCall {
            id: "c".into(),
            r#type: "function".into(),
            function_name: "f".into(),
            arguments_json: "{\"a\":1}".into(),
        };
        answer.push(&CompleteChunk { tool_calls: vec![whole.clone()], ..Default::default() });
        assert_eq!(answer.tool_calls, [whole]);
        assert_eq!(Answer::default().finish_reason_or_default(), "stop");
    }

    #[test]
    fn capabilities_follow_the_request() {
        let mut chat = ChatRequest::default();
        assert!(chat.capabilities().is_empty());
        chat.options.tools.push(pb::ToolDefinition { name: "f".into(), ..Default::default() });
        chat.options.reasoning_effort = "low".into();
        chat.options.response_format =
            Some(pb::ResponseFormat { kind: pb::response_format::Kind::JsonSchema as i32, ..Default::default() });
        chat.messages.push(pb::ChatMessage {
            role: "user".into(),
            parts: vec![
                pb::ContentPart {
                    part: Some(Part::ImageUrl(pb::ImageUrl { url: "https://x/y.png".into(), ..Default::default() })),
                },
                pb::ContentPart {
                    part: Some(Part::ImageUrl(pb::ImageUrl { url: "https://x/z.png".into(), ..Default::default() })),
                },
            ],
            ..Default::default()
        });
        assert_eq!(chat.capabilities(), ["json_schema", "reasoning", "tools", "vision"]);
    }
}
