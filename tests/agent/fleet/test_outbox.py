"""The durable outbox: drop policy exactly as documented, and in-order delivery across outages."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.agent.outbox import Kind, Outbox, OutboxLimits, OutboxSender
from edge.agent.outbox_disk import files_bytes
from edge.errors import ResourceError
from edge.transport import MqttClient
from tests.transport.helpers import FAST, WAIT_S, Inbox, client, unique, wait_until


def _topics(box: Outbox) -> list[str]:
    return [m.topic for m in box.peek(1000)]


def test_over_the_row_cap_the_oldest_telemetry_goes_first(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", OutboxLimits(max_rows=4, max_bytes=1 << 20))
    box.put("t1", b"x", kind=Kind.TELEMETRY)
    box.put("e1", b"x", kind=Kind.EVENT)
    box.put("t2", b"x", kind=Kind.TELEMETRY)
    box.put("e2", b"x", kind=Kind.EVENT)
    box.put("e3", b"x", kind=Kind.EVENT)  # 5 rows: t1 goes
    assert _topics(box) == ["e1", "t2", "e2", "e3"]
    box.put("t3", b"x", kind=Kind.TELEMETRY)  # t2 goes (oldest telemetry), never an event
    assert _topics(box) == ["e1", "e2", "e3", "t3"]
    assert box.dropped() == {"telemetry": 2, "event": 0}


def test_events_go_only_when_no_telemetry_is_left(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", OutboxLimits(max_rows=3, max_bytes=1 << 20))
    box.put("t1", b"x", kind=Kind.TELEMETRY)
    for name in ("e1", "e2", "e3", "e4"):
        box.put(name, b"x")
    # e3 pushed out t1; e4 found no telemetry left, so the oldest event went (the hard cap).
    assert _topics(box) == ["e2", "e3", "e4"]
    assert box.dropped() == {"telemetry": 1, "event": 1}
    assert box.dropped_total() == 2


def test_the_byte_cap_drops_by_the_same_policy(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", OutboxLimits(max_rows=1000, max_bytes=2048))
    box.put("e", b"e" * 900)
    box.put("t", b"t" * 900, kind=Kind.TELEMETRY)
    box.put("e", b"f" * 900)  # 2703 bytes: the telemetry goes
    assert [m.payload[:1] for m in box.peek(10)] == [b"e", b"f"]
    with pytest.raises(ResourceError, match="does not fit"):
        box.put("huge", b"x" * 4096)


def test_a_newer_retained_value_replaces_the_queued_one(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    box.put("dev/reported", b"gen 1", retain=True)
    box.put("dev/events", b"installed")
    box.put("dev/reported", b"gen 2", retain=True)
    assert [(m.topic, m.payload) for m in box.peek(10)] == [("dev/events", b"installed"), ("dev/reported", b"gen 2")]
    assert box.dropped_total() == 0  # superseded, not lost


def test_a_long_offline_device_stays_within_its_disk_budget_and_drops_exactly_by_the_policy(tmp_path: Path) -> None:
    cap = 256 * 1024
    path = tmp_path / "o.db"
    # Message bytes are not the binding limit here: the database file, its WAL and index are.
    box = Outbox(path, OutboxLimits(max_rows=1_000_000, max_bytes=1 << 30, max_disk_bytes=cap))
    telemetry, events, reported = [], [], []
    peak = 0
    for i in range(2000):  # weeks offline: telemetry every interval, now and then an event or a new state
        telemetry.append(box.put("dev/telemetry", b"t" * 600 + str(i).encode(), kind=Kind.TELEMETRY))
        if i % 40 == 0:
            events.append(box.put("dev/events", f"event {i} ".encode() * 10))
        if i % 250 == 0:
            reported.append(box.put("dev/reported", f"generation {i}".encode(), retain=True))
        peak = max(peak, files_bytes(path))
    assert peak <= cap
    kept = box.peek(1_000_000)
    assert [m.id for m in kept] == sorted(m.id for m in kept)  # still in order
    kept_telemetry = [m.id for m in kept if m.kind is Kind.TELEMETRY]
    assert [m.id for m in kept if m.kind is Kind.EVENT and not m.retain] == events  # no event went
    assert [m.id for m in kept if m.retain] == [reported[-1]]  # replaced by the newest, not dropped
    assert 0 < len(kept_telemetry) < len(telemetry)
    assert kept_telemetry == telemetry[-len(kept_telemetry):]  # the oldest telemetry went first
    assert box.dropped() == {"telemetry": len(telemetry) - len(kept_telemetry), "event": 0}
    # Then only events (its sensors died): every telemetry message goes before the first event does.
    older_events = [m.id for m in kept if m.kind is Kind.EVENT]
    more = []
    for i in range(400):
        more.append(box.put("dev/events", b"e" * 500 + str(i).encode()))
        if box.dropped()["event"]:
            assert not [m for m in box.peek(1_000_000) if m.kind is Kind.TELEMETRY]
        peak = max(peak, files_bytes(path))
    assert peak <= cap
    assert box.dropped()["telemetry"] == len(telemetry) and box.dropped()["event"] > 0
    left = [m.id for m in box.peek(1_000_000)]
    assert left == (older_events + more)[-len(left):]  # the oldest events went first
    assert box.dropped()["event"] == len(older_events) + len(more) - len(left)
    box.close()


def test_a_disk_budget_too_small_for_the_schema_and_a_wal_is_refused() -> None:
    with pytest.raises(ValueError, match="disk budget"):
        OutboxLimits(max_disk_bytes=64 * 1024)


def test_messages_and_drop_counts_survive_a_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", OutboxLimits(max_rows=2, max_bytes=1 << 20))
    for i in range(3):
        box.put(f"t{i}", b"x", kind=Kind.TELEMETRY)
    box.close()
    again = Outbox(tmp_path / "o.db", OutboxLimits(max_rows=2, max_bytes=1 << 20))
    assert _topics(again) == ["t1", "t2"] and again.dropped()["telemetry"] == 1
    again.close()


def _drain(url: str, box: Outbox) -> tuple[MqttClient, OutboxSender]:
    c = MqttClient(url, unique("agent"), backoff=FAST).start()
    sender = OutboxSender(box, c, window=8)
    sender.start()
    return c, sender


def test_queued_while_the_broker_is_down_is_delivered_in_order_after_an_agent_restart(any_broker, tmp_path: Path) -> None:
    base = unique("dev")
    box = Outbox(tmp_path / "o.db")
    c, sender = _drain(any_broker.url, box)
    assert c.wait_connected(WAIT_S)
    any_broker.stop()
    for i in range(120):
        box.put(f"{base}/events", f"event {i}".encode())
    sender.stop()
    c.stop()  # the agent exits while the broker is down
    box.close()
    any_broker.start()
    inbox = Inbox()
    watcher = client(any_broker.url, "watcher")
    assert watcher.subscribe(f"{base}/#", inbox).wait(WAIT_S)
    box = Outbox(tmp_path / "o.db")  # the agent starts again
    c, sender = _drain(any_broker.url, box)
    try:
        assert inbox.wait_for(lambda m: len(m) >= 120)
        assert inbox.payloads() == [f"event {i}".encode() for i in range(120)]  # in order, none lost
        assert wait_until(lambda: box.depth() == 0)  # deleted once acknowledged
    finally:
        sender.stop()
        c.stop()
        watcher.stop()


def test_a_running_sender_delivers_everything_after_the_broker_restarts(broker, tmp_path: Path) -> None:
    if not broker.persistent:
        pytest.skip("needs a broker that keeps the watcher's session across a restart")
    base = unique("dev")
    inbox = Inbox()
    watcher = client(broker.url, "watcher")
    assert watcher.subscribe(f"{base}/#", inbox).wait(WAIT_S)
    box = Outbox(tmp_path / "o.db")
    c, sender = _drain(broker.url, box)
    try:
        for i in range(50):
            box.put(f"{base}/events", f"before {i}".encode())
        broker.stop()
        for i in range(50):
            box.put(f"{base}/events", f"during {i}".encode())
        broker.start()
        expected = [f"before {i}".encode() for i in range(50)] + [f"during {i}".encode() for i in range(50)]
        assert inbox.wait_for(lambda m: len(set(p for _, p, _ in m)) >= 100)
        got = inbox.payloads()
        # At least once: a message in flight when the broker died may arrive twice, never out of order.
        deduped = [p for i, p in enumerate(got) if p not in got[:i]]
        assert deduped == expected
        assert wait_until(lambda: box.depth() == 0)
    finally:
        sender.stop()
        c.stop()
        watcher.stop()


def test_a_message_the_client_refuses_is_dropped_and_counted_not_retried(broker, tmp_path: Path) -> None:
    base = unique("dev")
    inbox = Inbox()
    watcher = client(broker.url, "watcher")
    assert watcher.subscribe(f"{base}/#", inbox).wait(WAIT_S)
    box = Outbox(tmp_path / "o.db")
    c = MqttClient(broker.url, unique("agent"), backoff=FAST, max_payload=1000).start()
    sender = OutboxSender(box, c)
    box.put(f"{base}/events", b"small 1")
    box.put(f"{base}/events", b"x" * 5000)
    box.put(f"{base}/events", b"small 2")
    sender.start()
    try:
        assert inbox.wait_for(lambda m: len(m) >= 2)
        assert wait_until(lambda: box.depth() == 0)
        assert inbox.payloads() == [b"small 1", b"small 2"]
        assert box.dropped() == {"telemetry": 0, "event": 1}
    finally:
        sender.stop()
        c.stop()
        watcher.stop()
