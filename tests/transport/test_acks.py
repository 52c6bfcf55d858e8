"""Deferred acknowledgements (``subscribe(..., defer_ack=True)``) against a real mosquitto.

A message a deferred handler has not acked stays in the subscriber's persistent session and comes
again after a reconnect; an acked one does not. Session state survives only in mosquitto
(persistence on), so these tests need it.
"""

from __future__ import annotations

import threading

import pytest

from edge.errors import ConfigError
from edge.transport import Ack, MqttClient
from tests.fixtures.broker import MOSQUITTO
from tests.transport.helpers import FAST, WAIT_S, client, unique, wait_until

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="needs mosquitto (persistent sessions)")


class Held:
    """A deferred handler that records messages and keeps their acks for the test to call."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.acks: list[Ack] = []
        self._lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes, retained: bool, ack: Ack) -> None:
        with self._lock:
            self.payloads.append(payload)
            self.acks.append(ack)

    def count(self) -> int:
        with self._lock:
            return len(self.payloads)


def _subscriber(url: str, client_id: str, topic: str, handler: Held, **kw) -> MqttClient:
    c = MqttClient(url, client_id, backoff=FAST, clean_start=False, **kw)
    handle = c.subscribe(topic, handler, qos=1, defer_ack=True)
    c.start()
    assert c.wait_connected(WAIT_S) and handle.wait(WAIT_S)
    return c


def _publish(pub: MqttClient, topic: str, *payloads: bytes) -> None:
    assert all(h.wait(WAIT_S) for h in [pub.publish(topic, p, qos=1) for p in payloads])


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_unacked_messages_come_again_and_acked_ones_do_not(broker, protocol: str) -> None:
    topic, sub_id = unique("acks") + "/t", unique("ingest")
    pub = client(broker.url, "pub")
    first = Held()
    sub = _subscriber(broker.url, sub_id, topic, first, protocol=protocol)
    try:
        _publish(pub, topic, b"m1", b"m2", b"m3")
        assert wait_until(lambda: first.count() == 3)
        first.acks[0]()  # m1 is stored; m2 and m3 are not when the subscriber goes away
        # Acked from another thread, as the ingest writer does; sent by the network thread.
        threading.Thread(target=first.acks[0]).start()  # a second call does nothing
    finally:
        sub.stop()
    again = Held()
    sub = _subscriber(broker.url, sub_id, topic, again, protocol=protocol)
    try:
        _publish(pub, topic, b"m4")  # the session's messages come before this one
        assert wait_until(lambda: b"m4" in again.payloads)
        assert again.payloads == [b"m2", b"m3", b"m4"]
        for ack in again.acks:
            ack()
    finally:
        sub.stop()
    last = Held()
    sub = _subscriber(broker.url, sub_id, topic, last, protocol=protocol)
    try:
        _publish(pub, topic, b"m5")
        assert wait_until(lambda: b"m5" in last.payloads)
        assert last.payloads == [b"m5"]  # nothing acked came again
    finally:
        sub.stop()
        pub.stop()


def test_a_message_comes_again_on_the_next_connection_when_its_connection_ended_unacked(broker) -> None:
    topic, sub_id = unique("cut") + "/t", unique("ingest")
    pub = client(broker.url, "pub")
    held = Held()
    sub = _subscriber(broker.url, sub_id, topic, held)
    try:
        _publish(pub, topic, b"kept")
        assert wait_until(lambda: held.count() == 1)
        broker.stop()  # the connection that delivered "kept" ends before it is stored
        assert wait_until(lambda: not sub.connected)
        broker.start()
        assert sub.wait_connected(WAIT_S)
        assert wait_until(lambda: held.count() == 2)  # the session sends it again on the new connection
        assert held.payloads == [b"kept", b"kept"]
        for ack in held.acks:
            ack()
    finally:
        sub.stop()
    after = Held()
    sub = _subscriber(broker.url, sub_id, topic, after)
    try:
        _publish(pub, topic, b"marker")
        assert wait_until(lambda: b"marker" in after.payloads)
        assert after.payloads == [b"marker"]
    finally:
        sub.stop()
        pub.stop()


def test_an_ack_from_an_earlier_connection_is_never_sent_on_a_later_one(broker) -> None:
    topic, sub_id = unique("stale") + "/t", unique("ingest")
    pub = client(broker.url, "pub")
    held = Held()
    sub = _subscriber(broker.url, sub_id, topic, held)
    try:
        _publish(pub, topic, b"old")
        assert wait_until(lambda: held.count() == 1)
        broker.stop()
        (broker.workdir / "mosquitto.db").unlink()  # the broker forgets every session: packet ids start over
        assert wait_until(lambda: not sub.connected)
        broker.start()
        assert sub.wait_connected(WAIT_S) and pub.wait_connected(WAIT_S)
        n = 0

        def delivered() -> bool:  # until the renewed subscription is in place
            nonlocal n
            n += 1
            pub.publish(topic, f"new-{n}".encode(), qos=1).wait(WAIT_S)
            return wait_until(lambda: held.count() > 1, timeout=0.2)

        assert wait_until(delivered)
        first_new = held.payloads[1]
        # The case at stake: "old" on the first connection and "new-k" on this one share a packet id.
        assert held.acks[0]._delivery.mid == held.acks[1]._delivery.mid  # type: ignore[union-attr]
        held.acks[0]()  # late: sent now, it would acknowledge new-k, which nobody stored
    finally:
        sub.stop()
    again = Held()
    sub = _subscriber(broker.url, sub_id, topic, again)
    try:
        assert wait_until(lambda: first_new in again.payloads)  # still in the session: the late ack was dropped
        for ack in again.acks:
            ack()
    finally:
        sub.stop()
        pub.stop()


def test_receive_maximum_widens_the_brokers_window_for_deferred_acks(broker) -> None:
    topic = unique("window") + "/t"
    pub = client(broker.url, "pub")
    narrow, wide = Held(), Held()
    a = _subscriber(broker.url, unique("narrow"), topic, narrow)
    b = _subscriber(broker.url, unique("wide"), topic, wide, receive_maximum=500)
    try:
        _publish(pub, topic, *[f"m{i}".encode() for i in range(100)])
        assert wait_until(lambda: wide.count() == 100)  # all 100 in flight, none acked
        assert narrow.count() == 20  # mosquitto's default in-flight window: the rest waits for acks
        for ack in list(narrow.acks):
            ack()
        assert wait_until(lambda: narrow.count() > 20)  # the acks reached the broker: more flows
    finally:
        a.stop()
        b.stop()
        pub.stop()


def test_a_failing_deferred_handler_does_not_hold_the_message(broker) -> None:
    topic, sub_id = unique("fail") + "/t", unique("ingest")
    pub = client(broker.url, "pub")
    seen: list[bytes] = []

    def broken(topic: str, payload: bytes, retained: bool, ack: Ack) -> None:
        seen.append(payload)
        raise RuntimeError("handler bug")

    sub = MqttClient(broker.url, sub_id, backoff=FAST, clean_start=False)
    handle = sub.subscribe(topic, broken, defer_ack=True)
    sub.start()
    try:
        assert sub.wait_connected(WAIT_S) and handle.wait(WAIT_S)
        _publish(pub, topic, b"x")
        assert wait_until(lambda: seen == [b"x"])
    finally:
        sub.stop()
    after = Held()
    sub = _subscriber(broker.url, sub_id, topic, after)
    try:
        _publish(pub, topic, b"marker")
        assert wait_until(lambda: b"marker" in after.payloads)
        assert after.payloads == [b"marker"]  # logged and acked, not redelivered forever
    finally:
        sub.stop()
        pub.stop()


@pytest.mark.parametrize("value", [0, 65536])
def test_receive_maximum_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(ConfigError, match="receive_maximum"):
        MqttClient("mqtt://127.0.0.1:1883", unique("c"), receive_maximum=value)


def test_deferred_acks_are_asked_for_before_start(broker) -> None:
    c = client(broker.url, "late")
    try:
        with pytest.raises(ConfigError, match="after start"):
            c.subscribe(unique("late") + "/t", Held(), defer_ack=True)
    finally:
        c.stop()
