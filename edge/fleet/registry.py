"""The device registry: devices from births, deaths, telemetry and reported state.

Every function here takes a connection inside a transaction and a batch of decoded messages, so
ingestion writes thousands of messages per commit. Applying a batch is idempotent and does not
depend on arrival order:

- status: a message applies only if its session counter is newer, or equal with ``offline``
  (the death of that same session). A stale ``offline`` from an old session, arriving after the
  device reconnected, is ignored (the race Sparkplug's bdSeq exists for).
- telemetry and events: the message id is unique in its table; a redelivered message adds no row.
- reported state: applied only if not older than the one stored.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from sqlalchemy import and_, bindparam as _bind, delete, func, or_, select, update
from sqlalchemy.engine import Connection

from edge.errors import ConfigError, NotFoundError
from edge.fleet.db import (
    bulk,
    commands_t,
    counters_t,
    device_models_t,
    devices_t,
    events_t,
    labels_t,
    telemetry_t,
)
from edge.protocol.messages import Envelope, Event, Reported, Response, Status, Telemetry, encode
from edge.protocol.topics import check_id

log = logging.getLogger(__name__)

LABEL_KINDS = ("tag", "group")
# Labels share the id alphabet: they end up in filters and URLs.
MAX_LABELS = 64
# Keys of Telemetry copied onto the device row for the list view.
SUMMARY_KEYS = ("uptime_s", "cpu_percent", "ram_used_mb", "ram_total_mb", "disk_free_mb", "temperature_c",
                "latency_p95_ms", "tokens_per_s", "outbox_depth", "outbox_dropped")


@dataclass(frozen=True)
class Received:
    """One decoded message and when the controller received it."""

    envelope: Envelope
    received_at: float
    retained: bool = False
    raw: bytes = b""  # the payload as received (telemetry is stored as is)


def ensure_devices(conn: Connection, ids: Iterable[str], now: float) -> None:
    """Create rows for devices not seen before."""
    bulk(conn, "INSERT INTO devices (id, first_seen, last_seen, online, session, status_ts, profile, agent_version, "
               "architecture, reported_generation, desired_generation, desired_published, desired_dirty) "
               "VALUES (?, ?, ?, ?, -1, 0, '', '', '', -1, 0, 0, ?) ON CONFLICT (id) DO NOTHING",
         [(d, now, now, False, False) for d in sorted(set(ids))])


def touch(conn: Connection, seen: dict[str, float]) -> None:
    """Record the last time each device was heard from."""
    bulk(conn, "UPDATE devices SET last_seen = ? WHERE id = ?", [(t, d) for d, t in sorted(seen.items())])


def apply_statuses(conn: Connection, batch: Sequence[Received]) -> int:
    """Apply births and deaths by session counter; return how many changed a device."""
    births, deaths = [], []
    for item in batch:
        body: Status = item.envelope.body  # type: ignore[assignment]
        row = {"d_id": item.envelope.device, "s": body.session, "ts": item.envelope.ts}
        if body.state == "online":
            caps = body.capabilities
            row.update(
                profile=body.profile, agent_version=body.agent_version, http_url=body.http_url,
                architecture=caps.architecture if caps else "",
                capabilities=caps.model_dump(mode="json") if caps else None,
            )
            births.append(row)
        else:
            row["reason"] = body.reason or "offline"
            deaths.append(row)
    changed = 0
    s, d = devices_t.c.session, devices_t.c.id
    if births:
        # A birth applies to a newer session, or refreshes the current one while it is online.
        stmt = (
            update(devices_t)
            .where(d == _bind("d_id"), or_(s < _bind("s"), and_(s == _bind("s"), devices_t.c.online.is_(True))))
            .values(online=True, session=_bind("s"), status_ts=_bind("ts"), profile=_bind("profile"),
                    agent_version=_bind("agent_version"), http_url=_bind("http_url"),
                    architecture=_bind("architecture"), capabilities=_bind("capabilities"), offline_reason=None)
        )
        changed += max(conn.execute(stmt, births).rowcount, 0)
    if deaths:
        # A death applies to its own session or a newer one, never to an older one.
        stmt = (
            update(devices_t)
            .where(d == _bind("d_id"), s <= _bind("s"))
            .values(online=False, session=_bind("s"), status_ts=_bind("ts"), offline_reason=_bind("reason"))
        )
        changed += max(conn.execute(stmt, deaths).rowcount, 0)
    return changed


def telemetry_health(body: Telemetry) -> list[dict[str, Any]]:
    """Return per-model health figures of one telemetry message, for the active version of each.

    ``per_model[name]`` gives a model's own figures (``requests`` and ``errors`` counted since the
    agent started, ``latency_p95_ms`` and ``tokens_per_s`` over the last interval); with one
    active model and no per-model entry, the device totals are that model's.
    """
    active = [m for m in body.models if m.state == "active"]
    out = []
    for m in active:
        figures = body.per_model.get(m.name)
        if figures is None and len(active) == 1:
            figures = {"requests": body.requests, "errors": body.errors,
                       "latency_p95_ms": body.latency_p95_ms, "tokens_per_s": body.tokens_per_s}
        if figures is None:
            continue
        out.append({
            "model": m.name, "version": m.version,
            "requests": float(figures.get("requests") or 0), "errors": float(figures.get("errors") or 0),
            "latency_p95_ms": figures.get("latency_p95_ms"),
            "tokens_per_s": figures.get("tokens_per_s", body.tokens_per_s if len(active) == 1 else None),
        })
    return out


def _interval(last: list[float] | None, ts: float, requests: float, errors: float) -> tuple[float, float] | None:
    """Turn since-start counters into this interval's, from the previous sample ``[ts, req, err]``.

    None for a message older than the last one counted (late or repeated); a counter that went
    down means the agent restarted, so its value is all new. The first sample ever seen only
    sets the baseline: its counts may span versions and days.
    """
    if last is None:
        return 0.0, 0.0
    last_ts, last_req, last_err = last
    if ts <= last_ts:
        return None
    if requests < last_req or errors < last_err:
        return requests, errors
    return requests - last_req, errors - last_err


def insert_telemetry(conn: Connection, batch: Sequence[Received], stored_at: float | None = None) -> int:
    """Store telemetry once per message id (and when each device was last heard from); return
    how many rows were new."""
    stored_at = time.time() if stored_at is None else stored_at
    ids = sorted({item.envelope.device for item in batch})
    counters: dict[tuple[str, str], list[float]] = {}
    for start in range(0, len(ids), 500):
        # Locked (PostgreSQL) so replicas ingesting the same device count each interval once;
        # sorted ids keep the lock order the same everywhere.
        stmt = select(counters_t).where(counters_t.c.device_id.in_(ids[start:start + 500]))
        for r in conn.execute(stmt.order_by(counters_t.c.device_id, counters_t.c.model).with_for_update()):
            counters[(r.device_id, r.model)] = [r.ts, r.requests, r.errors]
    rows, health, changed, newest, sessions, seen = [], [], {}, {}, {}, {}
    for item in sorted(batch, key=lambda i: (i.envelope.device, i.envelope.ts)):
        env = item.envelope
        body: Telemetry = env.body  # type: ignore[assignment]
        raw = item.raw.decode() if item.raw else encode(env).decode()
        rows.append((env.id, env.device, env.ts, item.received_at, stored_at, body.seq, body.session, body.requests,
                     body.errors, body.latency_p95_ms, body.tokens_per_s, raw))
        for h in telemetry_health(body):
            key = (env.device, h["model"])
            step = _interval(counters.get(key), env.ts, h["requests"], h["errors"])
            if step is None:
                continue
            counters[key] = changed[key] = [env.ts, h["requests"], h["errors"]]
            health.append((env.id, env.device, h["model"], h["version"], env.ts, body.session, step[0], step[1],
                           h["latency_p95_ms"], h["tokens_per_s"]))
        newest[env.device] = env.id
        sessions[env.device] = max(sessions.get(env.device, -1), body.session)
        seen[env.device] = max(seen.get(env.device, 0.0), item.received_at)
    new = bulk(conn, "INSERT INTO telemetry (msg_id, device_id, ts, received_at, stored_at, seq, session, requests, "
                     "errors, latency_p95_ms, tokens_per_s, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                     "ON CONFLICT (msg_id) DO NOTHING", rows)
    bulk(conn, "INSERT INTO health_samples (msg_id, device_id, model, version, ts, session, requests, errors, "
               "latency_p95_ms, tokens_per_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
               "ON CONFLICT (msg_id, model) DO NOTHING", health)
    bulk(conn, "INSERT INTO health_counters (device_id, model, ts, requests, errors) VALUES (?, ?, ?, ?, ?) "
               "ON CONFLICT (device_id, model) DO UPDATE SET ts = excluded.ts, requests = excluded.requests, "
               "errors = excluded.errors", [(d, m, *v) for (d, m), v in sorted(changed.items())])
    # One statement per device: when it was last heard from, its newest telemetry, and its
    # session: telemetry of a newer session than the last status means the device is online in
    # it (its birth may still be in flight); the same session never revives a recorded death.
    bulk(conn, "UPDATE devices SET last_seen = ?, last_telemetry = ?, "
               "online = CASE WHEN session < ? THEN ? ELSE online END, "
               "session = CASE WHEN session < ? THEN ? ELSE session END WHERE id = ?",
         [(seen[d], newest[d], sessions[d], True, sessions[d], sessions[d], d) for d in sorted(newest)])
    return new


def insert_events(conn: Connection, batch: Sequence[Received]) -> int:
    """Store events once per message id; return how many rows were new."""
    rows = []
    for item in batch:
        env = item.envelope
        body: Event = env.body  # type: ignore[assignment]
        rows.append((env.id, env.device, env.ts, item.received_at, body.kind.value, body.model, body.version,
                     body.deployment_id, body.detail[:4000], body.error_code))
    return bulk(conn, "INSERT INTO events (msg_id, device_id, ts, received_at, kind, model, version, deployment_id, "
                      "detail, error_code) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (msg_id) DO NOTHING", rows)


def apply_reported(conn: Connection, batch: Sequence[Received]) -> int:
    """Replace each device's model list with its newest reported state; return how many applied."""
    applied = 0
    newest: dict[str, Received] = {}
    for item in batch:
        cur = newest.get(item.envelope.device)
        if cur is None or cur.envelope.ts <= item.envelope.ts:
            newest[item.envelope.device] = item
    for device, item in newest.items():
        body: Reported = item.envelope.body  # type: ignore[assignment]
        res = conn.execute(
            update(devices_t)
            .where(devices_t.c.id == device,
                   or_(devices_t.c.reported_at.is_(None), devices_t.c.reported_at <= item.envelope.ts))
            .values(reported_generation=body.generation, reported_at=item.envelope.ts)
        )
        if res.rowcount != 1:
            continue
        applied += 1
        conn.execute(delete(device_models_t).where(device_models_t.c.device_id == device))
        rows = {m.name: {"device_id": device, "model": m.name, "version": m.version, "state": m.state,
                         "provider": m.provider, "previous": m.previous, "error": m.error} for m in body.models}
        if rows:
            conn.execute(device_models_t.insert(), list(rows.values()))
    return applied


def apply_responses(conn: Connection, batch: Sequence[Received]) -> int:
    """Record command responses (only from the device the command went to); return how many matched."""
    matched = 0
    for item in batch:
        body: Response = item.envelope.body  # type: ignore[assignment]
        res = conn.execute(
            update(commands_t)
            .where(commands_t.c.id == body.command_id, commands_t.c.device_id == item.envelope.device,
                   commands_t.c.answered_at.is_(None))
            .values(state="answered", ok=body.ok, result=body.result, error=body.error,
                    error_code=body.error_code, answered_at=item.received_at)
        )
        matched += res.rowcount
    return matched


# ---------------------------------------------------------------- queries for the REST API


@dataclass(frozen=True)
class DeviceQuery:
    """Filters and paging of the device list."""

    search: str | None = None
    tag: str | None = None
    group: str | None = None
    profile: str | None = None
    status: str | None = None  # online, offline
    model: str | None = None
    version: str | None = None
    limit: int = 100
    after: str | None = None  # keyset cursor: the last id of the previous page


def _label_exists(kind: str, value: str) -> Any:
    return select(labels_t.c.device_id).where(
        labels_t.c.kind == kind, labels_t.c.value == value, labels_t.c.device_id == devices_t.c.id
    ).exists()


def target_condition(kind: str, value: str) -> Any:
    """Return the WHERE clause selecting the devices of a rollout target."""
    if kind == "all":
        return devices_t.c.id.is_not(None)
    if kind in LABEL_KINDS:
        return _label_exists(kind, value)
    if kind == "profile":
        return devices_t.c.profile == value
    raise ConfigError(f"unknown target kind {kind!r}", hint="use all, tag, group or profile")


def _conditions(q: DeviceQuery) -> list[Any]:
    conds: list[Any] = []
    if q.search:
        escaped = q.search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        conds.append(devices_t.c.id.like(f"%{escaped}%", escape="\\"))
    if q.tag:
        conds.append(_label_exists("tag", q.tag))
    if q.group:
        conds.append(_label_exists("group", q.group))
    if q.profile:
        conds.append(devices_t.c.profile == q.profile)
    if q.status:
        if q.status not in ("online", "offline"):
            raise ConfigError(f"unknown status {q.status!r}", hint="use online or offline")
        conds.append(devices_t.c.online.is_(q.status == "online"))
    if q.model or q.version:
        sub = select(device_models_t.c.device_id).where(device_models_t.c.device_id == devices_t.c.id)
        if q.model:
            sub = sub.where(device_models_t.c.model == q.model)
        if q.version:
            sub = sub.where(device_models_t.c.version == q.version)
        conds.append(sub.exists())
    return conds


def list_devices(conn: Connection, q: DeviceQuery) -> dict[str, Any]:
    """Return one page of devices (keyset paging by id) and the total matching the filters."""
    limit = max(1, min(q.limit, 1000))
    conds = _conditions(q)
    total = conn.execute(select(func.count()).select_from(devices_t).where(*conds)).scalar_one()
    stmt = select(devices_t).where(*conds)
    if q.after:
        stmt = stmt.where(devices_t.c.id > q.after)
    rows = conn.execute(stmt.order_by(devices_t.c.id).limit(limit + 1)).mappings().all()
    page = rows[:limit]
    ids = [r["id"] for r in page]
    labels = _labels_of(conn, ids)
    models = _models_of(conn, ids)
    latest = _latest_telemetry(conn, [r["last_telemetry"] for r in page if r["last_telemetry"]])
    items = [_device_summary(r, labels.get(r["id"], {}), models.get(r["id"], []), latest.get(r["last_telemetry"]))
             for r in page]
    return {"items": items, "total": total, "next": page[-1]["id"] if len(rows) > limit else None}


def _latest_telemetry(conn: Connection, msg_ids: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    if msg_ids:
        for r in conn.execute(select(telemetry_t.c.msg_id, telemetry_t.c.payload).where(telemetry_t.c.msg_id.in_(msg_ids))):
            try:
                env = json.loads(r.payload)
                body = env["body"]
            except (ValueError, KeyError, TypeError):
                continue
            out[r.msg_id] = {"ts": env.get("ts"), **{k: body[k] for k in SUMMARY_KEYS if k in body}}
    return out


def _labels_of(conn: Connection, ids: list[str]) -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    if ids:
        for r in conn.execute(select(labels_t).where(labels_t.c.device_id.in_(ids)).order_by(labels_t.c.value)):
            out.setdefault(r.device_id, {}).setdefault(r.kind, []).append(r.value)
    return out


def _models_of(conn: Connection, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    if ids:
        stmt = select(device_models_t).where(device_models_t.c.device_id.in_(ids)).order_by(device_models_t.c.model)
        for r in conn.execute(stmt).mappings():
            out.setdefault(r["device_id"], []).append({k: v for k, v in r.items() if k != "device_id" and v is not None})
    return out


def _device_summary(r: Any, labels: dict[str, list[str]], models: list[dict[str, Any]],
                    telemetry: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": r["id"], "status": "online" if r["online"] else "offline", "session": r["session"],
        "profile": r["profile"], "agent_version": r["agent_version"], "architecture": r["architecture"],
        "first_seen": r["first_seen"], "last_seen": r["last_seen"], "offline_reason": r["offline_reason"],
        "tags": labels.get("tag", []), "groups": labels.get("group", []), "models": models,
        "telemetry": telemetry or {},
    }


def get_device(conn: Connection, device_id: str) -> dict[str, Any]:
    """Return one device's summary, or raise NotFoundError."""
    row = conn.execute(select(devices_t).where(devices_t.c.id == device_id)).mappings().first()
    if row is None:
        raise NotFoundError(f"unknown device {device_id!r}", hint="list devices with `edge fleet devices`")
    latest = _latest_telemetry(conn, [row["last_telemetry"]] if row["last_telemetry"] else [])
    out = _device_summary(row, _labels_of(conn, [device_id]).get(device_id, {}),
                          _models_of(conn, [device_id]).get(device_id, []), latest.get(row["last_telemetry"]))
    out.update(capabilities=row["capabilities"], http_url=row["http_url"],
               desired_generation=row["desired_generation"], desired_published=row["desired_published"],
               reported_generation=row["reported_generation"])
    return out


def telemetry_history(conn: Connection, device_id: str, limit: int = 100, before: float | None = None) -> list[dict]:
    """Return a device's telemetry, newest first."""
    stmt = select(telemetry_t.c.msg_id, telemetry_t.c.ts, telemetry_t.c.received_at, telemetry_t.c.payload).where(
        telemetry_t.c.device_id == device_id)
    if before is not None:
        stmt = stmt.where(telemetry_t.c.ts < before)
    rows = conn.execute(stmt.order_by(telemetry_t.c.ts.desc()).limit(max(1, min(limit, 1000))))
    return [{"id": r.msg_id, "ts": r.ts, "received_at": r.received_at, **json.loads(r.payload)["body"]} for r in rows]


def event_history(conn: Connection, device_id: str, limit: int = 100) -> list[dict]:
    """Return a device's events, newest first."""
    stmt = select(events_t).where(events_t.c.device_id == device_id).order_by(events_t.c.ts.desc(), events_t.c.id.desc())
    rows = conn.execute(stmt.limit(max(1, min(limit, 1000)))).mappings()
    return [{k: v for k, v in r.items() if k not in ("id",) and v is not None} for r in rows]


def set_labels(conn: Connection, device_id: str, kind: str, *, replace: Sequence[str] | None = None,
               add: Sequence[str] = (), remove: Sequence[str] = ()) -> list[str]:
    """Replace, add or remove a device's tags or groups; return the resulting list."""
    if kind not in LABEL_KINDS:
        raise ConfigError(f"unknown label kind {kind!r}", hint="use tag or group")
    get_device(conn, device_id)
    for value in [*(replace or ()), *add, *remove]:
        check_id(value, kind)
    current = set(conn.execute(select(labels_t.c.value).where(
        labels_t.c.device_id == device_id, labels_t.c.kind == kind)).scalars())
    wanted = set(replace) if replace is not None else set(current)
    wanted = (wanted | set(add)) - set(remove)
    if len(wanted) > MAX_LABELS:
        raise ConfigError(f"a device may have at most {MAX_LABELS} {kind}s")
    gone, new = current - wanted, wanted - current
    if gone:
        conn.execute(delete(labels_t).where(labels_t.c.device_id == device_id, labels_t.c.kind == kind,
                                            labels_t.c.value.in_(sorted(gone))))
    if new:
        conn.execute(labels_t.insert(), [{"device_id": device_id, "kind": kind, "value": v} for v in sorted(new)])
    return sorted(wanted)


def counts(conn: Connection) -> dict[str, int]:
    """Return device totals for the stats endpoint."""
    total = conn.execute(select(func.count()).select_from(devices_t)).scalar_one()
    online = conn.execute(select(func.count()).select_from(devices_t).where(devices_t.c.online.is_(True))).scalar_one()
    return {"devices": total, "online": online, "offline": total - online}
