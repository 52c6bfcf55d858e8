"""Live updates for the pages: a server-sent event stream fed by polling the database.

The database is the one place every controller replica (and a restarted one) writes to, so
polling it sees every change, whoever ingested it, with no hook into ingestion. Each stream
keeps a :class:`Watcher`, which remembers what it told its page and, once a second, reads
what changed since: cheap indexed queries, whatever the fleet size. Events are signals with
small bodies; pages re-read what they show through the REST API, so a page looks the same
whether it was loaded or updated.

Events (``event:`` name, JSON ``data:``):

=========  ==============================================================================
hello      first event: the time and device counts
stats      device counts changed: ``{total, online, degraded, offline}``
status     a device went online or offline: ``{id, status, reason, profile}``
resync     too many status changes at once to list: re-read everything
seen       devices that reported since the last poll: ``{ids, more}`` (for visible rows)
rollout    a rollout moved: ``{id, model, version, state, wave, devices, reason}``
failure    a device reported a failed install, health check or rollback
bundles    the bundle list changed
device     the watched device (``?device=ID``) has new ``telemetry``, ``events`` or ``commands``
logout     the session ended; the stream closes
=========  ==============================================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.engine import Connection

from edge.fleet.dashboard.queries import FAILURE_KINDS, degraded_condition
from edge.fleet.db import bundles_t, commands_t, devices_t, events_t, rollout_devices_t, rollouts_t, telemetry_t
from edge.fleet.states import FINAL

# Status changes listed one by one per poll; more means a fleet-wide event (a broker restart):
# the page is told to re-read instead.
MAX_STATUS_EVENTS = 200
# Device ids listed in one ``seen`` event: more than a page shows.
MAX_SEEN_IDS = 500
# Finished rollouts are still watched this long, so their last transition reaches the page.
FINISHED_GRACE_S = 120.0
# last_seen is the ingest time, written a batch (<= 50 ms) after receipt: look back this much more.
SEEN_SLACK_S = 2.0

Event = tuple[str, dict[str, Any]]


def frame(name: str, data: dict[str, Any], event_id: int | None = None) -> str:
    """Return one server-sent event."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@dataclass
class Watcher:
    """What one stream told its page, and the changes since (call :meth:`start`, then :meth:`poll`)."""

    device: str | None = None
    online: set[str] = field(default_factory=set)
    stats: dict[str, int] = field(default_factory=dict)
    rollouts: dict[str, tuple] = field(default_factory=dict)
    last_event_id: int = 0
    last_telemetry: float = 0.0
    bundles: tuple = ()
    commands: tuple = ()
    last_poll: float = 0.0
    seen_at: dict[str, float] = field(default_factory=dict)

    def start(self, conn: Connection, t: float) -> list[Event]:
        """Take the snapshot later polls compare with; return the ``hello`` event."""
        self.online = self._online(conn)
        self.stats = self._stats(conn, t)
        self.rollouts = {rid: fp for rid, fp, _ in self._rollouts(conn, t)}
        self.last_event_id = conn.execute(select(func.coalesce(func.max(events_t.c.id), 0))).scalar_one()
        self.bundles = self._bundles(conn)
        self.seen_at = dict(conn.execute(select(devices_t.c.id, devices_t.c.last_seen)
                                         .where(devices_t.c.last_seen > t - SEEN_SLACK_S)).all())
        if self.device:
            self.last_telemetry = self._last_telemetry(conn)
            self.commands = self._commands(conn)
        self.last_poll = t
        return [("hello", {"at": t, "stats": self.stats})]

    def poll(self, conn: Connection, t: float) -> list[Event]:
        """Return the events of what changed since the last poll."""
        out: list[Event] = []
        stats = self._stats(conn, t)
        if stats != self.stats:
            self.stats = stats
            out.append(("stats", stats))
        out += self._status_changes(conn)
        out += self._seen(conn, t)
        out += self._rollout_changes(conn, t)
        out += self._failures(conn)
        bundles = self._bundles(conn)
        if bundles != self.bundles:
            self.bundles = bundles
            out.append(("bundles", {"count": bundles[0]}))
        if self.device:
            out += self._device(conn)
        self.last_poll = t
        return out

    # ------------------------------------------------------------------ pieces

    def _online(self, conn: Connection) -> set[str]:
        return set(conn.execute(select(devices_t.c.id).where(devices_t.c.online.is_(True))).scalars())

    def _stats(self, conn: Connection, t: float) -> dict[str, int]:
        total = conn.execute(select(func.count()).select_from(devices_t)).scalar_one()
        online = conn.execute(select(func.count()).select_from(devices_t).where(devices_t.c.online.is_(True))).scalar_one()
        degraded = conn.execute(select(func.count()).select_from(devices_t).where(degraded_condition(t))).scalar_one()
        return {"total": total, "online": online - degraded, "degraded": degraded, "offline": total - online}

    def _status_changes(self, conn: Connection) -> list[Event]:
        online = self._online(conn)
        came, went = online - self.online, self.online - online
        self.online = online
        if not came and not went:
            return []
        if len(came) + len(went) > MAX_STATUS_EVENTS:
            return [("resync", {"online": len(came), "offline": len(went)})]
        rows = conn.execute(select(devices_t.c.id, devices_t.c.online, devices_t.c.offline_reason, devices_t.c.profile)
                            .where(devices_t.c.id.in_(sorted(came | went)))).all()
        return [("status", {"id": r.id, "status": "online" if r.online else "offline",
                            "reason": r.offline_reason, "profile": r.profile}) for r in sorted(rows)]

    def _seen(self, conn: Connection, t: float) -> list[Event]:
        # Look back past the last poll (a batch commits a little after it was received), and
        # report a device only when its last_seen moved since this stream last saw it.
        rows = conn.execute(select(devices_t.c.id, devices_t.c.last_seen)
                            .where(devices_t.c.last_seen > self.last_poll - SEEN_SLACK_S)
                            .order_by(devices_t.c.id).limit(MAX_SEEN_IDS * 4)).all()
        ids = [r.id for r in rows if self.seen_at.get(r.id) != r.last_seen]
        self.seen_at = {r.id: r.last_seen for r in rows}
        if not ids:
            return []
        return [("seen", {"ids": ids[:MAX_SEEN_IDS], "more": len(ids) > MAX_SEEN_IDS or len(rows) == MAX_SEEN_IDS * 4})]

    def _rollouts(self, conn: Connection, t: float) -> list[tuple[str, tuple, dict[str, Any]]]:
        rows = conn.execute(select(rollouts_t).where(or_(
            rollouts_t.c.state.not_in([s.value for s in FINAL]), rollouts_t.c.finished_at > t - FINISHED_GRACE_S))
            .order_by(rollouts_t.c.seq)).mappings().all()
        out = []
        for r in rows:
            counts = conn.execute(select(rollout_devices_t.c.state, func.count(), func.max(rollout_devices_t.c.updated_at))
                                  .where(rollout_devices_t.c.rollout_id == r["id"])
                                  .group_by(rollout_devices_t.c.state)).all()
            fp = (r["state"], r["wave_index"], r["updated_at"], tuple(sorted((s, n, u) for s, n, u in counts)))
            summary = {"id": r["id"], "model": r["model"], "version": r["version"], "state": r["state"],
                       "wave": r["wave_index"], "reason": r["reason"], "devices": {s: n for s, n, _ in counts}}
            out.append((r["id"], fp, summary))
        return out

    def _rollout_changes(self, conn: Connection, t: float) -> list[Event]:
        out: list[Event] = []
        current = self._rollouts(conn, t)
        for rid, fp, summary in current:
            if self.rollouts.get(rid) != fp:
                out.append(("rollout", summary))
        self.rollouts = {rid: fp for rid, fp, _ in current}
        return out

    def _failures(self, conn: Connection) -> list[Event]:
        rows = conn.execute(select(events_t).where(events_t.c.id > self.last_event_id).order_by(events_t.c.id)
                            .limit(1000)).mappings().all()
        if not rows:
            return []
        self.last_event_id = rows[-1]["id"]
        out: list[Event] = [("failure", {k: r[k] for k in ("device_id", "ts", "kind", "model", "version", "detail",
                                                          "error_code", "deployment_id")})
                            for r in rows if r["kind"] in FAILURE_KINDS][:50]
        if self.device and any(r["device_id"] == self.device for r in rows):
            out.append(("device", {"id": self.device, "events": True}))
        return out

    def _bundles(self, conn: Connection) -> tuple:
        return tuple(conn.execute(select(func.count(), func.max(bundles_t.c.uploaded_at)).select_from(bundles_t)).one())

    def _last_telemetry(self, conn: Connection) -> float:
        # max(ts), not max(id): the (device_id, ts) index answers it without a scan.
        return conn.execute(select(func.coalesce(func.max(telemetry_t.c.ts), 0.0))
                            .where(telemetry_t.c.device_id == self.device)).scalar_one()

    def _commands(self, conn: Connection) -> tuple:
        return tuple(conn.execute(select(func.count(), func.max(commands_t.c.sent_at), func.max(commands_t.c.answered_at))
                                  .where(commands_t.c.device_id == self.device)).one())

    def _device(self, conn: Connection) -> list[Event]:
        changed: dict[str, Any] = {}
        last = self._last_telemetry(conn)
        if last != self.last_telemetry:
            self.last_telemetry = last
            changed["telemetry"] = True
        commands = self._commands(conn)
        if commands != self.commands:
            self.commands = commands
            changed["commands"] = True
        return [("device", {"id": self.device, **changed})] if changed else []
