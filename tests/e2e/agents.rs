//! Agents through the whole mesh, as users run them: tools offered over HTTP come back as
//! `message.tool_calls` (streamed as `delta.tool_calls` pieces), the tool's result goes back and
//! text follows; JSON-schema answers, image parts, reasoning effort and prompt-cache usage reach
//! and come back from the provider; unknown parameters are forwarded, dropped or refused per
//! provider; the same conversation through an Anthropic-kind provider, an OpenAI Responses-kind
//! provider and over gRPC; a context
//! overflow falls back to a larger-context model, and with none answers 400
//! `context_length_exceeded`. Bad input is refused naming the field before any provider sees it.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use meshgate_catalog::{ProviderKind, ProviderSpec, UnknownParams};
use meshgate_proto::common::v1::{ChatMessage, ChatOptions, ToolChoice, ToolDefinition, tool_choice};
use meshgate_proto::gateway::v1::ChatRequest;
use meshgate_proto::gateway::v1::gateway_client::GatewayClient;
use meshgate_router::ModelFacts;
use meshgate_tests::{ADMIN_KEY, CLOUD_MODEL, MeshOptions, TestMesh, sse_events};
use serde_json::{Value, json};

/// Served by `dropper` (alpha's mock, unknown parameters dropped) and `refuser` (refused).
const DROP_MODEL: &str = "mock-drop";
const REFUSE_MODEL: &str = "mock-refuse";
/// Served by `claude`, an Anthropic-kind provider on alpha's mock (`/v1/messages`).
const CLAUDE_MODEL: &str = "mock-claude";
/// Served by `oai-responses`, a Responses-kind provider on alpha's mock (`/v1/responses`).
const RESPONSES_MODEL: &str = "mock-responses";
/// A small-context model whose policy falls back to a larger one, both on beta's mock.
const SMALL_MODEL: &str = "mock-small";
const LARGE_MODEL: &str = "mock-large";
/// Their context windows at the mock, in its prompt tokens (one a word, plus framing).
const SMALL_WINDOW: u64 = 40;
const LARGE_WINDOW: u64 = 400;
/// 1 µ$ a prompt token, 0.1 µ$ a cached one, 2 µ$ a completion token.
const INPUT_PRICE: i64 = 1_000_000;
const CACHED_PRICE: i64 = 100_000;
const OUTPUT_PRICE: i64 = 2_000_000;
/// A 1×1 PNG.
const PNG: &str = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAHnOcQAAAAABJRU5ErkJggg==";

fn extra_provider(name: &str, base_url: &str, model: &str, edit: impl FnOnce(&mut ProviderSpec)) -> ProviderSpec {
    let mut spec = ProviderSpec {
        name: name.into(),
        base_url: base_url.into(),
        models: vec![model.into()],
        ..ProviderSpec::default()
    };
    edit(&mut spec);
    spec
}

async fn agent_mesh() -> TestMesh {
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(|config| {
            let alpha = config.sync.providers[0].base_url.clone();
            let beta = config.sync.providers[1].base_url.clone();
            config.sync.providers.extend([
                extra_provider("dropper", &alpha, DROP_MODEL, |p| p.unknown_params = Some(UnknownParams::Drop)),
                extra_provider("refuser", &alpha, REFUSE_MODEL, |p| p.unknown_params = Some(UnknownParams::Refuse)),
                extra_provider("claude", &alpha, CLAUDE_MODEL, |p| p.kind = ProviderKind::Anthropic),
                extra_provider("oai-responses", &alpha, RESPONSES_MODEL, |p| p.kind = ProviderKind::OpenaiResponses),
                extra_provider("small", &beta, SMALL_MODEL, |_| {}),
                extra_provider("large", &beta, LARGE_MODEL, |_| {}),
            ]);
            let priced = ModelFacts {
                input_price_micros_per_mtok: Some(INPUT_PRICE),
                cached_input_price_micros_per_mtok: Some(CACHED_PRICE),
                output_price_micros_per_mtok: Some(OUTPUT_PRICE),
                ..ModelFacts::default()
            };
            for model in
                [CLOUD_MODEL, DROP_MODEL, REFUSE_MODEL, CLAUDE_MODEL, RESPONSES_MODEL, SMALL_MODEL, LARGE_MODEL]
            {
                config.router.models.insert(model.into(), priced.clone());
            }
            // The windows are left undeclared: the provider's own count decides.
            config.router.policy.context_window_fallbacks.insert(SMALL_MODEL.into(), vec![LARGE_MODEL.into()]);
        }),
        ..Default::default()
    })
    .await;
    mesh.beta.update(|b| {
        b.model_context_windows =
            HashMap::from([(SMALL_MODEL.to_owned(), SMALL_WINDOW), (LARGE_MODEL.to_owned(), LARGE_WINDOW)]);
    });
    mesh
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "The current weather of a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
        }, "required": ["city", "unit"], "additionalProperties": false},
        "strict": true
    }})
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("no {name} header"))
}

fn request_id(response: &reqwest::Response) -> String {
    header(response, "x-meshgate-request-id").to_owned()
}

async fn json_of(response: reqwest::Response) -> Value {
    let status = response.status();
    let body: Value = response.json().await.expect("a JSON body");
    assert_eq!(status, 200, "{body}");
    body
}

/// Asserts an error answer: its status, code and that its message names `field`.
async fn refused(response: reqwest::Response, status: u16, code: &str, field: &str) -> Value {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("`{field}`")), "the message names {field}: {message}");
    body
}

/// The weather conversation: a call to the tool, its result, then text.
async fn tools_round_trip(mesh: &TestMesh, model: &str, path: &str) {
    let ask = json!({"role": "user", "content": "What is the weather in Paris?"});
    let body = json!({"model": model, "messages": [ask], "tools": [weather_tool()], "max_tokens": 64});
    let reply = json_of(mesh.chat(body).await).await;
    let choice = &reply["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{reply}");
    let calls = choice["message"]["tool_calls"].as_array().expect("message.tool_calls");
    assert_eq!(calls.len(), 1, "{reply}");
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let arguments: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string() && ["celsius", "fahrenheit"].contains(&arguments["unit"].as_str().unwrap()));
    assert_eq!(reply["model"], model, "the served provider model names the reply");
    let sent = mesh.alpha.last_request().unwrap();
    assert_eq!(sent.path, path);

    // The call replayed with its result: the model answers in text.
    let call = calls[0].clone();
    let result = json!({"role": "tool", "tool_call_id": call["id"], "content": "18 degrees and sunny"});
    let turn = json!({"role": "assistant", "content": null, "tool_calls": [call]});
    let body = json!({"model": model, "messages": [ask, turn, result], "tools": [weather_tool()], "max_tokens": 64});
    let reply = json_of(mesh.chat(body).await).await;
    assert_eq!(reply["choices"][0]["finish_reason"], "stop", "{reply}");
    assert_eq!(reply["choices"][0]["message"]["content"], "echo: 18 degrees and sunny");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_calls_tools_streams_them_and_gets_structured_answers() {
    let mesh = agent_mesh().await;

    // The round trip over HTTP, OpenAI-compatible, Anthropic-kind and Responses-kind, the same
    // conversation.
    tools_round_trip(&mesh, CLOUD_MODEL, "/v1/chat/completions").await;
    tools_round_trip(&mesh, CLAUDE_MODEL, "/v1/messages").await;
    let sent = mesh.alpha.last_request().unwrap().json().unwrap();
    assert_eq!(sent["messages"][1]["content"][0]["type"], "tool_use", "{sent}");
    assert_eq!(sent["messages"][2]["content"][0]["type"], "tool_result");
    tools_round_trip(&mesh, RESPONSES_MODEL, "/v1/responses").await;
    let sent = mesh.alpha.last_request().unwrap().json().unwrap();
    let items: Vec<&str> = sent["input"].as_array().unwrap().iter().map(|i| i["type"].as_str().unwrap()).collect();
    assert_eq!(items, ["message", "function_call", "function_call_output"], "{sent}");
    assert_eq!(sent["input"][1]["call_id"], sent["input"][2]["call_id"]);
    assert_eq!(sent["input"][2]["output"], "18 degrees and sunny");
    assert_eq!((sent["stream"].as_bool(), sent["store"].as_bool()), (Some(true), Some(false)), "{sent}");
    assert_eq!(sent["tools"][0]["name"], "get_weather", "flat function tools: {sent}");

    // Streamed: the call arrives as delta.tool_calls pieces as the provider streams them.
    mesh.alpha.update(|b| b.chunk_delay = Duration::from_millis(40));
    for model in [CLOUD_MODEL, CLAUDE_MODEL, RESPONSES_MODEL] {
        let body = json!({"model": model, "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "weather in Oslo and Rome"}],
            "tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
        let response = mesh.chat(body).await;
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        let (mut arrivals, mut wire) = (Vec::new(), String::new());
        let started = std::time::Instant::now();
        while let Some(bytes) = stream.next().await {
            wire.push_str(std::str::from_utf8(&bytes.unwrap()).unwrap());
            arrivals.push((started.elapsed(), wire.matches("\"tool_calls\"").count()));
        }
        let events: Vec<Value> =
            sse_events(&wire).iter().filter(|e| *e != "[DONE]").map(|e| serde_json::from_str(e).unwrap()).collect();
        let pieces: Vec<&Value> =
            events.iter().filter_map(|e| e["choices"][0]["delta"]["tool_calls"].as_array()).flatten().collect();
        assert!(pieces.len() >= 3, "{model}: the call comes in pieces: {wire}");
        assert_eq!(pieces[0]["function"]["name"], "get_weather");
        assert!(pieces[0]["id"].as_str().is_some_and(|id| !id.is_empty()));
        let arguments: String = pieces.iter().filter_map(|p| p["function"]["arguments"].as_str()).collect();
        let arguments: Value = serde_json::from_str(&arguments).expect("the pieces make the arguments");
        assert!(arguments["city"].is_string(), "{arguments}");
        let finish = events.iter().find_map(|e| e["choices"][0]["finish_reason"].as_str());
        assert_eq!(finish, Some("tool_calls"), "{model}");
        // Not all at the end: the first piece was on the wire well before the stream ended.
        let first = arrivals.iter().find(|(_, n)| *n > 0).unwrap().0;
        let last = arrivals.last().unwrap().0;
        assert!(last - first >= Duration::from_millis(80), "{model}: first piece at {first:?}, end at {last:?}");
    }
    mesh.alpha.update(|b| b.chunk_delay = Duration::ZERO);

    // response_format json_schema: valid JSON following the schema, from both kinds.
    let schema = json!({"type": "object", "properties": {
        "city": {"type": "string"}, "temperature": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}}
    }, "required": ["city", "temperature", "tags"], "additionalProperties": false});
    for model in [CLOUD_MODEL, CLAUDE_MODEL, RESPONSES_MODEL] {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "Paris weather as JSON"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": true}}});
        let reply = json_of(mesh.chat(body).await).await;
        let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
        let answer: Value = serde_json::from_str(content).unwrap_or_else(|_| panic!("{model}: not JSON: {content}"));
        assert!(
            answer["city"].is_string() && answer["temperature"].is_number() && answer["tags"].is_array(),
            "{answer}"
        );
        assert_eq!(reply["choices"][0]["finish_reason"], "stop", "{model}: {reply}");
    }

    // gRPC chat with tools: the call streams as tool_call_deltas and ends assembled.
    let mut client = GatewayClient::new(mesh.channel("gateway"));
    let weather = ToolDefinition {
        name: "get_weather".into(),
        description: "The current weather of a city".into(),
        parameters_json: r#"{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}"#.into(),
        strict: None,
    };
    let mut request = tonic::Request::new(ChatRequest {
        model: CLOUD_MODEL.into(),
        messages: vec![ChatMessage { role: "user".into(), content: "weather in Lima".into(), ..Default::default() }],
        sampling: None,
        options: Some(ChatOptions {
            tools: vec![weather],
            tool_choice: Some(ToolChoice { mode: tool_choice::Mode::Required as i32, function_name: String::new() }),
            ..ChatOptions::default()
        }),
    });
    request.metadata_mut().insert("authorization", format!("Bearer {ADMIN_KEY}").parse().unwrap());
    let chunks: Vec<_> = client.chat(request).await.unwrap().into_inner().collect().await;
    let chunks: Vec<_> = chunks.into_iter().map(Result::unwrap).collect();
    let (last, pieces) = chunks.split_last().unwrap();
    assert!(pieces.iter().any(|c| !c.tool_call_deltas.is_empty()), "{chunks:?}");
    assert_eq!(last.finish_reason, "tool_calls");
    assert_eq!(last.tool_calls[0].function_name, "get_weather");
    let arguments: Value = serde_json::from_str(&last.tool_calls[0].arguments_json).unwrap();
    assert!(arguments["city"].is_string(), "{arguments}");
    assert!(chunks.iter().any(|c| c.model == CLOUD_MODEL), "the served model names the reply on gRPC too");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_reasoning_cached_tokens_and_unknown_parameters_reach_the_provider_and_the_bill() {
    let mesh = agent_mesh().await;
    mesh.alpha
        .update(|b| b.prompt_cache = Some(meshgate_mock_provider::PromptCache { read_tokens: 8, write_tokens: 0 }));

    // An image part and a reasoning effort reach the provider; reasoning and cached tokens come
    // back in the usage, and the cached ones are charged at the cached price.
    let body = json!({"model": CLOUD_MODEL, "reasoning_effort": "low", "max_completion_tokens": 200, "messages": [
        {"role": "system", "content": "You describe pictures of the weather in a few words"},
        {"role": "user", "content": [
            {"type": "text", "text": "what is in this picture"},
            {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}}
        ]}
    ]});
    let response = mesh.chat(body).await;
    let id = request_id(&response);
    let reply = json_of(response).await;
    let usage = &reply["usage"];
    let (prompt, completion) = (usage["prompt_tokens"].as_i64().unwrap(), usage["completion_tokens"].as_i64().unwrap());
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 8, "{reply}");
    let reasoning = usage["completion_tokens_details"]["reasoning_tokens"].as_i64().unwrap();
    assert!(reasoning > 0, "{reply}");
    assert!(reply["choices"][0]["message"]["reasoning_content"].as_str().is_some_and(|r| !r.is_empty()), "{reply}");
    let sent = mesh.alpha.last_request().unwrap();
    assert_eq!(sent.images(), [PNG]);
    let sent = sent.json().unwrap();
    assert_eq!(sent["reasoning_effort"], "low");
    assert_eq!(sent["messages"][1]["content"][1]["image_url"]["detail"], "low");
    let cost = ((prompt - 8) * INPUT_PRICE + 8 * CACHED_PRICE + completion * OUTPUT_PRICE + 999_999) / 1_000_000;
    let trace = mesh.trace(&id).await;
    let traced = trace.usage.unwrap();
    assert_eq!((traced.cached_prompt_tokens, traced.reasoning_tokens), (8, reasoning));
    assert_eq!(traced.cost_micros, cost, "each class of token at its price");
    let mut used = Value::Null;
    for _ in 0..200 {
        let status = mesh.get_json("/v1/quota/status", ADMIN_KEY).await;
        used =
            status["scopes"].as_array().unwrap().iter().find(|s| s["scope"]["kind"] == "key").unwrap()["used"].clone();
        if used["cost_micros"] == cost {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(used["cost_micros"], cost, "quota charges the cached tokens at the cached price: {used}");
    let mut sums = Value::Null;
    for _ in 0..200 {
        sums = mesh.get_json("/v1/analytics", ADMIN_KEY).await;
        if sums["data"][0]["requests"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(sums["data"][0]["cached_prompt_tokens"], 8, "{sums}");
    assert_eq!(sums["data"][0]["reasoning_tokens"], reasoning, "{sums}");
    mesh.alpha.update(|b| b.prompt_cache = None);

    // A parameter meshgate does not model: forwarded, dropped (and traced), or refused.
    let with_extra = |model: &str| {
        json!({"model": model, "messages": [{"role": "user", "content": "hello there"}],
            "guided_choice": ["yes", "no"], "repetition_penalty": 1.05})
    };
    json_of(mesh.chat(with_extra(CLOUD_MODEL)).await).await;
    let sent = mesh.alpha.last_request().unwrap();
    assert_eq!(sent.unknown_parameters(), ["guided_choice", "repetition_penalty"]);
    assert_eq!(sent.json().unwrap()["guided_choice"], json!(["yes", "no"]));

    let response = mesh.chat(with_extra(DROP_MODEL)).await;
    let id = request_id(&response);
    json_of(response).await;
    let sent = mesh.alpha.last_request().unwrap();
    assert_eq!(sent.json().unwrap()["model"], DROP_MODEL);
    assert!(sent.unknown_parameters().is_empty(), "{:?}", sent.unknown_parameters());
    let dropped = ["guided_choice", "repetition_penalty"];
    assert_eq!(mesh.trace(&id).await.dropped_params, dropped, "the trace names what was dropped");
    let trace = mesh.get_json(&format!("/v1/traces/{id}"), ADMIN_KEY).await;
    assert_eq!(trace["dropped_params"], json!(dropped), "{trace}");
    assert_eq!(trace["served_target"], format!("dropper/{DROP_MODEL}"));

    let before = mesh.alpha.requests_total();
    refused(mesh.chat(with_extra(REFUSE_MODEL)).await, 400, "invalid_request", "guided_choice").await;
    assert_eq!(mesh.alpha.requests_total(), before, "a refused parameter never reaches the provider");

    // A job carries the same request; its result keeps the tool calls and the usage details.
    let job = json!({"model": CLOUD_MODEL, "reasoning_effort": "low", "tool_choice": "required",
        "messages": [{"role": "user", "content": "weather in Quito"}], "tools": [weather_tool()]});
    let submitted = mesh.http.post(format!("{}/v1/jobs", mesh.edge)).bearer_auth(ADMIN_KEY).json(&job).send().await;
    let submitted = submitted.unwrap();
    assert_eq!(submitted.status(), 202);
    let id = submitted.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let mut job = Value::Null;
    for _ in 0..200 {
        job = mesh.get_json(&format!("/v1/jobs/{id}"), ADMIN_KEY).await;
        if job["status"] == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let result = &job["result"];
    assert_eq!(result["finish_reason"], "tool_calls", "{job}");
    assert_eq!(result["tool_calls"][0]["type"], "function");
    assert_eq!(result["tool_calls"][0]["function"]["name"], "get_weather");
    let arguments: Value =
        serde_json::from_str(result["tool_calls"][0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{arguments}");
    assert!(result["reasoning_content"].as_str().is_some_and(|r| !r.is_empty()), "{job}");
    assert!(result["usage"]["reasoning_tokens"].as_i64().unwrap() > 0, "{job}");
    let sent = mesh.alpha.last_request().unwrap().json().unwrap();
    assert_eq!(
        (sent["tools"][0]["function"]["name"].as_str(), sent["reasoning_effort"].as_str()),
        (Some("get_weather"), Some("low"))
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_overflow_falls_back_to_a_larger_model_and_without_one_is_a_400() {
    let mesh = agent_mesh().await;
    let words = |n: usize| vec!["word"; n].join(" ");
    let ask = |model: &str, n: usize| json!({"model": model, "messages": [{"role": "user", "content": words(n)}]});

    // Fits the small model: it serves.
    let response = mesh.chat(ask(SMALL_MODEL, 10)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-meshgate-target"), "small/mock-small");

    // Too long for it: the provider says so, and the policy's larger model serves.
    let response = mesh.chat(ask(SMALL_MODEL, 100)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-meshgate-target"), "large/mock-large");
    let id = request_id(&response);
    let reply = json_of(response).await;
    assert_eq!(reply["model"], LARGE_MODEL);
    let trace = mesh.trace(&id).await;
    let calls: Vec<(&str, &str, &str)> = trace
        .calls
        .iter()
        .map(|c| (c.target_id.as_str(), c.status.as_str(), c.error.as_ref().map_or("", |e| e.code.as_str())))
        .collect();
    assert_eq!(
        calls,
        [("small/mock-small", "error", "context_length_exceeded"), ("large/mock-large", "ok", "")],
        "{calls:?}"
    );

    // Too long for every model of the plan: 400 context_length_exceeded naming the messages.
    let body = refused(mesh.chat(ask(SMALL_MODEL, 1_000)).await, 400, "context_length_exceeded", "messages").await;
    assert_eq!(body["error"]["type"], "invalid_request_error");
    refused(mesh.chat(ask(LARGE_MODEL, 1_000)).await, 400, "context_length_exceeded", "messages").await;

    // Overflows say nothing about the targets' health: the small model still serves.
    let response = mesh.chat(ask(SMALL_MODEL, 10)).await;
    assert_eq!(header(&response, "x-meshgate-target"), "small/mock-small");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_agent_input_is_refused_naming_the_field_and_reaches_no_provider() {
    let mesh = agent_mesh().await;
    let user = json!({"role": "user", "content": "hello"});
    let cases = [
        (
            json!({"model": CLOUD_MODEL, "messages": [user], "tools": [
                {"type": "function", "function": {"name": "bad", "parameters": "not a schema"}}
            ]}),
            "tools[0].function.parameters",
        ),
        (
            json!({"model": CLOUD_MODEL, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "ftp://example.com/cat.png"}}
            ]}]}),
            "messages[0].content[0].image_url.url",
        ),
        (
            json!({"model": CLOUD_MODEL, "messages": [
                user, {"role": "tool", "tool_call_id": "call_nobody_made", "content": "42"}
            ]}),
            "messages[1].tool_call_id",
        ),
    ];
    for (body, field) in cases {
        refused(mesh.chat(body).await, 400, "invalid_request", field).await;
    }
    assert_eq!(mesh.alpha.requests_total() + mesh.beta.requests_total(), 0, "no provider received anything");
    mesh.stop().await;
}
