"""The official openai Python SDK as an agent uses it: a tools round trip with the function run here,
tool calls streamed and accumulated by index, `.parse()` with Pydantic models (response format and
function tools), and an image part in a conversation that goes on."""

import json
from typing import Literal

import openai
from pydantic import BaseModel

# A 1x1 PNG.
PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


class Weather(BaseModel):
    city: str
    unit: Literal["celsius", "fahrenheit"]


class LocalTime(BaseModel):
    timezone: str


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}

TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a timezone.",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
        },
    },
}


def get_weather(city, unit):
    """The function the model asks for, run here as an agent runs it."""
    return f"{city} is 21 degrees {unit} and sunny"


class Step(BaseModel):
    explanation: str
    output: str


class MathReasoning(BaseModel):
    steps: list[Step]
    final_answer: str
    confidence: float | None
    kind: Literal["arithmetic", "algebra"]


def test_tools_round_trip_runs_the_function_and_answers_with_its_result(client, model, marker, provider_requests):
    messages = [{"role": "user", "content": f"{marker} What is the weather in Paris?"}]
    first = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls, choice.message
    assert all(call.type == "function" and call.function.name == "get_weather" for call in calls)

    # As the SDK's guide does it: the assistant message goes back as the SDK returned it.
    messages.append(choice.message)
    results = []
    for call in calls:
        arguments = Weather.model_validate_json(call.function.arguments)
        result = get_weather(arguments.city, arguments.unit)
        results.append(result)
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    final = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL])
    answer = final.choices[0]
    assert answer.finish_reason == "stop", answer
    assert not answer.message.tool_calls
    for result in results:
        assert result in answer.message.content, answer.message.content
    assert final.usage.prompt_tokens > first.usage.prompt_tokens

    # What reached the provider: the tool offered, then the call and its result.
    sent = provider_requests(marker)
    assert [tool["function"]["name"] for tool in sent[0]["tools"]] == ["get_weather"]
    assert sent[0]["tools"][0]["function"]["parameters"] == WEATHER_TOOL["function"]["parameters"]
    replayed = sent[-1]["messages"]
    assert [call["id"] for call in replayed[1]["tool_calls"]] == [call.id for call in calls]
    assert {k: replayed[2][k] for k in ("role", "tool_call_id", "content")} == {
        "role": "tool",
        "tool_call_id": calls[0].id,
        "content": results[0],
    }


def test_streamed_tool_calls_accumulate_by_index(client, model, marker):
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"{marker} Weather in Paris and the time there?"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        stream=True,
        stream_options={"include_usage": True},
    )
    calls = {}
    argument_pieces = 0
    finish_reason = None
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                if delta.id:
                    assert call["id"] is None, "a call's id comes once"
                    call["id"] = delta.id
                if delta.function and delta.function.name:
                    call["name"] += delta.function.name
                if delta.function and delta.function.arguments:
                    assert call["id"], "arguments follow the start of their call"
                    call["arguments"] += delta.function.arguments
                    argument_pieces += 1
            finish_reason = choice.finish_reason or finish_reason
    assert finish_reason == "tool_calls"
    by_name = {call["name"]: call for call in calls.values()}
    assert sorted(by_name) == ["get_time", "get_weather"], calls
    Weather.model_validate_json(by_name["get_weather"]["arguments"])
    LocalTime.model_validate_json(by_name["get_time"]["arguments"])
    assert len({call["id"] for call in calls.values()}) == 2
    # Streamed as they were produced, not delivered whole at the end.
    assert argument_pieces > len(calls), argument_pieces
    assert usage is not None and usage.completion_tokens > 0


def test_parse_with_a_pydantic_model(client, model, marker, provider_requests):
    completion = client.chat.completions.parse(
        model=model,
        messages=[
            {"role": "system", "content": "You are a helpful math tutor."},
            {"role": "user", "content": f"{marker} solve 8x + 7 = -23"},
        ],
        response_format=MathReasoning,
    )
    message = completion.choices[0].message
    assert message.refusal is None
    assert isinstance(message.parsed, MathReasoning), message
    assert message.parsed.steps and message.parsed.kind in ("arithmetic", "algebra")
    assert MathReasoning.model_validate_json(message.content) == message.parsed

    sent = provider_requests(marker)[-1]
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"]["name"] == "MathReasoning"
    assert sent["response_format"]["json_schema"]["strict"] is True
    assert "$defs" in sent["response_format"]["json_schema"]["schema"]


def test_parse_with_pydantic_function_tools(client, model, marker):
    completion = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": f"{marker} weather in Oslo?"}],
        tools=[openai.pydantic_function_tool(Weather, name="get_weather")],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    calls = completion.choices[0].message.tool_calls
    assert len(calls) == 1
    assert isinstance(calls[0].function.parsed_arguments, Weather)


def test_an_image_part_reaches_the_provider_and_the_conversation_goes_on(client, model, marker, provider_requests):
    data_uri = f"data:image/png;base64,{PNG_BASE64}"
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": f"{marker} what is in this image?"},
                {"type": "image_url", "image_url": {"url": data_uri, "detail": "low"}},
            ],
        }
    ]
    first = client.chat.completions.create(model=model, messages=messages)
    assert "what is in this image?" in first.choices[0].message.content
    # Every later turn carries the image again.
    messages.append({"role": "assistant", "content": first.choices[0].message.content})
    messages.append({"role": "user", "content": f"{marker} and what colour is it?"})
    second = client.chat.completions.create(model=model, messages=messages)
    assert "what colour is it?" in second.choices[0].message.content

    for sent in provider_requests(marker):
        part = sent["messages"][0]["content"][1]
        assert part["type"] == "image_url"
        assert part["image_url"]["url"] == data_uri
