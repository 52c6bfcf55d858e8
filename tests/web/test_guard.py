"""Floods: token buckets per client address and the in-flight cap, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from edge.errors import ConfigError
from edge.web import HttpLimits, Rate
from edge.web.guard import MAX_CLIENTS, Buckets
from tests.web.helpers import Served


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_bucket_grants_its_burst_then_refills_at_its_rate() -> None:
    clock = FakeClock()
    buckets = Buckets(Rate(per_s=2, burst=3), clock)
    assert [buckets.take("a") for _ in range(3)] == [0, 0, 0]
    assert buckets.take("a") == pytest.approx(0.5)  # one token comes back every half second
    assert buckets.take("b") == 0  # another client has its own bucket
    clock.t += 0.5
    assert buckets.take("a") == 0 and buckets.take("a") > 0
    clock.t += 100  # a long pause fills the bucket up to its burst, no further
    assert [buckets.take("a") for _ in range(4)][-1] > 0
    with pytest.raises(ConfigError, match="positive rate"):
        Rate(per_s=0, burst=1)


def test_a_spray_of_addresses_does_not_grow_memory_without_bound() -> None:
    clock = FakeClock()
    buckets = Buckets(Rate(per_s=1, burst=1), clock)
    for i in range(3 * MAX_CLIENTS):
        buckets.take(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
    assert len(buckets._state) <= MAX_CLIENTS


class Gate:
    """A route that holds requests until the test opens the gate."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.waiting = 0

    async def held(self, request: Request) -> PlainTextResponse:
        self.waiting += 1
        while not self.open.is_set():
            await asyncio.sleep(0.01)
        return PlainTextResponse("done")


@pytest.fixture()
def gate() -> Gate:
    return Gate()


def _app(gate: Gate) -> Starlette:
    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/ok", ok), Route("/login", ok, methods=["POST"]), Route("/held", gate.held),
                             Route("/stream", gate.held)])


@pytest.fixture()
def guarded(gate: Gate) -> Iterator[Served]:
    limits = HttpLimits(max_requests=3, rate=Rate(per_s=0.01, burst=8), path_rates=(("/login", Rate(0.01, 2)),),
                        unmetered=("/stream",))
    served = Served(_app(gate), limits)
    try:
        yield served
    finally:
        gate.open.set()
        served.stop()


def test_a_flooding_client_gets_429_with_retry_after_and_others_do_not(guarded: Served) -> None:
    with httpx.Client(base_url=guarded.url) as client:
        answers = [client.get("/ok") for _ in range(12)]
    assert [r.status_code for r in answers] == [200] * 8 + [429] * 4
    refused = answers[-1]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "overloaded"
    assert "too many requests from 127.0.0.1" in refused.json()["error"]["message"]
    # another address (loopback is all of 127/8) has a bucket of its own
    with httpx.Client(base_url=guarded.url, transport=httpx.HTTPTransport(local_address="127.0.0.2")) as other:
        assert other.get("/ok").status_code == 200


def test_logins_have_a_stricter_bucket(guarded: Served) -> None:
    with httpx.Client(base_url=guarded.url) as client:
        codes = [client.post("/login").status_code for _ in range(4)]
        assert codes == [200, 200, 429, 429]
        assert client.get("/ok").status_code == 200  # the rest of the API is still open to it


def test_requests_in_flight_are_capped_with_429(guarded: Served, gate: Gate) -> None:
    clients = [httpx.Client(base_url=guarded.url, transport=httpx.HTTPTransport(local_address=f"127.0.0.{i}"),
                            timeout=60) for i in range(10, 16)]
    with ThreadPoolExecutor(4) as pool:
        held = [pool.submit(clients[i].get, "/held") for i in range(3)]
        streams = pool.submit(clients[3].get, "/stream")  # unmetered: not counted
        while gate.waiting < 4:
            threading.Event().wait(0.01)
        busy = clients[4].get("/ok")
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert "limit of 3 requests in flight" in busy.json()["error"]["message"]
        gate.open.set()
        assert [f.result().status_code for f in held] == [200] * 3 and streams.result().status_code == 200
    assert clients[5].get("/ok").status_code == 200  # the slots are free again
    for c in clients:
        c.close()
