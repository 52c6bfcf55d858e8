"""OpenAI-compatible routes over real HTTP, driven by the official openai client."""

from __future__ import annotations

import concurrent.futures

import httpx
import numpy as np
import openai
import pytest

from tests.agent.server.conftest import AgentProcess
from tests.agent.server.tiny import expected_embedding, tokenize


@pytest.fixture(scope="module")
def client(agent: AgentProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=agent.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_are_listed(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert {"tiny", "embedder"} <= set(models)
    assert client.models.retrieve("embedder").id == "embedder"
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.models.retrieve("nope")


def test_embeddings_are_pooled_and_normalized(client: openai.OpenAI) -> None:
    texts = ["hello world", "edge devices run models offline", "unknown words here"]
    # Unasked, the client requests base64 and decodes it; both encodings must give the same floats.
    for fmt in (openai.NOT_GIVEN, "float"):
        result = client.embeddings.create(model="embedder", input=texts, encoding_format=fmt)
        got = np.array([d.embedding for d in result.data], dtype=np.float32)
        want = np.stack([expected_embedding(t) for t in texts])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert [d.index for d in result.data] == [0, 1, 2]
        assert result.usage.prompt_tokens == sum(len(tokenize(t)) for t in texts)
    single = client.embeddings.create(model="embedder@1.0.0", input="fast edge")
    np.testing.assert_allclose(single.data[0].embedding, expected_embedding("fast edge"), rtol=1e-5, atol=1e-6)


def _batched_items(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith('edge_batch_size_sum{model="embedder"'))


def test_concurrent_embeddings_go_through_the_batcher(agent: AgentProcess) -> None:
    texts = [f"hello {'world ' * (i % 5)}edge" for i in range(48)]
    before = _batched_items(agent.url)
    with httpx.Client(base_url=agent.url, timeout=30, limits=httpx.Limits(max_connections=16)) as http:

        def one(text: str) -> list[float]:
            r = http.post("/v1/embeddings", json={"model": "embedder", "input": text})
            r.raise_for_status()
            return r.json()["data"][0]["embedding"]

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            got = list(pool.map(one, texts))
    np.testing.assert_allclose(np.array(got), np.stack([expected_embedding(t) for t in texts]), rtol=1e-5, atol=1e-6)
    assert _batched_items(agent.url) - before == 48  # every text ran in a batcher call, once


def test_errors_have_openai_shape(client: openai.OpenAI, agent: AgentProcess) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="nope", input="x")
    assert err.value.body["code"] == "not_found" and "unknown model 'nope'" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="feature-extraction"):
        client.embeddings.create(model="tiny", input="x")
    with pytest.raises(openai.BadRequestError, match="text-generation"):
        client.chat.completions.create(model="embedder", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="embedder", input="x", dimensions=3)
    with pytest.raises(openai.BadRequestError, match="token-id arrays"):
        client.embeddings.create(model="embedder", input=[[1, 2, 3]])
    for body, message in [
        (b"{oops", "not valid JSON"),
        (b'{"model": "embedder"}', "input"),
        (b'{"model": "embedder", "input": []}', "non-empty"),
        (b'{"model": "embedder", "input": "x", "encoding_format": "hex"}', "encoding_format"),
        (b"[1, 2]", "JSON object"),
        (b'{"model": "embedder", "input": "\\ud800"}', "lone surrogate"),
        (b"[" * 100_000, "nested too deeply"),
    ]:
        r = httpx.post(f"{agent.url}/v1/embeddings", content=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and message in error["message"], error
    r = httpx.post(f"{agent.url}/v1/embeddings", content=b"[" + b"1," * 600_000 + b"1]")
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
