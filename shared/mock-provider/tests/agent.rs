//! The agent game over real HTTP: tool calls from the offered schemas, tool results answered with
//! text, structured output, images, reasoning, cache usage, context overflow, unknown parameters
//! and the conversations providers refuse — in the OpenAI and the Anthropic format.

use std::collections::BTreeMap;

use meshgate_mock_provider::reply::{prompt_tokens, reasoning_text, reply_text};
use meshgate_mock_provider::{Behavior, MockProvider, PromptCache, StreamFault};
use serde_json::{Value, json};

const PNG_DATA: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

async fn post(mock: &MockProvider, path: &str, body: &Value) -> reqwest::Response {
    let request = reqwest::Client::new().post(format!("{}{path}", mock.base_url())).json(body);
    let request = if path == "/messages" {
        request.header("anthropic-version", "2023-06-01").header("x-api-key", "sk-ant")
    } else {
        request
    };
    request.send().await.unwrap()
}

async fn ok_json(mock: &MockProvider, path: &str, body: &Value) -> Value {
    let response = post(mock, path, body).await;
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// The `data:` payloads of an OpenAI stream, `[DONE]` checked and removed.
async fn openai_chunks(mock: &MockProvider, body: &Value) -> Vec<Value> {
    let text = post(mock, "/chat/completions", body).await.text().await.unwrap();
    let mut events: Vec<&str> =
        text.split("\n\n").filter(|e| !e.is_empty()).map(|e| e.strip_prefix("data: ").unwrap()).collect();
    assert_eq!(events.pop(), Some("[DONE]"), "{text}");
    events.into_iter().map(|e| serde_json::from_str(e).unwrap()).collect()
}

/// `(event name, data)` of an Anthropic stream.
async fn anthropic_events(mock: &MockProvider, body: &Value) -> Vec<(String, Value)> {
    let text = post(mock, "/messages", body).await.text().await.unwrap();
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').unwrap();
            let name = name.strip_prefix("event: ").unwrap().to_owned();
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], name.as_str());
            (name, data)
        })
        .collect()
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7}
            },
            "required": ["city", "unit"],
            "additionalProperties": false
        },
        "strict": true
    }})
}

fn search_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "minLength": 6},
                "filters": {"type": "object", "properties": {"recent": {"type": "boolean"}, "max_results": {"type": "number", "maximum": 1}}},
                "sites": {"type": "array", "items": {"type": "string", "format": "uri"}}
            },
            "required": ["query"]
        }
    }})
}

fn weather_arguments() -> Value {
    json!({"city": "city", "unit": "celsius", "days": 1})
}

fn search_arguments() -> Value {
    json!({"query": "queryx", "filters": {"recent": true, "max_results": 1.0}, "sites": ["https://example.com/"]})
}

fn agent_body(messages: Value) -> Value {
    json!({"model": "gpt-test", "messages": messages, "tools": [weather_tool(), search_tool()]})
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

/// The calls of a JSON reply as `(id, name, arguments)`.
fn calls(reply: &Value) -> Vec<(String, String, Value)> {
    reply["choices"][0]["message"]["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            assert_eq!(c["type"], "function");
            let arguments = serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
            (c["id"].as_str().unwrap().to_owned(), c["function"]["name"].as_str().unwrap().to_owned(), arguments)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offered_tools_are_called_with_arguments_from_their_schemas_then_results_are_answered() {
    let mock = MockProvider::start().await.unwrap();
    let question = user("weather in Paris and news about it");
    let reply = ok_json(&mock, "/chat/completions", &agent_body(json!([question]))).await;
    assert_eq!(reply["choices"][0]["finish_reason"], "tool_calls");
    assert!(reply["choices"][0]["message"]["content"].is_null());
    let made = calls(&reply);
    assert_eq!(made.len(), 2, "one call per tool");
    assert_eq!((made[0].1.as_str(), &made[0].2), ("get_weather", &weather_arguments()));
    assert_eq!((made[1].1.as_str(), &made[1].2), ("search", &search_arguments()));
    assert!(made[0].0.starts_with("call_") && made[0].0 != made[1].0);
    let fragments: usize = made.iter().map(|(_, _, a)| a.to_string().chars().count().div_ceil(4)).sum();
    assert_eq!(reply["usage"]["completion_tokens"], fragments as u64);

    // The results go back; the answer is text that mentions them.
    let assistant = reply["choices"][0]["message"].clone();
    let conversation = json!([
        question,
        assistant,
        {"role": "tool", "tool_call_id": made[0].0, "content": "21C and sunny"},
        {"role": "tool", "tool_call_id": made[1].0, "content": "no news"}
    ]);
    let answer = ok_json(&mock, "/chat/completions", &agent_body(conversation.clone())).await;
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer["choices"][0]["message"]["content"], reply_text("21C and sunny no news", 0, None));
    assert!(answer["choices"][0]["message"].get("tool_calls").is_none());

    // `required` calls again whatever the conversation ends with; `none` never calls.
    let mut required = agent_body(conversation);
    required["tool_choice"] = json!("required");
    assert_eq!(calls(&ok_json(&mock, "/chat/completions", &required).await).len(), 2);
    let mut none = agent_body(json!([user("hi")]));
    none["tool_choice"] = json!("none");
    let reply = ok_json(&mock, "/chat/completions", &none).await;
    assert_eq!(reply["choices"][0]["message"]["content"], "echo: hi");
    assert_eq!(mock.stats().succeeded, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_choice_and_parallel_calls_off_make_one_call() {
    let mock = MockProvider::start().await.unwrap();
    let mut named = agent_body(json!([user("look it up")]));
    named["tool_choice"] = json!({"type": "function", "function": {"name": "search"}});
    let made = calls(&ok_json(&mock, "/chat/completions", &named).await);
    assert_eq!(made.iter().map(|c| (c.1.as_str(), &c.2)).collect::<Vec<_>>(), [("search", &search_arguments())]);

    let mut single = agent_body(json!([user("look it up")]));
    single["parallel_tool_calls"] = json!(false);
    let made = calls(&ok_json(&mock, "/chat/completions", &single).await);
    assert_eq!(made.iter().map(|c| c.1.as_str()).collect::<Vec<_>>(), ["get_weather"]);

    let mut allowed = agent_body(json!([user("look it up")]));
    allowed["tool_choice"] = json!({"type": "allowed_tools", "allowed_tools": {
        "mode": "required", "tools": [{"type": "function", "function": {"name": "search"}}]
    }});
    let made = calls(&ok_json(&mock, "/chat/completions", &allowed).await);
    assert_eq!(made.iter().map(|c| c.1.as_str()).collect::<Vec<_>>(), ["search"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_tool_calls_start_with_index_id_and_name_then_fragments() {
    let mock = MockProvider::start().await.unwrap();
    let mut body = agent_body(json!([user("weather and news")]));
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = openai_chunks(&mock, &body).await;
    // Reassembled by index, as clients do; each call's id and name come before its arguments.
    let mut assembled: BTreeMap<u64, (String, String, String)> = BTreeMap::new();
    let mut fragments = 0;
    for chunk in &chunks {
        let Some(choice) = chunk["choices"].get(0) else { continue };
        for delta in choice["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let index = delta["index"].as_u64().unwrap();
            if let Some(id) = delta["id"].as_str() {
                assert!(!assembled.contains_key(&index), "one start per call");
                assert_eq!(delta["type"], "function");
                let name = delta["function"]["name"].as_str().unwrap().to_owned();
                assert_eq!(delta["function"]["arguments"], "");
                assembled.insert(index, (id.to_owned(), name, String::new()));
            } else {
                assert!(delta.get("id").is_none() && delta["function"].get("name").is_none());
                let call = assembled.get_mut(&index).expect("arguments follow the start of their call");
                call.2.push_str(delta["function"]["arguments"].as_str().unwrap());
                fragments += 1;
            }
        }
    }
    let streamed: Vec<(&str, Value)> =
        assembled.values().map(|(_, name, args)| (name.as_str(), serde_json::from_str(args).unwrap())).collect();
    assert_eq!(streamed, [("get_weather", weather_arguments()), ("search", search_arguments())]);
    assert!(assembled[&0].0.starts_with("call_"));
    assert!(chunks[0]["choices"][0]["delta"]["content"].is_null());
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], fragments);

    // A break after five pieces cuts inside the calls; the pieces before it all arrived.
    mock.update(|b| {
        b.fail_after_chunks = Some(5);
        b.stream_fault = StreamFault::Close;
    });
    let text = post(&mock, "/chat/completions", &body).await.text().await.unwrap();
    let argument_deltas = text.matches("\"arguments\":\"").count() - text.matches("\"arguments\":\"\"").count();
    assert_eq!(argument_deltas, 5);
    assert!(!text.contains("[DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_and_json_object_replies_are_valid_json() {
    let mock = MockProvider::start().await.unwrap();
    let schema = json!({
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 18}, "emails": {"type": "array", "items": {"type": "string", "format": "email"}}},
        "required": ["name", "age", "emails"],
        "additionalProperties": false
    });
    let expected = json!({"name": "name", "age": 18, "emails": ["mock@example.com"]});
    let mut body = json!({
        "model": "gpt-test",
        "messages": [user("extract the person")],
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": true}}
    });
    let reply = ok_json(&mock, "/chat/completions", &body).await;
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(serde_json::from_str::<Value>(content).unwrap(), expected);
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");

    body["stream"] = json!(true);
    let streamed: String = openai_chunks(&mock, &body)
        .await
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(streamed, content);

    // A budget too small for the document cuts it with finish reason "length", as providers do.
    body["stream"] = json!(false);
    body["max_tokens"] = json!(3);
    let cut = ok_json(&mock, "/chat/completions", &body).await;
    assert_eq!(cut["choices"][0]["finish_reason"], "length");
    assert_eq!(cut["choices"][0]["message"]["content"].as_str().unwrap(), &content[..12]);

    let object = json!({"model": "gpt-test", "messages": [user("say hi")], "response_format": {"type": "json_object"}});
    let reply = ok_json(&mock, "/chat/completions", &object).await;
    let content: Value = serde_json::from_str(reply["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert_eq!(content, json!({"reply": "echo: say hi"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_checked_accepted_and_recorded() {
    let mock = MockProvider::start().await.unwrap();
    let data_uri = format!("data:image/png;base64,{PNG_DATA}");
    let body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is in these images"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": data_uri}}
    ]}]});
    let reply = ok_json(&mock, "/chat/completions", &body).await;
    assert_eq!(reply["choices"][0]["message"]["content"], "echo: what is in these images");
    assert_eq!(reply["usage"]["prompt_tokens"], prompt_tokens(["what is in these images"]));
    assert_eq!(mock.last_request().unwrap().images(), ["https://example.com/cat.png".to_owned(), data_uri]);

    for (url, why) in [
        ("ftp://example.com/cat.png", "not http(s)"),
        ("data:image/png;base64,@@@", "not base64"),
        ("data:text/plain;base64,aGk=", "not an image"),
    ] {
        let bad = json!({"model": "gpt-test", "messages": [
            user("first"),
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
        ]});
        let response = post(&mock, "/chat/completions", &bad).await;
        assert_eq!(response.status(), 400, "{why}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], "messages[1].content[0].image_url.url", "{why}");
        assert_eq!(error["error"]["code"], "invalid_image_url");
    }
    let system_image = json!({"model": "gpt-test", "messages": [
        {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]},
        user("hi")
    ]});
    let response = post(&mock, "/chat/completions", &system_image).await;
    assert_eq!(response.status(), 400);
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["param"], "messages[0].content[0].type");
    assert_eq!(mock.stats().succeeded, 1);

    // Anthropic: base64 and URL sources; the base64 one is recorded as a data URI.
    let body = json!({"model": "claude-test", "max_tokens": 64, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_DATA}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/dog.jpg"}},
        {"type": "text", "text": "describe"}
    ]}]});
    let reply = ok_json(&mock, "/messages", &body).await;
    assert_eq!(reply["content"][0]["text"], "echo: describe");
    assert_eq!(
        mock.last_request().unwrap().images(),
        [format!("data:image/png;base64,{PNG_DATA}"), "https://example.com/dog.jpg".to_owned()]
    );
    let mut bad = body.clone();
    bad["messages"][0]["content"][0]["source"]["media_type"] = json!("image/bmp");
    let response = post(&mock, "/messages", &bad).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(error["error"]["message"].as_str().unwrap().starts_with("messages.0.content.0.image.source"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_effort_brings_reasoning_text_and_tokens() {
    let mock = MockProvider::start().await.unwrap();
    let mut body = json!({"model": "o-test", "messages": [user("why is the sky blue")], "reasoning_effort": "low"});
    let reply = ok_json(&mock, "/chat/completions", &body).await;
    let message = &reply["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], reasoning_text("why is the sky blue", "low"));
    assert_eq!(message["content"], "echo: why is the sky blue");
    assert_eq!(reply["usage"]["completion_tokens"], 4 + 6);
    assert_eq!(reply["usage"]["completion_tokens_details"]["reasoning_tokens"], 4);

    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = openai_chunks(&mock, &body).await;
    let deltas: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"].get(0).map(|ch| &ch["delta"])).collect();
    let reasoning: String = deltas.iter().filter_map(|d| d["reasoning_content"].as_str()).collect();
    let content: String = deltas.iter().filter_map(|d| d["content"].as_str()).collect();
    assert_eq!(reasoning, reasoning_text("why is the sky blue", "low"));
    assert_eq!(content, "echo: why is the sky blue");
    let first_content = deltas.iter().position(|d| d["content"].as_str().is_some_and(|c| !c.is_empty())).unwrap();
    assert!(deltas[..first_content].iter().filter(|d| d.get("reasoning_content").is_some()).count() == 4);
    assert_eq!(chunks.last().unwrap()["usage"], reply["usage"]);

    let bad = json!({"model": "o-test", "messages": [user("x")], "reasoning_effort": "maximum"});
    let response = post(&mock, "/chat/completions", &bad).await;
    assert_eq!(response.status(), 400);
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["param"], "reasoning_effort");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_cache_usage_is_reported_in_each_format() {
    let behavior =
        Behavior { prompt_cache: Some(PromptCache { read_tokens: 5, write_tokens: 3 }), ..Behavior::default() };
    let mock = MockProvider::start_with(behavior).await.unwrap();
    let prompt = prompt_tokens(["one two three four five six"]);
    let body = json!({"model": "gpt-test", "messages": [user("one two three four five six")]});
    let reply = ok_json(&mock, "/chat/completions", &body).await;
    assert_eq!(reply["usage"]["prompt_tokens"], prompt);
    assert_eq!(reply["usage"]["prompt_tokens_details"]["cached_tokens"], 5);

    let body = json!({"model": "claude-test", "max_tokens": 64, "stream": true,
        "messages": [user("one two three four five six")]});
    let events = anthropic_events(&mock, &body).await;
    let usage = &events[0].1["message"]["usage"];
    assert_eq!(usage["cache_read_input_tokens"], 5);
    assert_eq!(usage["cache_creation_input_tokens"], 3);
    assert_eq!(usage["input_tokens"], prompt - 8);

    // More than the prompt is clamped to it, reads first.
    mock.update(|b| b.prompt_cache = Some(PromptCache { read_tokens: 100, write_tokens: 100 }));
    let mut json_body = body.clone();
    json_body["stream"] = json!(false);
    let reply = ok_json(&mock, "/messages", &json_body).await;
    assert_eq!(reply["usage"]["cache_read_input_tokens"], prompt);
    assert_eq!(
        (reply["usage"]["cache_creation_input_tokens"].as_u64(), reply["usage"]["input_tokens"].as_u64()),
        (Some(0), Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_beyond_the_context_window_is_refused_with_the_providers_codes() {
    let mut behavior = Behavior { context_window: Some(20), ..Behavior::default() };
    behavior.model_context_windows.insert("gpt-large".into(), 1000);
    let mock = MockProvider::start_with(behavior).await.unwrap();
    let long = vec!["word"; 30].join(" ");
    let response = post(&mock, "/chat/completions", &json!({"model": "gpt-test", "messages": [user(&long)]})).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "context_length_exceeded");
    assert_eq!(error["error"]["param"], "messages");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(error["error"]["message"].as_str().unwrap().contains("maximum context length is 20 tokens"), "{error}");

    ok_json(&mock, "/chat/completions", &json!({"model": "gpt-large", "messages": [user(&long)]})).await;
    ok_json(&mock, "/chat/completions", &json!({"model": "gpt-test", "messages": [user("short")]})).await;

    let response =
        post(&mock, "/messages", &json!({"model": "claude-test", "max_tokens": 8, "messages": [user(&long)]})).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(
        error["error"]["message"].as_str().unwrap().starts_with("prompt is too long: 36 tokens > 20 maximum"),
        "{error}"
    );
    assert_eq!(mock.stats().succeeded, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_parameters_are_accepted_and_recorded() {
    let mock = MockProvider::start().await.unwrap();
    let body = json!({"model": "gpt-test", "messages": [user("hi")], "temperature": 0.2, "top_k": 40,
        "chat_template_kwargs": {"enable_thinking": false}, "repetition_penalty": 1.1});
    ok_json(&mock, "/chat/completions", &body).await;
    let recorded = mock.last_request().unwrap();
    assert_eq!(recorded.unknown_parameters(), ["chat_template_kwargs", "repetition_penalty", "top_k"]);
    assert_eq!(recorded.json().unwrap()["chat_template_kwargs"], json!({"enable_thinking": false}));

    let body = json!({"model": "claude-test", "max_tokens": 8, "messages": [user("hi")], "top_k": 5, "betas": ["x"]});
    ok_json(&mock, "/messages", &body).await;
    assert_eq!(mock.last_request().unwrap().unknown_parameters(), ["betas"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_and_tools_providers_refuse_are_refused_naming_the_field() {
    let mock = MockProvider::start().await.unwrap();
    let call = json!({"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}});
    let cases = [
        (json!([user("hi"), {"role": "tool", "tool_call_id": "call_9", "content": "x"}]), "messages[1].role"),
        (
            json!([user("hi"), {"role": "assistant", "content": null, "tool_calls": [call]}, user("again")]),
            "messages[2].role",
        ),
        (json!([user("hi"), {"role": "assistant", "content": null, "tool_calls": [call]}]), "messages[1].role"),
        (
            json!([user("hi"), {"role": "assistant", "content": null, "tool_calls": [call]}, {"role": "tool", "content": "x"}]),
            "messages[2].tool_call_id",
        ),
        (json!([{"role": "user", "content": [{"type": "video", "video": "x"}]}]), "messages[0].content[0].type"),
    ];
    for (messages, param) in cases {
        let response = post(&mock, "/chat/completions", &agent_body(messages.clone())).await;
        assert_eq!(response.status(), 400, "{messages}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], param, "{error}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
    let mut bad_name = agent_body(json!([user("hi")]));
    bad_name["tools"][0]["function"]["name"] = json!("get weather");
    let mut bad_schema = agent_body(json!([user("hi")]));
    bad_schema["tools"][1]["function"]["parameters"] = json!({"type": "string"});
    let mut unknown_choice = agent_body(json!([user("hi")]));
    unknown_choice["tool_choice"] = json!({"type": "function", "function": {"name": "nope"}});
    let choice_without_tools = json!({"model": "m", "messages": [user("hi")], "tool_choice": "auto"});
    let unnamed_schema = json!({"model": "m", "messages": [user("hi")],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}});
    let bad_format = json!({"model": "m", "messages": [user("hi")], "response_format": {"type": "yaml"}});
    for (body, param) in [
        (bad_name, "tools[0].function.name"),
        (bad_schema, "tools[1].function.parameters"),
        (unknown_choice, "tool_choice"),
        (choice_without_tools, "tool_choice"),
        (unnamed_schema, "response_format.json_schema.name"),
        (bad_format, "response_format.type"),
    ] {
        let response = post(&mock, "/chat/completions", &body).await;
        assert_eq!(response.status(), 400, "{body}");
        assert_eq!(response.json::<Value>().await.unwrap()["error"]["param"], param);
    }
    assert_eq!(mock.stats().succeeded, 0, "nothing was answered");
}

fn anthropic_tools() -> Value {
    json!([
        {"name": "get_weather", "description": "Current weather.", "input_schema": weather_tool()["function"]["parameters"]},
        {"name": "search", "input_schema": search_tool()["function"]["parameters"]},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_tool_use_json_stream_and_results() {
    let mock = MockProvider::start().await.unwrap();
    let question = user("weather and news");
    let mut body =
        json!({"model": "claude-test", "max_tokens": 256, "messages": [question], "tools": anthropic_tools()});
    let reply = ok_json(&mock, "/messages", &body).await;
    assert_eq!(reply["stop_reason"], "tool_use");
    let blocks = reply["content"].as_array().unwrap();
    assert_eq!(blocks.len(), 2, "client tools only: {reply}");
    assert_eq!((blocks[0]["name"].as_str(), &blocks[0]["input"]), (Some("get_weather"), &weather_arguments()));
    assert_eq!((blocks[1]["name"].as_str(), &blocks[1]["input"]), (Some("search"), &search_arguments()));
    assert!(blocks.iter().all(|b| b["type"] == "tool_use" && b["id"].as_str().unwrap().starts_with("toolu_")));

    // Streamed: each tool_use block starts with its id and name, then input_json_delta fragments.
    body["stream"] = json!(true);
    let events = anthropic_events(&mock, &body).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[..3], ["message_start", "content_block_start", "ping"]);
    let mut inputs: Vec<(String, String)> = Vec::new();
    for (name, data) in &events {
        match name.as_str() {
            "content_block_start" => {
                assert_eq!(data["index"], inputs.len());
                assert_eq!(data["content_block"]["input"], json!({}));
                inputs.push((data["content_block"]["name"].as_str().unwrap().to_owned(), String::new()));
            }
            "content_block_delta" => {
                assert_eq!(data["delta"]["type"], "input_json_delta");
                assert_eq!(data["index"], inputs.len() - 1);
                inputs.last_mut().unwrap().1.push_str(data["delta"]["partial_json"].as_str().unwrap());
            }
            _ => {}
        }
    }
    let inputs: Vec<(&str, Value)> =
        inputs.iter().map(|(n, i)| (n.as_str(), serde_json::from_str(i).unwrap())).collect();
    assert_eq!(inputs, [("get_weather", weather_arguments()), ("search", search_arguments())]);
    assert_eq!(events[events.len() - 2].1["delta"]["stop_reason"], "tool_use");

    // disable_parallel_tool_use makes one call; a named tool is the forced-tool structured output.
    body["stream"] = json!(false);
    body["tool_choice"] = json!({"type": "auto", "disable_parallel_tool_use": true});
    assert_eq!(ok_json(&mock, "/messages", &body).await["content"].as_array().unwrap().len(), 1);
    body["tool_choice"] = json!({"type": "tool", "name": "search"});
    let forced = ok_json(&mock, "/messages", &body).await;
    assert_eq!(forced["content"][0]["input"], search_arguments());

    // Results answered with text; a result for a call that was not made is refused.
    let ids: Vec<&str> = blocks.iter().map(|b| b["id"].as_str().unwrap()).collect();
    let results = json!({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": ids[0], "content": "21C"},
        {"type": "tool_result", "tool_use_id": ids[1], "content": [{"type": "text", "text": "no news"}]}
    ]});
    let follow_up = json!({"model": "claude-test", "max_tokens": 256, "tools": anthropic_tools(),
        "messages": [question, {"role": "assistant", "content": blocks}, results]});
    let answer = ok_json(&mock, "/messages", &follow_up).await;
    assert_eq!(answer["stop_reason"], "end_turn");
    assert_eq!(answer["content"], json!([{"type": "text", "text": "echo: 21C no news"}]));

    let mut missing = follow_up.clone();
    missing["messages"][2]["content"].as_array_mut().unwrap().pop();
    let mut stray = follow_up.clone();
    stray["messages"][2]["content"][0]["tool_use_id"] = json!("toolu_other");
    for (body, prefix) in [(missing, "messages.2: `tool_use` ids"), (stray, "messages.2.content.0: unexpected")] {
        let response = post(&mock, "/messages", &body).await;
        assert_eq!(response.status(), 400);
        let error: Value = response.json().await.unwrap();
        assert!(error["error"]["message"].as_str().unwrap().starts_with(prefix), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_thinking_and_structured_output() {
    let mock = MockProvider::start().await.unwrap();
    let mut body = json!({"model": "claude-test", "max_tokens": 4096, "messages": [user("plan the trip")],
        "thinking": {"type": "enabled", "budget_tokens": 2048}});
    let reply = ok_json(&mock, "/messages", &body).await;
    let thinking = reasoning_text("plan the trip", "medium");
    assert_eq!(reply["content"][0]["type"], "thinking");
    assert_eq!(reply["content"][0]["thinking"], thinking.as_str());
    assert!(!reply["content"][0]["signature"].as_str().unwrap().is_empty());
    assert_eq!(reply["content"][1], json!({"type": "text", "text": "echo: plan the trip"}));
    assert_eq!(reply["usage"]["output_tokens"], 8 + 4);

    body["stream"] = json!(true);
    let events = anthropic_events(&mock, &body).await;
    let streamed: String = events.iter().filter_map(|(_, d)| d["delta"]["thinking"].as_str()).collect();
    assert_eq!(streamed, thinking);
    assert_eq!(events[1].1["content_block"]["type"], "thinking");
    assert!(events.iter().any(|(_, d)| d["delta"]["type"] == "signature_delta" && d["index"] == 0));
    let text_start = events.iter().find(|(n, d)| n == "content_block_start" && d["index"] == 1).unwrap();
    assert_eq!(text_start.1["content_block"]["type"], "text");

    for (edit, prefix) in [
        (json!({"thinking": {"type": "enabled", "budget_tokens": 512}}), "thinking.enabled.budget_tokens"),
        (json!({"thinking": {"type": "enabled", "budget_tokens": 4096}}), "max_tokens"),
        (json!({"temperature": 0.5}), "temperature"),
        (json!({"temperature": 1.5, "thinking": null}), "temperature"),
    ] {
        let mut bad = body.clone();
        for (key, value) in edit.as_object().unwrap() {
            if value.is_null() {
                bad.as_object_mut().unwrap().remove(key);
            } else {
                bad[key] = value.clone();
            }
        }
        let response = post(&mock, "/messages", &bad).await;
        assert_eq!(response.status(), 400, "{bad}");
        let error: Value = response.json().await.unwrap();
        assert!(error["error"]["message"].as_str().unwrap().starts_with(prefix), "{error}");
    }

    let schema = json!({"type": "object", "properties": {"days": {"type": "integer"}}, "required": ["days"]});
    for field in ["output_config", "output_format"] {
        let format = json!({"type": "json_schema", "schema": schema});
        let value = if field == "output_config" { json!({"format": format}) } else { format };
        let body = json!({"model": "claude-test", "max_tokens": 64, "messages": [user("how long")], field: value});
        let reply = ok_json(&mock, "/messages", &body).await;
        let text = reply["content"][0]["text"].as_str().unwrap();
        assert_eq!(serde_json::from_str::<Value>(text).unwrap(), json!({"days": 1}), "{field}");
    }
}
