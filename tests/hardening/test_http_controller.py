"""The controller's REST API and dashboard against hostile clients, over real HTTP on loopback.

One controller (FleetService, in process, embedded broker) with small limits. Clients are told
apart by address: loopback is all of 127/8, so each test binds its clients to addresses of its
own and the buckets of one test do not leak into another.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from edge.fleet.api import MAX_JSON_BYTES
from edge.fleet.dashboard.routes import MAX_LOGIN_BYTES
from edge.fleet.service import CONTROLLER_LIMITS, FleetService, ServiceConfig
from edge.web import Rate
from tests.fixtures.slow_http import Trickle, connect, exchange, request_head, status_of

ADMIN = "hostile-admin-token-0123456789abcdef"
BURST = 10
MAX_REQUESTS = 6
LIMITS = replace(CONTROLLER_LIMITS, rate=Rate(per_s=0.01, burst=BURST), max_requests=MAX_REQUESTS,
                 path_rates=(("/dashboard/login", Rate(per_s=0.01, burst=3)),), header_timeout_s=1.0,
                 body_timeout_s=1.0)


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory, key_pair: tuple[Path, Path]) -> Iterator[str]:
    data = tmp_path_factory.mktemp("hostile-controller")
    svc = FleetService(ServiceConfig(data_dir=data, port=0, mqtt_port=0, fleet="hostile", admin_token=ADMIN,
                                     trusted_keys=(key_pair[1],), http=LIMITS)).start()
    try:
        assert svc.http is not None
        yield svc.http.url
    finally:
        svc.stop()


def client(url: str, address: str, token: str | None = ADMIN) -> httpx.Client:
    """An API client whose connections come from ``address`` (a loopback address of its own)."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=60,
                        transport=httpx.HTTPTransport(local_address=address))


def test_a_flooding_client_gets_429_with_retry_after_and_others_are_served(controller: str) -> None:
    # fewer at once than the in-flight cap, so every 429 here is the client's bucket
    with client(controller, "127.0.1.1") as c, ThreadPoolExecutor(MAX_REQUESTS - 2) as pool:
        answers = list(pool.map(lambda _: c.get("/api/v1/devices"), range(40)))
    codes = Counter(r.status_code for r in answers)
    assert codes[200] == BURST and codes[429] == 40 - BURST, codes
    refused = [r for r in answers if r.status_code == 429]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert {r.json()["error"]["code"] for r in refused} == {"overloaded"}
    assert all("too many requests from 127.0.1.1" in r.json()["error"]["message"] for r in refused)
    with client(controller, "127.0.1.2") as other:
        assert other.get("/api/v1/devices").status_code == 200


def test_login_brute_force_gets_429(controller: str) -> None:
    with client(controller, "127.0.2.1", token=None) as c:
        headers = {"origin": controller}
        codes = [c.post("/dashboard/login", json={"username": "admin", "password": f"guess-{i}"},
                        headers=headers).status_code for i in range(8)]
        assert codes[:3] == [401, 401, 401] and set(codes[3:]) == {429}, codes
        last = c.post("/dashboard/login", json={"token": ADMIN}, headers=headers)
        assert last.status_code == 429 and int(last.headers["retry-after"]) >= 1  # even the right token, for now
    with client(controller, "127.0.2.2", token=None) as c:  # another address logs in
        assert c.post("/dashboard/login", json={"token": ADMIN}, headers={"origin": controller}).status_code == 200


def test_requests_in_flight_are_capped_with_429(controller: str) -> None:
    # requests whose bodies never finish are in flight until the body timeout answers them 408
    head = request_head("POST", "/api/v1/tokens", f"Authorization: Bearer {ADMIN}", "Content-Type: application/json",
                        "Content-Length: 100")
    held = [Trickle(controller, head + b'{"name": ', source=f"127.0.3.{200 + i}") for i in range(MAX_REQUESTS)]
    for t in held:
        t.start()
    probes = iter(f"127.0.3.{i}" for i in range(1, 200))

    def probe() -> httpx.Response:
        with client(controller, next(probes)) as c:
            return c.get("/api/v1/health")

    deadline = time.monotonic() + 60
    while (r := probe()).status_code != 429:  # until the server has taken all the held requests
        assert r.status_code == 200 and time.monotonic() < deadline, r.text
    assert r.headers["retry-after"] == "1" and f"limit of {MAX_REQUESTS} requests" in r.json()["error"]["message"]
    for t in held:
        assert status_of(t.wait_closed()) == 408
    while (r := probe()).status_code == 429:  # the slots free as the 408s go out
        assert time.monotonic() < deadline
    assert r.status_code == 200


def test_slow_clients_are_cut_off_while_others_are_served(controller: str) -> None:
    body_head = request_head("POST", "/api/v1/tokens", f"Authorization: Bearer {ADMIN}",
                             "Content-Type: application/json", "Content-Length: 5000")
    slow_headers = [Trickle(controller, b"", request_head("GET", "/api/v1/devices", "X-Pad: " + "a" * 4000))
                    for _ in range(20)]
    slow_bodies = [Trickle(controller, body_head, b"{" + b" " * 4999, source=f"127.0.4.{10 + i}")
                   for i in range(MAX_REQUESTS // 2)]
    silent = [connect(controller, "127.0.4.2") for _ in range(10)]
    for t in (*slow_headers, *slow_bodies):
        t.start()
    try:
        with client(controller, "127.0.4.1") as c:
            for _ in range(3):
                assert c.get("/api/v1/health").status_code == 200
                assert c.get("/api/v1/devices").status_code == 200
        for t in slow_headers:
            t.wait_closed()
            assert t.sent < 4000
        for t in slow_bodies:
            assert status_of(t.wait_closed()) == 408
        for s in silent:
            s.settimeout(60)
            assert s.recv(1) == b""
    finally:
        for t in (*slow_headers, *slow_bodies):
            t.stop()
        for s in silent:
            s.close()


def test_oversized_bodies_get_413(controller: str) -> None:
    auth = f"Authorization: Bearer {ADMIN}"
    # declared: refused from the headers alone (no body is ever sent, yet the answer comes)
    for path, size in (("/api/v1/tokens", MAX_JSON_BYTES + 1), ("/api/v1/bundles", 1 << 50),
                       ("/dashboard/login", MAX_LOGIN_BYTES + 1)):
        answer = exchange(controller, request_head("POST", path, auth, f"Content-Length: {size}"), source="127.0.5.2")
        assert status_of(answer) == 413, (path, answer)

    def chunks() -> Iterator[bytes]:  # chunked, no length: cut off once past the limit
        for _ in range(20):
            yield b" " * 65536

    with client(controller, "127.0.5.1") as c:
        r = c.post("/api/v1/tokens", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "resource_exhausted", r.text
        assert c.post("/api/v1/tokens", json={"name": "after", "role": "read"}).status_code == 201
