"""Per-model record (``models/<name>/state.json``): which version serves, and how versions fared.

The record is replaced atomically (temporary file, fsync, rename, fsync of the folder), so an
activation is one rename: a crash leaves either the old record or the new one, never a mix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edge.agent.files import dump_json, read_json, write_atomic
from edge.agent.journal import now_iso
from edge.errors import StoreError

STATE_FILE = "state.json"
RECORD_SCHEMA = 1
# Events kept in the record: enough to explain the last few rollouts, small enough to rewrite
# on every activation.
HISTORY_LIMIT = 50
_KEYS = {"schema_version", "name", "active", "previous", "healthy", "failed", "attempts", "history"}


@dataclass
class ModelRecord:
    """The serving state of one model name."""

    name: str
    active: str | None = None
    previous: str | None = None
    # Versions that passed a health check on this device (a rollback target is trusted).
    healthy: list[str] = field(default_factory=list)
    # Versions that failed a health check or a check at open, with the reason; automatic
    # choices (rollback, resumed activation) never pick one, and `activate` needs force.
    failed: dict[str, str] = field(default_factory=dict)
    # Loads of the active version started without a health check confirming it since.
    attempts: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def note(self, event: str, version: str | None, reason: str | None = None) -> None:
        """Append an event to the history, dropping the oldest beyond the limit."""
        item: dict[str, Any] = {"at": now_iso(), "event": event, "version": version}
        if reason:
            item["reason"] = reason
        self.history = [*self.history, item][-HISTORY_LIMIT:]

    def forget(self, version: str) -> None:
        """Drop everything recorded about one version (it was removed)."""
        self.healthy = [v for v in self.healthy if v != version]
        self.failed.pop(version, None)
        self.attempts.pop(version, None)
        if self.previous == version:
            self.previous = None

    def to_dict(self) -> dict[str, Any]:
        """Return the record as JSON-able data."""
        return {
            "schema_version": RECORD_SCHEMA, "name": self.name, "active": self.active,
            "previous": self.previous, "healthy": sorted(self.healthy), "failed": dict(self.failed),
            "attempts": dict(self.attempts), "history": list(self.history),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Any, source: Path) -> "ModelRecord":
        """Parse a record strictly, naming the file and the key on any problem."""
        if not isinstance(data, dict):
            raise StoreError(f"{source} is not a JSON object")
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise StoreError(f"{source}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(_KEYS))}")
        if data.get("schema_version") != RECORD_SCHEMA:
            raise StoreError(f"{source}: schema_version {data.get('schema_version')!r}, expected {RECORD_SCHEMA}")
        try:
            rec = cls(
                name=str(data["name"]), active=data.get("active"), previous=data.get("previous"),
                healthy=[str(v) for v in data.get("healthy", [])],
                failed={str(k): str(v) for k, v in data.get("failed", {}).items()},
                attempts={str(k): int(v) for k, v in data.get("attempts", {}).items()},
                history=list(data.get("history", [])),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreError(f"{source} is corrupt: {exc}") from exc
        for key in ("active", "previous"):
            if getattr(rec, key) is not None and not isinstance(getattr(rec, key), str):
                raise StoreError(f"{source}: {key} must be a version string or null")
        return rec


def read_record(model_dir: Path) -> ModelRecord | None:
    """Read a model's record; None when the model has none yet."""
    path = model_dir / STATE_FILE
    try:
        return ModelRecord.from_dict(read_json(path), path)
    except FileNotFoundError:
        return None


def write_record(model_dir: Path, record: ModelRecord, on_written: Callable[[], None] | None = None) -> None:
    """Replace a model's record atomically; ``on_written`` runs between the fsync and the rename."""
    write_atomic(model_dir / STATE_FILE, dump_json(record.to_dict()), on_written)
