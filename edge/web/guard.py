"""Floods: a token bucket per client address and a cap on requests in flight, as ASGI middleware.

Both refuse with 429 and ``Retry-After`` (an :class:`~edge.errors.OverloadError` in the
controller's error shape), before the application reads anything, so a flood costs the server a
dictionary lookup per request rather than a queue that grows without bound. Clients are told
apart by address: a token is only known to be real once the database says so, and a bucket per
claimed token would let a client mint buckets at will.
"""

from __future__ import annotations

import json
import math
import time
from fnmatch import fnmatchcase
from typing import Any, Awaitable, Callable

from edge.errors import OverloadError
from edge.web.limits import HttpLimits, Rate

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

# Clients remembered per bucket table before idle ones are forgotten (a forgotten client starts
# with a full bucket, which is what an idle one has anyway). Bounds memory under address sprays.
MAX_CLIENTS = 10_000
# Seconds a client is told to wait when the server as a whole is busy: requests are short.
BUSY_RETRY_S = 1


class Buckets:
    """One token bucket per client key."""

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.clock = rate, clock
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    def take(self, key: str) -> float:
        """Take a token for ``key``; return 0 when granted, else the seconds until one is there."""
        now, per_s, burst = self.clock(), self.rate.per_s, self.rate.burst
        tokens, when = self._state.get(key, (burst, now))
        tokens = min(burst, tokens + (now - when) * per_s)
        if len(self._state) >= MAX_CLIENTS and key not in self._state:
            self._forget_idle(now)
        if tokens >= 1:
            self._state[key] = (tokens - 1, now)
            return 0.0
        self._state[key] = (tokens, now)
        return (1 - tokens) / per_s

    def _forget_idle(self, now: float) -> None:
        full_after = self.rate.burst / self.rate.per_s
        for key in [k for k, (_, when) in self._state.items() if now - when >= full_after]:
            del self._state[key]
        if len(self._state) >= MAX_CLIENTS:  # a spray of fresh addresses: start over rather than grow
            self._state.clear()


class RequestGuard:
    """ASGI middleware applying the rate limits and the in-flight cap of :class:`HttpLimits`."""

    def __init__(self, app: App, limits: HttpLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.app, self.limits = app, limits
        self.buckets = Buckets(limits.rate, clock) if limits.rate else None
        self.path_buckets = [(pattern, Buckets(rate, clock)) for pattern, rate in limits.path_rates]
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse the request with 429 when over a limit, else pass it on."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        who, path = client[0] if client else "", scope["path"]
        wait = self.buckets.take(who) if self.buckets else 0.0
        for pattern, buckets in self.path_buckets:
            if fnmatchcase(path, pattern):
                wait = max(wait, buckets.take(who))
        if wait > 0:
            retry = math.ceil(wait)
            await _refuse(send, OverloadError(f"too many requests from {who or 'this client'}",
                                              hint=f"retry after {retry} s", retry_after_s=retry))
            return
        cap = self.limits.max_requests
        if not cap or any(fnmatchcase(path, p) for p in self.limits.unmetered):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= cap:
            await _refuse(send, OverloadError(f"the server is at its limit of {cap} requests in flight",
                                              hint=f"retry after {BUSY_RETRY_S} s", retry_after_s=BUSY_RETRY_S))
            return
        self.in_flight += 1  # one event loop: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def _refuse(send: Send, exc: OverloadError) -> None:
    body = json.dumps({"error": exc.to_dict()}).encode()
    await send({"type": "http.response.start", "status": 429, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(exc.retry_after_s).encode())]})
    await send({"type": "http.response.body", "body": body})


def guard_app(app: App, limits: HttpLimits) -> App:
    """Return ``app`` behind a :class:`RequestGuard` when ``limits`` sets a per-request limit."""
    return RequestGuard(app, limits) if limits.needs_guard else app
