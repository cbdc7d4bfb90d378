"""Legacy text completions through the official openai Python SDK (`client.completions`, what IDE
autocomplete plugins call): a prompt answered whole and streamed.

The mock provider has no /v1/completions: these run only through meshgate (mesh_only), which
serves a prompt with a chat model (the prompt is one user message at the provider)."""

import openai
import pytest

pytestmark = pytest.mark.mesh_only


def test_create(client, model, marker, provider_requests):
    prompt = f"{marker} def fibonacci(n):"
    completion = client.completions.create(model=model, prompt=prompt, max_tokens=64)
    assert completion.object == "text_completion"
    (choice,) = completion.choices
    assert choice.index == 0
    assert choice.text == f"echo: {prompt}"
    assert choice.finish_reason == "stop"
    usage = completion.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    (sent,) = provider_requests(marker)
    assert sent["messages"] == [{"role": "user", "content": prompt}]
    assert sent["max_tokens"] == 64


def test_max_tokens_cuts_the_text(client, model, marker):
    completion = client.completions.create(model=model, prompt=f"{marker} one two three four five", max_tokens=2)
    (choice,) = completion.choices
    assert choice.finish_reason == "length"
    assert choice.text == f"echo: {marker}"
    assert completion.usage.completion_tokens == 2


def test_stream(client, model, marker):
    prompt = f"{marker} complete this sentence for me"
    stream = client.completions.create(
        model=model, prompt=prompt, max_tokens=64, stream=True, stream_options={"include_usage": True}
    )
    pieces, finish_reason, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "text_completion"
        usage = chunk.usage or usage
        for choice in chunk.choices:
            pieces.append(choice.text)
            finish_reason = choice.finish_reason or finish_reason
    assert len([piece for piece in pieces if piece]) > 1, "the text is streamed in pieces"
    assert "".join(pieces) == f"echo: {prompt}"
    assert finish_reason == "stop"
    assert usage is not None and usage.completion_tokens == len([piece for piece in pieces if piece])


def test_an_unsupported_field_is_a_bad_request(client, model, marker, provider_records):
    # Fill-in-the-middle: no chat model does it, and meshgate says so rather than ignoring it.
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=model, prompt=f"{marker} def f(", suffix="return x", max_tokens=16)
    assert "suffix" in str(raised.value)
    assert not provider_records(marker, required=False)
