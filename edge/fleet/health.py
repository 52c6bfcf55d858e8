"""Health gates of a rollout: the new version against the previous one, on the same devices.

Figures come from telemetry (``health_samples``): error rate, p95 latency and tokens/s. For each
device that took the new version, its samples of the new version since it was assigned are
compared with its own samples of the version it ran before, in a window before the assignment.
Devices that had no previous version count towards the absolute ceiling only. A metric with too
few requests behind it is reported as ``insufficient`` and never fails the gate on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.engine import Connection

from edge.fleet.db import health_t


class Gates(BaseModel):
    """Thresholds a wave must meet before the rollout moves on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_error_rate: float | None = Field(0.05, ge=0, le=1)  # absolute ceiling for the new version
    max_error_rate_increase: float = Field(0.02, ge=0, le=1)  # new minus old, in absolute points
    max_latency_increase: float = Field(0.25, ge=0)  # p95: new <= old * (1 + this)
    max_tokens_per_s_drop: float = Field(0.15, ge=0, le=1)  # tokens/s: new >= old * (1 - this)
    min_requests: int = Field(20, ge=0)  # fewer requests than this: the metric is not judged
    baseline_window_s: float = Field(3600.0, gt=0)  # how far before the switch to look for old figures


@dataclass(frozen=True)
class Member:
    """One device's switch: from which version to which, and when."""

    device_id: str
    previous_version: str | None
    assigned_at: float


@dataclass
class Figures:
    """Aggregated health of one version over a set of devices."""

    requests: float = 0.0
    errors: float = 0.0
    p95_weighted: float = 0.0
    p95_weight: float = 0.0
    tps_sum: float = 0.0
    tps_n: int = 0
    devices: set[str] = field(default_factory=set)

    def add(self, device: str, requests: float, errors: float, p95: float | None, tps: float | None) -> None:
        """Add one sample."""
        self.requests += requests
        self.errors += errors
        if p95 is not None:
            weight = max(requests, 1.0)
            self.p95_weighted += p95 * weight
            self.p95_weight += weight
        if tps is not None:
            self.tps_sum += tps
            self.tps_n += 1
        self.devices.add(device)

    @property
    def error_rate(self) -> float | None:
        """Return errors per request, or None with no requests."""
        return self.errors / self.requests if self.requests > 0 else None

    @property
    def p95_ms(self) -> float | None:
        """Return the request-weighted mean of the per-sample p95 latencies."""
        return self.p95_weighted / self.p95_weight if self.p95_weight else None

    @property
    def tokens_per_s(self) -> float | None:
        """Return the mean tokens/s of the samples that report it."""
        return self.tps_sum / self.tps_n if self.tps_n else None

    def to_dict(self) -> dict[str, Any]:
        """Describe the figures for the status API."""
        return {"requests": self.requests, "errors": self.errors, "error_rate": self.error_rate,
                "latency_p95_ms": self.p95_ms, "tokens_per_s": self.tokens_per_s, "devices": len(self.devices)}


@dataclass(frozen=True)
class GateResult:
    """The verdict of a health gate."""

    passed: bool
    judged: bool  # False when no metric had enough requests to judge
    failures: tuple[str, ...]
    new: dict[str, Any]
    old: dict[str, Any]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Describe the verdict for the status API."""
        return {"passed": self.passed, "judged": self.judged, "failures": list(self.failures),
                "new": self.new, "old": self.old, "notes": list(self.notes)}


def collect(conn: Connection, model: str, version: str, members: Sequence[Member],
            window_s: float) -> tuple[Figures, Figures, Figures]:
    """Return (new version on all members, new version on the members that also have figures of
    their previous version, those members' previous version): the last two cover the same devices."""
    by_id = {m.device_id: m for m in members}
    ids = sorted(by_id)
    new_rows: list[Any] = []
    old_rows: list[Any] = []
    for start in range(0, len(ids), 500):  # bound the IN list
        chunk = ids[start:start + 500]
        versions = {version} | {by_id[d].previous_version for d in chunk if by_id[d].previous_version}
        stmt = select(health_t.c.device_id, health_t.c.version, health_t.c.ts, health_t.c.requests,
                      health_t.c.errors, health_t.c.latency_p95_ms, health_t.c.tokens_per_s).where(
            health_t.c.model == model, health_t.c.version.in_(sorted(versions)), health_t.c.device_id.in_(chunk))
        for r in conn.execute(stmt):
            m = by_id[r.device_id]
            if r.version == version and r.ts >= m.assigned_at:
                new_rows.append(r)
            elif r.version == m.previous_version and m.assigned_at - window_s <= r.ts < m.assigned_at:
                old_rows.append(r)
    paired_devices = {r.device_id for r in old_rows}
    new_all, new_paired, old = Figures(), Figures(), Figures()
    for r in new_rows:
        new_all.add(r.device_id, r.requests, r.errors, r.latency_p95_ms, r.tokens_per_s)
        if r.device_id in paired_devices:
            new_paired.add(r.device_id, r.requests, r.errors, r.latency_p95_ms, r.tokens_per_s)
    devices_with_new = {r.device_id for r in new_rows}
    for r in old_rows:
        if r.device_id in devices_with_new:
            old.add(r.device_id, r.requests, r.errors, r.latency_p95_ms, r.tokens_per_s)
    return new_all, new_paired, old


def evaluate(gates: Gates, new_all: Figures, new_paired: Figures, old: Figures) -> GateResult:
    """Judge the new version's figures against the gates and the old version's figures."""
    failures: list[str] = []
    notes: list[str] = []
    judged = False
    enough_new = new_all.requests >= gates.min_requests
    if gates.max_error_rate is not None and enough_new and new_all.error_rate is not None:
        judged = True
        if new_all.error_rate > gates.max_error_rate:
            failures.append(f"error rate {new_all.error_rate:.3f} is over the ceiling {gates.max_error_rate:.3f}")
    paired = new_paired.requests >= gates.min_requests and old.requests >= gates.min_requests
    if paired:
        judged = True
        assert new_paired.error_rate is not None and old.error_rate is not None
        if new_paired.error_rate - old.error_rate > gates.max_error_rate_increase:
            failures.append(f"error rate rose from {old.error_rate:.3f} to {new_paired.error_rate:.3f} "
                            f"(allowed +{gates.max_error_rate_increase:.3f})")
        if new_paired.p95_ms is not None and old.p95_ms is not None:
            if new_paired.p95_ms > old.p95_ms * (1 + gates.max_latency_increase):
                failures.append(f"p95 latency rose from {old.p95_ms:.1f} ms to {new_paired.p95_ms:.1f} ms "
                                f"(allowed +{gates.max_latency_increase:.0%})")
        if new_paired.tokens_per_s is not None and old.tokens_per_s is not None:
            if new_paired.tokens_per_s < old.tokens_per_s * (1 - gates.max_tokens_per_s_drop):
                failures.append(f"tokens/s fell from {old.tokens_per_s:.1f} to {new_paired.tokens_per_s:.1f} "
                                f"(allowed -{gates.max_tokens_per_s_drop:.0%})")
    else:
        notes.append(f"not enough traffic to compare with the previous version (need {gates.min_requests} "
                     f"requests on each; new {new_paired.requests:.0f}, old {old.requests:.0f})")
    if not enough_new:
        notes.append(f"new version served {new_all.requests:.0f} requests (< {gates.min_requests})")
    return GateResult(not failures, judged, tuple(failures), new_all.to_dict(), old.to_dict(), tuple(notes))

