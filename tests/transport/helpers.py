"""Small helpers for tests that talk to a real broker."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Callable

from edge.transport import Backoff, MqttClient

# Fast reconnects for tests that restart the broker (production uses the 0.5-30 s default).
FAST = Backoff(initial=0.05, maximum=0.5)
# Generous bound for anything a test waits for; reached only when something is broken.
WAIT_S = 15.0


class Inbox:
    """A handler that records (topic, payload, retained) and lets a test wait for messages."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes, retained: bool) -> None:
        with self._cond:
            self.messages.append((topic, payload, retained))
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[tuple[str, bytes, bool]]], bool], timeout: float = WAIT_S) -> bool:
        """Wait until ``predicate(messages)`` holds; return whether it did."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.messages), timeout)

    def payloads(self, topic: str | None = None) -> list[bytes]:
        """Return the payloads received (on ``topic`` only, if given)."""
        with self._cond:
            return [p for t, p, _ in self.messages if topic is None or t == topic]


def unique(prefix: str) -> str:
    """Return a topic prefix or client id of this test's own."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def client(url: str, name: str, **kwargs) -> MqttClient:
    """Return a started client with fast reconnects, connected."""
    c = MqttClient(url, unique(name), backoff=kwargs.pop("backoff", FAST), **kwargs).start()
    assert c.wait_connected(WAIT_S), c.last_error
    return c


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_S, step: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
