//! `POST /v1/responses` over real HTTP: the `response` object and its event stream, the agent game
//! (function calls and their outputs, structured output, reasoning summaries, the output budget),
//! the requests OpenAI refuses, and the behaviour knobs the other routes honour.

use std::time::Duration;

use meshgate_mock_provider::reply::{prompt_tokens, reasoning_text, reply_text};
use meshgate_mock_provider::{Behavior, MockProvider, PromptCache, StreamFault};
use serde_json::{Value, json};

const PNG_DATA: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(mock: &MockProvider, body: &Value) -> reqwest::Response {
    client().post(format!("{}/responses", mock.base_url())).json(body).send().await.unwrap()
}

async fn ok_json(mock: &MockProvider, body: &Value) -> Value {
    let response = post(mock, body).await;
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// The `(name, data)` events of a Responses stream: each named after its `type`, numbered from 0,
/// and no `[DONE]`.
fn parse_events(text: &str) -> Vec<(String, Value)> {
    let events: Vec<(String, Value)> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').unwrap();
            let name = name.strip_prefix("event: ").unwrap().to_owned();
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], name.as_str());
            (name, data)
        })
        .collect();
    for (n, (_, data)) in events.iter().enumerate() {
        assert_eq!(data["sequence_number"], n, "{data}");
    }
    assert!(!text.contains("[DONE]"));
    events
}

async fn events(mock: &MockProvider, body: &Value) -> Vec<(String, Value)> {
    let response = post(mock, body).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    parse_events(&response.text().await.unwrap())
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(name, _)| name.as_str()).collect()
}

/// The 400 of a refused request: its `param` (checked to be OpenAI's error shape).
async fn refused(mock: &MockProvider, body: &Value) -> Value {
    let response = post(mock, body).await;
    assert_eq!(response.status(), 400, "{body}");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    assert!(error["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{error}");
    error
}

/// Output items without their ids (which differ from one request to the next).
fn without_ids(output: &Value) -> Value {
    let mut output = output.clone();
    for item in output.as_array_mut().unwrap() {
        item.as_object_mut().unwrap().remove("id");
        item.as_object_mut().unwrap().remove("call_id");
    }
    output
}

fn weather_tool() -> Value {
    json!({
        "type": "function",
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
            },
            "required": ["city", "unit"],
            "additionalProperties": false
        },
        "strict": true
    })
}

fn search_tool() -> Value {
    json!({"type": "function", "name": "search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string", "minLength": 6}}, "required": ["query"]
    }})
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_response_has_the_responses_shape_and_costs_what_chat_costs() {
    let mock = MockProvider::start().await.unwrap();
    let body = json!({"model": "gpt-test", "instructions": "you are terse", "input": "hello there big world",
        "temperature": 0.5, "store": false, "metadata": {"job": "7"}});
    let reply = ok_json(&mock, &body).await;
    assert!(reply["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(reply["object"], "response");
    assert!(reply["created_at"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!((reply["status"].as_str(), &reply["incomplete_details"]), (Some("completed"), &Value::Null));
    assert_eq!(reply["model"], "gpt-test");
    let output = reply["output"].as_array().unwrap();
    assert_eq!(output.len(), 1, "{reply}");
    assert!(output[0]["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(
        without_ids(&reply["output"]),
        json!([{"type": "message", "status": "completed", "role": "assistant", "content": [
            {"type": "output_text", "text": "echo: hello there big world", "annotations": [], "logprobs": []}
        ]}])
    );
    let prompt = prompt_tokens(["you are terse", "hello there big world"]);
    assert_eq!(
        reply["usage"],
        json!({"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + 5})
    );
    // The request's settings come back, with OpenAI's defaults for the rest.
    assert_eq!(reply["instructions"], "you are terse");
    assert_eq!((reply["temperature"].as_f64(), reply["top_p"].as_f64()), (Some(0.5), Some(1.0)));
    assert_eq!((&reply["store"], &reply["metadata"]), (&json!(false), &json!({"job": "7"})));
    assert_eq!((&reply["tool_choice"], &reply["tools"]), (&json!("auto"), &json!([])));
    assert_eq!(reply["text"]["format"], json!({"type": "text"}));
    assert_eq!((&reply["parallel_tool_calls"], &reply["max_output_tokens"]), (&json!(true), &Value::Null));
    assert_eq!(reply["reasoning"], json!({"effort": null, "summary": null}));

    // The same conversation costs the same as items, and through Chat Completions.
    let items = json!({"model": "gpt-test", "input": [
        {"type": "message", "role": "system", "content": "you are terse"},
        {"role": "user", "content": [{"type": "input_text", "text": "hello there big world"}]}
    ]});
    assert_eq!(ok_json(&mock, &items).await["usage"]["input_tokens"], prompt);
    let chat = json!({"model": "gpt-test", "messages": [
        {"role": "system", "content": "you are terse"}, user("hello there big world")
    ]});
    let chat: Value = client()
        .post(format!("{}/chat/completions", mock.base_url()))
        .json(&chat)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(chat["usage"]["prompt_tokens"], prompt);
    let stats = mock.stats();
    assert_eq!((stats.responses_requests, stats.chat_requests, stats.completions), (2, 1, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_events_come_in_openais_order_and_end_with_the_json_response() {
    let mock = MockProvider::start().await.unwrap();
    let mut body = json!({"model": "gpt-test", "instructions": "you are terse", "input": "hello there big world"});
    let json = ok_json(&mock, &body).await;
    body["stream"] = json!(true);
    let events = events(&mock, &body).await;
    assert_eq!(
        names(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    let created = &events[0].1["response"];
    assert_eq!(
        (created["status"].as_str(), &created["output"], &created["usage"]),
        (Some("in_progress"), &json!([]), &Value::Null)
    );
    assert_eq!(created["instructions"], "you are terse");
    assert_eq!(events[1].1["response"], *created);

    let added = &events[2].1;
    let item_id = added["item"]["id"].as_str().unwrap();
    assert_eq!(added["output_index"], 0);
    assert_eq!(
        added["item"],
        json!({"type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []})
    );
    assert_eq!(events[3].1["part"], json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []}));
    for (_, data) in &events[3..11] {
        assert_eq!(
            (data["item_id"].as_str(), &data["output_index"], &data["content_index"]),
            (Some(item_id), &json!(0), &json!(0))
        );
    }
    let deltas: Vec<&str> = events[4..9].iter().map(|(_, d)| d["delta"].as_str().unwrap()).collect();
    assert_eq!(deltas, ["echo:", " hello", " there", " big", " world"]);
    assert_eq!(events[9].1["text"], "echo: hello there big world");
    assert_eq!(events[10].1["part"]["text"], "echo: hello there big world");
    assert_eq!(events[11].1["item"]["status"], "completed");
    assert_eq!(events[11].1["item"]["content"], json["output"][0]["content"]);

    // The final event carries the whole response: what the JSON answer says.
    let completed = &events[12].1["response"];
    assert_eq!((completed["id"].as_str(), completed["status"].as_str()), (created["id"].as_str(), Some("completed")));
    assert_eq!(completed["usage"], json["usage"]);
    assert_eq!(without_ids(&completed["output"]), without_ids(&json["output"]));
    assert_eq!(completed["output"][0]["id"], item_id);
    assert_eq!(mock.stats().completions, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_calls_then_their_outputs_answered_with_text() {
    let mock = MockProvider::start().await.unwrap();
    let question = user("weather in Paris and news about it");
    let body = json!({"model": "gpt-test", "input": [question], "tools": [weather_tool(), search_tool()]});
    let reply = ok_json(&mock, &body).await;
    assert_eq!(reply["status"], "completed");
    let calls = reply["output"].as_array().unwrap().clone();
    assert_eq!(calls.len(), 2, "one call per tool: {reply}");
    for call in &calls {
        assert_eq!((call["type"].as_str(), call["status"].as_str()), (Some("function_call"), Some("completed")));
        assert!(call["id"].as_str().unwrap().starts_with("fc_"));
        assert!(call["call_id"].as_str().unwrap().starts_with("call_"));
    }
    let arguments = |call: &Value| serde_json::from_str::<Value>(call["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(
        (calls[0]["name"].as_str(), arguments(&calls[0])),
        (Some("get_weather"), json!({"city": "city", "unit": "celsius"}))
    );
    assert_eq!((calls[1]["name"].as_str(), arguments(&calls[1])), (Some("search"), json!({"query": "queryx"})));
    let fragments: usize = calls.iter().map(|c| c["arguments"].as_str().unwrap().chars().count().div_ceil(4)).sum();
    assert_eq!(reply["usage"]["output_tokens"], fragments);
    // The tools come back as given, strict unless they say otherwise.
    assert_eq!(reply["tools"][0], weather_tool());
    assert_eq!(reply["tools"][1]["strict"], true);

    // The calls and their outputs go back, as the SDKs replay them; the answer echoes the outputs.
    let mut input = vec![question.clone()];
    input.extend(calls.iter().cloned());
    input.push(json!({"type": "function_call_output", "call_id": calls[0]["call_id"], "output": "21C and sunny"}));
    input.push(json!({"type": "function_call_output", "call_id": calls[1]["call_id"],
        "output": [{"type": "input_text", "text": "no news"}]}));
    let follow_up = json!({"model": "gpt-test", "input": input, "tools": [weather_tool(), search_tool()]});
    let answer = ok_json(&mock, &follow_up).await;
    assert_eq!(answer["output"].as_array().unwrap().len(), 1);
    assert_eq!(answer["output"][0]["content"][0]["text"], reply_text("21C and sunny no news", 0, None));
    // The assistant turn (both calls) is one message and each output one, as in Chat Completions.
    let expected = prompt_tokens(["weather in Paris and news about it", "", "21C and sunny", "no news"]);
    assert_eq!(answer["usage"]["input_tokens"], expected);

    // Streamed: each call is an item whose arguments arrive in fragments.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = events(&mock, &streamed).await;
    let mut assembled: Vec<(String, String)> = Vec::new();
    for (name, data) in &events {
        match name.as_str() {
            "response.output_item.added" => {
                assert_eq!(data["output_index"], assembled.len());
                assert_eq!(
                    (data["item"]["arguments"].as_str(), data["item"]["status"].as_str()),
                    (Some(""), Some("in_progress"))
                );
                assembled.push((data["item"]["id"].as_str().unwrap().to_owned(), String::new()));
            }
            "response.function_call_arguments.delta" => {
                let index = assembled.len() - 1;
                let (id, arguments) = &mut assembled[index];
                assert_eq!((data["item_id"].as_str(), &data["output_index"]), (Some(id.as_str()), &json!(index)));
                arguments.push_str(data["delta"].as_str().unwrap());
            }
            "response.function_call_arguments.done" => {
                let (_, arguments) = assembled.last().unwrap();
                assert_eq!(data["arguments"], arguments.as_str());
                assert_eq!(data["name"], calls[assembled.len() - 1]["name"]);
            }
            "response.output_item.done" => assert_eq!(data["item"]["arguments"], assembled.last().unwrap().1.as_str()),
            _ => {}
        }
    }
    let streamed: Vec<Value> = assembled.iter().map(|(_, a)| serde_json::from_str(a).unwrap()).collect();
    assert_eq!(streamed, [arguments(&calls[0]), arguments(&calls[1])]);
    let deltas = names(&events).iter().filter(|n| **n == "response.function_call_arguments.delta").count();
    let completed = &events.last().unwrap().1["response"];
    assert_eq!(completed["usage"]["output_tokens"], deltas);
    assert_eq!(without_ids(&completed["output"]), without_ids(&reply["output"]));

    // One call when parallel calls are off, the named one when named, none for `none`.
    let mut single = body.clone();
    single["parallel_tool_calls"] = json!(false);
    let names_of = |reply: &Value| -> Vec<String> {
        reply["output"].as_array().unwrap().iter().filter_map(|i| i["name"].as_str().map(str::to_owned)).collect()
    };
    assert_eq!(names_of(&ok_json(&mock, &single).await), ["get_weather"]);
    let mut named = body.clone();
    named["tool_choice"] = json!({"type": "function", "name": "search"});
    let forced = ok_json(&mock, &named).await;
    assert_eq!(names_of(&forced), ["search"]);
    assert_eq!(forced["tool_choice"], json!({"type": "function", "name": "search"}));
    let mut allowed = body.clone();
    allowed["tool_choice"] =
        json!({"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "search"}]});
    assert_eq!(names_of(&ok_json(&mock, &allowed).await), ["search"]);
    let mut none = body.clone();
    none["tool_choice"] = json!("none");
    let text = ok_json(&mock, &none).await;
    assert_eq!(text["output"][0]["content"][0]["text"], "echo: weather in Paris and news about it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_format_answers_an_instance_of_the_schema() {
    let mock = MockProvider::start().await.unwrap();
    let format = json!({"type": "json_schema", "name": "person", "strict": true, "schema": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 18},
            "emails": {"type": "array", "items": {"type": "string", "format": "email"}}},
        "required": ["name", "age", "emails"],
        "additionalProperties": false
    }});
    let mut body = json!({"model": "gpt-test", "input": "extract the person", "text": {"format": format}});
    let reply = ok_json(&mock, &body).await;
    let text = reply["output"][0]["content"][0]["text"].as_str().unwrap().to_owned();
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        json!({"name": "name", "age": 18, "emails": ["mock@example.com"]})
    );
    assert_eq!(reply["text"]["format"], format);
    assert_eq!(reply["usage"]["output_tokens"], text.chars().count().div_ceil(4));

    body["stream"] = json!(true);
    let events = events(&mock, &body).await;
    let streamed: String = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text);

    let object = json!({"model": "gpt-test", "input": "say hi", "text": {"format": {"type": "json_object"}}});
    let reply = ok_json(&mock, &object).await;
    let content: Value = serde_json::from_str(reply["output"][0]["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(content, json!({"reply": "echo: say hi"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_effort_brings_a_reasoning_summary_before_the_answer() {
    let mock = MockProvider::start().await.unwrap();
    let mut body =
        json!({"model": "o-test", "input": "why is the sky blue", "reasoning": {"effort": "low", "summary": "auto"}});
    let reply = ok_json(&mock, &body).await;
    let thinking = reasoning_text("why is the sky blue", "low");
    let output = reply["output"].as_array().unwrap();
    assert_eq!(output.len(), 2);
    assert!(output[0]["id"].as_str().unwrap().starts_with("rs_"));
    assert_eq!(output[0]["type"], "reasoning");
    assert_eq!(output[0]["summary"], json!([{"type": "summary_text", "text": thinking}]));
    assert_eq!(output[1]["content"][0]["text"], "echo: why is the sky blue");
    assert_eq!(reply["usage"]["output_tokens"], 4 + 6);
    assert_eq!(reply["usage"]["output_tokens_details"]["reasoning_tokens"], 4);
    assert_eq!(reply["reasoning"], json!({"effort": "low", "summary": "auto"}));

    body["stream"] = json!(true);
    let events = events(&mock, &body).await;
    assert_eq!(
        names(&events)[2..11],
        [
            "response.output_item.added",
            "response.reasoning_summary_part.added",
            "response.reasoning_summary_text.delta",
            "response.reasoning_summary_text.delta",
            "response.reasoning_summary_text.delta",
            "response.reasoning_summary_text.delta",
            "response.reasoning_summary_text.done",
            "response.reasoning_summary_part.done",
            "response.output_item.done"
        ]
    );
    assert_eq!(events[2].1["item"]["summary"], json!([]));
    let reasoning_id = events[2].1["item"]["id"].as_str().unwrap();
    for (_, data) in &events[3..10] {
        assert_eq!(
            (data["item_id"].as_str(), &data["output_index"], &data["summary_index"]),
            (Some(reasoning_id), &json!(0), &json!(0))
        );
    }
    let streamed: String = events[4..8].iter().map(|(_, d)| d["delta"].as_str().unwrap()).collect();
    assert_eq!(streamed, thinking);
    assert_eq!(events[8].1["text"], thinking.as_str());
    assert_eq!(events[9].1["part"], json!({"type": "summary_text", "text": thinking}));
    assert_eq!(events[10].1["item"]["summary"], output[0]["summary"]);
    assert_eq!((events[11].0.as_str(), &events[11].1["output_index"]), ("response.output_item.added", &json!(1)));
    assert_eq!(events.last().unwrap().1["response"]["usage"], reply["usage"]);

    let bad = json!({"model": "o-test", "input": "x", "reasoning": {"effort": "maximum"}});
    let error = refused(&mock, &bad).await;
    assert_eq!(
        (error["error"]["param"].as_str(), error["error"]["code"].as_str()),
        (Some("reasoning.effort"), Some("invalid_value"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_output_tokens_cuts_the_answer_as_incomplete() {
    let mock = MockProvider::start().await.unwrap();
    let long = (1..=30).map(|n| format!("w{n}")).collect::<Vec<_>>().join(" ");
    let mut body = json!({"model": "gpt-test", "input": long, "max_output_tokens": 16});
    let reply = ok_json(&mock, &body).await;
    assert_eq!(reply["status"], "incomplete");
    assert_eq!(reply["incomplete_details"], json!({"reason": "max_output_tokens"}));
    assert_eq!(reply["max_output_tokens"], 16);
    assert_eq!(reply["output"][0]["status"], "incomplete");
    assert_eq!(reply["output"][0]["content"][0]["text"], reply_text(&long, 0, Some(16)));
    assert_eq!(reply["usage"]["output_tokens"], 16);

    body["stream"] = json!(true);
    let events = events(&mock, &body).await;
    let (name, last) = events.last().unwrap();
    assert_eq!(name, "response.incomplete");
    assert_eq!(last["response"]["status"], "incomplete");
    assert_eq!(last["response"]["usage"], reply["usage"]);
    assert_eq!(events.iter().filter(|(n, _)| n == "response.output_text.delta").count(), 16);
    assert_eq!(events[events.len() - 2].1["item"]["status"], "incomplete");

    // Enough budget: complete.
    body["stream"] = json!(false);
    body["max_output_tokens"] = json!(64);
    assert_eq!(ok_json(&mock, &body).await["status"], "completed");
    // Below OpenAI's minimum of 16: refused.
    body["max_output_tokens"] = json!(15);
    let error = refused(&mock, &body).await;
    assert_eq!(
        (error["error"]["param"].as_str(), error["error"]["code"].as_str()),
        (Some("max_output_tokens"), Some("integer_below_min_value"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_openai_refuses_are_refused_naming_the_param() {
    let mock = MockProvider::start().await.unwrap();
    let call = json!({"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"});
    let output = |id: &str| json!({"type": "function_call_output", "call_id": id, "output": "21C"});
    let with_input = |input: Value| json!({"model": "gpt-test", "input": input, "tools": [weather_tool()]});
    let with = |key: &str, value: Value| {
        let mut body = with_input(json!([user("hi")]));
        body[key] = value;
        body
    };
    let cases = [
        // A function_call_output answering no earlier call, and a call left unanswered.
        (with_input(json!([user("hi"), output("call_9")])), "input", Some("call_9")),
        (with_input(json!([user("hi"), output("call_1"), call])), "input", Some("call_1")),
        (with_input(json!([user("hi"), call, user("again")])), "input", Some("No tool output found")),
        (with_input(json!([{"role": "tool", "content": "x"}])), "input[0].role", None),
        (with_input(json!([{"type": "web_search_call", "id": "ws_1"}, user("hi")])), "input[0].type", None),
        (
            with_input(json!([
                user("hi"),
                {"role": "assistant", "content": [{"type": "input_text", "text": "x"}]},
                user("more")
            ])),
            "input[1].content[0].type",
            Some("'output_text', 'refusal'"),
        ),
        (
            with_input(json!([{"role": "user", "content": [{"type": "input_image", "image_url": "ftp://x/cat.png"}]}])),
            "input[0].content[0].image_url",
            None,
        ),
        (with("tool_choice", json!({"type": "function", "name": "nope"})), "tool_choice", Some("nope")),
        (with("tool_choice", json!({"type": "web_search_preview"})), "tool_choice.type", None),
        (
            with("tools", json!([weather_tool(), {"type": "web_search_preview"}])),
            "tools[1].type",
            Some("web_search_preview"),
        ),
        // A Chat Completions tool: the name is not where the Responses API wants it.
        (with("tools", json!([{"type": "function", "function": {"name": "get_weather"}}])), "tools[0].name", None),
        (with("tools", json!([{"type": "function", "name": "get weather"}])), "tools[0].name", None),
        (
            with("tools", json!([{"type": "function", "name": "f", "parameters": {"type": "string"}}])),
            "tools[0].parameters",
            None,
        ),
        (
            with("text", json!({"format": {"type": "json_schema", "schema": {"type": "object"}}})),
            "text.format.name",
            None,
        ),
        (with("text", json!({"format": {"type": "json_schema", "name": "x"}})), "text.format.schema", None),
        (with("text", json!({"format": {"type": "yaml"}})), "text.format.type", None),
        (with("previous_response_id", json!("resp_1")), "previous_response_id", Some("resp_1")),
        (with("temperature", json!(3)), "temperature", None),
        (json!({"input": "hi"}), "model", None),
        (json!({"model": "gpt-test"}), "input", None),
    ];
    for (body, param, mentions) in cases {
        let error = refused(&mock, &body).await;
        assert_eq!(error["error"]["param"], param, "{body} -> {error}");
        if let Some(text) = mentions {
            assert!(error["error"]["message"].as_str().unwrap().contains(text), "{error}");
        }
    }
    let error = refused(&mock, &with("previous_response_id", json!("resp_1"))).await;
    assert_eq!(error["error"]["code"], "previous_response_not_found");
    let error = refused(&mock, &with_input(json!([user("hi"), output("call_9")]))).await;
    assert_eq!(error["error"]["message"], "No tool call found for function call output with call_id call_9.");
    assert_eq!(mock.stats().succeeded, 0, "nothing was answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_auth_cache_and_context_window_apply_to_responses() {
    let behavior = Behavior { api_key: Some("sk-mock".into()), ..Behavior::default() };
    let mock = MockProvider::start_with(behavior).await.unwrap();
    let url = format!("{}/responses", mock.base_url());
    let body = json!({"model": "gpt-test", "input": "one two three four five six"});
    let missing = client().post(&url).json(&body).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    let wrong = client().post(&url).bearer_auth("sk-other").json(&body).send().await.unwrap();
    assert_eq!(wrong.json::<Value>().await.unwrap()["error"]["code"], "invalid_api_key");
    let azure = client().post(&url).header("api-key", "sk-mock").json(&body).send().await.unwrap();
    assert_eq!(azure.status(), 200);
    assert_eq!(mock.stats().unauthorized, 2);
    let send = || client().post(&url).bearer_auth("sk-mock").json(&body).send();

    mock.set_failures(1.0, 429);
    let limited = send().await.unwrap();
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "1");
    assert_eq!(limited.json::<Value>().await.unwrap()["error"]["code"], "rate_limit_exceeded");
    mock.set_failures(0.0, 500);
    mock.fail_next(1);
    let failed = send().await.unwrap();
    assert_eq!(failed.status(), 500);
    assert_eq!(failed.json::<Value>().await.unwrap()["error"]["type"], "server_error");
    assert_eq!(send().await.unwrap().status(), 200);
    assert_eq!(mock.stats().injected_failures, 2);

    // Cache reads are reported among the input tokens.
    let prompt = prompt_tokens(["one two three four five six"]);
    mock.update(|b| b.prompt_cache = Some(PromptCache { read_tokens: 5, write_tokens: 3 }));
    let reply: Value = send().await.unwrap().json().await.unwrap();
    assert_eq!(reply["usage"]["input_tokens"], prompt);
    assert_eq!(reply["usage"]["input_tokens_details"]["cached_tokens"], 5);

    mock.update(|b| b.context_window = Some(prompt - 1));
    let too_long = send().await.unwrap();
    assert_eq!(too_long.status(), 400);
    let error: Value = too_long.json().await.unwrap();
    assert_eq!(
        (error["error"]["code"].as_str(), error["error"]["param"].as_str()),
        (Some("context_length_exceeded"), Some("input"))
    );

    mock.update(|b| {
        b.context_window = None;
        b.latency = Duration::from_millis(100);
    });
    let started = std::time::Instant::now();
    assert_eq!(send().await.unwrap().status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(100));
}

/// A stream broken after two pieces: its events, and whether the transport failed.
async fn broken_stream(fault: StreamFault) -> (Vec<(String, Value)>, bool, u64) {
    let behavior = Behavior { fail_after_chunks: Some(2), stream_fault: fault, ..Behavior::default() };
    let mock = MockProvider::start_with(behavior).await.unwrap();
    let mut response =
        post(&mock, &json!({"model": "gpt-test", "input": "hello there big world", "stream": true})).await;
    assert_eq!(response.status(), 200);
    let mut raw = Vec::new();
    let mut transport_error = false;
    loop {
        match response.chunk().await {
            Ok(Some(bytes)) => raw.extend_from_slice(&bytes),
            Ok(None) => break,
            Err(_) => {
                transport_error = true;
                break;
            }
        }
    }
    (parse_events(&String::from_utf8(raw).unwrap()), transport_error, mock.stats().completions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_faults_cut_the_stream_before_its_final_event() {
    let head = [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
    ];
    let (events, transport_error, completions) = broken_stream(StreamFault::Abort).await;
    assert!(transport_error);
    assert_eq!(names(&events), head);
    assert_eq!(completions, 0);

    let (events, transport_error, completions) = broken_stream(StreamFault::ErrorEvent).await;
    assert!(!transport_error);
    assert_eq!(names(&events)[..6], head);
    let (name, error) = events.last().unwrap();
    assert_eq!((name.as_str(), error["code"].as_str()), ("error", Some("server_error")));
    assert_eq!(events.len(), 7);
    assert_eq!(completions, 0);

    let (events, transport_error, completions) = broken_stream(StreamFault::Close).await;
    assert!(!transport_error);
    assert_eq!(names(&events), head);
    assert_eq!(completions, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_idempotency_keys_are_replayed() {
    let mock =
        MockProvider::start_with(Behavior { honour_idempotency_keys: true, ..Behavior::default() }).await.unwrap();
    let body = json!({"model": "gpt-test", "input": "hello there", "stream": true});
    let send = |key: &'static str| {
        client().post(format!("{}/responses", mock.base_url())).header("idempotency-key", key).json(&body).send()
    };
    let first = send("job-1").await.unwrap();
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first = parse_events(&first.text().await.unwrap());
    mock.fail_next(1);
    // A replay does no new work, so no injected failure draws it.
    let again = send("job-1").await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again = parse_events(&again.text().await.unwrap());
    assert_eq!(names(&again), names(&first));
    assert_eq!(
        again.last().unwrap().1["response"]["output"][0]["content"],
        first.last().unwrap().1["response"]["output"][0]["content"]
    );
    assert_eq!(mock.count_for_idempotency_key("job-1"), 2, "both requests arrived");
    assert_eq!(mock.completions_for_idempotency_key("job-1"), 1, "the work was done once");
    let stats = mock.stats();
    assert_eq!((stats.completions, stats.idempotent_replays, stats.injected_failures), (1, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_recorded_with_images_and_unknown_parameters() {
    let mock = MockProvider::start().await.unwrap();
    let data_uri = format!("data:image/png;base64,{PNG_DATA}");
    let body = json!({
        "model": "gpt-test",
        "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "what is in these images"},
            {"type": "input_image", "image_url": "https://example.com/cat.png", "detail": "low"},
            {"type": "input_image", "image_url": data_uri},
            {"type": "input_file", "filename": "a.pdf", "file_data": "data:application/pdf;base64,aGk="}
        ]}],
        "store": false, "include": ["reasoning.encrypted_content"], "user": "u-1", "service_tier": "auto",
        "truncation": "auto", "metadata": {"k": "v"}, "top_k": 40, "chat_template_kwargs": {"x": 1}
    });
    let reply = client()
        .post(format!("{}/responses", mock.base_url()))
        .header("x-request-id", "req-r")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let reply: Value = reply.json().await.unwrap();
    assert_eq!(reply["output"][0]["content"][0]["text"], "echo: what is in these images");
    assert_eq!(reply["usage"]["input_tokens"], prompt_tokens(["what is in these images"]));
    assert_eq!((reply["user"].as_str(), reply["truncation"].as_str()), (Some("u-1"), Some("auto")));

    let recorded = mock.last_request().unwrap();
    assert_eq!(recorded.path, "/v1/responses");
    assert_eq!(recorded.request_id.as_deref(), Some("req-r"));
    assert_eq!(recorded.images(), ["https://example.com/cat.png".to_owned(), data_uri]);
    assert_eq!(recorded.unknown_parameters(), ["chat_template_kwargs", "top_k"]);
    let listed: Value =
        client().get(format!("http://{}/_mock/requests", mock.addr())).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed[0]["path"], "/v1/responses");
    assert_eq!(listed[0]["body"], body);
    assert_eq!(listed[0]["unknown_parameters"], json!(["chat_template_kwargs", "top_k"]));
    assert_eq!(mock.count_for_request_id("req-r"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_meshgate_sends_is_answered_as_a_stream() {
    // What meshgate's Responses provider body looks like: typed items, a replayed round trip,
    // streaming and nothing stored.
    let mock = MockProvider::start().await.unwrap();
    let body = json!({
        "model": "gpt-test",
        "input": [
            {"type": "message", "role": "system", "content": "You read receipts."},
            {"type": "message", "role": "user", "content": "Is it warm in Nice?"},
            {"type": "message", "role": "assistant", "content": "Checking."},
            {"type": "function_call", "call_id": "call_sea", "name": "get_weather", "arguments": "{\"city\":\"Nice\"}"},
            {"type": "function_call_output", "call_id": "call_sea", "output": "23C"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "And in Brest?"}]}
        ],
        "stream": true,
        "store": false,
        "max_output_tokens": 1000,
        "tools": [weather_tool()],
        "tool_choice": "auto",
        "parallel_tool_calls": true,
        "text": {"verbosity": "low"},
        "reasoning": {"effort": "minimal"}
    });
    let events = events(&mock, &body).await;
    let kinds: Vec<&str> = events
        .iter()
        .filter(|(n, _)| n == "response.output_item.done")
        .map(|(_, d)| d["item"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["reasoning", "function_call"]);
    let (name, completed) = events.last().unwrap();
    assert_eq!(name, "response.completed");
    let response = &completed["response"];
    assert_eq!((response["store"].as_bool(), response["text"]["verbosity"].as_str()), (Some(false), Some("low")));
    assert_eq!(response["output"][1]["name"], "get_weather");
    // The assistant turn (its message and its call) is one message, as in Chat Completions.
    let expected = prompt_tokens(["You read receipts.", "Is it warm in Nice?", "Checking.", "23C", "And in Brest?"]);
    assert_eq!(response["usage"]["input_tokens"], expected);
    assert_eq!(response["usage"]["output_tokens_details"]["reasoning_tokens"], 2);
}
