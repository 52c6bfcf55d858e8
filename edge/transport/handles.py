"""Acknowledgement handles, tracked per MQTT message id."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from edge.errors import TransportError

# Acks that arrive before their publish() call registered the handle (the network thread can be
# faster than the caller); they are claimed within microseconds, so a small bound is plenty.
MAX_EARLY_ACKS = 1024


class PublishHandle:
    """The fate of one publish: acknowledged (PUBACK for QoS 1, written for QoS 0) or failed."""

    def __init__(self, topic: str, qos: int) -> None:
        self.topic = topic
        self.qos = qos
        self.mid: int | None = None
        self.error: TransportError | None = None
        self.created = time.monotonic()
        self.warned = False
        self._done = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds; return True when the broker acknowledged the message."""
        return self._done.wait(timeout) and self.error is None

    @property
    def done(self) -> bool:
        """Return whether the message was acknowledged or failed."""
        return self._done.is_set()

    @property
    def acked(self) -> bool:
        """Return whether the broker acknowledged the message."""
        return self._done.is_set() and self.error is None

    def resolve(self, error: TransportError | None = None) -> None:
        """Mark the handle acknowledged, or failed with ``error`` (first call wins)."""
        if not self._done.is_set():
            self.error = error
            self._done.set()

    def __repr__(self) -> str:
        state = "acked" if self.acked else ("failed" if self.done else "pending")
        return f"<{type(self).__name__} {self.topic!r} mid={self.mid} {state}>"


class SubscribeHandle(PublishHandle):
    """The fate of one SUBSCRIBE: granted (SUBACK) or refused."""

    def __init__(self, topic_filter: str, qos: int) -> None:
        super().__init__(topic_filter, qos)


class AckTracker:
    """Pending handles by message id; acks that race ahead of registration are kept briefly."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, PublishHandle] = {}
        self._early: OrderedDict[int, TransportError | None] = OrderedDict()

    def register(self, mid: int, handle: PublishHandle) -> None:
        """Track ``handle`` under ``mid``; resolve it at once if its ack already arrived."""
        handle.mid = mid
        with self._lock:
            if mid in self._early:
                error = self._early.pop(mid)
            else:
                self._pending[mid] = handle
                return
        handle.resolve(error)

    def resolve(self, mid: int, error: TransportError | None = None) -> None:
        """Resolve the handle of ``mid`` (called from the network thread on PUBACK/SUBACK)."""
        with self._lock:
            handle = self._pending.pop(mid, None)
            if handle is None:
                self._early[mid] = error
                while len(self._early) > MAX_EARLY_ACKS:
                    self._early.popitem(last=False)
                return
        handle.resolve(error)

    def fail(self, error: TransportError) -> int:
        """Fail every pending handle; return how many."""
        with self._lock:
            handles = list(self._pending.values())
            self._pending.clear()
        for h in handles:
            h.resolve(error)
        return len(handles)

    def connection_lost(self, error: TransportError) -> None:
        """Fail pending QoS 0 publishes and forget pending SUBSCRIBEs: neither is ever resent.

        QoS 1/2 publishes stay: paho resends them after the reconnect. A subscription's handle
        is registered again when the subscription is renewed.
        """
        with self._lock:
            doomed = [m for m, h in self._pending.items() if isinstance(h, SubscribeHandle) or h.qos == 0]
            handles = [self._pending.pop(m) for m in doomed]
        for h in handles:
            if not isinstance(h, SubscribeHandle):
                h.resolve(error)

    def overdue(self, older_than: float) -> list[PublishHandle]:
        """Return pending handles created more than ``older_than`` seconds ago, not yet warned about."""
        limit = time.monotonic() - older_than
        with self._lock:
            late = [h for h in self._pending.values() if h.created < limit and not h.warned]
        for h in late:
            h.warned = True
        return late

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)
