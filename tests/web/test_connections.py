"""Slow clients against a real uvicorn on loopback, served with edge.web's protocol and options.

Timeouts are short (half a second) so the cut-offs happen quickly; every check is about what
the server did (closed, answered 408/431/503), never about how long it took.
"""

from __future__ import annotations

import socket
import time
from typing import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from edge.errors import ConfigError
from edge.web import HttpLimits
from edge.web.connections import guarded_protocol
from tests.fixtures.slow_http import Trickle, exchange, request_head, status_of
from tests.web.helpers import Served

FAST = HttpLimits(header_timeout_s=0.5, body_timeout_s=0.5, max_header_bytes=8192)


def make_app() -> Starlette:
    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"bytes": len(body)})

    return Starlette(routes=[Route("/health", health), Route("/echo", echo, methods=["POST"])])


@pytest.fixture()
def served() -> Iterator[Served]:
    s = Served(make_app(), FAST)
    try:
        yield s
    finally:
        s.stop()


def test_the_protocol_extends_the_one_uvicorn_would_pick() -> None:
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    assert issubclass(guarded_protocol(FAST), HttpToolsProtocol)  # httptools is installed here
    assert issubclass(guarded_protocol(FAST, H11Protocol), H11Protocol)
    with pytest.raises(ConfigError, match="header_timeout_s"):
        HttpLimits(header_timeout_s=0)
    with pytest.raises(ConfigError, match="max_requests"):
        HttpLimits(max_requests=-1)


def test_ordinary_clients_are_served_on_kept_alive_connections(served: Served) -> None:
    def pieces() -> Iterator[bytes]:  # a body in several writes, as an uploading client sends it
        for _ in range(8):
            yield b"x" * 4096

    with httpx.Client(base_url=served.url) as client:
        for _ in range(20):
            assert client.get("/health").text == "ok"
            assert client.post("/echo", content=b"y" * 1000).json() == {"bytes": 1000}
        assert client.post("/echo", content=pieces()).json() == {"bytes": 8 * 4096}
    # idle past the header timeout between two requests on one connection: keep-alive (5 s) rules
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        for _ in range(2):
            sock.sendall(request_head("GET", "/health"))
            assert sock.recv(65536).startswith(b"HTTP/1.1 200"), "the kept-alive connection was closed"
            time.sleep(1.0)


@pytest.mark.parametrize("protocol", ["httptools", "h11"])
def test_slow_headers_and_silent_connections_are_closed_while_others_are_served(protocol: str) -> None:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    # the device install may lack httptools: uvicorn then runs h11
    served = Served(make_app(), FAST, H11Protocol if protocol == "h11" else None)
    try:
        # headers a byte every 0.1 s, forever; and connections that never send a byte
        slow = [Trickle(served.url, b"", request_head("GET", "/health", "X-Pad: " + "a" * 4000)) for _ in range(10)]
        silent = [socket.create_connection(("127.0.0.1", int(served.url.rsplit(":", 1)[1]))) for _ in range(10)]
        for t in slow:
            t.start()
        with httpx.Client(base_url=served.url) as client:
            for _ in range(5):
                assert client.get("/health").text == "ok"
        for t in slow:
            t.wait_closed()
            assert t.sent < 4000  # cut off long before the headers could have been complete
        for s in silent:
            s.settimeout(60)
            assert s.recv(1) == b""  # closed by the server
            s.close()
    finally:
        served.stop()


def test_a_body_that_never_completes_gets_408_and_is_closed(served: Served) -> None:
    stalled = Trickle(served.url, request_head("POST", "/echo", "Content-Length: 1000") + b"x" * 10)
    trickled = Trickle(served.url, request_head("POST", "/echo", "Content-Length: 100000"), b"x" * 100000)
    for t in (stalled, trickled):
        t.start()
    for t in (stalled, trickled):
        answer = t.wait_closed()
        assert status_of(answer) == 408, answer
        assert b"did not arrive in time" in answer
    assert httpx.get(served.url + "/health").text == "ok"


def test_a_slow_but_steady_body_completes(served: Served) -> None:
    # 8 KiB every 0.2 s (40 KiB/s): each piece extends the 0.5 s deadline by 8 s at 1 KiB/s
    body = b"z" * (8 * 8192)
    t = Trickle(served.url, request_head("POST", "/echo", f"Content-Length: {len(body)}", "Connection: close"),
                body, step=8192, interval_s=0.2)
    t.start()
    answer = t.wait_closed()
    assert status_of(answer) == 200 and answer.endswith(b'{"bytes":65536}'), answer


def test_headers_over_the_limit_get_431(served: Served) -> None:
    answer = exchange(served.url, b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"b" * 20000)
    assert status_of(answer) == 431, answer


def test_the_connection_cap_answers_503_until_slow_connections_are_gone() -> None:
    served = Served(make_app(), HttpLimits(header_timeout_s=0.5, max_connections=4))
    try:
        port = int(served.url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        for s in idle:
            s.sendall(b"GET /health HTTP/1.1\r\n")  # connected and started, never finished
        r = httpx.get(served.url + "/health")
        assert r.status_code == 503, r.text
        for s in idle:
            s.settimeout(60)
            assert s.recv(1) == b""
            s.close()
        assert httpx.get(served.url + "/health").status_code == 200
    finally:
        served.stop()
