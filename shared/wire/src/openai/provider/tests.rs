use serde_json::{Value, json};

use super::*;

fn body_of(request: &CompleteRequest, model: &ProviderModel) -> (Value, Vec<String>) {
    let out = request_body(request, model).unwrap();
    (serde_json::from_slice(&out.body).unwrap(), out.dropped)
}

fn agent_request() -> CompleteRequest {
    use pb::content_part::Part;
    CompleteRequest {
        model: "gpt-5".into(),
        messages: vec![
            pb::ChatMessage { role: "system".into(), content: "be brief".into(), ..Default::default() },
            pb::ChatMessage {
                role: "user".into(),
                name: "ana".into(),
                parts: vec![
                    pb::ContentPart { part: Some(Part::Text("what is this?".into())) },
                    pb::ContentPart {
                        part: Some(Part::ImageUrl(pb::ImageUrl {
                            url: "https://x/cat.png".into(),
                            detail: "low".into(),
                        })),
                    },
                    pb::ContentPart {
                        part: Some(Part::InputAudio(pb::InputAudio { data: "UklGRg==".into(), format: "wav".into() })),
                    },
                    pb::ContentPart {
                        part: Some(Part::File(pb::FileInput { file_id: "file-1".into(), ..Default::default() })),
                    },
                ],
                ..Default::default()
            },
            pb::ChatMessage {
                role: "assistant".into(),
                reasoning_content: "thinking".into(),
                tool_calls: vec![pb::ToolCall {
                    id: "call_1".into(),
                    r#type: String::new(),
                    function_name: "lookup".into(),
                    arguments_json: "{\"q\":1}".into(),
                }],
                ..Default::default()
            },
            pb::ChatMessage {
                role: "tool".into(),
                tool_call_id: "call_1".into(),
                content: "found".into(),
                ..Default::default()
            },
            pb::ChatMessage { role: "assistant".into(), refusal: "no".into(), ..Default::default() },
        ],
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(100),
            temperature: Some(0.5),
            top_p: Some(0.9),
            top_k: Some(40),
            seed: Some(7),
            stop: vec!["END".into()],
        }),
        options: Some(pb::ChatOptions {
            tools: vec![pb::ToolDefinition {
                name: "lookup".into(),
                description: "find".into(),
                parameters_json: r#"{"type": "object", "b": 1, "a": 2}"#.into(),
                strict: Some(true),
            }],
            tool_choice: Some(pb::ToolChoice {
                mode: pb::tool_choice::Mode::Function as i32,
                function_name: "lookup".into(),
            }),
            parallel_tool_calls: Some(false),
            response_format: Some(pb::ResponseFormat {
                kind: pb::response_format::Kind::JsonSchema as i32,
                name: "answer".into(),
                description: String::new(),
                schema_json: r#"{"type":"object"}"#.into(),
                strict: Some(true),
            }),
            reasoning_effort: "low".into(),
            n: Some(1),
            logprobs: Some(true),
            top_logprobs: Some(2),
            frequency_penalty: Some(0.5),
            presence_penalty: Some(-0.5),
            logit_bias: [("50256".to_owned(), -100.0)].into_iter().collect(),
            user: "u-1".into(),
            metadata: [("team".to_owned(), "a".to_owned())].into_iter().collect(),
            service_tier: "flex".into(),
            extra_json: r#"{"verbosity":"low","store":false}"#.into(),
        }),
        ..Default::default()
    }
}

#[test]
fn every_canonical_field_has_its_place() {
    let model = ProviderModel { max_completion_tokens: true, ..ProviderModel::default() };
    let out = request_body(&agent_request(), &model).unwrap();
    let text = String::from_utf8(out.body.clone()).unwrap();
    assert!(text.contains(r#""parameters":{"type": "object", "b": 1, "a": 2}"#), "schemas pass byte for byte: {text}");
    assert!(text.ends_with(r#""service_tier":"flex","verbosity":"low","store":false}"#), "{text}");
    let body: Value = serde_json::from_slice(&out.body).unwrap();
    assert_eq!(
        body,
        json!({
            "model": "gpt-5",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "name": "ana", "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "https://x/cat.png", "detail": "low"}},
                    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                    {"type": "file", "file": {"file_id": "file-1"}}
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":1}"}}
                ]},
                {"role": "tool", "content": "found", "tool_call_id": "call_1"},
                {"role": "assistant", "content": null, "refusal": "no"}
            ],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_completion_tokens": 100,
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 40,
            "seed": 7,
            "stop": ["END"],
            "tools": [{"type": "function", "function": {"name": "lookup", "description": "find",
                "parameters": {"type": "object", "b": 1, "a": 2}, "strict": true}}],
            "tool_choice": {"type": "function", "function": {"name": "lookup"}},
            "parallel_tool_calls": false,
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": true}},
            "reasoning_effort": "low",
            "n": 1,
            "logprobs": true,
            "top_logprobs": 2,
            "frequency_penalty": 0.5,
            "presence_penalty": -0.5,
            "logit_bias": {"50256": -100.0},
            "user": "u-1",
            "metadata": {"team": "a"},
            "service_tier": "flex",
            "verbosity": "low",
            "store": false
        })
    );
    assert_eq!(out.dropped, ["messages[].reasoning_content"]);
}

#[test]
fn max_tokens_keeps_its_old_name_for_models_that_want_it() {
    let (body, _) = body_of(&agent_request(), &ProviderModel::default());
    assert_eq!(body["max_tokens"], 100);
    assert!(body.get("max_completion_tokens").is_none());
}

#[test]
fn unknown_parameters_follow_the_providers_policy() {
    let drop = ProviderModel { unknown_params: UnknownParams::Drop, ..ProviderModel::default() };
    let (body, dropped) = body_of(&agent_request(), &drop);
    assert!(body.get("verbosity").is_none() && body.get("store").is_none() && body.get("top_k").is_none());
    assert_eq!(dropped, ["messages[].reasoning_content", "top_k", "verbosity", "store"]);

    let refuse = ProviderModel { unknown_params: UnknownParams::Refuse, ..ProviderModel::default() };
    let err = request_body(&agent_request(), &refuse).unwrap_err();
    assert!(matches!(err, WireError::Unsupported { .. }), "{err:?}");
    assert_eq!(err.field(), Some("top_k"));
    let mut request = agent_request();
    request.sampling.as_mut().unwrap().top_k = None;
    assert_eq!(request_body(&request, &refuse).unwrap_err().field(), Some("verbosity"));

    request.options.as_mut().unwrap().extra_json = r#"{"model":"other"}"#.into();
    assert_eq!(request_body(&request, &ProviderModel::default()).unwrap_err().field(), Some("model"));
}

fn event(data: &str) -> SseEvent {
    SseEvent { event: None, data: data.to_owned() }
}

#[test]
fn the_stream_decodes_into_chunks_as_they_come() {
    let request = CompleteRequest { model: "requested".into(), ..Default::default() };
    let mut decoder = StreamDecoder::new(&request);
    let role = r#"{"model":"served-1","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]}"#;
    assert_eq!(decoder.on_event(&event(role)).unwrap(), None, "the role-only chunk is held");
    let reasoning = r#"{"choices":[{"index":0,"delta":{"reasoning_content":"hmm"}}]}"#;
    let chunk = decoder.on_event(&event(reasoning)).unwrap().unwrap();
    assert_eq!((chunk.reasoning_delta.as_str(), chunk.model.as_str()), ("hmm", "served-1"));
    let text = r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":{"content":[{"token":"Hi","logprob":-0.5,"bytes":[72,105],"top_logprobs":[]}],"refusal":null}}]}"#;
    let chunk = decoder.on_event(&event(text)).unwrap().unwrap();
    assert_eq!((chunk.delta.as_str(), chunk.model.as_str()), ("Hi", ""));
    assert!(chunk.logprobs_json.starts_with(r#"{"content":[{"token":"Hi""#));
    let calls = r#"{"choices":[{"index":0,"delta":{"tool_calls":[
        {"index":0,"id":"call_a","type":"function","function":{"name":"f","arguments":""}},
        {"index":1,"id":"call_b","type":"function","function":{"name":"g","arguments":"{\"x\""}}]}}]}"#;
    let chunk = decoder.on_event(&event(calls)).unwrap().unwrap();
    assert_eq!(
        chunk.tool_call_deltas,
        [
            pb::ToolCallDelta {
                index: 0,
                id: "call_a".into(),
                function_name: "f".into(),
                arguments_delta: String::new()
            },
            pb::ToolCallDelta {
                index: 1,
                id: "call_b".into(),
                function_name: "g".into(),
                arguments_delta: "{\"x\"".into()
            },
        ]
    );
    for piece in [
        r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":":1}"}}]}}]}"#,
        r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}]}"#,
    ] {
        assert_eq!(decoder.on_event(&event(piece)).unwrap().unwrap().tool_call_deltas.len(), 1);
    }
    let refusal = r#"{"choices":[{"index":0,"delta":{"refusal":"I can't"}}]}"#;
    assert_eq!(decoder.on_event(&event(refusal)).unwrap().unwrap().refusal_delta, "I can't");
    let other_choice = r#"{"choices":[{"index":1,"delta":{"content":"ignored"}}]}"#;
    assert_eq!(decoder.on_event(&event(other_choice)).unwrap(), None);
    let finish = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#;
    assert_eq!(decoder.on_event(&event(finish)).unwrap(), None);
    let usage = r#"{"choices":[],"usage":{"prompt_tokens":2006,"completion_tokens":300,"total_tokens":2306,
        "prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":192}}}"#;
    assert_eq!(decoder.on_event(&event(usage)).unwrap(), None);
    assert!(!decoder.is_done());
    let last = decoder.on_event(&event("[DONE]")).unwrap().unwrap();
    assert!(decoder.is_done());
    assert_eq!(last.finish_reason, "tool_calls");
    assert_eq!(last.model, "");
    assert_eq!(
        last.usage,
        Some(pb::Usage {
            prompt_tokens: 2006,
            completion_tokens: 300,
            total_tokens: 2306,
            cost_micros: 0,
            cached_prompt_tokens: 1920,
            cache_write_tokens: 0,
            reasoning_tokens: 192,
        })
    );
    let calls: Vec<_> =
        last.tool_calls.iter().map(|c| (c.id.as_str(), c.function_name.as_str(), c.arguments_json.as_str())).collect();
    assert_eq!(calls, [("call_a", "f", "{}"), ("call_b", "g", "{\"x\":1}")]);
}

#[test]
fn an_answer_without_a_reported_model_names_the_requested_one() {
    let request = CompleteRequest { model: "requested".into(), ..Default::default() };
    let mut decoder = StreamDecoder::new(&request);
    let last = decoder.on_event(&event("[DONE]")).unwrap().unwrap();
    assert_eq!((last.model.as_str(), last.usage), ("requested", None));
}

#[test]
fn garbage_and_error_events_fail_the_stream() {
    let mut decoder = StreamDecoder::new(&CompleteRequest::default());
    assert!(matches!(decoder.on_event(&event("{not json")), Err(WireError::Protocol(_))));
    let err = decoder.on_event(&event(r#"{"error":{"message":"overloaded","type":"server_error"}}"#)).unwrap_err();
    let WireError::Provider(error) = err else { panic!("{err:?}") };
    assert_eq!((error.kind, error.message.as_str()), (ProviderErrorKind::Server, "overloaded"));
    let named = SseEvent { event: Some("error".into()), data: r#"{"message":"boom"}"#.into() };
    assert!(decoder.on_event(&named).unwrap_err().to_string().contains("boom"));
    let overflow = r#"{"error":{"message":"too long","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
    let WireError::Provider(error) = decoder.on_event(&event(overflow)).unwrap_err() else { panic!() };
    assert_eq!(error.kind, ProviderErrorKind::ContextLengthExceeded);
}

#[test]
fn whole_completions_decode_to_the_same_chunks() {
    let request = CompleteRequest { model: "requested".into(), ..Default::default() };
    let body = br#"{"id":"chatcmpl-1","object":"chat.completion","model":"served","choices":[{"index":0,
        "message":{"role":"assistant","content":"Hello","refusal":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{}"}}]},
        "finish_reason":"tool_calls","logprobs":null}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
    let chunks = decode_completion(&request, body).unwrap();
    assert_eq!(chunks.len(), 2);
    assert_eq!((chunks[0].delta.as_str(), chunks[0].model.as_str()), ("Hello", "served"));
    assert_eq!(chunks[1].finish_reason, "tool_calls");
    assert_eq!(chunks[1].tool_calls[0].function_name, "f");
    assert_eq!(chunks[1].usage.unwrap().total_tokens, 7);
    let answer: crate::Answer = chunks.into_iter().collect();
    assert_eq!(answer.tool_calls.len(), 1);

    assert!(matches!(decode_completion(&request, b"{\"choices\":[]}"), Err(WireError::Protocol(_))));
    assert!(matches!(decode_completion(&request, b"<html>"), Err(WireError::Protocol(_))));
    assert!(matches!(decode_completion(&request, br#"{"error":{"message":"x"}}"#), Err(WireError::Provider(_))));
}

#[test]
fn error_answers_are_classified() {
    let cases: [(u16, &str, ProviderErrorKind, &str, &str); 9] = [
        (
            400,
            r#"{"error":{"message":"This model's maximum context length is 8192 tokens. However, your messages resulted in 8227 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#,
            ProviderErrorKind::ContextLengthExceeded,
            "context_length_exceeded",
            "messages",
        ),
        (
            400,
            r#"{"object":"error","message":"This model's maximum context length is 131072 tokens. However, you requested 351430 tokens.","type":"BadRequestError","param":null,"code":400}"#,
            ProviderErrorKind::ContextLengthExceeded,
            "context_length_exceeded",
            "messages",
        ),
        (
            400,
            r#"{"error":{"message":"Unrecognized request argument supplied: verbosity","type":"invalid_request_error","param":null,"code":null}}"#,
            ProviderErrorKind::InvalidRequest,
            "invalid_request_error",
            "",
        ),
        (
            429,
            r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
            ProviderErrorKind::RateLimited,
            "rate_limit_exceeded",
            "",
        ),
        (
            401,
            r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}}"#,
            ProviderErrorKind::Auth,
            "invalid_api_key",
            "",
        ),
        (
            404,
            r#"{"error":{"message":"The model `x` does not exist","type":"invalid_request_error","code":"model_not_found"}}"#,
            ProviderErrorKind::ModelNotFound,
            "model_not_found",
            "",
        ),
        (500, r#"{"error":"internal"}"#, ProviderErrorKind::Server, "", ""),
        (503, "upstream connect error", ProviderErrorKind::Server, "", ""),
        (413, r#"{"detail":"body too large"}"#, ProviderErrorKind::PayloadTooLarge, "", ""),
    ];
    for (status, body, kind, code, param) in cases {
        let error = provider_error(status, body.as_bytes());
        assert_eq!(
            (error.kind, error.code.as_str(), error.param.as_str(), error.status),
            (kind, code, param, status),
            "{body}"
        );
        assert!(!error.message.is_empty() && error.message != "no message", "{body}");
    }
    assert_eq!(provider_error(503, b"upstream connect error").message, "upstream connect error");
}
