"""Slow clients: a deadline on every request's headers and body, kept per connection.

uvicorn has no header timeout (a client may take forever over its headers, a byte at a time)
and no body timeout (a request whose body never completes waits forever): the "slowloris"
attack holds connections open that way until the server has none left. The protocol built by
:func:`guarded_protocol` (a subclass of the one uvicorn would pick) adds both, in the manner of
Apache's mod_reqtimeout:

* headers: from a connection's start, or from the first byte after a response, the next
  request's headers must be complete within ``header_timeout_s`` and ``max_header_bytes``;
  otherwise the connection is closed (431 first when the headers are too large);
* body: a request whose body did not arrive with its headers gets ``body_timeout_s``, extended
  by a second per ``body_min_rate`` bytes received; past that it is answered 408 (unless its
  response has begun), the application sees a disconnect, and the connection is closed.

A timer runs only while a connection waits for headers or a body; a request that arrives in one
piece on a kept-alive connection arms none, so the inference path pays an attribute check.
"""

from __future__ import annotations

import json
from typing import Any

from edge.web.limits import HttpLimits

# What a connection is waiting for.
_HEADERS, _BODY, _NOTHING = "headers", "body", "nothing"
_PHRASES = {408: "Request Timeout", 431: "Request Header Fields Too Large"}


def _base_protocol() -> type:
    """Return the protocol class uvicorn's ``http="auto"`` picks: httptools when installed, else h11."""
    try:
        import httptools  # noqa: F401

        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def guarded_protocol(limits: HttpLimits, base: type | None = None) -> type:
    """Return a uvicorn HTTP protocol class enforcing the header and body deadlines of ``limits``."""
    base = base or _base_protocol()
    header_timeout, body_timeout = limits.header_timeout_s, limits.body_timeout_s
    per_byte_s, max_header_bytes = 1.0 / limits.body_min_rate, limits.max_header_bytes

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        """uvicorn's protocol plus header and body deadlines."""

        def connection_made(self, transport: Any) -> None:
            self._g_cycle: Any = None  # the request whose headers were seen last
            self._g_state = _NOTHING
            self._g_timer: Any = None
            self._g_deadline = 0.0
            self._g_bytes = 0
            super().connection_made(transport)
            self._g_wait(_HEADERS, header_timeout)

        def connection_lost(self, exc: Exception | None) -> None:
            self._g_stop_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.is_closing():
                self._g_stop_timer()
                return
            cycle = self.cycle
            if cycle is not self._g_cycle:  # the headers of a new request are complete
                self._g_cycle = cycle
                if cycle.more_body and not cycle.response_complete:
                    self._g_wait(_BODY, body_timeout + len(data) * per_byte_s)
                elif self._g_state is not _NOTHING:
                    self._g_cancel()
            elif self._g_state is _BODY:
                if cycle.more_body and not cycle.response_complete:
                    self._g_deadline += len(data) * per_byte_s
                else:
                    self._g_cancel()
            elif cycle is None or cycle.response_complete:  # between requests
                if self._g_state is _NOTHING:
                    self._g_wait(_HEADERS, header_timeout)
                self._g_deadline += len(data) * per_byte_s  # the rest of an unread body may still be coming
                self._g_bytes += len(data)
                if self._g_bytes > max_header_bytes and (cycle is None or not cycle.more_body):
                    self._g_refuse(431, f"request headers are over {max_header_bytes} bytes")

        # -- the deadline ----------------------------------------------------------------------

        def _g_wait(self, state: str, seconds: float) -> None:
            self._g_state, self._g_bytes = state, 0
            self._g_deadline = self.loop.time() + seconds
            # A pending timer that fires no later than the deadline is kept (it re-arms itself on
            # expiry): a request that arrives in two pieces then costs no timer of its own.
            if self._g_timer is not None and self._g_timer.when() > self._g_deadline:
                self._g_stop_timer()
            if self._g_timer is None:
                self._g_timer = self.loop.call_at(self._g_deadline, self._g_expire)

        def _g_cancel(self) -> None:
            self._g_state = _NOTHING  # a pending timer lapses harmlessly

        def _g_stop_timer(self) -> None:
            self._g_state = _NOTHING
            if self._g_timer is not None:
                self._g_timer.cancel()
                self._g_timer = None

        def _g_expire(self) -> None:
            self._g_timer = None
            if self._g_state is _NOTHING or self.transport.is_closing():
                return
            if self.loop.time() < self._g_deadline:  # extended by bytes that arrived meanwhile
                self._g_timer = self.loop.call_at(self._g_deadline, self._g_expire)
                return
            if self._g_state is _BODY:
                self._g_refuse(408, "the request body did not arrive in time; send it at once, or faster")
            else:
                self._g_refuse(None, "")

        def _g_refuse(self, status: int | None, message: str) -> None:
            """Answer ``status`` (unless a response has begun), end the request, close the connection."""
            self._g_stop_timer()
            cycle = self.cycle  # between requests: the last one, answered in full
            if status is not None and (cycle is None or cycle.response_complete or not cycle.response_started):
                body = json.dumps({"error": message}).encode()
                head = (f"HTTP/1.1 {status} {_PHRASES[status]}\r\ncontent-type: application/json\r\n"
                        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
                self.transport.write(head + body)
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the application's next receive() says http.disconnect
                cycle.message_event.set()
            self.transport.close()

    return GuardedProtocol


def uvicorn_options(limits: HttpLimits) -> dict[str, Any]:
    """Return the ``uvicorn.Config`` keyword arguments that apply ``limits`` to connections."""
    return {
        "http": guarded_protocol(limits),
        # uvicorn answers 503 to a request arriving while this many connections are open.
        "limit_concurrency": limits.max_connections,
        "h11_max_incomplete_event_size": limits.max_header_bytes,
    }
