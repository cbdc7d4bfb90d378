"""The Responses API through the official openai Python SDK, as agents call it by default:
`instructions` and `input`, a function tool round trip (function_call -> function_call_output
items), `text.format` with a JSON schema (`responses.parse` with a Pydantic model), the event
stream, and the stored conversation (`store`, `previous_response_id`, retrieve, delete).

The mock provider serves /v1/responses itself, so these run against it too (the oracle), except
the stored conversation: the mock keeps no responses (mesh_only). Each test runs twice: with the
model of an OpenAI chat-completions provider (meshgate translates the request to chat completions)
and with the model of a provider of kind `openai-responses` (meshgate calls it in the Responses
format); what reached the provider is checked in whichever shape it came, by the helpers below."""

import json
import os
from typing import Literal

import openai
import pytest
from pydantic import BaseModel

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


@pytest.fixture(params=["MESHGATE_CLIENTS_MODEL", "MESHGATE_CLIENTS_RESPONSES_MODEL"], ids=["chat-kind", "responses-kind"])
def model(request):
    """The model of a chat-completions provider, then of an `openai-responses` provider (the mock
    serves any model name itself)."""
    value = os.environ.get(request.param)
    if not value:
        pytest.exit(f"{request.param} is not set: run these tests through scripts/clients/run.sh", returncode=2)
    return value


def responses_api(record):
    """Whether a provider request is a Responses API request (else Chat Completions)."""
    return record["path"] == "/v1/responses"


def turns(record):
    """A provider request's conversation as [(role, content)], in Chat Completions terms whichever
    API it reached (a developer message is a system one): Responses `instructions` are a system
    message, a run of assistant messages and function calls one assistant turn (content None when
    it only calls), a function call output a tool turn."""
    body = record["body"]

    def role(role):
        return "system" if role == "developer" else role

    if not responses_api(record):
        return [(role(message["role"]), message.get("content")) for message in body["messages"]]
    found = [("system", body["instructions"])] if body.get("instructions") else []
    items = body["input"]
    # A string input is one user message.
    for item in [{"role": "user", "content": items}] if isinstance(items, str) else items:
        kind = item.get("type", "message")
        if kind == "function_call_output":
            found.append(("tool", item["output"]))
        elif kind == "function_call" or (kind == "message" and item["role"] == "assistant"):
            content = item.get("content") if kind == "message" else None
            if found and found[-1][0] == "assistant":
                found[-1] = ("assistant", found[-1][1] or content)
            else:
                found.append(("assistant", content))
        elif kind == "message":
            found.append((role(item["role"]), item["content"]))
    return found


def roles(record):
    return [role for role, _ in turns(record)]


def tool_calls(record):
    """The ids of the tool calls replayed in a provider request, in order."""
    body = record["body"]
    if responses_api(record):
        return [item["call_id"] for item in body["input"] if item.get("type") == "function_call"]
    return [call["id"] for message in body["messages"] for call in message.get("tool_calls") or []]


def tool_outputs(record):
    """The (call id, content) of each tool result in a provider request."""
    body = record["body"]
    if responses_api(record):
        return [(i["call_id"], i["output"]) for i in body["input"] if i.get("type") == "function_call_output"]
    return [(m["tool_call_id"], m["content"]) for m in body["messages"] if m["role"] == "tool"]


def functions(record):
    """The function tools of a provider request: {name: parameters}."""
    tools = record["body"]["tools"]
    if responses_api(record):
        return {tool["name"]: tool["parameters"] for tool in tools}
    return {tool["function"]["name"]: tool["function"]["parameters"] for tool in tools}


def reasoning_effort(record):
    body = record["body"]
    return body["reasoning"]["effort"] if responses_api(record) else body["reasoning_effort"]


def json_schema_format(record):
    """A provider request's JSON schema output format: {"name", "schema", "strict", ...}."""
    body = record["body"]
    if responses_api(record):
        assert body["text"]["format"]["type"] == "json_schema"
        return body["text"]["format"]
    assert body["response_format"]["type"] == "json_schema"
    return body["response_format"]["json_schema"]


def test_create_with_instructions_and_input(client, model, marker, provider_records):
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

    (sent,) = provider_records(marker)
    # The instructions are the system (or developer) message before the input.
    assert roles(sent)[0] == "system" and roles(sent)[-1] == "user"
    assert instructions in json.dumps(turns(sent)[0][1])


def test_function_tool_round_trip(client, model, marker, provider_records):
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

    sent = provider_records(marker)
    assert len(sent) == 2
    assert functions(sent[0]) == {"get_weather": WEATHER_TOOL["parameters"]}
    assert roles(sent[1]) == ["user", "assistant", "tool"]
    assert tool_calls(sent[1]) == [calls[0].call_id]
    assert tool_outputs(sent[1]) == [(calls[0].call_id, result)]


def test_function_tool_round_trip_with_reasoning_items_replayed(client, model, marker, provider_records):
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

    sent = provider_records(marker)
    assert [reasoning_effort(record) for record in sent] == ["low", "low"]
    assert roles(sent[1]) == ["user", "assistant", "tool"]


def test_parse_with_a_pydantic_text_format(client, model, marker, provider_records):
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

    (sent,) = provider_records(marker)
    schema_format = json_schema_format(sent)
    assert schema_format["name"] == "MathReasoning"
    assert schema_format["strict"] is True
    assert "$defs" in schema_format["schema"]


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


@pytest.mark.mesh_only  # The mock provider keeps no responses: no previous_response_id there.
def test_stored_response_continues_with_previous_response_id(client, model, marker, provider_records):
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
    sent = provider_records(marker)
    assert len(sent) == 2
    assert roles(sent[1]) == ["user", "assistant", "user"]
    conversation = turns(sent[1])
    assert f"{marker} my name is Ada" in json.dumps(conversation[0][1])
    assert first.output_text in json.dumps(conversation[1][1])


@pytest.mark.mesh_only  # The mock provider keeps no responses: nothing to retrieve or delete there.
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

