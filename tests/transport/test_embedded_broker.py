"""The embedded amqtt broker: serves in a thread, restarts on its port, keeps retained messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.errors import TransportError
from edge.transport.embedded_broker import EmbeddedBroker, free_port
from tests.transport.helpers import WAIT_S, Inbox, client, unique


def _retained(url: str, topic: str) -> list[tuple[str, bytes, bool]]:
    inbox = Inbox()
    c = client(url, "reader")
    try:
        c.subscribe(topic, inbox)
        inbox.wait_for(lambda m: len(m) >= 1, timeout=3)
        return list(inbox.messages)
    finally:
        c.stop()


def test_retained_messages_survive_a_restart_and_a_new_process(tmp_path: Path) -> None:
    state = tmp_path / "broker-state.json"
    topic = unique("edge/v1/f") + "/dev/desired"
    b = EmbeddedBroker("127.0.0.1", free_port(), state_file=state).start()
    try:
        c = client(b.url, "ctl")
        assert c.protocol == "3.1.1"  # amqtt refuses MQTT 5 cleanly, so the client falls back at once
        assert c.publish(topic, b"generation 7", retain=True).wait(WAIT_S)
        c.stop()
        b.stop()
        b.start()  # same object, same port
        assert _retained(b.url, topic) == [(topic, b"generation 7", True)]
    finally:
        b.stop()
    assert state.exists()
    again = EmbeddedBroker("127.0.0.1", free_port(), state_file=state).start()  # as after a process restart
    try:
        assert _retained(again.url, topic) == [(topic, b"generation 7", True)]
    finally:
        again.stop()


def test_a_busy_port_is_reported() -> None:
    first = EmbeddedBroker("127.0.0.1", free_port()).start()
    try:
        with pytest.raises(TransportError, match="cannot listen"):
            EmbeddedBroker("127.0.0.1", first.port).start()
    finally:
        first.stop()
