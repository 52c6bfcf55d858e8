"""Read models of the dashboard pages: what the REST API does not already answer in one call.

The overview (device health, versions per profile, failures), the values the filters offer,
a device's telemetry as chart series, and a bundle with its manifest, signature and devices.
Every function takes a connection inside a read transaction.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.engine import Connection

from edge.errors import ConfigError, NotFoundError
from edge.fleet import registry
from edge.fleet.db import (
    bundles_t,
    desired_t,
    device_models_t,
    devices_t,
    events_t,
    labels_t,
    rollouts_t,
)
from edge.protocol.messages import EventKind

# An online device silent this long is degraded: twelve default telemetry intervals (10 s),
# so a slow link or a busy broker does not flap it, a hung agent shows within two minutes.
SILENT_S = 120.0
# Model states (reported by the agent) that mean something on the device went wrong.
BAD_MODEL_STATES = ("failed", "rolled_back")
FAILURE_KINDS = (EventKind.FAILED.value, EventKind.HEALTH_FAILED.value, EventKind.ROLLED_BACK.value)
# Telemetry rows read for one chart: a day at the default 10 s interval.
MAX_SERIES_ROWS = 8640
# Points sent per series: about one per horizontal pixel of a chart.
MAX_POINTS = 600
# Series of a device chart: (key in the response, telemetry field); rates come from counters.
GAUGES = (("p50", "latency_p50_ms"), ("p95", "latency_p95_ms"), ("tps", "tokens_per_s"),
          ("cpu", "cpu_percent"), ("ram", "ram_used_mb"), ("ram_total", "ram_total_mb"), ("temp", "temperature_c"))
COUNTERS = (("rps", "requests"), ("eps", "errors"))


def _bad_model() -> Any:
    return select(device_models_t.c.device_id).where(
        device_models_t.c.device_id == devices_t.c.id,
        or_(device_models_t.c.state.in_(BAD_MODEL_STATES), device_models_t.c.error.is_not(None))).exists()


def degraded_condition(t: float) -> Any:
    """Return the WHERE clause of online devices that are not well: a failed model, or silence."""
    return and_(devices_t.c.online.is_(True), or_(devices_t.c.last_seen < t - SILENT_S, _bad_model()))


def health_of(device: dict[str, Any], t: float) -> dict[str, Any]:
    """Return a device summary's health: ``online``, ``degraded`` (with reasons) or ``offline``."""
    if device["status"] != "online":
        return {"state": "offline", "reasons": [device.get("offline_reason") or "offline"]}
    reasons = [f"{m['model']}@{m['version']} {m['state']}" + (f": {m['error']}" if m.get("error") else "")
               for m in device.get("models", []) if m.get("state") in BAD_MODEL_STATES or m.get("error")]
    if device.get("last_seen", t) < t - SILENT_S:
        reasons.append(f"silent for {int(t - device['last_seen'])} s")
    return {"state": "degraded" if reasons else "online", "reasons": reasons}


def overview(conn: Connection, t: float) -> dict[str, Any]:
    """Return fleet health, where each model version runs, and what failed lately."""
    total, online = conn.execute(select(func.count(), func.coalesce(func.sum(case((devices_t.c.online.is_(True), 1),
                                                                                   else_=0)), 0))).one()
    degraded = conn.execute(select(func.count()).select_from(devices_t).where(degraded_condition(t))).scalar_one()
    profiles = [{"profile": p or "", "online": int(on or 0), "total": n} for p, n, on in conn.execute(
        select(devices_t.c.profile, func.count(), func.sum(case((devices_t.c.online.is_(True), 1), else_=0)))
        .group_by(devices_t.c.profile).order_by(func.count().desc()))]
    versions = [{"model": m, "version": v, "profile": p or "", "devices": n} for m, v, p, n in conn.execute(
        select(device_models_t.c.model, device_models_t.c.version, devices_t.c.profile, func.count())
        .select_from(device_models_t.join(devices_t, devices_t.c.id == device_models_t.c.device_id))
        .where(device_models_t.c.state == "active")
        .group_by(device_models_t.c.model, device_models_t.c.version, devices_t.c.profile)
        .order_by(device_models_t.c.model, device_models_t.c.version, devices_t.c.profile))]
    failures = [dict(r) for r in conn.execute(
        select(events_t.c.device_id, events_t.c.ts, events_t.c.kind, events_t.c.model, events_t.c.version,
               events_t.c.deployment_id, events_t.c.detail, events_t.c.error_code)
        .where(events_t.c.kind.in_(FAILURE_KINDS)).order_by(events_t.c.ts.desc()).limit(12)).mappings()]
    went_offline = [dict(r) for r in conn.execute(
        select(devices_t.c.id, devices_t.c.offline_reason, devices_t.c.last_seen, devices_t.c.profile)
        .where(devices_t.c.online.is_(False), devices_t.c.session >= 0)
        .order_by(devices_t.c.last_seen.desc()).limit(8)).mappings()]
    return {
        "at": t, "silent_s": SILENT_S,
        "devices": {"total": total, "online": int(online) - degraded, "degraded": degraded,
                    "offline": total - int(online)},
        "profiles": profiles, "versions": versions, "failures": failures, "went_offline": went_offline,
    }


def facets(conn: Connection) -> dict[str, Any]:
    """Return the values the device filters offer: tags, groups, profiles, model versions."""
    def labels(kind: str) -> list[str]:
        return list(conn.execute(select(labels_t.c.value).where(labels_t.c.kind == kind).distinct()
                                 .order_by(labels_t.c.value).limit(1000)).scalars())
    profiles = sorted({p for p in conn.execute(select(devices_t.c.profile).distinct()).scalars() if p}
                      | set(conn.execute(select(bundles_t.c.profile).distinct()).scalars()))
    models = [{"model": m, "version": v, "devices": n} for m, v, n in conn.execute(
        select(device_models_t.c.model, device_models_t.c.version, func.count())
        .group_by(device_models_t.c.model, device_models_t.c.version)
        .order_by(device_models_t.c.model, device_models_t.c.version))]
    return {"tags": labels("tag"), "groups": labels("group"), "profiles": profiles, "models": models}


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def series(conn: Connection, device_id: str, since: float, until: float,
           max_points: int = MAX_POINTS) -> dict[str, Any]:
    """Return a device's telemetry between two times as chart columns, at most ``max_points`` long.

    Gauges are averaged per time bucket; requests and errors, counted by the agent since it
    started, become rates per second between consecutive samples of one session (a restart
    resets them, and yields no rate rather than a negative one).
    """
    if not until > since:
        raise ConfigError("the chart range is empty", hint="give since < until")
    rows: list[dict[str, Any]] = []
    before = until + 1e-6
    while len(rows) < MAX_SERIES_ROWS:  # newest first, a page at a time, back to `since`
        page = registry.telemetry_history(conn, device_id, 1000, before)
        rows += [r for r in page if r["ts"] >= since]
        if len(page) < 1000 or page[-1]["ts"] < since:
            break
        before = page[-1]["ts"]
    rows.reverse()
    samples: list[dict[str, float | None]] = []
    prev: dict[str, Any] | None = None
    for r in rows:
        point: dict[str, float | None] = {"t": r["ts"]}
        for key, field in GAUGES:
            point[key] = _number(r.get(field))
        for key, field in COUNTERS:
            point[key] = None
            if prev is not None and prev.get("session") == r.get("session") and r["ts"] > prev["ts"]:
                delta = (r.get(field) or 0) - (prev.get(field) or 0)
                if delta >= 0:
                    point[key] = delta / (r["ts"] - prev["ts"])
        samples.append(point)
        prev = r
    keys = ["t", *(k for k, _ in GAUGES), *(k for k, _ in COUNTERS)]
    return {"since": since, "until": until, "samples": len(samples), **_bucket(samples, keys, since, until, max_points)}


def _bucket(samples: Sequence[dict[str, float | None]], keys: list[str], since: float, until: float,
            max_points: int) -> dict[str, list[float | None]]:
    if len(samples) <= max_points:
        return {k: [s[k] for s in samples] for k in keys}
    width = (until - since) / max_points
    buckets: dict[int, list[dict[str, float | None]]] = {}
    for s in samples:
        buckets.setdefault(min(int((s["t"] - since) / width), max_points - 1), []).append(s)  # type: ignore[operator]
    out: dict[str, list[float | None]] = {k: [] for k in keys}
    for i in sorted(buckets):
        group = buckets[i]
        for k in keys:
            values = [s[k] for s in group if s[k] is not None]
            out[k].append(sum(values) / len(values) if values else None)  # type: ignore[arg-type]
    return out


def bundle_view(conn: Connection, sha256: str, trusted_keys: Sequence[str]) -> dict[str, Any]:
    """Return a bundle's record, its manifest's exporter figures, its signature and its devices."""
    row = conn.execute(select(bundles_t).where(bundles_t.c.sha256 == sha256)).mappings().first()
    if row is None:
        raise NotFoundError(f"no bundle with sha256 {sha256}", hint="list bundles on the Bundles page")
    manifest = json.loads(row["manifest"])
    desired = select(desired_t.c.device_id).where(desired_t.c.bundle_sha256 == sha256)
    told = conn.execute(select(func.count()).select_from(desired.subquery())).scalar_one()
    running_q = (select(devices_t.c.id, devices_t.c.online, devices_t.c.profile, device_models_t.c.state)
                 .select_from(device_models_t.join(devices_t, devices_t.c.id == device_models_t.c.device_id))
                 .where(device_models_t.c.model == row["name"], device_models_t.c.version == row["version"],
                        device_models_t.c.device_id.in_(desired)))
    running = [dict(r) for r in conn.execute(running_q.order_by(devices_t.c.id).limit(100)).mappings()]
    running_total = conn.execute(select(func.count()).select_from(running_q.subquery())).scalar_one()
    rollouts = [dict(r) for r in conn.execute(
        select(rollouts_t.c.id, rollouts_t.c.state, rollouts_t.c.created_at, rollouts_t.c.target_kind,
               rollouts_t.c.target_value)
        .where(rollouts_t.c.model == row["name"], rollouts_t.c.version == row["version"])
        .order_by(rollouts_t.c.seq.desc()).limit(20)).mappings()]
    key = row["key_id"]
    return {
        "sha256": sha256, "name": row["name"], "version": row["version"], "profile": row["profile"],
        "architecture": row["architecture"], "precision": row["precision"], "task": row["task"], "size": row["size"],
        "uploaded_at": row["uploaded_at"],
        "signature": {"key_id": key, "verified_on_upload": True, "key_trusted_now": key in trusted_keys},
        "fidelity": manifest.get("fidelity"), "latency_ms": manifest.get("latency_ms") or {},
        "provenance": manifest.get("provenance"), "required_providers": manifest.get("required_providers", []),
        "min_ram_mb": manifest.get("min_ram_mb"), "created_at": manifest.get("created_at"),
        "expires_at": manifest.get("expires_at"), "inputs": manifest.get("inputs", []),
        "outputs": manifest.get("outputs", []), "files": manifest.get("files", []),
        "devices": {"desired": told, "running": running_total, "items": running},
        "rollouts": rollouts,
    }


def bundle_usage(conn: Connection) -> dict[str, dict[str, int]]:
    """Return, per bundle hash, how many devices are told it and how many report running it."""
    told = dict(conn.execute(select(desired_t.c.bundle_sha256, func.count()).group_by(desired_t.c.bundle_sha256)).all())
    running = dict(conn.execute(
        select(desired_t.c.bundle_sha256, func.count())
        .select_from(desired_t.join(device_models_t, and_(device_models_t.c.device_id == desired_t.c.device_id,
                                                          device_models_t.c.model == desired_t.c.model,
                                                          device_models_t.c.version == desired_t.c.version)))
        .where(device_models_t.c.state == "active").group_by(desired_t.c.bundle_sha256)).all())
    return {sha: {"desired": n, "running": running.get(sha, 0)} for sha, n in told.items()}
