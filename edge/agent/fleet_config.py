"""Settings the controller may change on a running agent (``set-config``), kept across restarts.

    set-config {"telemetry_interval": 30, "download_rate_kb": 512}

:data:`SETTINGS` names every key with its unit and bounds. A command is checked as a whole
before anything changes: an unknown key or a bad value refuses all of it, with an error naming
the key and what is valid. Accepted values are merged into what the controller set before and
written atomically to ``DATA/fleet/config.json`` *before* they are applied, so an "ok" answer
means the setting survives a restart; then they apply at once (the telemetry loop takes a new
interval at its next wait; a download cap applies from the next download attempt).

At start the agent reads the file back: a value the controller set wins over the command-line
option of the same name, or a restart would silently undo it. ``null`` for a key forgets the
controller's value, and the command-line option applies again. A file that cannot be read is
logged and ignored (the agent still serves and reports, on its own options); the next
``set-config`` replaces it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from edge.agent.files import dump_json, read_json, write_atomic
from edge.errors import ConfigError, StoreError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CONFIG_SCHEMA = 1
# Bounds of the telemetry interval: below a second telemetry would be most of what a device
# sends; above an hour a dead device looks alive for too long.
MIN_INTERVAL_S, MAX_INTERVAL_S = 1.0, 3600.0


@dataclass(frozen=True)
class Setting:
    """One key set-config accepts: a number within bounds."""

    unit: str
    low: float
    high: float


# In the order the answers and errors list them.
SETTINGS: dict[str, Setting] = {
    "telemetry_interval": Setting("seconds", MIN_INTERVAL_S, MAX_INTERVAL_S),
    # KiB/s; 0 lifts the cap. 10 GiB/s is above any link a device has.
    "download_rate_kb": Setting("KiB/s, 0 for no cap", 0.0, 10 * 1024 * 1024),
}


@dataclass(frozen=True)
class RemoteConfig:
    """The values the controller set; None: not set, the agent's own option applies."""

    telemetry_interval: float | None = None
    download_rate_kb: float | None = None

    def merged(self, changes: dict[str, float | None]) -> "RemoteConfig":
        """Return this config with ``changes`` applied (None forgets a value)."""
        return replace(self, **changes)

    def interval(self, default: float) -> float:
        """Return the telemetry interval in force (seconds)."""
        return default if self.telemetry_interval is None else self.telemetry_interval

    def rate(self, default: float | None) -> float | None:
        """Return the download cap in force (bytes per second; None: no cap)."""
        if self.download_rate_kb is None:
            return default
        return self.download_rate_kb * 1024 if self.download_rate_kb > 0 else None

    def to_json(self) -> dict[str, Any]:
        """Return the values set, as stored in the file."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def describe(interval: float, rate: float | None) -> dict[str, float]:
    """Return the settings in force in set-config's units."""
    return {"telemetry_interval": float(interval), "download_rate_kb": rate / 1024 if rate else 0.0}


def parse_changes(args: dict[str, Any]) -> dict[str, float | None]:
    """Validate set-config's arguments; return key -> number (None: forget the controller's value)."""
    valid = ", ".join(SETTINGS)
    if not args:
        raise ConfigError("set-config names no setting", hint=f"valid: {valid}")
    unknown = [k for k in args if k not in SETTINGS]
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(sorted(unknown))}", hint=f"valid: {valid}")
    out: dict[str, float | None] = {}
    for key, value in args.items():
        spec = SETTINGS[key]
        if value is None:
            out[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not spec.low <= value <= spec.high:
            raise ConfigError(f"{key} must be a number from {_number(spec.low)} to {_number(spec.high)} ({spec.unit}), "
                              f"got {value!r}",
                              hint=f"or null to go back to the agent's own {key}")
        out[key] = float(value)
    return out


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def load_config(path: Path) -> RemoteConfig:
    """Read what the controller set; an empty config when there is no file or it is unreadable."""
    try:
        data = read_json(path)
    except FileNotFoundError:
        return RemoteConfig()
    except StoreError as exc:
        log.error("ignoring the controller's settings: %s", exc)
        return RemoteConfig()
    try:
        if not isinstance(data, dict) or data.get("schema_version") != CONFIG_SCHEMA:
            raise ConfigError(f"expected an object with schema_version {CONFIG_SCHEMA}")
        values = {k: v for k, v in data.items() if k != "schema_version"}
        return RemoteConfig().merged(parse_changes(values)) if values else RemoteConfig()
    except ConfigError as exc:
        log.error("ignoring the controller's settings in %s: %s", path, exc)
        return RemoteConfig()


def save_config(path: Path, config: RemoteConfig) -> None:
    """Write what the controller set, atomically."""
    try:
        write_atomic(path, dump_json({"schema_version": CONFIG_SCHEMA, **config.to_json()}))
    except OSError as exc:
        raise StoreError(f"cannot save the settings to {path}: {exc}", hint="is the data folder writable and not full?") from exc
