"""What a rollout is asked to do: target, waves, soak, gates, failure ratio, activation window.

Parsed once at the API boundary into a frozen :class:`RolloutPlan`; unknown keys are errors.
Waves are cumulative: ``["1", "10%", "50%", "100%"]`` means a canary of one device, then up to
10%, 50% and all of the target; the last wave is always 100%.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge.errors import ConfigError
from edge.fleet.health import Gates
from edge.protocol.manifest import NAME_PATTERN, VERSION_PATTERN
from edge.protocol.topics import ID_PATTERN

# Canary one device, then widen by roughly 5x: the Greengrass-style exponential rate.
DEFAULT_WAVES = ("1", "10%", "50%", "100%")
WAVE_PATTERN = re.compile(r"^(?:([1-9]\d{0,6})|(100|[1-9]\d?(?:\.\d+)?|0\.\d*[1-9]\d*)%)$")
WINDOW_PATTERN = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


class Target(BaseModel):
    """Which devices a rollout is for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["all", "tag", "group", "profile"]
    value: str = ""

    @model_validator(mode="after")
    def _value(self) -> "Target":
        if self.kind == "all":
            if self.value:
                raise ValueError("target 'all' takes no value")
        elif not ID_PATTERN.match(self.value):
            raise ValueError(f"target {self.kind} needs a value of 1-64 letters, digits, '.', '_', ':' or '-'")
        return self

    def __str__(self) -> str:
        return "all devices" if self.kind == "all" else f"{self.kind} {self.value}"


class RolloutPlan(BaseModel):
    """The knobs of one rollout."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    waves: tuple[str, ...] = DEFAULT_WAVES
    soak_s: float = Field(600.0, ge=0)  # watch each wave this long before widening
    device_timeout_s: float = Field(1800.0, gt=0)  # a device not done by then counts as failed
    max_failure_ratio: float = Field(0.1, ge=0, le=1)  # failed / finished devices above this: halt
    min_finished_for_ratio: int = Field(1, ge=1)  # judge the ratio once this many finished
    auto_revert: bool = True  # on a failed gate: revert the whole rollout (else halt and wait)
    allow_fallback: bool = True  # no variant for the profile: take a compatible portable one
    require_traffic: bool = False  # hold each soak until the gate has enough requests to judge
    gates: Gates = Gates()
    activate_after: float | None = None  # unix time: download now, activate from then on
    maintenance_window: str | None = None  # "HH:MM-HH:MM" UTC: activate only inside it

    @field_validator("waves")
    @classmethod
    def _waves(cls, waves: tuple[str, ...]) -> tuple[str, ...]:
        if not waves:
            raise ValueError("a rollout needs at least one wave")
        for w in waves:
            if not WAVE_PATTERN.match(w):
                raise ValueError(f"wave {w!r} is neither a device count (e.g. 1, 25) nor a share (e.g. 10%)")
        if waves[-1] != "100%":
            waves = (*waves, "100%")
        return waves

    @field_validator("maintenance_window")
    @classmethod
    def _window(cls, window: str | None) -> str | None:
        if window is not None:
            m = WINDOW_PATTERN.match(window)
            if not m or m.group(1, 2) == m.group(3, 4):
                raise ValueError(f"maintenance window {window!r} is not HH:MM-HH:MM (UTC, start != end)")
        return window


class RolloutSpec(BaseModel):
    """A request to roll ``model@version`` out to a target."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    target: Target = Target(kind="all")
    plan: RolloutPlan = RolloutPlan()


def parse_spec(data: object) -> RolloutSpec:
    """Validate a rollout request, raising ConfigError naming the bad field."""
    try:
        return RolloutSpec.model_validate(data)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(body)'}: {e['msg']}" for e in exc.errors()[:5])
        raise ConfigError(f"invalid rollout: {details}",
                          hint="fields: model, version, target {kind, value}, plan {waves, soak_s, ...}") from exc


def wave_size(wave: str, total: int) -> int:
    """Return how many devices a cumulative wave covers out of ``total``."""
    m = WAVE_PATTERN.match(wave)
    if not m:
        raise ConfigError(f"invalid wave {wave!r}")
    if m.group(1):
        return min(int(m.group(1)), total)
    return min(total, math.ceil(float(m.group(2)) / 100 * total - 1e-9))


def next_window_start(window: str | None, after: float) -> float:
    """Return the first moment at or after ``after`` inside the UTC window (``after`` without one)."""
    if window is None:
        return after
    m = WINDOW_PATTERN.match(window)
    assert m is not None
    h1, m1, h2, m2 = (int(x) for x in m.groups())
    t = datetime.fromtimestamp(after, timezone.utc)
    start, end = h1 * 60 + m1, h2 * 60 + m2
    minute = t.hour * 60 + t.minute
    inside = start <= minute < end if start < end else (minute >= start or minute < end)
    if inside:
        return after
    day = t.replace(hour=h1, minute=m1, second=0, microsecond=0)
    if day.timestamp() < after:
        day += timedelta(days=1)
    return day.timestamp()
