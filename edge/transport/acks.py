"""Acknowledgements of received messages that the application gives when it is done (manual acks).

paho acknowledges a QoS 1 message as soon as its callback returns. A subscriber that stores
messages later (the controller's ingest commits them in batches) subscribes with
``defer_ack=True`` and calls the :class:`Ack` it is handed once the message is safe. Until then
the broker keeps the message in the client's session and sends it again after a reconnect, so a
crash between receipt and commit loses nothing; the receiver deduplicates by message id.

Only the network thread talks to paho: :meth:`Ack.__call__` may run in any thread and only
queues the acknowledgement here; the network thread sends it on its next turn, and only on the
connection that delivered the message. Packet ids belong to one connection: after a reconnect
the broker sends the message again under the id it keeps in the session, and an id of an earlier
connection may by then name another message, so a late ack for it is dropped, never sent.
"""

from __future__ import annotations

import threading
from collections import deque


class _Delivery:
    """One received message that deferred handlers hold; acked once every one of them is done."""

    __slots__ = ("connection", "mid", "qos", "left")

    def __init__(self, connection: int, mid: int, qos: int, holders: int) -> None:
        self.connection, self.mid, self.qos, self.left = connection, mid, qos, holders


class Ack:
    """Acknowledge one received message to the broker; call it once the message is stored.

    Safe from any thread; calls after the first do nothing. For a QoS 0 message it does nothing.
    """

    __slots__ = ("_book", "_delivery", "_done")

    def __init__(self, book: "AckBook | None", delivery: _Delivery | None) -> None:
        self._book, self._delivery, self._done = book, delivery, False

    def __call__(self) -> None:
        if self._done or self._book is None or self._delivery is None:
            return
        self._done = True
        self._book.release(self._delivery)


# Handed to deferred handlers for messages that need no acknowledgement (QoS 0).
NO_ACK = Ack(None, None)


class AckBook:
    """Deliveries awaiting their application's ack, and acks waiting for the network thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: deque[_Delivery] = deque()
        self._outstanding = 0

    @property
    def outstanding(self) -> int:
        """Return how many delivered messages still wait for their application's ack."""
        return self._outstanding

    def deliver(self, connection: int, mid: int, qos: int, holders: int) -> list[Ack]:
        """Return one :class:`Ack` per deferred handler of a message received on ``connection``."""
        delivery = _Delivery(connection, mid, qos, holders)
        with self._lock:
            self._outstanding += 1
        return [Ack(self, delivery) for _ in range(holders)]

    def release(self, delivery: _Delivery) -> None:
        """Count one handler done with ``delivery``; queue its ack when it was the last."""
        with self._lock:
            delivery.left -= 1
            if delivery.left > 0:
                return
            self._outstanding -= 1
            self._ready.append(delivery)

    def take(self) -> list[tuple[int, int, int]]:
        """Return and forget the acks ready to send, oldest first, as (connection, mid, qos)."""
        if not self._ready:
            return []
        with self._lock:
            ready = [(d.connection, d.mid, d.qos) for d in self._ready]
            self._ready.clear()
        return ready
