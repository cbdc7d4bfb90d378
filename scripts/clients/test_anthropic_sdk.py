"""The official anthropic Python SDK as Claude-style applications use it: a system prompt, a tool
round trip with the function run here (invoked and streamed), `messages.stream()` with its text
deltas and final message, `count_tokens`, and the SDK's typed errors.

Against the mock provider the SDK speaks to its native Messages route; through meshgate the same
requests are translated for an OpenAI-shaped provider (the mock's chat completions), so what
reached the provider is checked in whichever of the two shapes it came in."""

import json

import anthropic
import pytest

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
    },
}


def get_weather(city, unit):
    """The function the model asks for, run here as an application runs it."""
    return f"{city} is 21 degrees {unit} and sunny"


@pytest.fixture(scope="module")
def claude(root_url, api_key):
    # No retries: a failure must show as the first answer, not as a slow retry loop.
    return anthropic.Anthropic(base_url=root_url, api_key=api_key, max_retries=0, timeout=30)


def text_of(message):
    return "".join(block.text for block in message.content if block.type == "text")


def system_at_provider(record):
    """The system prompt the provider received, in either wire format."""
    body = record["body"]
    if record["path"] == "/v1/messages":
        system = body.get("system") or ""
        return system if isinstance(system, str) else " ".join(block["text"] for block in system)
    parts = []
    for message in body["messages"]:
        if message["role"] in ("system", "developer"):
            content = message["content"]
            parts.append(content if isinstance(content, str) else " ".join(p["text"] for p in content))
    return " ".join(parts)


def tool_names_at_provider(record):
    tools = record["body"].get("tools") or []
    return [tool["name"] if record["path"] == "/v1/messages" else tool["function"]["name"] for tool in tools]


def test_create_with_a_system_prompt(claude, model, marker, provider_records):
    system = "You are a terse assistant who answers in one line."
    message = claude.messages.create(
        model=model,
        max_tokens=256,
        system=system,
        messages=[{"role": "user", "content": f"{marker} say hello"}],
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.stop_reason == "end_turn"
    assert text_of(message) == f"echo: {marker} say hello"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0

    sent = provider_records(marker)
    assert len(sent) == 1
    assert system_at_provider(sent[0]) == system
    # The system prompt is not a user turn.
    assert system not in json.dumps([m for m in sent[0]["body"]["messages"] if m["role"] == "user"])


def test_tool_round_trip_runs_the_function_and_answers_with_its_result(claude, model, marker, provider_records):
    messages = [{"role": "user", "content": f"{marker} What is the weather in Paris?"}]
    first = claude.messages.create(model=model, max_tokens=256, messages=messages, tools=[WEATHER_TOOL])
    assert first.stop_reason == "tool_use", first
    uses = [block for block in first.content if block.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather", first.content
    assert set(uses[0].input) == {"city", "unit"}
    assert uses[0].input["unit"] in ("celsius", "fahrenheit")

    # As Anthropic's guide does it: the assistant content goes back as the SDK returned it.
    messages.append({"role": "assistant", "content": first.content})
    result = get_weather(**uses[0].input)
    messages.append(
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": result}]}
    )
    final = claude.messages.create(model=model, max_tokens=256, messages=messages, tools=[WEATHER_TOOL])
    assert final.stop_reason == "end_turn", final
    assert not [block for block in final.content if block.type == "tool_use"]
    assert result in text_of(final), final.content
    assert final.usage.input_tokens > first.usage.input_tokens

    # What reached the provider: the tool offered, then the call and its result.
    sent = provider_records(marker)
    assert len(sent) == 2
    assert tool_names_at_provider(sent[0]) == ["get_weather"]
    replayed = json.dumps(sent[1]["body"]["messages"])
    assert uses[0].id in replayed and result in replayed


def test_streamed_tool_use_arrives_whole_in_the_final_message(claude, model, marker):
    with claude.messages.stream(
        model=model,
        max_tokens=256,
        messages=[{"role": "user", "content": f"{marker} weather in Rome?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
    ) as stream:
        partials = [event.partial_json for event in stream if event.type == "input_json"]
        final = stream.get_final_message()
    assert len(partials) > 1, "the input arrives in pieces"
    assert final.stop_reason == "tool_use"
    (use,) = [block for block in final.content if block.type == "tool_use"]
    assert use.name == "get_weather" and use.id
    assert json.loads("".join(partials)) == use.input
    assert set(use.input) == {"city", "unit"}


def test_thinking_tool_loop_replays_the_thinking_blocks(claude, model, marker):
    """Claude Code's loop: with thinking on, the assistant turn (thinking and tool_use blocks) goes
    back as it came, with the tool result; the next turn thinks again and answers."""
    thinking = {"type": "enabled", "budget_tokens": 2048}
    messages = [{"role": "user", "content": f"{marker} What is the weather in Paris?"}]
    turn = {"model": model, "max_tokens": 4096, "thinking": thinking, "tools": [WEATHER_TOOL]}
    first = claude.messages.create(**turn, messages=messages)
    assert [block.type for block in first.content] == ["thinking", "tool_use"], first.content
    assert first.content[0].thinking
    use = first.content[1]
    messages.append({"role": "assistant", "content": first.content})
    result = get_weather(**use.input)
    messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": result}]})
    final = claude.messages.create(**turn, messages=messages)
    assert [block.type for block in final.content] == ["thinking", "text"], final.content
    assert final.stop_reason == "end_turn"
    assert result in text_of(final)


def test_max_tokens_cuts_the_answer(claude, model, marker):
    message = claude.messages.create(
        model=model, max_tokens=2, messages=[{"role": "user", "content": f"{marker} one two three four"}]
    )
    assert message.stop_reason == "max_tokens"
    assert text_of(message) == f"echo: {marker}"
    assert message.usage.output_tokens == 2


def test_stream_text_deltas_and_the_final_message(claude, model, marker, provider_records):
    with claude.messages.stream(
        model=model,
        max_tokens=256,
        system="Answer briefly.",
        messages=[{"role": "user", "content": f"{marker} tell me about streams please"}],
    ) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(deltas) > 1, "the text is streamed in pieces"
    assert "".join(deltas) == text_of(final) == f"echo: {marker} tell me about streams please"
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens > 0
    assert final.usage.output_tokens == len(deltas)
    assert provider_records(marker)[-1]["body"]["stream"] is True


@pytest.mark.mesh_only  # The mock provider has no /v1/messages/count_tokens.
def test_count_tokens(claude, model, marker, provider_records):
    short = [{"role": "user", "content": f"{marker} hi"}]
    long = [{"role": "user", "content": f"{marker} " + "a much longer question about the weather " * 20}]
    counted = claude.messages.count_tokens(model=model, messages=short)
    assert counted.input_tokens > 0
    with_system = claude.messages.count_tokens(model=model, system="You are a weather bot.", messages=short)
    assert with_system.input_tokens > counted.input_tokens
    with_tools = claude.messages.count_tokens(model=model, messages=short, tools=[WEATHER_TOOL])
    assert with_tools.input_tokens > counted.input_tokens
    assert claude.messages.count_tokens(model=model, messages=long).input_tokens > counted.input_tokens + 100
    # Counting is meshgate's own estimate: no provider is asked.
    assert not provider_records(marker, required=False)


@pytest.mark.mesh_only  # The mock provider has no /v1/messages/count_tokens.
def test_count_tokens_for_a_model_nothing_serves_is_not_found(claude, model):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="no-such-model", max_tokens=16, messages=messages)
    with pytest.raises(anthropic.NotFoundError) as raised:
        claude.messages.count_tokens(model="no-such-model", messages=messages)
    assert raised.value.body["error"]["type"] == "not_found_error"


def test_a_bad_request_raises_bad_request_error(claude, model, marker, target, provider_records):
    # A tool result answering no tool_use of the turn before.
    orphan = {"type": "tool_result", "tool_use_id": "toolu_nowhere", "content": "21 degrees"}
    with pytest.raises(anthropic.BadRequestError) as raised:
        claude.messages.create(
            model=model,
            max_tokens=256,
            messages=[{"role": "user", "content": [{"type": "text", "text": f"{marker} hi"}, orphan]}],
        )
    assert raised.value.status_code == 400
    assert raised.value.body["type"] == "error"
    assert raised.value.body["error"]["type"] == "invalid_request_error"
    assert "toolu_nowhere" in raised.value.body["error"]["message"]

    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=model, max_tokens=256, messages=[])
    if target == "mesh":
        # Refused at the edge: the provider never saw it.
        assert not provider_records(marker, required=False)


@pytest.mark.mesh_only  # The mock provider runs without a key: any key is good there.
def test_a_wrong_key_raises_authentication_error(root_url, api_key, model, marker, provider_records):
    wrong = anthropic.Anthropic(base_url=root_url, api_key="mg-not-a-key", max_retries=0, timeout=30)
    with pytest.raises(anthropic.AuthenticationError) as raised:
        wrong.messages.create(model=model, max_tokens=64, messages=[{"role": "user", "content": f"{marker} hi"}])
    assert raised.value.status_code == 401
    assert raised.value.body["error"]["type"] == "authentication_error"
    assert not provider_records(marker, required=False)

    # The key as a Bearer token (the SDK's auth_token) is a key too.
    bearer = anthropic.Anthropic(base_url=root_url, auth_token=api_key, api_key=None, max_retries=0, timeout=30)
    message = bearer.messages.create(model=model, max_tokens=64, messages=[{"role": "user", "content": f"{marker} hi"}])
    assert text_of(message) == f"echo: {marker} hi"
