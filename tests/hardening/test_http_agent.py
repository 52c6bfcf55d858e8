"""The agent's HTTP server against hostile clients, as a real `edge agent run` process.

One agent (a tiny raw-tensor model and a tiny chat model) with small limits: one generation
slot, one waiting request per model, 1 MiB bodies, one-second header and body timeouts. A flood
must get 429 with Retry-After and never a 5xx; slow clients must be cut off while others are
served; oversized bodies must get 413, a declared one before its bytes are sent.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

from edge.protocol.catalog import load_catalog
from edge.protocol.signing import SigningKey, TrustStore
from tests.agent.server.conftest import PROFILE, AgentProcess, install
from tests.agent.server.tiny import CONTEXT, make_llm_bundle
from tests.fixtures.bundles import expected_output, make_generic_bundle
from tests.fixtures.slow_http import Trickle, exchange, request_head, split_url, status_of

INFER = "/v2/models/tiny/infer"
X = np.arange(4, dtype=np.float32).reshape(1, 4)
INFER_BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X.ravel().tolist()}]}


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, signing_key: SigningKey, trust: TrustStore,
          key_pair: tuple[Path, Path]) -> Iterator[AgentProcess]:
    root = tmp_path_factory.mktemp("hostile-agent")
    install(root / "data", load_catalog().get(PROFILE), trust, [
        (make_generic_bundle(root, signing_key, version="1.0.0"), True), (make_llm_bundle(root, signing_key), True)])
    proc = AgentProcess(root / "data", root / "home", "--trusted-key", str(key_pair[1]), "--max-body-mb", "1",
                        "--llm-slots", "1", "--queue", "1", "--header-timeout", "1", "--body-timeout", "1")
    try:
        proc.wait_ready()
        yield proc
    finally:
        assert proc.stop() == 0, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr


def _gauge(url: str, name: str, model: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def _wait(predicate, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _endless_chat(url: str, stream: bool) -> socket.socket:
    """Start a generation that runs to the end of the context (the bigram model says "la" forever)."""
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "sing forever"}], "stream": stream,
                       "temperature": 0, "max_tokens": CONTEXT - 10}).encode()
    sock = socket.create_connection(split_url(url), timeout=60)
    sock.sendall(request_head("POST", "/v1/chat/completions", "Content-Type: application/json",
                              f"Content-Length: {len(body)}") + body)
    return sock


def _infer_ok(url: str) -> None:
    r = httpx.post(url + INFER, json=INFER_BODY, timeout=60)
    assert r.status_code == 200, r.text
    y = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(1, 2)
    np.testing.assert_allclose(y, expected_output("1.0.0", X), rtol=1e-5)


def _status(sock: socket.socket) -> int:
    got = b""
    while b"\r\n" not in got and (chunk := sock.recv(4096)):
        got += chunk
    return status_of(got)


def test_a_flood_gets_429_with_retry_after_never_5xx_and_the_agent_keeps_serving(agent: AgentProcess) -> None:
    url = agent.url
    # One generation in the chat model's only slot; then two more at once: the queue holds one,
    # so exactly one of them is refused, whatever the timing (the first runs for 2,000 tokens).
    running = _endless_chat(url, stream=True)
    seen = b""
    while seen.count(b"data: ") < 2:
        seen += running.recv(4096)
    pair = [_endless_chat(url, stream=False), _endless_chat(url, stream=False)]

    chat = {"model": "chat", "messages": [{"role": "user", "content": "question"}], "max_tokens": 8}
    health: list[int] = []

    def one(i: int) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=60) as c:
            if i % 10 == 0:
                health.append(c.get("/v2/health/live").status_code)
            if i % 3 == 0:
                return c.post(INFER, json=INFER_BODY)
            return c.post("/v1/chat/completions", json=chat)

    with ThreadPoolExecutor(16) as pool:  # while the slot and the queue are taken
        answers = list(pool.map(one, range(90)))
    assert sorted(_status(s) for s in pair) == [200, 429]
    codes = Counter(r.status_code for r in answers)
    assert set(codes) <= {200, 429}, codes  # in particular no 5xx
    refused = [r for r in answers if r.status_code == 429]
    assert refused, codes
    assert all(r.headers.get("retry-after") == "1" for r in refused)
    assert all(r.json()["error"]["type"] == "rate_limit_error" for r in refused if "/v1/" in str(r.url))
    assert health and set(health) == {200}

    for s in (running, *pair):
        s.close()
    _wait(lambda: _gauge(url, "edge_active_requests", "chat") == 0 and _gauge(url, "edge_queue_depth", "chat") == 0,
          "the generations to end")
    r = httpx.post(url + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200 and "paris" in r.json()["choices"][0]["message"]["content"], r.text
    _infer_ok(url)


def test_slow_clients_are_cut_off_while_others_are_served(agent: AgentProcess) -> None:
    url = agent.url
    infer_head = request_head("POST", INFER, "Content-Type: application/json", "Content-Length: 5000")
    slow_headers = [Trickle(url, b"", request_head("POST", INFER, "X-Pad: " + "a" * 4000)) for _ in range(20)]
    slow_bodies = [Trickle(url, infer_head, b"{" + b" " * 4999) for _ in range(10)]
    stalled_bodies = [Trickle(url, infer_head + b'{"inputs": ') for _ in range(10)]
    silent = [socket.create_connection(split_url(url)) for _ in range(10)]
    for t in (*slow_headers, *slow_bodies, *stalled_bodies):
        t.start()
    try:
        for _ in range(3):  # another client, meanwhile
            assert httpx.get(url + "/v2/health/live", timeout=30).status_code == 200
            _infer_ok(url)
        for t in slow_headers:
            t.wait_closed()
            assert t.sent < 4000  # cut off long before its headers were complete
        for t in (*slow_bodies, *stalled_bodies):
            answer = t.wait_closed()
            assert status_of(answer) == 408, answer
        for s in silent:
            s.settimeout(60)
            assert s.recv(1) == b""
    finally:
        for t in (*slow_headers, *slow_bodies, *stalled_bodies):
            t.stop()
        for s in silent:
            s.close()
    _infer_ok(url)


def test_oversized_bodies_get_413(agent: AgentProcess) -> None:
    url = agent.url
    limit = 1024 * 1024
    # declared: refused from the headers alone (no body is ever sent, yet the answer comes)
    answer = exchange(url, request_head("POST", INFER, "Content-Type: application/json",
                                        f"Content-Length: {limit + 1}"))
    assert status_of(answer) == 413, answer
    # chunked: cut off once past the limit
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b" " * 65536

    for path in (INFER, "/v1/chat/completions", "/v1/embeddings"):
        r = httpx.post(url + path, content=chunks(), headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 413, (path, r.status_code, r.text)
        assert "limit" in r.text
    _infer_ok(url)
