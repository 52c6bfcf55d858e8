"""What the processes of the agent crash campaign run until they are killed: the real store,
outbox, fleet link and deployer, in a lean process (no HTTP server, no model registry).

Each job writes JSON lines to its ``log`` (fsynced): ``{"phase": "start"}`` when the work the
driver may kill begins. Every job that queues messages uses :class:`RecordingOutbox`, which
appends a message's envelope id to the ``acks`` file (fsynced) right after ``Outbox.put``
returned for it. That is what "acknowledged" means here: ``put()`` returned, so the message is
durable; a process killed between the return and the log line only makes the log a subset.
Retained messages (the reported state) are not logged: a newer one replaces a queued older one
on purpose.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import onnxruntime  # noqa: F401  (imported once by the driver, so each forked job skips it)

from edge.agent import deployer as deployer_module
from edge.agent import fleet_link as fleet_link_module
from edge.agent.fleet_link import FleetLink, FleetOptions
from edge.agent.health import probe
from edge.agent.outbox import Kind, Outbox, OutboxSender
from edge.agent.store import Store
from edge.protocol.catalog import load_catalog
from edge.protocol.messages import Desired, Event, EventKind, Telemetry, encode, wrap
from edge.protocol.signing import TrustStore
from edge.protocol.topics import Channel, Topics
from edge.transport import Backoff, MqttClient
from tests.agent.fleet.helpers import FakeAgent
from tests.agent.test_store_crash import worker as store_worker

PROFILE = "generic-cpu"
FAST = Backoff(initial=0.05, maximum=0.5)
# Seconds a job may take to finish what it was asked (reached only when something is broken).
DONE_S = 60.0
# The fastest telemetry the fleet link allows: many acknowledged messages per run.
TELEMETRY_S = 0.1

_profiles: dict[str, Any] = {}
_ack_fds: dict[str, int] = {}


def open_store(data: str, trusted: str) -> Store:
    """Open (and so recover) the store in ``data``."""
    if PROFILE not in _profiles:
        _profiles[PROFILE] = load_catalog().get(PROFILE)
    return Store(Path(data), _profiles[PROFILE], TrustStore.from_files([Path(trusted)]))


def note(log: str, **record: Any) -> None:
    """Append one JSON line to ``log`` and fsync it."""
    _append(log, json.dumps(record))


def _append(path: str, line: str) -> None:
    fd = _ack_fds.get(path)
    if fd is None:
        fd = _ack_fds[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (line + "\n").encode())  # one write: O_APPEND lines from several threads never mix
    os.fsync(fd)


class RecordingOutbox(Outbox):
    """The real outbox, logging the envelope id of each message once ``put`` returned."""

    acks: str | None = None

    def put(self, topic: str, payload: bytes, *, kind: Kind = Kind.EVENT, qos: int = 1, retain: bool = False) -> int:
        """Queue (the real code), then record the acknowledgement."""
        row = super().put(topic, payload, kind=kind, qos=qos, retain=retain)
        if self.acks and not retain:
            _append(self.acks, json.loads(payload)["id"])
        return row


class InProcessHealth:
    """The health check of a process without a registry, run here: real inference, finite outputs."""

    def check(self, installed: Any) -> str:
        """Load the version with ONNX Runtime, run it once, check its outputs."""
        return probe(Path(installed.folder).parent, [("CPUExecutionProvider", {})])

    def restore(self, name: str) -> None:
        """Nothing is served in this process."""


def _wait(predicate: Any, what: str, timeout: float = DONE_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def agent_job(data: str, trusted: str, broker_url: str, fleet: str, device: str, log: str, acks: str,
              generation: int, result: str | None = None, rate: float | None = None,
              supersede: dict[str, Any] | None = None, linger: bool = False) -> None:
    """Run the fleet link (outbox, deployer, telemetry) until the desired state is reached.

    ``supersede``: once the deployment of the retained desired state downloads, hand the
    deployer this newer desired state (as the network thread would) and lift the rate cap.
    ``result``: on success, stop cleanly and write the deployments and the store's state there.
    ``linger``: once there, go on running (telemetry) until killed, as an idle agent does.
    """
    deployer_module.WAIT_POLL_S = 0.05  # the campaign's activation times are seconds away, not hours
    fleet_link_module.Outbox = RecordingOutbox  # type: ignore[misc]
    RecordingOutbox.acks = acks
    store = open_store(data, trusted)
    agent = FakeAgent(device, Path(data), store)
    options = FleetOptions(broker_url, topics=Topics(fleet=fleet), reconnect=FAST, download_backoff=FAST,
                           telemetry_interval=TELEMETRY_S, download_rate=rate, keepalive=5)
    link = FleetLink(options, health=InProcessHealth())
    began = time.monotonic()
    note(log, phase="start", op="agent")
    link.start(agent)
    deployer = link.deployer
    assert deployer is not None and link.outbox is not None
    if supersede is not None:
        newer = Desired.model_validate(supersede)
        name = next(iter(newer.models))
        _wait(lambda: (d := deployer.deployments().get(name)) is not None and d.state.value == "downloading",
              "the download to supersede")
        deployer.desire(newer)
        deployer.rate = None
        generation = newer.generation

    def done() -> bool:
        deps = deployer.deployments()
        return deployer.generation == generation and all(d.done for d in deps.values())

    _wait(done, f"the deployments of generation {generation}")
    _wait(lambda: link.outbox.depth() == 0, "an empty outbox")
    note(log, phase="done", seconds=round(time.monotonic() - began, 3))
    if result is None:
        if linger:
            time.sleep(DONE_S)
        os._exit(0)
    link.stop()
    state = {
        "deployments": {k: v.to_dict() for k, v in deployer.deployments().items()},
        "failures": deployer.journal.failures(),
        "models": {m.name: [m.active, m.previous, sorted(v.version for v in m.versions if v.failed)]
                   for m in store.list()},
    }
    store.close()
    Path(result).write_text(json.dumps(state))
    os._exit(0)


def outbox_job(data: str, broker_url: str, fleet: str, device: str, log: str, acks: str,
               count: int | None = None, drop: bool = False) -> None:
    """Queue telemetry and events as fast as the disk allows while a sender delivers them.

    ``count``: queue that many, wait until everything is delivered, exit. ``drop``: first queue
    one message and drop it as a broker refusal would (logged before and after), then go on.
    """
    RecordingOutbox.acks = acks
    outbox = RecordingOutbox(Path(data) / "fleet" / "outbox.db")
    topics = Topics(fleet=fleet)
    telemetry, events = topics.device(device, Channel.TELEMETRY), topics.device(device, Channel.EVENTS)
    seq = 0

    def body(i: int) -> tuple[str, bytes, Kind]:
        if i % 5 == 4:
            event = Event(kind=EventKind.DOWNLOAD_STARTED, model="tiny", version="1.0.0", detail=f"message {i}")
            return events, encode(wrap(device, event)), Kind.EVENT
        t = Telemetry(seq=i, session=1, uptime_s=float(i), agent_version="crash-campaign")
        return telemetry, encode(wrap(device, t)), Kind.TELEMETRY

    if drop:
        topic, payload, kind = body(seq)
        outbox.put(topic, payload, kind=kind)
        victim = outbox.peek(1_000_000)[-1]
        note(log, phase="drop", id=json.loads(victim.payload)["id"])
        outbox.drop(victim, "refused by the broker (crash campaign)")
        note(log, phase="dropped")
    client = MqttClient(broker_url, f"edge-agent-{device}", backoff=FAST, clean_start=False).start()
    sender = OutboxSender(outbox, client)
    sender.start()
    note(log, phase="start", op="outbox")
    while count is None or seq < count:
        seq += 1
        topic, payload, kind = body(seq)
        outbox.put(topic, payload, kind=kind)
    _wait(lambda: outbox.depth() == 0, "an empty outbox")
    sender.stop()
    client.stop()
    outbox.close()
    os._exit(0)


def store_job(data: str, trusted: str, bundles: dict[str, str], seed: int, log: str,
              script: list[list[str]] | None = None) -> None:
    """Run store operations as tests/agent/test_store_crash.py does (a script, or random ones forever)."""
    store_worker(data, trusted, bundles, seed, log, None, script)
    os._exit(0)


JOBS = {"agent": agent_job, "outbox": outbox_job, "store": store_job}
