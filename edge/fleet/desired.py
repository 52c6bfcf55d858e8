"""Each device's desired state, built from the database and published retained (QoS 1).

``desired_models`` holds what every device should run; a change bumps the device's
``desired_generation`` and marks it dirty. The publisher sends the dirty ones and clears the
mark only after the broker acknowledged the message, and only if nothing changed meanwhile, so
a restart or a broker outage never leaves a device with a stale desired state. Retained, so a
device that was offline converges when it returns.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Protocol, Sequence
from urllib.parse import urlencode

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection

from edge.errors import TransportError
from edge.fleet.auth import sign_download
from edge.fleet.db import Clock, Database, bundles_t, desired_t, devices_t, now
from edge.protocol.messages import Desired, DesiredModel, encode, wrap
from edge.protocol.topics import Channel, Topics

log = logging.getLogger(__name__)

# Devices published per round: bounds one round's memory and the time before marks are saved.
BATCH = 1000
# Seconds to wait for the broker's acknowledgements of one round.
ACK_TIMEOUT_S = 30.0


# IN lists are cut into chunks of this size (SQLite allows 32766 parameters; keep statements small).
CHUNK = 500


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), CHUNK):
        yield items[i:i + CHUNK]


def bump_desired(conn: Connection, device_ids: Iterable[str]) -> None:
    """Mark devices' desired state changed, so it is published again."""
    ids = sorted(set(device_ids))
    for chunk in _chunks(ids):
        conn.execute(update(devices_t).where(devices_t.c.id.in_(chunk)).values(
            desired_generation=devices_t.c.desired_generation + 1, desired_dirty=True))


class Handle(Protocol):
    """What a publish returns (the transport's message handle)."""

    def wait(self, timeout: float) -> Any:
        """Block until the broker acknowledged the message, or raise on timeout."""


Publish = Callable[[str, bytes], Handle]


class DesiredPublisher:
    """Build and publish desired-state messages."""

    def __init__(self, db: Database, topics: Topics, public_url: str, secret: bytes, clock: Clock = now) -> None:
        self.db, self.topics, self.public_url, self.secret, self.clock = db, topics, public_url.rstrip("/"), secret, clock

    def bundle_url(self, sha256: str, device_id: str) -> str:
        """Return the download URL of a bundle for one device (signed for it)."""
        query = urlencode({"device": device_id, "sig": sign_download(self.secret, sha256, device_id)})
        return f"{self.public_url}/api/v1/bundles/{sha256}/download?{query}"

    def build(self, conn: Connection, device_ids: Sequence[str]) -> dict[str, Desired]:
        """Return the desired state of each device (generation included)."""
        gens = dict(conn.execute(select(devices_t.c.id, devices_t.c.desired_generation).where(
            devices_t.c.id.in_(list(device_ids)))).all())
        models: dict[str, dict[str, DesiredModel]] = {d: {} for d in gens}
        rows = conn.execute(select(desired_t, bundles_t.c.size).select_from(
            desired_t.join(bundles_t, bundles_t.c.sha256 == desired_t.c.bundle_sha256)).where(
            desired_t.c.device_id.in_(list(device_ids)))).mappings()
        for r in rows:
            models[r["device_id"]][r["model"]] = DesiredModel(
                version=r["version"], bundle_url=self.bundle_url(r["bundle_sha256"], r["device_id"]),
                sha256=r["bundle_sha256"], size=r["size"], deployment_id=r["rollout_id"],
                activate_after=r["activate_after"], maintenance_window=r["maintenance_window"])
        return {d: Desired(generation=gens[d], models=models[d]) for d in gens}

    def device_desired(self, device_id: str) -> dict[str, Any] | None:
        """Return one device's desired state as JSON data (for the REST API)."""
        with self.db.read() as conn:
            built = self.build(conn, [device_id])
        return built[device_id].model_dump(mode="json", exclude_none=True) if device_id in built else None

    def publish_pending(self, publish: Publish, limit: int = BATCH) -> int:
        """Publish the dirty devices' desired state; return how many the broker acknowledged."""
        with self.db.read() as conn:
            ids = list(conn.execute(select(devices_t.c.id).where(devices_t.c.desired_dirty.is_(True))
                                    .order_by(devices_t.c.id).limit(limit)).scalars())
            if not ids:
                return 0
            built = self.build(conn, ids)
        sent = []
        for device, desired in built.items():
            payload = encode(wrap(device, desired, ts=self.clock()))
            try:
                handle = publish(self.topics.device(device, Channel.DESIRED), payload)
            except TransportError as exc:
                log.warning("desired state of %s not published: %s", device, exc)
                break
            sent.append((device, desired.generation, handle))
        acked = []
        for device, generation, handle in sent:
            try:
                ok = handle.wait(ACK_TIMEOUT_S)
            except TransportError as exc:
                log.warning("desired state of %s not acknowledged: %s", device, exc)
                continue
            if ok is False:
                log.warning("desired state of %s not acknowledged in %.0f s", device, ACK_TIMEOUT_S)
                continue
            acked.append({"d_id": device, "g": generation})
        self.mark_published(acked)
        return len(acked)

    def mark_published(self, acked: list[dict[str, Any]]) -> None:
        """Clear the dirty mark of devices whose generation ``g`` was acknowledged (if still current)."""
        if not acked:
            return
        with self.db.write() as conn:
            conn.execute(update(devices_t).where(devices_t.c.id == bindparam("d_id"),
                                                 devices_t.c.desired_generation == bindparam("g"))
                         .values(desired_dirty=False, desired_published=bindparam("g")), acked)
