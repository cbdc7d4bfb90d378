//! The Responses API's answers: the `response` object ([`response_json`]) and its event stream
//! ([`ResponsesEncoder`]).
//!
//! An answer becomes output items in this order: the reasoning (a `reasoning` item whose text is
//! a `summary_text`: the reasoning text providers return — Anthropic thinking, `reasoning_content`
//! — is what every Responses client shows as a summary), the message (`output_text`, then any
//! `refusal`), then one `function_call` item per tool call. Item ids derive from the response id
//! (`msg_<id>_<position>`, `fc_…`, `rs_…`), so a stored response reads back the same.

use std::collections::BTreeMap;

use bytes::Bytes;
use meshgate_proto::common::v1 as pb;
use meshgate_proto::sync::v1::CompleteChunk;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::request::ResponsesRequest;
use super::stored::StoredTool;
use crate::canonical::Answer;
use crate::sse::write_json_event;

/// What a response object says about itself beyond the answer: its id and time, and what it
/// repeats of the request. Kept with a stored response, so it is serde-serializable.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResponseMeta {
    /// `resp_…`.
    pub id: String,
    /// Unix seconds.
    pub created_at: i64,
    /// The model asked for (the model that served the answer wins when it names itself).
    pub model: String,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    #[serde(default)]
    pub store: bool,
    #[serde(default)]
    pub max_output_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_logprobs: Option<i32>,
    #[serde(default = "default_true")]
    pub parallel_tool_calls: bool,
    #[serde(default)]
    pub tools: Vec<StoredTool>,
    /// `auto`, `none`, `required`, or `function:<name>`.
    #[serde(default)]
    pub tool_choice: String,
    #[serde(default)]
    pub text_format: StoredFormat,
    #[serde(default)]
    pub reasoning_effort: Option<String>,
    #[serde(default)]
    pub reasoning_summary: Option<String>,
    #[serde(default)]
    pub truncation: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub service_tier: Option<String>,
}

fn default_true() -> bool {
    true
}

/// `text.format` as the request gave it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredFormat {
    /// `text`, `json_object` or `json_schema`.
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub schema_json: String,
    #[serde(default)]
    pub strict: Option<bool>,
}

fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_owned())
}

impl ResponseMeta {
    /// The meta of the response `id` created at `created_at` (Unix seconds) for `request`.
    pub fn new(request: &ResponsesRequest, id: impl Into<String>, created_at: i64) -> Self {
        use pb::response_format::Kind;
        use pb::tool_choice::Mode;
        let options = &request.chat.options;
        let tool_choice = match options.tool_choice.as_ref().map(|c| (Mode::try_from(c.mode), c)) {
            Some((Ok(Mode::None), _)) => "none".to_owned(),
            Some((Ok(Mode::Required), _)) => "required".to_owned(),
            Some((Ok(Mode::Function), choice)) => format!("function:{}", choice.function_name),
            _ => "auto".to_owned(),
        };
        let text_format = match options.response_format.as_ref() {
            Some(format) if format.kind == Kind::JsonSchema as i32 => StoredFormat {
                kind: "json_schema".into(),
                name: format.name.clone(),
                description: format.description.clone(),
                schema_json: format.schema_json.clone(),
                strict: format.strict,
            },
            Some(format) if format.kind == Kind::JsonObject as i32 => {
                StoredFormat { kind: "json_object".into(), ..StoredFormat::default() }
            }
            _ => StoredFormat { kind: "text".into(), ..StoredFormat::default() },
        };
        Self {
            id: id.into(),
            created_at,
            model: request.chat.model.clone(),
            instructions: request.instructions.clone(),
            previous_response_id: request.previous_response_id.clone(),
            store: request.store,
            max_output_tokens: request.chat.sampling.max_tokens,
            temperature: request.chat.sampling.temperature,
            top_p: request.chat.sampling.top_p,
            top_logprobs: options.top_logprobs,
            parallel_tool_calls: options.parallel_tool_calls.unwrap_or(true),
            tools: options.tools.iter().map(StoredTool::from).collect(),
            tool_choice,
            text_format,
            reasoning_effort: non_empty(&options.reasoning_effort),
            reasoning_summary: request.reasoning_summary.clone(),
            truncation: request.truncation.clone(),
            user: non_empty(&options.user),
            metadata: options.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            service_tier: non_empty(&options.service_tier),
        }
    }

    /// The id without its `resp_` prefix, the stem of the output items' ids.
    fn stem(&self) -> &str {
        self.id.strip_prefix("resp_").unwrap_or(&self.id)
    }

    fn item_id(&self, prefix: &str, position: usize) -> String {
        format!("{prefix}_{}_{position}", self.stem())
    }
}

// ---------------------------------------------------------------------------------------------
// The response object

/// One item of a response's `output`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum OutputItem {
    Reasoning { id: String, summary: Vec<SummaryText> },
    Message { id: String, status: &'static str, role: &'static str, content: Vec<OutputContent> },
    FunctionCall { id: String, call_id: String, name: String, arguments: String, status: &'static str },
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct SummaryText {
    #[serde(rename = "type")]
    kind: &'static str,
    text: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum OutputContent {
    OutputText { text: String, annotations: [(); 0], logprobs: Vec<Box<RawValue>> },
    Refusal { refusal: String },
}

impl OutputItem {
    fn id(&self) -> &str {
        match self {
            Self::Reasoning { id, .. } | Self::Message { id, .. } | Self::FunctionCall { id, .. } => id,
        }
    }
}

/// The output items of a whole answer (see the module docs for the order).
fn output_of(meta: &ResponseMeta, answer: &Answer, item_status: &'static str) -> Vec<OutputItem> {
    let mut output = Vec::new();
    if !answer.reasoning.is_empty() {
        output.push(OutputItem::Reasoning {
            id: meta.item_id("rs", output.len()),
            summary: vec![SummaryText { kind: "summary_text", text: answer.reasoning.clone() }],
        });
    }
    let mut content = Vec::new();
    let logprobs = answer.logprobs.as_ref().map(|l| l.content.clone()).unwrap_or_default();
    if !answer.content.is_empty() || !logprobs.is_empty() {
        content.push(OutputContent::OutputText { text: answer.content.clone(), annotations: [], logprobs });
    }
    if !answer.refusal.is_empty() {
        content.push(OutputContent::Refusal { refusal: answer.refusal.clone() });
    }
    // An answer of nothing at all is still a (empty) message, as OpenAI answers it.
    if !content.is_empty() || (answer.tool_calls.is_empty() && answer.reasoning.is_empty()) {
        if content.is_empty() {
            content.push(OutputContent::OutputText { text: String::new(), annotations: [], logprobs: Vec::new() });
        }
        output.push(OutputItem::Message {
            id: meta.item_id("msg", output.len()),
            // The last item is the one an incomplete answer cut short.
            status: if answer.tool_calls.is_empty() { item_status } else { "completed" },
            role: "assistant",
            content,
        });
    }
    for call in &answer.tool_calls {
        output.push(OutputItem::FunctionCall {
            id: meta.item_id("fc", output.len()),
            call_id: call.id.clone(),
            name: call.function_name.clone(),
            arguments: call.arguments_json.clone(),
            status: "completed",
        });
    }
    output
}

/// The response's status and, when incomplete, why, from the answer's finish reason.
fn status_of(finish_reason: &str) -> (&'static str, Option<&'static str>) {
    match finish_reason {
        "length" => ("incomplete", Some("max_output_tokens")),
        "content_filter" => ("incomplete", Some("content_filter")),
        _ => ("completed", None),
    }
}

#[derive(Serialize)]
struct ResponseJson<'a> {
    id: &'a str,
    object: &'static str,
    created_at: i64,
    status: &'a str,
    background: bool,
    error: Option<ErrorJson<'a>>,
    incomplete_details: Option<IncompleteJson>,
    instructions: Option<&'a str>,
    max_output_tokens: Option<i64>,
    model: &'a str,
    output: &'a [OutputItem],
    parallel_tool_calls: bool,
    previous_response_id: Option<&'a str>,
    reasoning: ReasoningJson<'a>,
    service_tier: Option<&'a str>,
    store: bool,
    temperature: Option<f32>,
    text: TextJson<'a>,
    tool_choice: ToolChoiceJson<'a>,
    tools: &'a RawValue,
    top_logprobs: Option<i32>,
    top_p: Option<f32>,
    truncation: &'a str,
    usage: Option<UsageJson>,
    user: Option<&'a str>,
    metadata: &'a BTreeMap<String, String>,
}

/// A response's error: the meshgate error code and message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseError {
    pub code: String,
    pub message: String,
}

#[derive(Serialize)]
struct ErrorJson<'a> {
    code: &'a str,
    message: &'a str,
}

#[derive(Serialize)]
struct IncompleteJson {
    reason: &'static str,
}

#[derive(Serialize)]
struct ReasoningJson<'a> {
    effort: Option<&'a str>,
    summary: Option<&'a str>,
}

#[derive(Serialize)]
struct TextJson<'a> {
    format: FormatJson<'a>,
}

#[derive(Serialize)]
struct FormatJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum ToolChoiceJson<'a> {
    Mode(&'a str),
    Function {
        #[serde(rename = "type")]
        kind: &'static str,
        name: &'a str,
    },
}

#[derive(Serialize)]
struct ToolJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'a str,
    description: Option<&'a str>,
    parameters: Option<&'a RawValue>,
    strict: Option<bool>,
}

#[derive(Serialize)]
pub(crate) struct UsageJson {
    input_tokens: i64,
    input_tokens_details: InputDetails,
    output_tokens: i64,
    output_tokens_details: OutputDetails,
    total_tokens: i64,
}

#[derive(Serialize)]
struct InputDetails {
    cached_tokens: i64,
}

#[derive(Serialize)]
struct OutputDetails {
    reasoning_tokens: i64,
}

impl From<&pb::Usage> for UsageJson {
    fn from(usage: &pb::Usage) -> Self {
        Self {
            input_tokens: usage.prompt_tokens,
            input_tokens_details: InputDetails { cached_tokens: usage.cached_prompt_tokens },
            output_tokens: usage.completion_tokens,
            output_tokens_details: OutputDetails { reasoning_tokens: usage.reasoning_tokens },
            total_tokens: usage.tokens(),
        }
    }
}

/// A JSON document kept as text, for embedding as it is (`None` when it is empty or, which a
/// checked request never holds, not JSON).
fn raw(text: &str) -> Option<&RawValue> {
    if text.is_empty() { None } else { serde_json::from_str(text.trim()).ok() }
}

/// What the response object holds beyond the meta.
struct Body<'a> {
    status: &'a str,
    error: Option<&'a ResponseError>,
    incomplete: Option<&'static str>,
    model: &'a str,
    output: &'a [OutputItem],
    usage: Option<UsageJson>,
}

/// The `tools` a response repeats, rendered once (an encoder repeats them in three events).
fn tools_json(meta: &ResponseMeta) -> Box<RawValue> {
    let tools: Vec<ToolJson<'_>> = meta
        .tools
        .iter()
        .map(|tool| ToolJson {
            kind: "function",
            name: &tool.name,
            description: (!tool.description.is_empty()).then_some(tool.description.as_str()),
            parameters: raw(&tool.parameters_json),
            strict: tool.strict,
        })
        .collect();
    serde_json::value::to_raw_value(&tools).expect("tools serialize")
}

fn write_response<T: Serialize>(
    meta: &ResponseMeta,
    tools: &RawValue,
    body: Body<'_>,
    write: impl FnOnce(&ResponseJson<'_>) -> T,
) -> T {
    let tool_choice = match meta.tool_choice.strip_prefix("function:") {
        Some(name) => ToolChoiceJson::Function { kind: "function", name },
        None if meta.tool_choice.is_empty() => ToolChoiceJson::Mode("auto"),
        None => ToolChoiceJson::Mode(&meta.tool_choice),
    };
    let format = &meta.text_format;
    let schema_format = format.kind == "json_schema";
    let response = ResponseJson {
        id: &meta.id,
        object: "response",
        created_at: meta.created_at,
        status: body.status,
        background: false,
        error: body.error.map(|e| ErrorJson { code: &e.code, message: &e.message }),
        incomplete_details: body.incomplete.map(|reason| IncompleteJson { reason }),
        instructions: meta.instructions.as_deref(),
        max_output_tokens: meta.max_output_tokens,
        model: body.model,
        output: body.output,
        parallel_tool_calls: meta.parallel_tool_calls,
        previous_response_id: meta.previous_response_id.as_deref(),
        reasoning: ReasoningJson {
            effort: meta.reasoning_effort.as_deref(),
            summary: meta.reasoning_summary.as_deref(),
        },
        service_tier: meta.service_tier.as_deref(),
        store: meta.store,
        temperature: meta.temperature,
        text: TextJson {
            format: FormatJson {
                kind: if format.kind.is_empty() { "text" } else { &format.kind },
                name: schema_format.then_some(format.name.as_str()),
                description: (schema_format && !format.description.is_empty()).then_some(format.description.as_str()),
                schema: if schema_format { raw(&format.schema_json) } else { None },
                strict: if schema_format { format.strict } else { None },
            },
        },
        tool_choice,
        tools,
        top_logprobs: meta.top_logprobs,
        top_p: meta.top_p,
        truncation: meta.truncation.as_deref().unwrap_or("disabled"),
        usage: body.usage,
        user: meta.user.as_deref(),
        metadata: &meta.metadata,
    };
    write(&response)
}

/// The `response` object of a whole answer.
pub fn response_json(meta: &ResponseMeta, answer: &Answer) -> Vec<u8> {
    let (status, incomplete) = status_of(answer.finish_reason_or_default());
    let output = output_of(meta, answer, if incomplete.is_some() { "incomplete" } else { "completed" });
    let body = Body {
        status,
        error: None,
        incomplete,
        model: if answer.model.is_empty() { &meta.model } else { &answer.model },
        output: &output,
        usage: Some(UsageJson::from(&answer.usage.unwrap_or_default())),
    };
    write_response(meta, &tools_json(meta), body, |response| {
        serde_json::to_vec(response).expect("a response serializes")
    })
}

/// The `response` object of a response that failed (`status: failed`), with what was produced
/// before the failure.
pub fn failed_response_json(meta: &ResponseMeta, answer: &Answer, error: &ResponseError) -> Vec<u8> {
    let output = output_of(meta, answer, "incomplete");
    let output = if answer == &Answer::default() { Vec::new() } else { output };
    let body = Body {
        status: "failed",
        error: Some(error),
        incomplete: None,
        model: if answer.model.is_empty() { &meta.model } else { &answer.model },
        output: &output,
        usage: answer.usage.as_ref().map(UsageJson::from),
    };
    write_response(meta, &tools_json(meta), body, |response| {
        serde_json::to_vec(response).expect("a response serializes")
    })
}

/// The answer to `DELETE /v1/responses/{id}`.
pub fn deleted_json(id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"id": id, "object": "response.deleted", "deleted": true}))
        .expect("a JSON value serializes")
}

// ---------------------------------------------------------------------------------------------
// The event stream

/// Writes a streamed answer as the Responses API's events (each an `event:` line naming its type
/// and a `data:` line whose JSON carries the same `type` and a `sequence_number` from 0):
///
/// - `response.created` and `response.in_progress` before the first piece (with the model that
///   serves it);
/// - per output item, `response.output_item.added`, its pieces and `response.output_item.done`:
///   reasoning as `response.reasoning_summary_part.added`, `response.reasoning_summary_text.delta`
///   / `.done` and `response.reasoning_summary_part.done`; a message's text as
///   `response.content_part.added`, `response.output_text.delta` / `.done` and
///   `response.content_part.done` (a refusal as `response.refusal.delta` / `.done` in a part of its
///   own); a tool call as a `function_call` item with `response.function_call_arguments.delta` /
///   `.done`. An item is done when the next one starts (or the answer ends); a provider that came
///   back to a tool call after starting another gets the late pieces on the call's own
///   `output_index`, where the SDKs accumulate them;
/// - [`ResponsesEncoder::finish`]: `response.completed` (or `response.incomplete`, for an answer
///   cut at its length limit or filtered) with the whole response and its usage;
/// - [`ResponsesEncoder::fail`]: `response.failed`, or an `error` event when no response was
///   created yet.
#[derive(Debug)]
pub struct ResponsesEncoder {
    meta: ResponseMeta,
    /// The meta's tools as the response object repeats them.
    tools: Box<RawValue>,
    sequence: u64,
    started: bool,
    finished: bool,
    items: Vec<OutputItem>,
    /// Whether each item's `output_item.done` went out.
    done: Vec<bool>,
    /// The item pieces go to unless a new item starts.
    open: Option<usize>,
    /// Canonical tool-call index → position in `items`.
    calls: BTreeMap<i32, usize>,
    answer: Answer,
}

#[derive(Serialize)]
struct Event<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    sequence_number: u64,
    #[serde(flatten)]
    body: T,
}

#[derive(Serialize)]
struct ResponseBody<'a, 'b> {
    response: &'a ResponseJson<'b>,
}

#[derive(Serialize)]
struct ItemBody<'a> {
    output_index: usize,
    item: &'a OutputItem,
}

#[derive(Serialize)]
struct PartBody<'a, P: Serialize> {
    item_id: &'a str,
    output_index: usize,
    content_index: usize,
    part: P,
}

#[derive(Serialize)]
struct SummaryPartBody<'a> {
    item_id: &'a str,
    output_index: usize,
    summary_index: usize,
    part: SummaryPart<'a>,
}

#[derive(Serialize)]
struct SummaryPart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Serialize)]
struct TextDeltaBody<'a> {
    item_id: &'a str,
    output_index: usize,
    content_index: usize,
    delta: &'a str,
    logprobs: &'a [Box<RawValue>],
}

#[derive(Serialize)]
struct TextDoneBody<'a> {
    item_id: &'a str,
    output_index: usize,
    content_index: usize,
    text: &'a str,
    logprobs: &'a [Box<RawValue>],
}

#[derive(Serialize)]
struct RefusalDeltaBody<'a> {
    item_id: &'a str,
    output_index: usize,
    content_index: usize,
    delta: &'a str,
}

#[derive(Serialize)]
struct RefusalDoneBody<'a> {
    item_id: &'a str,
    output_index: usize,
    content_index: usize,
    refusal: &'a str,
}

#[derive(Serialize)]
struct SummaryDeltaBody<'a> {
    item_id: &'a str,
    output_index: usize,
    summary_index: usize,
    delta: &'a str,
}

#[derive(Serialize)]
struct SummaryDoneBody<'a> {
    item_id: &'a str,
    output_index: usize,
    summary_index: usize,
    text: &'a str,
}

#[derive(Serialize)]
struct ArgumentsDeltaBody<'a> {
    item_id: &'a str,
    output_index: usize,
    delta: &'a str,
}

#[derive(Serialize)]
struct ArgumentsDoneBody<'a> {
    item_id: &'a str,
    output_index: usize,
    name: &'a str,
    arguments: &'a str,
}

#[derive(Serialize)]
struct ErrorEventBody<'a> {
    code: &'a str,
    message: &'a str,
    param: Option<&'a str>,
}

/// A chunk's content logprobs (its `logprobs_json` is the choice's logprobs object).
#[derive(Deserialize)]
struct ChunkLogprobs {
    #[serde(default)]
    content: Option<Vec<Box<RawValue>>>,
}

impl ResponsesEncoder {
    pub fn new(meta: ResponseMeta) -> Self {
        Self {
            tools: tools_json(&meta),
            meta,
            sequence: 0,
            started: false,
            finished: false,
            items: Vec::new(),
            done: Vec::new(),
            open: None,
            calls: BTreeMap::new(),
            answer: Answer::default(),
        }
    }

    /// The answer folded from the chunks so far (to store the response, trace and charge it).
    pub fn answer(&self) -> &Answer {
        &self.answer
    }

    /// The meta, with the model that served the answer once one named itself.
    pub fn meta(&self) -> &ResponseMeta {
        &self.meta
    }

    /// Whether the stream has ended ([`ResponsesEncoder::finish`] or [`ResponsesEncoder::fail`]).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    fn emit<T: Serialize>(&mut self, out: &mut Vec<u8>, kind: &str, body: T) {
        let event = Event { kind, sequence_number: self.sequence, body };
        self.sequence += 1;
        write_json_event(out, Some(kind), &event);
    }

    fn emit_response(&mut self, out: &mut Vec<u8>, kind: &str, body: Body<'_>) {
        let sequence = self.sequence;
        self.sequence += 1;
        write_response(&self.meta, &self.tools, body, |response| {
            let event = Event { kind, sequence_number: sequence, body: ResponseBody { response } };
            write_json_event(out, Some(kind), &event);
        });
    }

    /// `response.created` and `response.in_progress`, once (the first [`ResponsesEncoder::encode`]
    /// sends them when this was not called).
    pub fn start(&mut self) -> Bytes {
        let mut out = Vec::new();
        self.start_into(&mut out);
        Bytes::from(out)
    }

    fn start_into(&mut self, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let model = self.meta.model.clone();
        for kind in ["response.created", "response.in_progress"] {
            let body =
                Body { status: "in_progress", error: None, incomplete: None, model: &model, output: &[], usage: None };
            self.emit_response(out, kind, body);
        }
    }

    /// The events for one chunk of the answer (possibly none).
    pub fn encode(&mut self, chunk: &CompleteChunk) -> Bytes {
        if self.finished {
            return Bytes::new();
        }
        if !self.started && !chunk.model.is_empty() {
            self.meta.model.clone_from(&chunk.model);
        }
        self.answer.push(chunk);
        let mut out = Vec::new();
        self.start_into(&mut out);
        if !chunk.reasoning_delta.is_empty() {
            self.reasoning(&mut out, &chunk.reasoning_delta);
        }
        let logprobs = (!chunk.logprobs_json.is_empty())
            .then(|| serde_json::from_str::<ChunkLogprobs>(&chunk.logprobs_json).ok())
            .flatten()
            .and_then(|l| l.content)
            .unwrap_or_default();
        if !chunk.delta.is_empty() || !logprobs.is_empty() {
            self.text(&mut out, &chunk.delta, logprobs);
        }
        if !chunk.refusal_delta.is_empty() {
            self.refusal(&mut out, &chunk.refusal_delta);
        }
        for piece in &chunk.tool_call_deltas {
            self.call_piece(&mut out, piece);
        }
        // Calls that arrived whole on the last chunk (a provider or model that does not stream
        // them) go out whole.
        for (index, call) in chunk.tool_calls.iter().enumerate() {
            let index = index as i32;
            if !self.calls.contains_key(&index) {
                let piece = pb::ToolCallDelta {
                    index,
                    id: call.id.clone(),
                    function_name: call.function_name.clone(),
                    arguments_delta: call.arguments_json.clone(),
                };
                self.call_piece(&mut out, &piece);
            }
        }
        Bytes::from(out)
    }

    /// Starts a new item (closing the open one) and announces it.
    fn open_item(&mut self, out: &mut Vec<u8>, item: OutputItem) -> usize {
        if let Some(open) = self.open.take() {
            self.close_item(out, open, "completed");
        }
        let position = self.items.len();
        self.items.push(item);
        self.done.push(false);
        self.open = Some(position);
        let item = self.items[position].clone();
        self.emit(out, "response.output_item.added", ItemBody { output_index: position, item: &item });
        position
    }

    fn reasoning(&mut self, out: &mut Vec<u8>, delta: &str) {
        let position = match self.open {
            Some(open) if matches!(self.items[open], OutputItem::Reasoning { .. }) => open,
            _ => {
                let id = self.meta.item_id("rs", self.items.len());
                let position = self.open_item(out, OutputItem::Reasoning { id: id.clone(), summary: Vec::new() });
                let part = SummaryPart { kind: "summary_text", text: "" };
                let body = SummaryPartBody { item_id: &id, output_index: position, summary_index: 0, part };
                self.emit(out, "response.reasoning_summary_part.added", body);
                if let OutputItem::Reasoning { summary, .. } = &mut self.items[position] {
                    summary.push(SummaryText { kind: "summary_text", text: String::new() });
                }
                position
            }
        };
        if let OutputItem::Reasoning { summary, .. } = &mut self.items[position]
            && let Some(part) = summary.last_mut()
        {
            part.text.push_str(delta);
        }
        let id = self.items[position].id().to_owned();
        let body = SummaryDeltaBody { item_id: &id, output_index: position, summary_index: 0, delta };
        self.emit(out, "response.reasoning_summary_text.delta", body);
    }

    /// The open message, opened with a last part of the kind wanted (`refusal` or not).
    fn message_part(&mut self, out: &mut Vec<u8>, refusal: bool) -> (usize, usize) {
        let position = match self.open {
            Some(open) if matches!(self.items[open], OutputItem::Message { .. }) => open,
            _ => {
                let id = self.meta.item_id("msg", self.items.len());
                let item = OutputItem::Message { id, status: "in_progress", role: "assistant", content: Vec::new() };
                self.open_item(out, item)
            }
        };
        let OutputItem::Message { content, .. } = &self.items[position] else { unreachable!("an open message") };
        let wanted = |c: &OutputContent| matches!(c, OutputContent::Refusal { .. }) == refusal;
        if let Some(last) = content.last()
            && wanted(last)
        {
            return (position, content.len() - 1);
        }
        if !content.is_empty() {
            self.close_part(out, position);
        }
        let part = if refusal {
            OutputContent::Refusal { refusal: String::new() }
        } else {
            OutputContent::OutputText { text: String::new(), annotations: [], logprobs: Vec::new() }
        };
        let OutputItem::Message { id, content, .. } = &mut self.items[position] else {
            unreachable!("an open message")
        };
        let (id, content_index) = (id.clone(), content.len());
        content.push(part.clone());
        let body = PartBody { item_id: &id, output_index: position, content_index, part };
        self.emit(out, "response.content_part.added", body);
        (position, content_index)
    }

    fn text(&mut self, out: &mut Vec<u8>, delta: &str, logprobs: Vec<Box<RawValue>>) {
        let (position, content_index) = self.message_part(out, false);
        let OutputItem::Message { id, content, .. } = &mut self.items[position] else { return };
        let id = id.clone();
        if let Some(OutputContent::OutputText { text, logprobs: kept, .. }) = content.get_mut(content_index) {
            text.push_str(delta);
            kept.extend(logprobs.iter().cloned());
        }
        let body = TextDeltaBody { item_id: &id, output_index: position, content_index, delta, logprobs: &logprobs };
        self.emit(out, "response.output_text.delta", body);
    }

    fn refusal(&mut self, out: &mut Vec<u8>, delta: &str) {
        let (position, content_index) = self.message_part(out, true);
        let OutputItem::Message { id, content, .. } = &mut self.items[position] else { return };
        let id = id.clone();
        if let Some(OutputContent::Refusal { refusal }) = content.get_mut(content_index) {
            refusal.push_str(delta);
        }
        let body = RefusalDeltaBody { item_id: &id, output_index: position, content_index, delta };
        self.emit(out, "response.refusal.delta", body);
    }

    fn call_piece(&mut self, out: &mut Vec<u8>, piece: &pb::ToolCallDelta) {
        let position = match self.calls.get(&piece.index) {
            Some(position) => *position,
            None => {
                let item = OutputItem::FunctionCall {
                    id: self.meta.item_id("fc", self.items.len()),
                    call_id: piece.id.clone(),
                    name: piece.function_name.clone(),
                    arguments: String::new(),
                    status: "in_progress",
                };
                let position = self.open_item(out, item);
                self.calls.insert(piece.index, position);
                position
            }
        };
        if piece.arguments_delta.is_empty() {
            return;
        }
        let OutputItem::FunctionCall { id, arguments, .. } = &mut self.items[position] else { return };
        arguments.push_str(&piece.arguments_delta);
        let id = id.clone();
        let body = ArgumentsDeltaBody { item_id: &id, output_index: position, delta: &piece.arguments_delta };
        self.emit(out, "response.function_call_arguments.delta", body);
    }

    /// The `.done` events of a message's last part.
    fn close_part(&mut self, out: &mut Vec<u8>, position: usize) {
        let OutputItem::Message { id, content, .. } = &self.items[position] else { return };
        let (id, content_index) = (id.clone(), content.len() - 1);
        let part = content[content_index].clone();
        match &part {
            OutputContent::OutputText { text, logprobs, .. } => {
                let body = TextDoneBody { item_id: &id, output_index: position, content_index, text, logprobs };
                self.emit(out, "response.output_text.done", body);
            }
            OutputContent::Refusal { refusal } => {
                let body = RefusalDoneBody { item_id: &id, output_index: position, content_index, refusal };
                self.emit(out, "response.refusal.done", body);
            }
        }
        let body = PartBody { item_id: &id, output_index: position, content_index, part };
        self.emit(out, "response.content_part.done", body);
    }

    fn close_item(&mut self, out: &mut Vec<u8>, position: usize, status: &'static str) {
        if self.done[position] {
            return;
        }
        self.done[position] = true;
        match &self.items[position] {
            OutputItem::Reasoning { id, summary } => {
                let (id, text) = (id.clone(), summary.last().map(|s| s.text.clone()).unwrap_or_default());
                let body = SummaryDoneBody { item_id: &id, output_index: position, summary_index: 0, text: &text };
                self.emit(out, "response.reasoning_summary_text.done", body);
                let part = SummaryPart { kind: "summary_text", text: &text };
                let body = SummaryPartBody { item_id: &id, output_index: position, summary_index: 0, part };
                self.emit(out, "response.reasoning_summary_part.done", body);
            }
            OutputItem::Message { content, .. } => {
                if !content.is_empty() {
                    self.close_part(out, position);
                }
                if let OutputItem::Message { status: item_status, .. } = &mut self.items[position] {
                    *item_status = status;
                }
            }
            OutputItem::FunctionCall { id, name, arguments, .. } => {
                let (id, name, arguments) = (id.clone(), name.clone(), arguments.clone());
                let body =
                    ArgumentsDoneBody { item_id: &id, output_index: position, name: &name, arguments: &arguments };
                self.emit(out, "response.function_call_arguments.done", body);
                if let OutputItem::FunctionCall { status, .. } = &mut self.items[position] {
                    *status = "completed";
                }
            }
        }
        let item = self.items[position].clone();
        self.emit(out, "response.output_item.done", ItemBody { output_index: position, item: &item });
    }

    /// Ends the stream: the open items done, then `response.completed` (or
    /// `response.incomplete`) with the whole response.
    pub fn finish(&mut self) -> Bytes {
        if self.finished {
            return Bytes::new();
        }
        let mut out = Vec::new();
        self.start_into(&mut out);
        self.finished = true;
        let (status, incomplete) = status_of(self.answer.finish_reason_or_default());
        if self.items.is_empty() {
            // An answer of nothing at all is an empty message, as in the response object.
            self.message_part(&mut out, false);
        }
        let item_status = if incomplete.is_some() { "incomplete" } else { "completed" };
        if let Some(open) = self.open.take() {
            self.close_item(&mut out, open, item_status);
        }
        for position in 0..self.items.len() {
            self.close_item(&mut out, position, item_status);
        }
        let kind = if incomplete.is_some() { "response.incomplete" } else { "response.completed" };
        let items = std::mem::take(&mut self.items);
        let model = if self.answer.model.is_empty() { self.meta.model.clone() } else { self.answer.model.clone() };
        let usage = UsageJson::from(&self.answer.usage.unwrap_or_default());
        let body = Body { status, error: None, incomplete, model: &model, output: &items, usage: Some(usage) };
        self.emit_response(&mut out, kind, body);
        self.items = items;
        Bytes::from(out)
    }

    /// Ends the stream with an error (`code` from the error-code table): `response.failed`
    /// with what was produced so far, or an `error` event when the response was never created.
    pub fn fail(&mut self, code: &str, message: &str) -> Bytes {
        if self.finished {
            return Bytes::new();
        }
        self.finished = true;
        let mut out = Vec::new();
        if !self.started {
            self.emit(&mut out, "error", ErrorEventBody { code, message, param: None });
            return Bytes::from(out);
        }
        let error = ResponseError { code: code.to_owned(), message: message.to_owned() };
        let items = std::mem::take(&mut self.items);
        let model = if self.answer.model.is_empty() { self.meta.model.clone() } else { self.answer.model.clone() };
        let usage = self.answer.usage.as_ref().map(UsageJson::from);
        let body =
            Body { status: "failed", error: Some(&error), incomplete: None, model: &model, output: &items, usage };
        self.emit_response(&mut out, "response.failed", body);
        self.items = items;
        Bytes::from(out)
    }
}
