"""A controller without MQTT, driven by hand: messages go through the real ingestion, desired
state through the real publisher (into a list), time through a fake clock."""

from __future__ import annotations

from typing import Any, Iterable

from edge.fleet import registry
from edge.fleet.ingest import Ingestor
from edge.fleet.plan import parse_spec
from edge.protocol.messages import Desired, EventKind, decode
from edge.protocol.topics import Channel
from tests.fleet.conftest import Controller
from tests.fleet.helpers import Devices, ingest

COMMIT_STEPS = (EventKind.DOWNLOAD_STARTED, EventKind.DOWNLOADED, EventKind.VERIFIED, EventKind.INSTALLED,
                EventKind.ACTIVATED, EventKind.HEALTH_OK, EventKind.COMMITTED)


class Acked:
    """A publish handle the broker acknowledged."""

    def wait(self, timeout: float) -> bool:
        return True


class Harness:
    """Devices, ticks and published desired state around one controller."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller
        self.ing = Ingestor(controller.db, controller.topics, controller.clock)
        self.dev = Devices(controller.topics, controller.clock)
        self.desired: dict[str, Desired] = {}
        self.running: dict[str, dict[str, str]] = {}
        self.served: dict[str, tuple[int, int]] = {}  # the agent's counters since it started

    # -- devices ---------------------------------------------------------------------------

    def add(self, n: int, profile: str = "generic-cpu", prefix: str = "d", tags: Iterable[str] = (),
            running: dict[str, str] | None = None, online: bool = True) -> list[str]:
        """Register ``n`` devices (births and reported state)."""
        ids = [f"{prefix}{len(self.running) + i:03d}" for i in range(n)]
        msgs = []
        for d in ids:
            self.running[d] = dict(running or {})
            msgs.append(self.dev.birth(d, 1, profile=profile))
            if not online:
                msgs.append(self.dev.death(d, 1))
            if running:
                msgs.append(self.dev.reported(d, running))
        ingest(self.ing, *msgs)
        if tags:
            self.tag(ids, *tags)
        return ids

    def tag(self, ids: Iterable[str], *tags: str, kind: str = "tag", remove: bool = False) -> None:
        """Add (or remove) tags or groups."""
        with self.c.db.write() as conn:
            for d in ids:
                if remove:
                    registry.set_labels(conn, d, kind, remove=list(tags))
                else:
                    registry.set_labels(conn, d, kind, add=list(tags))

    # -- controller ------------------------------------------------------------------------

    def create(self, model: str = "tiny", version: str = "2.0.0", target: dict | None = None, **plan: Any) -> str:
        """Create a rollout; return its id."""
        spec = parse_spec({"model": model, "version": version, "target": target or {"kind": "all"}, "plan": plan})
        return self.c.engine.create(spec)["id"]

    def tick(self, advance: float = 0.0) -> dict[str, Any] | None:
        """Advance the clock, run the ticker once, publish desired state."""
        if advance:
            self.c.clock.advance(advance)
        self.c.engine.tick()
        self.publish()
        return None

    def publish(self) -> None:
        """Publish dirty desired state (the fake broker acks everything)."""
        def record(topic: str, payload: bytes) -> Acked:
            device, channel, _ = self.c.topics.parse(topic)
            assert channel is Channel.DESIRED
            env = decode(payload)
            assert env.device == device
            self.desired[device] = env.body  # type: ignore[assignment]
            return Acked()
        while self.c.desired.publish_pending(record):
            pass

    def status(self, rid: str) -> dict[str, Any]:
        """Return the rollout's status."""
        return self.c.engine.status(rid)

    def state(self, rid: str) -> str:
        """Return the rollout's state."""
        return self.status(rid)["state"]

    def members(self, rid: str, state: str | None = None) -> list[str]:
        """Return the ids of the rollout's devices (in one state)."""
        return [m["device_id"] for m in self.c.engine.devices(rid, state, limit=1000)]

    def wanted(self, device: str, model: str = "tiny") -> str | None:
        """Return the version the last published desired state gives ``device``."""
        d = self.desired.get(device)
        m = d.models.get(model) if d else None
        return m.version if m else None

    # -- device side -----------------------------------------------------------------------

    def follow(self, devices: Iterable[str], steps: Iterable[EventKind] = COMMIT_STEPS, model: str = "tiny") -> None:
        """Play a device agent: act on the published desired state, reporting each step."""
        msgs = []
        for d in devices:
            want = self.desired[d].models[model]
            for kind in steps:
                msgs.append(self.dev.event(d, kind, want.deployment_id, model=model, version=want.version))
            if EventKind.COMMITTED in steps:
                previous = self.running[d].get(model)
                self.running[d][model] = want.version
                msgs.append(self.dev.reported(d, self.running[d], previous={model: previous} if previous else None))
        ingest(self.ing, *msgs)

    def fail(self, devices: Iterable[str], kind: EventKind = EventKind.FAILED, model: str = "tiny") -> None:
        """Report a failed install (or ``kind``) for the deployment in the desired state."""
        msgs = []
        for d in devices:
            want = self.desired[d].models[model]
            msgs.append(self.dev.event(d, kind, want.deployment_id, model=model, version=want.version, detail="boom"))
        ingest(self.ing, *msgs)

    def serve(self, devices: Iterable[str], requests: int, errors: int, p95: float, tps: float | None = None,
              model: str = "tiny", times: int = 1) -> None:
        """Report telemetry ``times`` over 10 s: each interval ``requests`` served with ``errors`` by
        the version each device runs (sent as the agent does: counters since it started)."""
        devices = list(devices)
        for d in devices:
            if d not in self.served:  # the first message only sets the controller's baseline
                self.served[d] = (0, 0)
                ingest(self.ing, self.dev.telemetry(d, models={model: self.running[d][model]}, p95=p95, tps=tps))
        for _ in range(times):
            self.c.clock.advance(10)
            msgs = []
            for d in devices:
                req, err = self.served[d]
                self.served[d] = (req + requests, err + errors)
                msgs.append(self.dev.telemetry(d, models={model: self.running[d][model]}, requests=req + requests,
                                               errors=err + errors, p95=p95, tps=tps))
            ingest(self.ing, *msgs)
