//! The other APIs agents speak, through the whole mesh: the Responses API (stored, continued,
//! read, deleted, streamed), Anthropic Messages (with `x-api-key`, streamed, tools, its error
//! shape, count_tokens) and legacy completions, each served by the mock provider behind the
//! canonical request; and a provider of kind `openai-responses`, called in the Responses format
//! whichever API the client spoke.

use meshgate_catalog::{ProviderKind, ProviderSpec};
use meshgate_mock_provider::PromptCache;
use meshgate_tests::{ADMIN_KEY, CLOUD_MODEL, MeshOptions, TestMesh, sse_events};
use reqwest::Method;
use serde_json::{Value, json};

use crate::tenancy::{Tenant, call};

/// The `data:` payloads of a stream's events, with their `event:` names.
fn named_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| {
            let mut name = String::new();
            let mut data = String::new();
            for line in event.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = value.to_owned();
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data.push_str(value);
                }
            }
            (name, serde_json::from_str(&data).unwrap_or(Value::String(data)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_responses_api_answers_stores_continues_and_forgets_within_the_project() {
    let mesh = TestMesh::start().await;
    let (http, edge) = (&mesh.http, mesh.edge.as_str());
    let post = |body: Value| call(http, edge, ADMIN_KEY, Method::POST, "/v1/responses", Some(body));

    let (status, first) =
        post(json!({"model": CLOUD_MODEL, "instructions": "be brief", "input": "My name is Ada."})).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["object"], "response");
    assert_eq!(first["status"], "completed");
    let id = first["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("resp_"), "{id}");
    assert_eq!(first["output"][0]["type"], "message");
    assert!(first["output"][0]["content"][0]["text"].as_str().is_some_and(|t| !t.is_empty()), "{first}");
    assert!(first["usage"]["input_tokens"].as_i64().unwrap() > 0);

    // Continued: the provider receives the stored conversation and its answer before the input.
    let (status, second) =
        post(json!({"model": CLOUD_MODEL, "previous_response_id": id, "input": "What is my name?"})).await;
    assert_eq!(status, 200, "{second}");
    let sent = mesh.alpha.last_request().expect("the provider was called").json().unwrap();
    let contents: Vec<String> = sent["messages"].as_array().unwrap().iter().map(|m| m["content"].to_string()).collect();
    assert!(contents.iter().any(|c| c.contains("My name is Ada.")), "{contents:?}");
    assert!(contents.iter().any(|c| c.contains("What is my name?")), "{contents:?}");

    // Read back, invisible to another project, then deleted.
    let (status, stored) = call(http, edge, ADMIN_KEY, Method::GET, format!("/v1/responses/{id}"), None).await;
    assert_eq!((status, stored["id"].as_str()), (200, Some(id.as_str())), "{stored}");
    let tenant = Tenant::create(http, edge, "other").await;
    let path = format!("/v1/responses/{id}");
    assert_eq!(call(http, edge, tenant.secret("owner"), Method::GET, path.clone(), None).await.0, 404);
    assert_eq!(call(http, edge, tenant.secret("owner"), Method::DELETE, path.clone(), None).await.0, 404);
    let other = json!({"model": CLOUD_MODEL, "previous_response_id": id, "input": "hi"});
    let (status, _) = call(http, edge, tenant.secret("owner"), Method::POST, "/v1/responses", Some(other)).await;
    assert_eq!(status, 404, "another project cannot continue the conversation");
    let (status, deleted) = call(http, edge, ADMIN_KEY, Method::DELETE, path.clone(), None).await;
    assert_eq!((status, deleted["deleted"].as_bool()), (200, Some(true)), "{deleted}");
    assert_eq!(call(http, edge, ADMIN_KEY, Method::GET, path, None).await.0, 404);

    // Streamed: the Responses event sequence, ending completed with usage.
    let response = http
        .post(format!("{edge}/v1/responses"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"model": CLOUD_MODEL, "input": "stream please", "stream": true, "store": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = named_events(&response.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names.first(), Some(&"response.created"), "{names:?}");
    assert!(names.contains(&"response.output_text.delta"), "{names:?}");
    assert_eq!(names.last(), Some(&"response.completed"), "{names:?}");
    let completed = &events.last().unwrap().1;
    assert!(completed["response"]["usage"]["output_tokens"].as_i64().unwrap() > 0, "{completed}");

    // A built-in tool meshgate does not run, and a malformed body: 400 naming the field.
    let (status, body) = post(json!({"model": CLOUD_MODEL, "input": "x", "tools": [{"type": "web_search"}]})).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("tools[0]"), "{body}");
    mesh.stop().await;
}

/// Served by `oai`, a provider of kind `openai-responses` on alpha's mock.
const RESPONSES_MODEL: &str = "mock-responses";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responses_kind_provider_is_called_in_the_responses_format() {
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(|config| {
            let alpha = config.sync.providers[0].base_url.clone();
            config.sync.providers.push(ProviderSpec {
                name: "oai".into(),
                kind: ProviderKind::OpenaiResponses,
                base_url: alpha,
                models: vec![RESPONSES_MODEL.into()],
                ..ProviderSpec::default()
            });
        }),
        ..Default::default()
    })
    .await;
    mesh.alpha.update(|b| b.prompt_cache = Some(PromptCache { read_tokens: 4, write_tokens: 0 }));
    let (http, edge) = (&mesh.http, mesh.edge.as_str());
    let post = |body: Value| call(http, edge, ADMIN_KEY, Method::POST, "/v1/responses", Some(body));

    // A Responses client: reasoning, cached and reasoning tokens come back from the provider's own
    // Responses answer; what reached it is a Responses body, not a chat completion.
    let (status, first) = post(json!({"model": RESPONSES_MODEL, "instructions": "be brief",
        "input": "Explain the mesh gateway", "reasoning": {"effort": "low"}, "max_output_tokens": 200}))
    .await;
    assert_eq!(status, 200, "{first}");
    let kinds: Vec<&str> = first["output"].as_array().unwrap().iter().map(|i| i["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["reasoning", "message"], "{first}");
    assert_eq!(first["output"][1]["content"][0]["text"], "echo: Explain the mesh gateway");
    assert_eq!(first["usage"]["input_tokens_details"]["cached_tokens"], 4, "{first}");
    assert!(first["usage"]["output_tokens_details"]["reasoning_tokens"].as_i64().unwrap() > 0, "{first}");
    let sent = mesh.alpha.last_request().expect("the provider was called");
    assert_eq!(sent.path, "/v1/responses");
    let body = sent.json().unwrap();
    assert_eq!((body["model"].as_str(), body["store"].as_bool()), (Some(RESPONSES_MODEL), Some(false)), "{body}");
    assert_eq!((body["reasoning"]["effort"].as_str(), body["max_output_tokens"].as_i64()), (Some("low"), Some(200)));
    let roles: Vec<&str> = body["input"].as_array().unwrap().iter().map(|i| i["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["system", "user"], "{body}");

    // Continued: the stored conversation goes out as input items before the new turn.
    let id = first["id"].as_str().unwrap();
    let (status, second) =
        post(json!({"model": RESPONSES_MODEL, "previous_response_id": id, "input": "And its quota?"})).await;
    assert_eq!(status, 200, "{second}");
    let body = mesh.alpha.last_request().unwrap().json().unwrap();
    let texts: Vec<String> = body["input"].as_array().unwrap().iter().map(|i| i["content"].to_string()).collect();
    // (The first request's instructions are not carried over, as OpenAI does not carry them.)
    assert_eq!(texts.len(), 3, "{texts:?}");
    assert!(texts[0].contains("Explain the mesh gateway") && texts[1].contains("echo: Explain"), "{texts:?}");
    assert!(texts[2].contains("And its quota?"), "{texts:?}");

    // Streamed with a function tool: the provider's argument deltas become the client's.
    let weather = json!({"type": "function", "name": "get_weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}}, "required": ["city"]}});
    let response = http
        .post(format!("{edge}/v1/responses"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"model": RESPONSES_MODEL, "input": "Weather in Oslo?", "tools": [weather], "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = named_events(&response.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert!(names.contains(&"response.function_call_arguments.delta"), "{names:?}");
    let completed = &events.last().unwrap().1;
    assert_eq!(completed["type"], "response.completed", "{names:?}");
    let call = &completed["response"]["output"][0];
    assert_eq!((call["type"].as_str(), call["name"].as_str()), (Some("function_call"), Some("get_weather")));
    let arguments: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{arguments}");

    // A chat client reaches the same provider in the Responses format; what it has no field
    // for is left out and traced.
    let response = mesh
        .chat(json!({"model": RESPONSES_MODEL, "seed": 7, "messages": [{"role": "user", "content": "hello there"}]}))
        .await;
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-meshgate-request-id"].to_str().unwrap().to_owned();
    let reply: Value = response.json().await.unwrap();
    assert_eq!(reply["choices"][0]["message"]["content"], "echo: hello there", "{reply}");
    let sent = mesh.alpha.last_request().unwrap();
    assert_eq!(sent.path, "/v1/responses");
    assert!(sent.json().unwrap().get("seed").is_none());
    assert_eq!(mesh.trace(&id).await.dropped_params, ["seed"]);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_are_served_with_x_api_key_tools_and_streams() {
    let mesh = TestMesh::start().await;
    let edge = &mesh.edge;
    let messages = |body: Value| {
        mesh.http
            .post(format!("{edge}/v1/messages"))
            .header("x-api-key", ADMIN_KEY)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
    };
    let weather = json!({"name": "get_weather", "description": "Weather in a city",
                         "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}});

    // A tool round trip, as Claude Code drives one.
    let asked = messages(json!({"model": CLOUD_MODEL, "max_tokens": 256, "tools": [weather],
                                "messages": [{"role": "user", "content": "Weather in Paris?"}]}))
    .await
    .unwrap();
    assert_eq!(asked.status(), 200);
    let asked: Value = asked.json().await.unwrap();
    assert_eq!((asked["type"].as_str(), asked["stop_reason"].as_str()), (Some("message"), Some("tool_use")), "{asked}");
    let tool_use = asked["content"].as_array().unwrap().iter().find(|b| b["type"] == "tool_use").expect("a tool_use");
    assert_eq!(tool_use["name"], "get_weather");
    assert!(tool_use["input"]["city"].is_string(), "{tool_use}");
    let answered = messages(json!({"model": CLOUD_MODEL, "max_tokens": 256, "tools": [weather], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": asked["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use["id"], "content": "sunny, 21C"}]}
    ]}))
    .await
    .unwrap();
    assert_eq!(answered.status(), 200);
    let answered: Value = answered.json().await.unwrap();
    assert_eq!(answered["stop_reason"], "end_turn", "{answered}");
    assert!(answered["content"][0]["text"].as_str().unwrap().contains("sunny"), "{answered}");

    // Streamed: Anthropic's event sequence.
    let streamed = messages(json!({"model": CLOUD_MODEL, "max_tokens": 64, "stream": true,
                                   "messages": [{"role": "user", "content": "hello"}]}))
    .await
    .unwrap();
    assert_eq!(streamed.status(), 200);
    let events = named_events(&streamed.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"), "{names:?}");
    let started = &events[0].1;
    assert!(started["message"]["usage"]["input_tokens"].as_i64().unwrap() > 0, "the prompt's estimate: {started}");
    assert!(names.contains(&"content_block_delta") && names.contains(&"message_delta"), "{names:?}");
    assert_eq!(names.last(), Some(&"message_stop"), "{names:?}");

    // Errors in Anthropic's shape; count_tokens.
    let refused =
        messages(json!({"model": CLOUD_MODEL, "messages": [{"role": "user", "content": "x"}]})).await.unwrap();
    assert_eq!(refused.status(), 400);
    let refused: Value = refused.json().await.unwrap();
    assert_eq!(
        (refused["type"].as_str(), refused["error"]["type"].as_str()),
        (Some("error"), Some("invalid_request_error"))
    );
    assert!(refused["error"]["message"].as_str().unwrap().contains("max_tokens"), "{refused}");
    let unauthenticated = mesh
        .http
        .post(format!("{edge}/v1/messages"))
        .header("x-api-key", "wrong")
        .json(&json!({"model": CLOUD_MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let unauthenticated: Value = unauthenticated.json().await.unwrap();
    assert_eq!(unauthenticated["error"]["type"], "authentication_error");
    let counted = mesh
        .http
        .post(format!("{edge}/v1/messages/count_tokens"))
        .header("x-api-key", ADMIN_KEY)
        .json(&json!({"model": CLOUD_MODEL, "messages": [{"role": "user", "content": "hello there"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(counted.status(), 200);
    let counted: Value = counted.json().await.unwrap();
    assert!(counted["input_tokens"].as_i64().unwrap() > 0, "{counted}");
    // A model nothing serves is counted for nobody: 404, as the request itself would be.
    let unserved = mesh
        .http
        .post(format!("{edge}/v1/messages/count_tokens"))
        .header("x-api-key", ADMIN_KEY)
        .json(&json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hello there"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(unserved.status(), 404);
    let unserved: Value = unserved.json().await.unwrap();
    assert_eq!(unserved["error"]["type"], "not_found_error", "{unserved}");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_completions_are_served_by_chat_models() {
    let mesh = TestMesh::start().await;
    let (http, edge) = (&mesh.http, mesh.edge.as_str());
    let (status, body) = call(
        http,
        edge,
        ADMIN_KEY,
        Method::POST,
        "/v1/completions",
        Some(json!({"model": CLOUD_MODEL, "prompt": "Once upon a time", "max_tokens": 16})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert!(body["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    let sent = mesh.alpha.last_request().unwrap().json().unwrap();
    assert_eq!(sent["messages"][0]["role"], "user", "the prompt is one user message");

    let response = http
        .post(format!("{edge}/v1/completions"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"model": CLOUD_MODEL, "prompt": "count", "stream": true}))
        .send()
        .await
        .unwrap();
    let events = sse_events(&response.text().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    assert!(events.iter().any(|e| e.contains("\"text\"")), "{events:?}");

    let suffix = json!({"model": CLOUD_MODEL, "prompt": "def f(", "suffix": "return x"});
    let (status, body) = call(http, edge, ADMIN_KEY, Method::POST, "/v1/completions", Some(suffix)).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("suffix"), "{body}");
    mesh.stop().await;
}
