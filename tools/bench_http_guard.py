"""Benchmark what edge.web's guards cost per request, on the real code paths, in process.

* the protocol (header and body deadlines): uvicorn's own protocol and ``guarded_protocol`` are
  fed the same requests through ``data_received`` (a fake transport, a trivial ASGI app, the
  event loop running each request's task to completion); the difference per request is what the
  inference path pays. Two shapes: a request in one piece (no timer), and headers then body in
  two pieces (a body deadline armed and cancelled); and the guard's own code alone, over a
  protocol that does nothing (so the noise of uvicorn's work does not hide a fraction of a µs);
* the middleware (``RequestGuard``: a token bucket per address and the in-flight count), called
  directly around a no-op ASGI app, against the app alone;
* one ``Buckets.take`` on its own.

Runs are interleaved (plain, guarded, plain, ...) and the best of ``--rounds`` short runs is
kept, so a noisy neighbour inflates both sides alike. Usage:
``python tools/bench_http_guard.py [--requests 2000] [--rounds 40] [--loop uvloop|asyncio]``. Prints a markdown table,
the versions and the command; figures go to BENCHMARKS.md, tests never time.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BODY = b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}]}'
REQUEST = (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n" % len(BODY))


class FakeTransport(asyncio.Transport):
    """Enough of a socket transport for uvicorn's protocols."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: Any) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def app(scope: dict, receive: Callable, send: Callable) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


async def protocol_run(cls: type, n: int, split: bool) -> float:
    """Return µs per request through ``cls`` over one kept-alive connection."""
    import uvicorn
    from uvicorn.server import ServerState

    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)
    config.load()
    state = ServerState()
    proto = cls(config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop())
    proto.connection_made(FakeTransport())
    whole = REQUEST + BODY
    start = time.perf_counter()
    for _ in range(n):
        if split:
            proto.data_received(REQUEST)
            proto.data_received(BODY)
        else:
            proto.data_received(whole)
        await asyncio.gather(*state.tasks)
    elapsed = time.perf_counter() - start
    proto.connection_lost(None)
    return elapsed / n * 1e6


class _Cycle:
    def __init__(self, more_body: bool) -> None:
        self.more_body, self.response_complete, self.response_started = more_body, False, False


class _StubProtocol:
    """A protocol whose own work is nothing: each call completes one request's headers."""

    def __init__(self, loop: Any) -> None:
        self.loop, self.transport, self.cycle, self.split = loop, FakeTransport(), None, False

    def connection_made(self, transport: Any) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        if self.split and self.cycle is not None and self.cycle.more_body:
            self.cycle.more_body = False  # the body's piece
        else:
            self.cycle = _Cycle(more_body=self.split)  # a new request's headers


async def added_code_run(cls: type, n: int, split: bool) -> float:
    """Return µs per request of ``cls.data_received`` over a protocol that does nothing itself."""
    proto = cls(asyncio.get_running_loop())
    proto.split = split
    proto.connection_made(proto.transport)
    calls = 2 if split else 1
    start = time.perf_counter()
    for _ in range(n):
        for _ in range(calls):
            proto.data_received(BODY)
    return (time.perf_counter() - start) / n * 1e6


async def middleware_run(target: Callable, n: int) -> float:
    scope = {"type": "http", "path": "/api/v1/devices", "client": ("127.0.0.1", 50000)}

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        pass

    async def noop(scope: dict, receive: Callable, send: Callable) -> None:
        pass

    call = target(noop)
    start = time.perf_counter()
    for _ in range(n):
        await call(scope, receive, send)
    return (time.perf_counter() - start) / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                        help="event loop (uvicorn's loop=auto, as the agent runs, picks uvloop when installed)")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from edge.web import HttpLimits, Rate, RequestGuard
    from edge.web.connections import guarded_protocol
    from edge.web.guard import Buckets

    guarded = guarded_protocol(HttpLimits())
    limits = HttpLimits(max_requests=64, rate=Rate(per_s=1e9, burst=10**9))
    rows: list[tuple[str, float, float]] = []

    def best(fn: Callable[[], float]) -> float:
        return min(statistics.median(fn() for _ in range(3)) for _ in range(args.rounds))

    for label, split in (("one piece", False), ("headers, then body", True)):
        plain_s: list[float] = []
        guard_s: list[float] = []
        for _ in range(args.rounds):
            plain_s.append(asyncio.run(protocol_run(HttpToolsProtocol, args.requests, split)))
            guard_s.append(asyncio.run(protocol_run(guarded, args.requests, split)))
        rows.append((f"uvicorn httptools protocol, request in {label}", min(plain_s), min(guard_s)))
    stub_guarded = guarded_protocol(HttpLimits(), _StubProtocol)
    for label, split in (("one piece", False), ("headers, then body", True)):
        bare = min(asyncio.run(added_code_run(_StubProtocol, args.requests, split)) for _ in range(args.rounds))
        with_guard = min(asyncio.run(added_code_run(stub_guarded, args.requests, split)) for _ in range(args.rounds))
        rows.append((f"the guard's own code alone (over a do-nothing protocol), request in {label}", bare, with_guard))
    plain_m, guard_m = [], []
    for _ in range(args.rounds):
        plain_m.append(asyncio.run(middleware_run(lambda a: a, args.requests)))
        guard_m.append(asyncio.run(middleware_run(lambda a: RequestGuard(a, limits), args.requests)))
    rows.append(("ASGI call of a no-op app, bare vs behind RequestGuard", min(plain_m), min(guard_m)))
    buckets = Buckets(Rate(per_s=1e9, burst=10**9))
    take = best(lambda: _time_take(buckets, args.requests))

    print("| path | without guard (µs/request) | with guard | added |")
    print("|---|---|---|---|")
    for name, plain, with_guard in rows:
        print(f"| {name} | {plain:.2f} | {with_guard:.2f} | {with_guard - plain:+.2f} |")
    print(f"| `Buckets.take` alone | | {take:.2f} | |")
    print()
    print(f"Versions: Python {platform.python_version()}, uvicorn {uvicorn.__version__}, "
          f"httptools {_version('httptools')}, starlette {_version('starlette')}, uvloop {_version('uvloop')} "
          f"(loop: {args.loop})")
    print(f"Command: python tools/bench_http_guard.py --requests {args.requests} --rounds {args.rounds} "
          f"--loop {args.loop}")
    return 0


def _time_take(buckets: Any, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        buckets.take("127.0.0.1")
    return (time.perf_counter() - start) / n * 1e6


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(main())
