"""Fixtures of the real-client tests: where the OpenAI-compatible endpoint is (meshgate's edge, or
the mock provider itself when checking the tests), its key and model, and what the mock provider
received (its GET /_mock/requests), so a test can tell what reached the provider."""

import json
import os
import urllib.request
import uuid

import openai
import pytest


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


@pytest.fixture(scope="session")
def provider_requests():
    """provider_requests(marker) -> the bodies the mock provider received whose messages mention
    marker, oldest first."""
    mock_url = _env("MESHGATE_CLIENTS_MOCK_URL")

    def find(marker):
        with urllib.request.urlopen(f"{mock_url}/_mock/requests", timeout=10) as response:
            recorded = json.load(response)
        bodies = [r["body"] for r in recorded if isinstance(r["body"], dict)]
        found = [b for b in bodies if marker in json.dumps(b.get("messages", []))]
        assert found, f"no request mentioning {marker} reached the provider"
        return found

    return find
