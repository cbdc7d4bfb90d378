"""The OpenAI Agents SDK (openai-agents) as an application runs it: an Agent with one
@function_tool, `Runner.run` through its default model (the Responses API, on the client given to
`set_default_openai_client`) and through `OpenAIChatCompletionsModel`; the tool must really run and
the final output use its result. Also a streamed run and a structured `output_type`.

The Responses runs need /v1/responses, which the mock provider does not serve (mesh_only); the
chat completions run also works against the mock itself."""

import asyncio
from typing import Literal

import pytest
from agents import (
    Agent,
    ItemHelpers,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_default_openai_api,
    set_default_openai_client,
    set_tracing_disabled,
)
from openai import AsyncOpenAI
from pydantic import BaseModel

# Tracing would post spans to OpenAI's servers with the key: off.
set_tracing_disabled(True)


def make_weather_tool():
    """A fresh tool and the list of the calls it ran."""
    ran = []

    @function_tool
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """The current weather in a city.

        Args:
            city: City name.
            unit: Temperature unit.
        """
        ran.append((city, unit))
        return f"{city} is 21 degrees {unit} and sunny"

    return get_weather, ran


def async_client(base_url, api_key):
    # Made inside each test's event loop: an httpx client belongs to the loop it first ran in.
    return AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)


def check_tool_run(result, ran, sent):
    """The tool ran once, its output is in the run's items and in the final output, and the provider
    got the tool offered, then its call and result."""
    assert len(ran) == 1, ran
    city, unit = ran[0]
    expected = f"{city} is 21 degrees {unit} and sunny"
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"], kinds
    assert result.new_items[1].output == expected
    assert expected in result.final_output, result.final_output
    assert len(result.raw_responses) == 2
    assert [tool["function"]["name"] for tool in sent[0]["tools"]] == ["get_weather"]
    tool_messages = [m for m in sent[-1]["messages"] if m["role"] == "tool"]
    assert [m["content"] for m in tool_messages] == [expected]


@pytest.mark.mesh_only  # The default model speaks the Responses API, which the mock does not serve.
def test_runner_with_the_default_responses_model(base_url, api_key, model, marker, provider_requests):
    get_weather, ran = make_weather_tool()

    async def main():
        set_default_openai_client(async_client(base_url, api_key), use_for_tracing=False)
        set_default_openai_api("responses")
        agent = Agent(
            name="Weather agent",
            instructions="Answer with the weather tool.",
            model=model,
            tools=[get_weather],
        )
        return await Runner.run(agent, f"{marker} What is the weather in Paris?")

    result = asyncio.run(main())
    # The default model is the Responses one: its ids are responses'.
    assert all(response.response_id.startswith("resp_") for response in result.raw_responses)
    check_tool_run(result, ran, provider_requests(marker))


def test_runner_with_the_chat_completions_model(base_url, api_key, model, marker, provider_requests):
    get_weather, ran = make_weather_tool()

    async def main():
        agent = Agent(
            name="Weather agent",
            instructions="Answer with the weather tool.",
            model=OpenAIChatCompletionsModel(model=model, openai_client=async_client(base_url, api_key)),
            tools=[get_weather],
        )
        return await Runner.run(agent, f"{marker} What is the weather in Paris?")

    result = asyncio.run(main())
    check_tool_run(result, ran, provider_requests(marker))


@pytest.mark.mesh_only  # The Responses API again.
def test_streamed_run_with_the_default_responses_model(base_url, api_key, model, marker, provider_requests):
    get_weather, ran = make_weather_tool()

    async def main():
        set_default_openai_client(async_client(base_url, api_key), use_for_tracing=False)
        set_default_openai_api("responses")
        agent = Agent(name="Weather agent", instructions="Use the tool.", model=model, tools=[get_weather])
        result = Runner.run_streamed(agent, f"{marker} What is the weather in Oslo?")
        deltas, messages = [], []
        async for event in result.stream_events():
            if event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
                deltas.append(event.data.delta)
            elif event.type == "run_item_stream_event" and event.item.type == "message_output_item":
                messages.append(ItemHelpers.text_message_output(event.item))
        return result, deltas, messages

    result, deltas, messages = asyncio.run(main())
    assert len(deltas) > 1, "the final text is streamed in pieces"
    assert messages == ["".join(deltas)] == [result.final_output]
    check_tool_run(result, ran, provider_requests(marker))


@pytest.mark.mesh_only  # The Responses API again.
def test_a_second_run_continues_the_first_with_previous_response_id(
    base_url, api_key, model, marker, provider_requests
):
    async def main():
        set_default_openai_client(async_client(base_url, api_key), use_for_tracing=False)
        set_default_openai_api("responses")
        agent = Agent(name="Assistant", instructions="Remember what you are told.", model=model)
        first = await Runner.run(agent, f"{marker} my name is Ada")
        second = await Runner.run(agent, f"{marker} what is my name?", previous_response_id=first.last_response_id)
        return first, second

    first, second = asyncio.run(main())
    assert first.last_response_id and second.last_response_id != first.last_response_id
    assert second.final_output == f"echo: {marker} what is my name?"
    # Only the new question was sent; meshgate gave the provider the stored conversation before it.
    sent = provider_requests(marker)
    assert len(sent) == 2
    assert [(m["role"], m["content"]) for m in sent[1]["messages"]] == [
        ("system", "Remember what you are told."),
        ("user", f"{marker} my name is Ada"),
        ("assistant", first.final_output),
        ("user", f"{marker} what is my name?"),
    ]


class Forecast(BaseModel):
    city: str
    summary: str
    unit: Literal["celsius", "fahrenheit"]


@pytest.mark.mesh_only  # The Responses API again.
def test_structured_output_type_with_the_default_responses_model(base_url, api_key, model, marker, provider_requests):
    async def main():
        set_default_openai_client(async_client(base_url, api_key), use_for_tracing=False)
        set_default_openai_api("responses")
        agent = Agent(name="Forecaster", instructions="Give a forecast.", model=model, output_type=Forecast)
        return await Runner.run(agent, f"{marker} Forecast for Lisbon.")

    result = asyncio.run(main())
    assert isinstance(result.final_output, Forecast), result.final_output
    assert result.final_output.unit in ("celsius", "fahrenheit")
    (sent,) = provider_requests(marker)
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"]["strict"] is True
    assert set(sent["response_format"]["json_schema"]["schema"]["properties"]) == {"city", "summary", "unit"}
