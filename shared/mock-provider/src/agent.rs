//! What the mock answers, whatever the wire format: text, structured JSON or tool calls, with
//! reasoning first when it was asked for (the rules are in the crate documentation).

use serde_json::Value;

use crate::reply::{self, Echo, REASONING_PREFIX, argument_fragments, completion_plan};
use crate::schema;
use crate::state::Behavior;

/// A tool the request offers.
pub(crate) struct Tool<'a> {
    pub name: &'a str,
    pub parameters: Option<&'a Value>,
}

/// Whether and which tool the model must call.
#[derive(Clone, Copy)]
pub(crate) enum ToolMode<'a> {
    Auto,
    None,
    Required,
    Named(&'a str),
}

/// The shape the request asks the answer to take.
#[derive(Clone, Copy)]
pub(crate) enum Output<'a> {
    Text,
    JsonObject,
    JsonSchema(&'a Value),
}

/// The facts of a request the answer depends on, read from either wire format.
pub(crate) struct Request<'a> {
    pub tools: Vec<Tool<'a>>,
    pub tool_mode: ToolMode<'a>,
    pub parallel_tool_calls: bool,
    /// The conversation ends in a user turn (not in tool results).
    pub ends_in_user_turn: bool,
    pub output: Output<'a>,
    /// Reasoning pieces to produce before the answer.
    pub reasoning_pieces: usize,
    /// The text the answer echoes: the last user message, or the tool results the conversation
    /// ends with.
    pub echo_source: String,
    pub max_tokens: Option<u64>,
}

/// One tool call of the answer.
pub(crate) struct PlannedCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// The answer's main part.
pub(crate) enum Body {
    Text,
    Json(String),
    ToolCalls(Vec<PlannedCall>),
}

/// Why the answer ends.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    Stop,
    Length,
    ToolCalls,
}

impl Finish {
    pub(crate) fn openai(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ToolCalls => "tool_calls",
        }
    }

    pub(crate) fn anthropic(self) -> &'static str {
        match self {
            Self::Stop => "end_turn",
            Self::Length => "max_tokens",
            Self::ToolCalls => "tool_use",
        }
    }
}

/// The whole answer, decided before the first byte is sent.
pub(crate) struct Plan {
    pub echo: Echo,
    /// The reasoning pieces' source, when the request asked for reasoning.
    pub reasoning: Option<Echo>,
    pub reasoning_pieces: usize,
    pub body: Body,
    /// Body pieces (completion tokens besides the reasoning).
    pub body_pieces: usize,
    pub finish: Finish,
}

impl Plan {
    /// Decides the answer; `call_id` names each tool call.
    pub(crate) fn new(request: Request<'_>, behavior: &Behavior, mut call_id: impl FnMut() -> String) -> Self {
        // A zero budget is the mock's empty reply: no pieces, finish reason "length".
        let max_tokens = if behavior.empty_replies { Some(0) } else { request.max_tokens };
        let calls = if behavior.empty_replies {
            Vec::new()
        } else if let Some(call) = &behavior.tool_call {
            vec![(call.name.clone(), call.arguments.clone())]
        } else {
            tool_calls(&request)
        };
        let body = if !calls.is_empty() {
            Body::ToolCalls(
                calls.into_iter().map(|(name, arguments)| PlannedCall { id: call_id(), name, arguments }).collect(),
            )
        } else if behavior.empty_replies {
            Body::Text
        } else {
            match request.output {
                Output::Text => Body::Text,
                Output::JsonObject => Body::Json(reply::json_object_text(&request.echo_source)),
                Output::JsonSchema(schema) => Body::Json(schema::instance(schema).to_string()),
            }
        };
        let reasoning =
            (request.reasoning_pieces > 0).then(|| Echo::with_prefix(request.echo_source.clone(), REASONING_PREFIX));
        let echo = Echo::new(request.echo_source);
        let (body_pieces, finish) = match &body {
            Body::Text => {
                let (count, finish) = completion_plan(echo.len(), behavior.stream_chunks, max_tokens);
                (count, if finish == "length" { Finish::Length } else { Finish::Stop })
            }
            Body::Json(json) => {
                let natural = argument_fragments(json).count();
                match max_tokens {
                    Some(max) if (max as usize) < natural => (max as usize, Finish::Length),
                    _ => (natural, Finish::Stop),
                }
            }
            Body::ToolCalls(calls) => {
                (calls.iter().map(|c| argument_fragments(&c.arguments).count()).sum(), Finish::ToolCalls)
            }
        };
        Self { reasoning, echo, reasoning_pieces: request.reasoning_pieces, body, body_pieces, finish }
    }

    /// Completion tokens: reasoning and body pieces.
    pub(crate) fn completion_tokens(&self) -> u64 {
        (self.reasoning_pieces + self.body_pieces) as u64
    }

    /// The reasoning text, when there is some.
    pub(crate) fn reasoning_text(&self) -> Option<String> {
        self.reasoning.as_ref().map(|reasoning| reasoning.text(self.reasoning_pieces))
    }

    /// The pieces a non-tool answer streams, one completion token each: echo pieces, or fragments
    /// of the JSON document.
    pub(crate) fn content_pieces(&self) -> impl Iterator<Item = String> + '_ {
        let (count, json) = match &self.body {
            Body::Text => (self.body_pieces, None),
            Body::Json(json) => (self.body_pieces, Some(argument_fragments(json))),
            Body::ToolCalls(_) => (0, None),
        };
        let mut json = json.into_iter().flatten();
        (0..count).map(move |i| match json.next() {
            Some(fragment) => fragment.to_owned(),
            None => self.echo.piece(i).to_string(),
        })
    }

    /// The text or JSON content of a non-tool answer (cut at the budget for JSON too).
    pub(crate) fn content(&self) -> Option<String> {
        match &self.body {
            Body::Text => Some(self.echo.text(self.body_pieces)),
            Body::Json(json) => Some(argument_fragments(json).take(self.body_pieces).collect()),
            Body::ToolCalls(_) => None,
        }
    }
}

/// The calls a request gets: none, the named tool, or the tools offered (all, or the first when
/// parallel calls are off).
fn tool_calls(request: &Request<'_>) -> Vec<(String, String)> {
    if request.tools.is_empty() {
        return Vec::new();
    }
    let call = |tool: &Tool<'_>| (tool.name.to_owned(), schema::arguments(tool.parameters).to_string());
    match request.tool_mode {
        ToolMode::None => Vec::new(),
        ToolMode::Named(name) => {
            let parameters = request.tools.iter().find(|t| t.name == name).and_then(|t| t.parameters);
            vec![call(&Tool { name, parameters })]
        }
        ToolMode::Auto if !request.ends_in_user_turn => Vec::new(),
        ToolMode::Auto | ToolMode::Required => {
            let count = if request.parallel_tool_calls { request.tools.len() } else { 1 };
            request.tools.iter().take(count).map(call).collect()
        }
    }
}
