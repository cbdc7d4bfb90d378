"""The Responses API through the official openai Python SDK, as agents call it by default:
`instructions` and `input`, a function tool round trip (function_call -> function_call_output
items), `text.format` with a JSON schema (`responses.parse` with a Pydantic model), the event
stream, and the stored conversation (`store`, `previous_response_id`, retrieve, delete).

The mock provider serves chat completions and Anthropic messages, not /v1/responses: every test
here runs only through meshgate (mesh_only), which answers the Responses API from a provider's
chat completions; what reached the provider is checked in that shape."""

import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel

pytestmark = pytest.mark.mesh_only

WEATHER_TOOL = {
    "type": "function",
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
    "strict": True,
}


class Weather(BaseModel):
    city: str
    unit: Literal["celsius", "fahrenheit"]


def get_weather(city, unit):
    """The function the model asks for, run here as an agent runs it."""
    return f"{city} is 21 degrees {unit} and sunny"


class Step(BaseModel):
    explanation: str
    output: str


class MathReasoning(BaseModel):
    steps: list[Step]
    final_answer: str
    kind: Literal["arithmetic", "algebra"]


def roles(body):
    return [message["role"] for message in body["messages"]]


def test_create_with_instructions_and_input(client, model, marker, provider_requests):
    instructions = "You are a terse assistant."
    response = client.responses.create(model=model, instructions=instructions, input=f"{marker} say hello")
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "completed"
    assert response.output_text == f"echo: {marker} say hello"
    (item,) = response.output
    assert item.type == "message" and item.role == "assistant"
    assert response.instructions == instructions
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens

    (sent,) = provider_requests(marker)
    # The instructions are the system (or developer) message before the input.
    assert roles(sent)[-1] == "user"
    assert sent["messages"][0]["role"] in ("system", "developer")
    assert instructions in json.dumps(sent["messages"][0]["content"])


def test_function_tool_round_trip(client, model, marker, provider_requests):
    inputs = [{"role": "user", "content": f"{marker} What is the weather in Paris?"}]
    first = client.responses.create(model=model, input=inputs, tools=[WEATHER_TOOL], store=False)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather", first.output
    assert calls[0].call_id
    arguments = Weather.model_validate_json(calls[0].arguments)

    # As OpenAI's function calling guide does it: the output items go back, then the results.
    inputs += first.output
    result = get_weather(arguments.city, arguments.unit)
    inputs.append({"type": "function_call_output", "call_id": calls[0].call_id, "output": result})
    final = client.responses.create(model=model, input=inputs, tools=[WEATHER_TOOL], store=False)
    assert not [item for item in final.output if item.type == "function_call"]
    assert result in final.output_text, final.output
    assert final.usage.input_tokens > first.usage.input_tokens

    sent = provider_requests(marker)
    assert len(sent) == 2
    assert [tool["function"]["name"] for tool in sent[0]["tools"]] == ["get_weather"]
    assert sent[0]["tools"][0]["function"]["parameters"] == WEATHER_TOOL["parameters"]
    assert roles(sent[1]) == ["user", "assistant", "tool"]
    assert [call["id"] for call in sent[1]["messages"][1]["tool_calls"]] == [calls[0].call_id]
    assert sent[1]["messages"][2]["tool_call_id"] == calls[0].call_id
    assert sent[1]["messages"][2]["content"] == result


def test_function_tool_round_trip_with_reasoning_items_replayed(client, model, marker, provider_requests):
    """A reasoning model's loop, as the Agents SDK runs it without stored state: the reasoning item
    goes back with the function call and its output."""
    inputs = [{"role": "user", "content": f"{marker} What is the weather in Oslo?"}]
    reasoning = {"effort": "low", "summary": "auto"}
    first = client.responses.create(model=model, input=inputs, tools=[WEATHER_TOOL], reasoning=reasoning, store=False)
    assert [item.type for item in first.output] == ["reasoning", "function_call"], first.output
    assert first.usage.output_tokens_details.reasoning_tokens > 0
    call = first.output[1]
    arguments = Weather.model_validate_json(call.arguments)
    inputs += [item.model_dump(exclude_none=True) for item in first.output]
    result = get_weather(arguments.city, arguments.unit)
    inputs.append({"type": "function_call_output", "call_id": call.call_id, "output": result})
    final = client.responses.create(model=model, input=inputs, tools=[WEATHER_TOOL], reasoning=reasoning, store=False)
    assert [item.type for item in final.output] == ["reasoning", "message"], final.output
    assert result in final.output_text

    sent = provider_requests(marker)
    assert [body["reasoning_effort"] for body in sent] == ["low", "low"]
    assert roles(sent[1]) == ["user", "assistant", "tool"]


def test_parse_with_a_pydantic_text_format(client, model, marker, provider_requests):
    response = client.responses.parse(
        model=model,
        instructions="You are a helpful math tutor.",
        input=f"{marker} solve 8x + 7 = -23",
        text_format=MathReasoning,
    )
    parsed = response.output_parsed
    assert isinstance(parsed, MathReasoning), response.output
    assert parsed.steps and parsed.kind in ("arithmetic", "algebra")
    assert MathReasoning.model_validate_json(response.output_text) == parsed
    assert response.text.format.type == "json_schema" and response.text.format.name == "MathReasoning"

    (sent,) = provider_requests(marker)
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"]["name"] == "MathReasoning"
    assert sent["response_format"]["json_schema"]["strict"] is True
    assert "$defs" in sent["response_format"]["json_schema"]["schema"]


def test_stream_text_deltas_and_the_completed_response(client, model, marker):
    with client.responses.stream(model=model, input=f"{marker} tell me about streams please") as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert kinds[-1] == "response.completed", kinds
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) > 1, "the text is streamed in pieces"
    assert "".join(deltas) == final.output_text == f"echo: {marker} tell me about streams please"
    done = [event for event in events if event.type == "response.output_text.done"]
    assert [event.text for event in done] == [final.output_text]
    completed = events[-1].response
    assert completed.status == "completed" and completed.id == final.id
    assert completed.usage.output_tokens == len(deltas)
    assert completed.usage.input_tokens > 0


def test_streamed_function_call_arguments(client, model, marker):
    stream = client.responses.create(
        model=model,
        input=f"{marker} weather in Rome?",
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        stream=True,
    )
    events = list(stream)
    pieces = [event.delta for event in events if event.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 1, "the arguments arrive in pieces"
    (done,) = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert "".join(pieces) == done.arguments
    Weather.model_validate_json(done.arguments)
    completed = events[-1]
    assert completed.type == "response.completed"
    (call,) = completed.response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.arguments == done.arguments


def test_stored_response_continues_with_previous_response_id(client, model, marker, provider_requests):
    first = client.responses.create(
        model=model, instructions="Remember what you are told.", input=f"{marker} my name is Ada", store=True
    )
    assert first.store is True
    second = client.responses.create(
        model=model, input=f"{marker} what is my name?", previous_response_id=first.id, store=True
    )
    assert second.previous_response_id == first.id
    assert second.output_text == f"echo: {marker} what is my name?"
    assert second.usage.input_tokens > first.usage.input_tokens

    # The provider got the whole conversation: the first turn, its answer, the new question; as
    # OpenAI documents it, the earlier response's instructions are not carried over.
    sent = provider_requests(marker)
    assert len(sent) == 2
    assert roles(sent[1]) == ["user", "assistant", "user"]
    conversation = sent[1]["messages"]
    assert f"{marker} my name is Ada" in json.dumps(conversation[0]["content"])
    assert first.output_text in json.dumps(conversation[1]["content"])


def test_retrieve_and_delete_a_stored_response(client, model, marker):
    # Stored by default, as OpenAI does.
    created = client.responses.create(model=model, input=f"{marker} keep this")
    assert created.store is True
    retrieved = client.responses.retrieve(created.id)
    assert retrieved.id == created.id
    assert retrieved.status == "completed"
    assert retrieved.output_text == created.output_text == f"echo: {marker} keep this"
    assert retrieved.usage.total_tokens == created.usage.total_tokens

    deleted = client.responses.delete(created.id)
    # The SDK's delete returns None (the body is {"id", "object", "deleted"}).
    assert deleted is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=model, input=f"{marker} and then?", previous_response_id=created.id)

    # A response asked not to be stored is not.
    unstored = client.responses.create(model=model, input=f"{marker} forget this", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)

