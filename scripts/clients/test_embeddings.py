"""The official openai Python SDK's embeddings as RAG pipelines call them, against a provider's
embedding model: the SDK's default base64 encoding decoded back to floats, several texts, token
ids, and a shorter `dimensions`."""

import math

EMBEDDING_MODEL = "text-embedding-3-small"


def test_texts_come_back_in_order_as_unit_vectors(client, marker, embedding_requests):
    texts = [f"{marker} first document", f"{marker} a second, longer document"]
    result = client.embeddings.create(model=EMBEDDING_MODEL, input=texts)
    assert [d.index for d in result.data] == [0, 1]
    assert all(abs(math.sqrt(sum(v * v for v in d.embedding)) - 1.0) < 1e-3 for d in result.data)
    assert result.usage.prompt_tokens > 0
    assert result.model == EMBEDDING_MODEL
    # The SDK asks for base64 and decodes it; the provider was asked for the texts.
    sent = embedding_requests(marker)
    assert sent and sent[-1]["input"] == texts


def test_the_same_text_embeds_the_same_way_as_floats_or_base64(client, marker):
    text = f"{marker} stable"
    as_floats = client.embeddings.create(model=EMBEDDING_MODEL, input=text, encoding_format="float")
    as_base64 = client.embeddings.create(model=EMBEDDING_MODEL, input=text)
    assert len(as_floats.data[0].embedding) == len(as_base64.data[0].embedding)
    assert all(abs(a - b) < 1e-6 for a, b in zip(as_floats.data[0].embedding, as_base64.data[0].embedding))


def test_token_ids_and_dimensions(client):
    result = client.embeddings.create(model=EMBEDDING_MODEL, input=[[9906, 1917], [40, 1093]], dimensions=8)
    assert len(result.data) == 2
    assert all(len(d.embedding) == 8 for d in result.data)
