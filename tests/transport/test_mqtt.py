"""MqttClient against real brokers: mosquitto (MQTT 5) and the embedded amqtt broker (3.1.1)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge.errors import ConfigError, ConnectError, PublishError
from edge.transport import MqttClient
from tests.transport.helpers import FAST, WAIT_S, Inbox, client, unique, wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_publish_subscribe_and_ack(any_broker) -> None:
    topic = unique("t") + "/a"
    inbox = Inbox()
    sub = client(any_broker.url, "sub")
    pub = client(any_broker.url, "pub")
    try:
        assert sub.protocol == ("5" if any_broker.kind == "mosquitto" else "3.1.1")
        assert sub.subscribe(topic.rsplit("/", 1)[0] + "/+", inbox).wait(WAIT_S)
        handles = [pub.publish(topic, f"m{i}".encode()) for i in range(20)]
        assert all(h.wait(WAIT_S) for h in handles)
        assert all(h.mid is not None and h.acked for h in handles)
        assert inbox.wait_for(lambda m: len(m) == 20)
        assert inbox.payloads() == [f"m{i}".encode() for i in range(20)]  # in order
        assert pub.pending_acks == 0
    finally:
        sub.stop()
        pub.stop()


def test_retained_message_reaches_a_late_subscriber_flagged_retained(any_broker) -> None:
    topic = unique("r") + "/desired"
    pub = client(any_broker.url, "pub")
    assert pub.publish(topic, b"v1", retain=True).wait(WAIT_S)
    assert pub.publish(topic, b"v2", retain=True).wait(WAIT_S)
    inbox = Inbox()
    sub = client(any_broker.url, "late")
    try:
        sub.subscribe(topic, inbox)
        assert inbox.wait_for(lambda m: len(m) >= 1)
        assert inbox.messages[0] == (topic, b"v2", True)
    finally:
        sub.stop()
        pub.stop()


WILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from edge.transport import MqttClient
    url, cid, topic = sys.argv[1:4]
    c = MqttClient(url, cid, will=(topic, b"offline", 1, True)).start()
    assert c.wait_connected(15), c.last_error
    assert c.publish(topic, b"online", retain=True).wait(15)
    print("ready", flush=True)
    time.sleep(120)
    """
)


def test_last_will_is_published_when_the_process_dies(any_broker) -> None:
    topic = unique("w") + "/status"
    inbox = Inbox()
    watcher = client(any_broker.url, "watcher")
    proc = subprocess.Popen([sys.executable, "-c", WILL_SCRIPT, any_broker.url, unique("dying"), topic],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert watcher.subscribe(topic, inbox).wait(WAIT_S)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        assert inbox.wait_for(lambda m: b"online" in [p for _, p, _ in m])
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT_S)
        assert inbox.wait_for(lambda m: m[-1][1] == b"offline")
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.stop()
    late = Inbox()
    again = client(any_broker.url, "late")
    try:
        again.subscribe(topic, late)
        assert late.wait_for(lambda m: len(m) >= 1)
        assert late.messages[0] == (topic, b"offline", True)  # the will was retained
    finally:
        again.stop()


def test_a_clean_stop_sends_disconnect_so_the_will_is_dropped(any_broker) -> None:
    topic = unique("w") + "/status"
    inbox = Inbox()
    watcher = client(any_broker.url, "watcher")
    try:
        assert watcher.subscribe(topic, inbox).wait(WAIT_S)
        c = client(any_broker.url, "clean", will=(topic, b"will", 1, False))
        assert c.publish(topic, b"bye").wait(WAIT_S)
        c.stop()
        assert inbox.wait_for(lambda m: len(m) == 1)
        marker = watcher.publish(topic, b"marker")  # everything before it has been routed
        assert marker.wait(WAIT_S) and inbox.wait_for(lambda m: m[-1][1] == b"marker")
        assert inbox.payloads() == [b"bye", b"marker"]
    finally:
        watcher.stop()


def test_will_callable_is_evaluated_per_connection(any_broker) -> None:
    topic = unique("w") + "/status"
    calls = []

    def will():
        calls.append(len(calls) + 1)
        return topic, f"offline {len(calls)}".encode(), 1, True

    c = MqttClient(any_broker.url, unique("c"), will=will, backoff=FAST).start()
    try:
        assert c.wait_connected(WAIT_S)
        attempts = len(calls)
        any_broker.stop()
        assert wait_until(lambda: not c.connected)
        any_broker.start()
        assert c.wait_connected(WAIT_S)
        assert len(calls) > attempts  # a fresh will (with a fresh session) for the new connection
    finally:
        c.stop()


def test_reconnects_after_broker_restart_and_resubscribes(any_broker) -> None:
    topic = unique("re") + "/x"
    inbox = Inbox()
    connects = []
    sub = MqttClient(any_broker.url, unique("sub"), backoff=FAST)
    sub.on_connect(lambda info: connects.append(info))
    sub.start()
    pub = client(any_broker.url, "pub")
    try:
        assert sub.wait_connected(WAIT_S)
        assert sub.subscribe(topic, inbox).wait(WAIT_S)
        any_broker.stop()
        assert wait_until(lambda: not sub.connected and not pub.connected)
        any_broker.start()
        assert sub.wait_connected(WAIT_S) and pub.wait_connected(WAIT_S)
        assert [i.count for i in connects] == [1, 2]
        # Publish until the renewed subscription delivers (the SUBACK may trail the CONNACK).
        n = 0

        def delivered() -> bool:
            nonlocal n
            n += 1
            pub.publish(topic, f"after-{n}".encode(), qos=0)
            return inbox.wait_for(lambda m: len(m) > 0, timeout=0.2)

        assert wait_until(delivered)
        assert inbox.payloads()[0].startswith(b"after-")
    finally:
        sub.stop()
        pub.stop()


def test_messages_published_while_down_leave_in_order_after_reconnect(broker) -> None:
    # mosquitto keeps the subscriber's persistent session across the restart, so nothing is lost.
    topic = unique("q") + "/x"
    inbox = Inbox()
    sub = client(broker.url, "sub")
    pub = client(broker.url, "pub")
    try:
        assert sub.subscribe(topic, inbox).wait(WAIT_S)
        broker.stop()
        assert wait_until(lambda: not pub.connected)
        handles = [pub.publish(topic, f"m{i}".encode()) for i in range(50)]
        assert not handles[0].wait(0.05)  # not acked while the broker is down
        broker.start()
        assert all(h.wait(WAIT_S) for h in handles)
        if broker.persistent:
            assert inbox.wait_for(lambda m: len(m) == 50)
            assert inbox.payloads() == [f"m{i}".encode() for i in range(50)]
    finally:
        sub.stop()
        pub.stop()


def test_on_connect_hook_publishes_a_birth_before_the_backlog(any_broker) -> None:
    base = unique("b")
    inbox = Inbox()
    watcher = client(any_broker.url, "watcher")
    assert watcher.subscribe(base + "/#", inbox).wait(WAIT_S)
    dev = MqttClient(any_broker.url, unique("dev"), backoff=FAST)
    dev.on_connect(lambda info: dev.publish(base + "/status", f"online {info.count}".encode()))
    queued = dev.publish(base + "/events", b"queued before connect")
    dev.start()
    try:
        assert queued.wait(WAIT_S)
        assert inbox.wait_for(lambda m: len(m) == 2)
        assert inbox.payloads() == [b"online 1", b"queued before connect"]
    finally:
        dev.stop()
        watcher.stop()


def test_a_failing_handler_never_stops_the_loop(any_broker, caplog: pytest.LogCaptureFixture) -> None:
    topic = unique("h") + "/x"
    inbox = Inbox()

    def explode(t: str, payload: bytes, retained: bool) -> None:
        if payload.startswith(b"boom"):
            raise RuntimeError("handler bug")
        inbox(t, payload, retained)

    sub = client(any_broker.url, "sub")
    pub = client(any_broker.url, "pub")
    try:
        assert sub.subscribe(topic, explode).wait(WAIT_S)
        with caplog.at_level(logging.ERROR, logger="edge.transport.mqtt"):
            pub.publish(topic, b"boom" + b"x" * 1000)
            pub.publish(topic, b"fine")
            assert inbox.wait_for(lambda m: len(m) == 1)
        assert inbox.payloads() == [b"fine"]
        failure = next(r for r in caplog.records if "failed on topic" in r.getMessage())
        assert topic in failure.getMessage() and b"boom".decode() in failure.getMessage()
        assert len(failure.getMessage()) < 600  # the payload is truncated
        assert failure.exc_info is not None and "handler bug" in str(failure.exc_info[1])
        assert sub.connected
    finally:
        sub.stop()
        pub.stop()


def test_shared_subscriptions_split_on_mqtt5_and_fall_back_to_plain_on_311(any_broker) -> None:
    base = unique("s")
    a, b = Inbox(), Inbox()
    ca, cb = client(any_broker.url, "ca"), client(any_broker.url, "cb")
    pub = client(any_broker.url, "pub")
    try:
        assert ca.subscribe(f"$share/ctl/{base}/+/telemetry", a).wait(WAIT_S)
        assert cb.subscribe(f"$share/ctl/{base}/+/telemetry", b).wait(WAIT_S)
        for i in range(20):
            assert pub.publish(f"{base}/dev{i}/telemetry", b"t").wait(WAIT_S)
        if ca.shared_subscriptions:  # MQTT 5: each message goes to one member of the group
            assert wait_until(lambda: len(a.messages) + len(b.messages) == 20)
            assert a.messages and b.messages
        else:  # 3.1.1: the plain filter, so every subscriber sees every message
            assert a.wait_for(lambda m: len(m) == 20) and b.wait_for(lambda m: len(m) == 20)
    finally:
        for c in (ca, cb, pub):
            c.stop()


def test_stop_fails_pending_handles_and_later_publishes(broker) -> None:
    c = MqttClient(broker.url, unique("c"), backoff=FAST)  # never started: publishes wait in the backlog
    h = c.publish("t/x", b"1")
    c.stop()
    assert not h.wait(1) and isinstance(h.error, ConnectError)
    late = c.publish("t/x", b"2")
    assert late.done and isinstance(late.error, ConnectError)


def test_connection_refused_is_reported_and_retried(tmp_path: Path) -> None:
    from edge.transport.embedded_broker import free_port

    port = free_port()
    c = MqttClient(f"mqtt://127.0.0.1:{port}", unique("c"), backoff=FAST).start()
    try:
        assert not c.wait_connected(0.5)
        assert isinstance(c.last_error, ConnectError) and "refused" in str(c.last_error).lower()
    finally:
        c.stop()


def test_invalid_topics_filters_and_ids_are_refused(broker) -> None:
    c = MqttClient(broker.url, unique("c"))
    with pytest.raises(PublishError, match="wildcard"):
        c.publish("a/+/b", b"x")
    with pytest.raises(PublishError, match="bytes"):
        c.publish("a/b", "text")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="filter"):
        c.subscribe("a/#/b", lambda *a: None)
    with pytest.raises(ConfigError, match="shared subscription"):
        c.subscribe("$share//a", lambda *a: None)
    with pytest.raises(ConfigError, match="client id"):
        MqttClient(broker.url, "has space")
    c.stop()


def test_forced_311_on_mosquitto(broker) -> None:
    c = client(broker.url, "old", protocol="3.1.1")
    try:
        assert c.protocol == "3.1.1" and not c.shared_subscriptions
        assert c.publish("t/311", b"x").wait(WAIT_S)
    finally:
        c.stop()


def test_only_the_network_thread_writes_so_messages_leave_in_order(any_broker) -> None:
    """Publishers on other threads only queue: two writers popping one queue reorder messages."""
    import threading

    base = unique("order")
    inbox = Inbox()
    watcher = client(any_broker.url, "watcher")
    assert watcher.subscribe(f"{base}/#", inbox).wait(WAIT_S)
    c = client(any_broker.url, "writer")
    paho_client = c._paho  # the transport's own paho client: its socket writes are what we check
    writers: set[str] = set()
    send = paho_client._sock_send

    def recording_send(buf: bytes) -> int:
        writers.add(threading.current_thread().name)
        return send(buf)

    paho_client._sock_send = recording_send
    try:
        handles = []
        publishers = [threading.Thread(target=lambda k=k: handles.extend(
            c.publish(f"{base}/{k}", f"{k} {i}".encode(), 1) for i in range(100))) for k in range(4)]
        for t in publishers:
            t.start()
        for t in publishers:
            t.join()
        assert all(h.wait(WAIT_S) for h in handles)
        assert writers == {f"mqtt-{c.client_id}"}, writers
        assert inbox.wait_for(lambda m: len(m) >= 400)
        for k in range(4):  # each publisher's messages arrive in the order it published them
            mine = [p for t, p, _ in inbox.messages if t == f"{base}/{k}"]
            assert mine == [f"{k} {i}".encode() for i in range(100)]
    finally:
        c.stop()
        watcher.stop()
