"""langchain-openai as an agent framework uses it: `bind_tools` (a tool loop, invoked and streamed)
and `with_structured_output` with a Pydantic model (json_schema and function_calling methods)."""

from typing import Annotated, Literal

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field


@tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """The current weather in a city."""
    return f"{city} is 21 degrees {unit} and sunny"


@tool
def get_population(city: str, year: Annotated[int, Field(ge=1900, le=2100)]) -> str:
    """The population of a city in a year."""
    return f"{city} had 2100000 people in {year}"


class Itinerary(BaseModel):
    """A trip plan."""

    destination: str
    days: int = Field(ge=1, le=30)
    stops: list[str]
    budget: float | None = None
    pace: Literal["relaxed", "busy"]


@pytest.fixture(scope="module")
def chat(base_url, api_key, model):
    return ChatOpenAI(model=model, base_url=base_url, api_key=api_key, max_retries=0, timeout=30)


def test_bind_tools_runs_a_tool_loop(chat, marker, provider_requests):
    tools = {t.name: t for t in (get_weather, get_population)}
    agent = chat.bind_tools(list(tools.values()))
    messages = [HumanMessage(f"{marker} How is Paris today, and how many people live there?")]
    reply = agent.invoke(messages)
    assert sorted(call["name"] for call in reply.tool_calls) == ["get_population", "get_weather"], reply
    assert not reply.invalid_tool_calls
    messages.append(reply)
    results = []
    for call in reply.tool_calls:
        # Invoked with the whole call, a tool returns the ToolMessage answering it.
        result = tools[call["name"]].invoke(call)
        results.append(result.content)
        messages.append(result)
    final = agent.invoke(messages)
    assert not final.tool_calls
    for result in results:
        assert result in final.content, final.content

    sent = provider_requests(marker)
    assert sorted(t["function"]["name"] for t in sent[0]["tools"]) == ["get_population", "get_weather"]
    assert [m["role"] for m in sent[-1]["messages"]] == ["user", "assistant", "tool", "tool"]


def test_bind_tools_streams_tool_call_chunks(chat, marker):
    agent = chat.bind_tools([get_weather])
    chunks = list(agent.stream(f"{marker} weather in Rome?"))
    assert sum(len(chunk.tool_call_chunks) for chunk in chunks) > 1, "the arguments arrive in pieces"
    gathered = chunks[0]
    for chunk in chunks[1:]:
        gathered = gathered + chunk
    assert [call["name"] for call in gathered.tool_calls] == ["get_weather"]
    assert set(gathered.tool_calls[0]["args"]) == {"city", "unit"}
    assert gathered.tool_calls[0]["args"]["unit"] in ("celsius", "fahrenheit")


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_the_pydantic_model(chat, marker, method, provider_requests):
    planner = chat.with_structured_output(Itinerary, method=method)
    plan = planner.invoke(f"{marker} Plan three days in Lisbon.")
    assert isinstance(plan, Itinerary), plan
    assert 1 <= plan.days <= 30 and plan.stops

    sent = provider_requests(marker)[-1]
    if method == "json_schema":
        assert sent["response_format"]["type"] == "json_schema"
        assert sent["response_format"]["json_schema"]["name"] == "Itinerary"
    else:
        assert [t["function"]["name"] for t in sent["tools"]] == ["Itinerary"]
        assert sent["tool_choice"]["function"]["name"] == "Itinerary"
