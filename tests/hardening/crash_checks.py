"""What the agent crash campaign checks after each kill, and the subscriber it checks against.

* **Store**: reopened (recovery runs), it serves exactly one sound version per model, whose
  payload hashes match the signed manifest, with no staging, journal, trash or temporary
  leftovers (:func:`tests.agent.test_store_crash.check_store`); each active version answers
  with the weights of its version.
* **Deployment records**: every record on disk parses into a state of the state machine, right
  after the kill (no torn file), and ends in the expected terminal state after the restart.
* **Acknowledged messages**: every envelope id an ``Outbox.put`` returned for (see
  :mod:`tests.hardening.crash_jobs`) is still queued in the outbox or was delivered to a real
  subscriber; copies delivered twice (QoS 1 resends after a restart) are byte-identical, so
  deduplication by envelope id restores exactly-once.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edge.agent.deployment import Deployment
from edge.agent.outbox import Outbox
from edge.protocol.messages import Event, decode
from edge.protocol.topics import Channel, Topics
from edge.runtime.model import load_model
from tests.agent.test_store_crash import check_store
from tests.fixtures.bundles import expected_output
from tests.hardening.crash_jobs import open_store
from tests.transport.helpers import WAIT_S, client, wait_until

# The channels the outbox carries.
OUTBOX_CHANNELS = (Channel.TELEMETRY, Channel.EVENTS, Channel.RESP, Channel.REPORTED)


class Delivered:
    """A real MQTT subscriber on the fleet's outbox channels: every envelope received, by id."""

    def __init__(self, url: str, topics: Topics) -> None:
        self._lock = threading.Lock()
        self.copies: dict[str, list[bytes]] = {}
        self.events: dict[str, list[Event]] = {}
        self.client = client(url, "crash-subscriber")
        for channel in OUTBOX_CHANNELS:
            assert self.client.subscribe(topics.fleet_filter(channel), self._on_message, qos=1).wait(WAIT_S)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if not payload:
            return
        env = decode(payload)
        with self._lock:
            self.copies.setdefault(env.id, []).append(payload)
            if isinstance(env.body, Event):
                self.events.setdefault(env.device, []).append(env.body)

    def ids(self) -> set[str]:
        """Return the envelope ids received."""
        with self._lock:
            return set(self.copies)

    def duplicates(self) -> int:
        """Return how many copies arrived beyond the first of each id; check they are identical."""
        with self._lock:
            for msg_id, copies in self.copies.items():
                assert len(set(copies)) == 1, f"message {msg_id} arrived with different bytes"
            return sum(len(c) - 1 for c in self.copies.values())

    def final_event(self, device: str, kind: str, deployment_id: str) -> bool:
        """Return whether ``device`` reported a ``kind`` event for ``deployment_id``."""
        with self._lock:
            return any(e.kind.value == kind and e.deployment_id == deployment_id for e in self.events.get(device, []))

    def close(self) -> None:
        """Disconnect."""
        self.client.stop()


def read_lines(path: Path) -> list[str]:
    """Return the complete lines of an append-only log (a torn last line is not one)."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    return lines[:-1]  # the part after the last newline is empty, or torn


def queued_ids(data: Path) -> list[str]:
    """Return the envelope ids still queued in the outbox of ``data`` (oldest first)."""
    path = data / "fleet" / "outbox.db"
    if not path.exists():
        return []
    box = Outbox(path)
    try:
        return [json.loads(m.payload)["id"] for m in box.peek(10_000_000)]
    finally:
        box.close()


def check_acknowledged(acks: Path, data: Path, delivered: Delivered,
                       dropped: frozenset[str] | set[str] = frozenset()) -> set[str]:
    """Assert every acknowledged id (but deliberate drops) is queued or delivered; return them."""
    acked = set(read_lines(acks)) - set(dropped)
    queued = queued_ids(data)
    assert len(queued) == len(set(queued)), "one put became two outbox rows"
    wanted = acked - set(queued)
    # A message the broker acknowledged reaches the subscriber a moment later.
    wait_until(lambda: wanted <= delivered.ids(), timeout=WAIT_S)
    lost = wanted - delivered.ids()
    assert not lost, f"{len(lost)} acknowledged message(s) lost, e.g. {sorted(lost)[:3]}"
    return acked


def check_records(data: Path) -> dict[str, str]:
    """Assert every deployment record on disk parses into a legal state; return name -> state."""
    folder = data / "fleet" / "deployments"
    states = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if path.name.startswith("_") or path.name == "failed.json":
            continue
        dep = Deployment.from_dict(json.loads(path.read_bytes()), path)  # raises on a torn or unknown state
        states[dep.name] = dep.state.value
    failed = folder / "failed.json"
    if failed.exists():
        assert isinstance(json.loads(failed.read_bytes()), list)
    return states


def check_serving(data: Path, trusted: str) -> dict[str, list[Any]]:
    """Reopen the store, check its invariants, and run each active version; return its summary."""
    summary = check_store(data, trusted)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    with open_store(str(data), trusted) as store:
        active = store.active()
        assert sorted(i.name for i in active) == sorted(summary), "a model lost its active version"
        for inst in active:
            y = load_model(inst.folder, inst.manifest).infer({"x": x})["y"]
            np.testing.assert_allclose(y, expected_output(inst.version, x), rtol=1e-5, err_msg=inst.ref)
    return summary
