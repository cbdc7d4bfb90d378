"""Fixtures of the real-client tests: where the OpenAI-compatible endpoint is (meshgate's edge, or
the mock provider itself when checking the tests), its key and model, and what the mock provider
received (its GET /_mock/requests), so a test can tell what reached the provider.

A test marked `mesh_only` is skipped in the oracle run (against the mock provider): it exercises
an API the mock does not serve (legacy completions, count_tokens, stored responses) or a behaviour
only meshgate has (its keys). Its docstring or marker comment says which."""

import json
import os
import urllib.request
import uuid

import openai
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "mesh_only: runs only through meshgate, not against the mock provider")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MESHGATE_CLIENTS_TARGET") != "mock":
        return
    skip = pytest.mark.skip(reason="the mock provider does not serve this (mesh_only)")
    for item in items:
        if "mesh_only" in item.keywords:
            item.add_marker(skip)


def _env(name):
    value = os.environ.get(name)
    if not value:
        pytest.exit(f"{name} is not set: run these tests through scripts/clients/run.sh", returncode=2)
    return value


@pytest.fixture(scope="session")
def base_url():
    """The OpenAI base URL, version path included (http://127.0.0.1:PORT/v1)."""
    return _env("MESHGATE_CLIENTS_BASE_URL")


@pytest.fixture(scope="session")
def target():
    """What the tests run against: "mock" (the oracle) or "mesh" (a `meshgate up`)."""
    value = _env("MESHGATE_CLIENTS_TARGET")
    assert value in ("mock", "mesh"), value
    return value


@pytest.fixture(scope="session")
def root_url(base_url):
    """The base URL without the version path, as the anthropic SDK takes it (it adds /v1/...)."""
    return base_url.removesuffix("/").removesuffix("/v1")


@pytest.fixture(scope="session")
def api_key():
    return _env("MESHGATE_CLIENTS_API_KEY")


@pytest.fixture(scope="session")
def model():
    return _env("MESHGATE_CLIENTS_MODEL")


@pytest.fixture(scope="session")
def client(base_url, api_key):
    # No retries: a failure must show as the first answer, not as a slow retry loop.
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)


@pytest.fixture
def marker():
    """A word unique to the test, put in its user messages to find its requests at the provider."""
    return f"marker{uuid.uuid4().hex[:12]}"


def _conversation(record):
    """What a recorded body says to the model: its messages, or its Responses API input."""
    body = record["body"]
    return body.get("input", []) if record["path"] == "/v1/responses" else body.get("messages", [])


@pytest.fixture(scope="session")
def provider_records():
    """provider_records(marker) -> what the mock provider received whose messages (or Responses API
    input) mention marker, oldest first: {"path": "/v1/chat/completions", "/v1/messages" or
    "/v1/responses", "body": {...}, ...}; none is a failure unless required=False."""
    mock_url = _env("MESHGATE_CLIENTS_MOCK_URL")

    def find(marker, required=True):
        with urllib.request.urlopen(f"{mock_url}/_mock/requests", timeout=10) as response:
            recorded = json.load(response)
        found = [r for r in recorded if isinstance(r["body"], dict) and marker in json.dumps(_conversation(r))]
        assert found or not required, f"no request mentioning {marker} reached the provider"
        return found

    return find


@pytest.fixture(scope="session")
def embedding_requests():
    """embedding_requests(marker) -> the embeddings bodies the mock provider received whose input
    mentions marker, oldest first."""
    mock_url = _env("MESHGATE_CLIENTS_MOCK_URL")

    def find(marker):
        with urllib.request.urlopen(f"{mock_url}/_mock/requests", timeout=10) as response:
            recorded = json.load(response)
        return [
            r["body"]
            for r in recorded
            if r["path"] == "/v1/embeddings" and isinstance(r["body"], dict) and marker in json.dumps(r["body"])
        ]

    return find


@pytest.fixture(scope="session")
def provider_requests(provider_records):
    """provider_requests(marker) -> the bodies the mock provider received whose messages (or
    Responses API input) mention marker, oldest first."""
    return lambda marker: [record["body"] for record in provider_records(marker)]
