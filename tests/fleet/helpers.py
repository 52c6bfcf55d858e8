"""Build the messages devices send, as the transport would deliver them to the controller."""

from __future__ import annotations

from typing import Any

from edge.fleet.ingest import Ingestor, Raw
from edge.protocol.messages import (
    Capabilities,
    Event,
    EventKind,
    ModelReport,
    Reported,
    Response,
    Status,
    Telemetry,
    encode,
    new_id,
    wrap,
)
from edge.protocol.topics import Channel, Topics

CAPS = {
    "generic-cpu": Capabilities(architecture="x86_64", providers=("CPUExecutionProvider",), ram_mb=4096, disk_mb=10000, cpu_count=4),
    "x86-avx2": Capabilities(architecture="x86_64", providers=("CPUExecutionProvider",), ram_mb=8192, disk_mb=10000, cpu_count=8),
    "raspberry-pi-5": Capabilities(architecture="aarch64", providers=("XnnpackExecutionProvider", "CPUExecutionProvider"),
                                   ram_mb=8192, disk_mb=10000, cpu_count=4),
    "jetson-orin-nano": Capabilities(architecture="aarch64", providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
                                     ram_mb=8192, disk_mb=10000, cpu_count=6),
}


class Devices:
    """Message factory for one fleet; ``t`` is the envelope time of the next message."""

    def __init__(self, topics: Topics, clock: Any) -> None:
        self.topics, self.clock = topics, clock
        self.seq: dict[str, int] = {}

    def _raw(self, device: str, channel: Channel, body: Any, msg_id: str | None = None, ts: float | None = None,
             retained: bool = False) -> Raw:
        env = wrap(device, body, message_id=msg_id or new_id(), ts=self.clock() if ts is None else ts)
        return Raw(self.topics.device(device, channel), encode(env), retained, self.clock())

    def birth(self, device: str, session: int, profile: str = "generic-cpu", **kw: Any) -> Raw:
        """Return a retained online status."""
        body = Status(state="online", session=session, profile=profile, agent_version="0.1.0",
                      capabilities=CAPS.get(profile), **kw)
        return self._raw(device, Channel.STATUS, body, retained=True)

    def death(self, device: str, session: int, reason: str = "will") -> Raw:
        """Return an offline status (the last will of ``session``)."""
        return self._raw(device, Channel.STATUS, Status(state="offline", session=session, reason=reason), retained=True)

    def telemetry(self, device: str, session: int = 1, models: dict[str, str] | None = None, msg_id: str | None = None,
                  requests: int = 0, errors: int = 0, p95: float | None = None, tps: float | None = None,
                  ts: float | None = None) -> Raw:
        """Return one telemetry message (models: name -> version, all in state active)."""
        seq = self.seq[device] = self.seq.get(device, -1) + 1
        reports = tuple(ModelReport(name=n, version=v, state="active") for n, v in (models or {}).items())
        body = Telemetry(seq=seq, session=session, uptime_s=float(seq), agent_version="0.1.0", models=reports,
                         requests=requests, errors=errors, latency_p95_ms=p95, tokens_per_s=tps, cpu_percent=12.5)
        return self._raw(device, Channel.TELEMETRY, body, msg_id=msg_id, ts=ts)

    def event(self, device: str, kind: EventKind, deployment: str | None, model: str = "tiny",
              version: str = "2.0.0", msg_id: str | None = None, detail: str = "") -> Raw:
        """Return one deployment event."""
        body = Event(kind=kind, model=model, version=version, deployment_id=deployment, detail=detail)
        return self._raw(device, Channel.EVENTS, body, msg_id=msg_id)

    def reported(self, device: str, models: dict[str, str], generation: int = 1, previous: dict[str, str] | None = None) -> Raw:
        """Return a retained reported state."""
        reports = tuple(ModelReport(name=n, version=v, state="active", previous=(previous or {}).get(n))
                        for n, v in models.items())
        return self._raw(device, Channel.REPORTED, Reported(generation=generation, models=reports), retained=True)

    def response(self, device: str, command_id: str, ok: bool = True, result: dict | None = None) -> Raw:
        """Return a command response."""
        return self._raw(device, Channel.RESP, Response(command_id=command_id, ok=ok, result=result or {}))


def ingest(ingestor: Ingestor, *raws: Raw) -> None:
    """Write messages through the real decode and batch-write path, now."""
    ingestor.process(list(raws))
