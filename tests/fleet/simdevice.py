"""A scripted device on a real broker (through the transport), for controller tests that do not
need a real agent: birth and will with a session counter, retained desired state followed by hand."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from edge.protocol.messages import (
    Capabilities,
    Desired,
    Event,
    EventKind,
    ModelReport,
    Reported,
    Status,
    Telemetry,
    decode,
    encode,
    wrap,
)
from edge.protocol.topics import Channel, Topics
from edge.transport import Backoff, MqttClient

FAST = Backoff(initial=0.05, maximum=0.5)
CAPS = Capabilities(architecture="x86_64", providers=("CPUExecutionProvider",), ram_mb=4096, disk_mb=10000, cpu_count=2)


class SimDevice:
    """One device: connects, announces itself, records its desired state, reports on command."""

    def __init__(self, url: str, topics: Topics, device_id: str, session: int = 1, profile: str = "generic-cpu") -> None:
        self.topics, self.id, self.session, self.profile = topics, device_id, session, profile
        self.running: dict[str, str] = {}
        self.desired: Desired | None = None
        self._cond = threading.Condition()
        self._seq = 0
        status = topics.device(device_id, Channel.STATUS)
        self.client = MqttClient(url, f"sim-{device_id}-{uuid.uuid4().hex[:6]}", backoff=FAST, clean_start=True,
                                 will=lambda: (status, self._status("offline"), 1, True))
        self.client.on_connect(lambda info: self.client.publish(status, self._status("online"), qos=1, retain=True))
        self.client.subscribe(topics.device(device_id, Channel.DESIRED), self._on_desired)

    def _status(self, state: str) -> bytes:
        body = Status(state=state, session=self.session, profile=self.profile, agent_version="sim",
                      capabilities=CAPS if state == "online" else None, reason=None if state == "online" else "will")
        return encode(wrap(self.id, body))

    def _on_desired(self, topic: str, payload: bytes, retained: bool) -> None:
        body = decode(payload).body
        with self._cond:
            self.desired = body  # type: ignore[assignment]
            self._cond.notify_all()

    def start(self) -> "SimDevice":
        """Connect (the birth goes out on connect)."""
        self.client.start()
        assert self.client.wait_connected(15), self.client.last_error
        return self

    def stop(self) -> None:
        """Disconnect cleanly, saying offline first (a clean disconnect sends no will)."""
        self.client.publish(self.topics.device(self.id, Channel.STATUS), self._status("offline"), qos=1,
                            retain=True).wait(5)
        self.client.stop()

    def wait_desired(self, model: str, version: str | None, timeout: float = 30.0) -> Any:
        """Wait until the desired state gives ``model`` at ``version`` (None: absent); return it."""
        def ok() -> bool:
            m = self.desired.models.get(model) if self.desired else None
            return (m is None) if version is None else (m is not None and m.version == version)
        with self._cond:
            assert self._cond.wait_for(ok, timeout), f"{self.id}: desired state is {self.desired}"
            return self.desired.models.get(model) if self.desired else None

    def send(self, channel: Channel, body: Any) -> None:
        """Publish one message at QoS 1 and wait for the broker's ack."""
        assert self.client.publish(self.topics.device(self.id, channel), encode(wrap(self.id, body)), qos=1,
                                   retain=channel in (Channel.STATUS, Channel.REPORTED)).wait(15)

    def install(self, model: str, steps: tuple[EventKind, ...] = (EventKind.DOWNLOAD_STARTED, EventKind.DOWNLOADED,
                                                                   EventKind.ACTIVATED, EventKind.COMMITTED)) -> None:
        """Act on the desired state of ``model``: report each step, then the new reported state."""
        want = self.desired.models[model]  # type: ignore[union-attr]
        for kind in steps:
            self.send(Channel.EVENTS, Event(kind=kind, model=model, version=want.version, deployment_id=want.deployment_id))
        if EventKind.COMMITTED in steps:
            previous = self.running.get(model)
            self.running[model] = want.version
            self.send(Channel.REPORTED, Reported(generation=self.desired.generation, models=tuple(  # type: ignore[union-attr]
                ModelReport(name=n, version=v, state="active", previous=previous if n == model else None)
                for n, v in self.running.items())))

    def telemetry(self, requests: int = 10, errors: int = 0) -> None:
        """Report one telemetry message."""
        self._seq += 1
        self.send(Channel.TELEMETRY, Telemetry(
            seq=self._seq, session=self.session, uptime_s=time.monotonic() % 1000, agent_version="sim",
            models=tuple(ModelReport(name=n, version=v, state="active") for n, v in self.running.items()),
            requests=requests, errors=errors, latency_p95_ms=12.0))
