"""One deployment of one model version on this device: a persisted state machine.

Mender-like (every state is written to disk before its work starts, so a power cut resumes
or rolls back instead of leaving a half-switched device)::

    PENDING -> DOWNLOADING -> VERIFYING -> INSTALLING -> [WAITING ->] ACTIVATING -> HEALTH_CHECK
        -> COMMITTED                                       (the new version serves)
        -> ROLLING_BACK -> ROLLED_BACK | FAILED            (back on the previous version, or none left)
    any state before ACTIVATING -> FAILED | CANCELLED      (nothing was switched)

On restart: download, verify and install are re-run (the download resumes from its partial
file; an install of bytes already in the store is a no-op); ACTIVATING is re-run (activation is
idempotent); HEALTH_CHECK is re-run once, and rolled back if the agent died during it twice
(the model may be what kills it); ROLLING_BACK is re-run.

Failed deployments are remembered by (deployment id, name, version, SHA-256), so a desired
state that keeps naming a bad version is not retried in a loop; a new deployment id (a new
rollout) or a ``deploy`` command with ``force`` tries again.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from edge.agent import faults
from edge.agent.files import TMP_PREFIX, dump_json, read_json, write_atomic
from edge.errors import ConfigError, StoreError
from edge.protocol.messages import DesiredModel


class DeployState(str, Enum):
    """Where a deployment is."""

    PENDING = "pending"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    WAITING = "waiting"  # installed; waiting for activate_after or the maintenance window
    ACTIVATING = "activating"
    HEALTH_CHECK = "health_check"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    CANCELLED = "cancelled"  # superseded by a newer desired version before anything switched


S = DeployState
TRANSITIONS: dict[DeployState, frozenset[DeployState]] = {
    S.PENDING: frozenset({S.DOWNLOADING, S.FAILED, S.CANCELLED}),
    S.DOWNLOADING: frozenset({S.VERIFYING, S.FAILED, S.CANCELLED}),
    S.VERIFYING: frozenset({S.INSTALLING, S.DOWNLOADING, S.FAILED, S.CANCELLED}),
    S.INSTALLING: frozenset({S.WAITING, S.ACTIVATING, S.DOWNLOADING, S.FAILED, S.CANCELLED}),
    S.WAITING: frozenset({S.ACTIVATING, S.FAILED, S.CANCELLED}),
    S.ACTIVATING: frozenset({S.HEALTH_CHECK, S.FAILED}),
    S.HEALTH_CHECK: frozenset({S.COMMITTED, S.ROLLING_BACK}),
    S.ROLLING_BACK: frozenset({S.ROLLED_BACK, S.FAILED}),
    S.COMMITTED: frozenset(),
    S.ROLLED_BACK: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
TERMINAL = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)
# States a newer target may interrupt: nothing has been switched yet.
INTERRUPTIBLE = frozenset({S.PENDING, S.DOWNLOADING, S.VERIFYING, S.INSTALLING, S.WAITING})
WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


def parse_window(window: str) -> tuple[int, int]:
    """Return a "HH:MM-HH:MM" UTC window as (start, end) minutes of the day."""
    m = WINDOW.match(window)
    if not m:
        raise ConfigError(f"invalid maintenance window {window!r}", hint="use HH:MM-HH:MM in UTC, e.g. 01:00-04:30")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    return h1 * 60 + m1, h2 * 60 + m2


def in_window(window: str, now: float) -> bool:
    """Return whether unix time ``now`` falls inside the daily UTC window (it may wrap midnight)."""
    start, end = parse_window(window)
    t = datetime.fromtimestamp(now, timezone.utc)
    minute = t.hour * 60 + t.minute
    return start <= minute < end if start <= end else (minute >= start or minute < end)


@dataclass
class Deployment:
    """The persisted record of one deployment."""

    name: str
    version: str
    bundle_url: str
    sha256: str
    size: int
    deployment_id: str | None = None
    generation: int | None = None
    activate_after: float | None = None
    maintenance_window: str | None = None
    force: bool = False
    state: DeployState = DeployState.PENDING
    attempts: int = 0  # failed download attempts
    health_attempts: int = 0  # health checks started (a restart during one counts)
    previous: str | None = None  # the version active before the switch
    error: str | None = None
    error_code: str | None = None
    announced: bool = False  # the final state's event is queued (until then a restart sends it again)
    updated: float = field(default_factory=time.time)

    @classmethod
    def for_target(cls, name: str, model: DesiredModel, generation: int | None, force: bool) -> "Deployment":
        """Start a deployment of ``model`` under ``name``."""
        if model.maintenance_window:
            parse_window(model.maintenance_window)
        return cls(name, model.version, model.bundle_url, model.sha256, model.size, model.deployment_id,
                   generation, model.activate_after, model.maintenance_window, force)

    @property
    def ref(self) -> str:
        """Return ``name@version``."""
        return f"{self.name}@{self.version}"

    @property
    def key(self) -> str:
        """Return what identifies this deployment in the memory of failures."""
        return f"{self.deployment_id or '-'}:{self.name}@{self.version}#{self.sha256}"

    @property
    def done(self) -> bool:
        """Return whether the deployment reached a terminal state."""
        return self.state in TERMINAL

    def same_target(self, model: DesiredModel) -> bool:
        """Return whether ``model`` asks for exactly what this deployment installs."""
        return (self.version, self.sha256, self.deployment_id) == (model.version, model.sha256, model.deployment_id)

    def may_activate(self, now: float) -> bool:
        """Return whether the activation time and window allow switching now."""
        if self.activate_after is not None and now < self.activate_after:
            return False
        return self.maintenance_window is None or in_window(self.maintenance_window, now)

    def move(self, to: DeployState, error: str | None = None, code: str | None = None) -> None:
        """Change state, refusing a move the transition table does not allow."""
        if to not in TRANSITIONS[self.state]:
            raise StoreError(f"deployment of {self.ref}: cannot go from {self.state.value} to {to.value}")
        self.state = to
        if error is not None:
            self.error, self.error_code = error, code
        self.updated = time.time()

    def to_dict(self) -> dict[str, Any]:
        """Return the record as JSON-able data."""
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_dict(cls, data: Any, source: Path) -> "Deployment":
        """Parse a record, naming the file on any problem."""
        try:
            fields = dict(data)
            fields["state"] = DeployState(fields["state"])
            return cls(**fields)
        except (TypeError, ValueError, KeyError) as exc:
            raise StoreError(f"deployment record {source} is corrupt: {exc}") from exc


class DeploymentJournal:
    """Deployment records on disk: one file per model name, plus the memory of failures."""

    # The leading underscore keeps these apart from records: model names start with a letter or
    # digit, so a model called "failed" or "managed" has its own record file.
    FAILED_FILE = "_failed.json"
    # Where releases before 0.2 kept the failures; moved at open (a record never has that shape).
    OLD_FAILED_FILE = "failed.json"
    # Names the desired state gave this device (what a removal may take away).
    MANAGED_FILE = "_managed.json"
    # Failures remembered: plenty for a device's lifetime of rollouts, bounded for its disk.
    MAX_FAILED = 500

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in self.folder.glob(f"{TMP_PREFIX}*"):  # a write the last process died in
            path.unlink(missing_ok=True)
        self._move_old_failures()

    def _move_old_failures(self) -> None:
        """Move an old ``failed.json`` (a list of pairs, never a record) to its new name."""
        old = self.folder / self.OLD_FAILED_FILE
        if old.exists() and not (self.folder / self.FAILED_FILE).exists() and isinstance(read_json(old), list):
            os.replace(old, self.folder / self.FAILED_FILE)

    def load(self) -> dict[str, Deployment]:
        """Return the last deployment of every model name."""
        out = {}
        for path in sorted(self.folder.glob("*.json")):
            if path.name in (self.FAILED_FILE, self.MANAGED_FILE):
                continue
            dep = Deployment.from_dict(read_json(path), path)
            out[dep.name] = dep
        return out

    def save(self, dep: Deployment) -> None:
        """Persist one record atomically (fault points before, during and after the write)."""
        faults.reach(f"deploy-before-{dep.state.value}")
        write_atomic(self.folder / f"{dep.name}.json", dump_json(dep.to_dict()), _mid_write)
        faults.reach(f"deploy-after-{dep.state.value}")

    def forget(self, name: str) -> None:
        """Delete the record of ``name`` (the model was removed from this device)."""
        (self.folder / f"{name}.json").unlink(missing_ok=True)

    def managed(self) -> set[str]:
        """Return the model names the desired state named and no removal has taken away yet."""
        path = self.folder / self.MANAGED_FILE
        if not path.exists():
            return set()
        data = read_json(path)
        if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
            raise StoreError(f"{path} is corrupt: expected a list of model names")
        return set(data)

    def save_managed(self, names: set[str]) -> None:
        """Persist the managed model names."""
        write_atomic(self.folder / self.MANAGED_FILE, dump_json(sorted(names)))

    def failures(self) -> dict[str, str]:
        """Return remembered failures, oldest first: deployment key -> reason."""
        path = self.folder / self.FAILED_FILE
        if not path.exists():
            return {}
        data = read_json(path)
        if not isinstance(data, list) or not all(isinstance(p, list) and len(p) == 2 for p in data):
            raise StoreError(f"{path} is corrupt: expected a list of [key, reason] pairs")
        return {str(k): str(v) for k, v in data}

    def save_failures(self, failures: dict[str, str]) -> None:
        """Persist the memory of failures (the oldest beyond the bound are forgotten)."""
        pairs = [[k, v] for k, v in failures.items()][-self.MAX_FAILED:]
        write_atomic(self.folder / self.FAILED_FILE, dump_json(pairs), _mid_write)


def _mid_write() -> None:
    faults.reach("deploy-mid-write")
