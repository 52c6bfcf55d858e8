"""The install journal: one file per install in flight, so a restart finishes or undoes it.

Every install walks this state machine; each state is written (atomically, fsynced) once its
step is done and before the next one starts, so after a crash the journal says how far the
install got::

    RECEIVED -> VERIFIED -> EXTRACTED -> VALIDATED -> INSTALLED -> ACTIVE

    every state before INSTALLED -> FAILED   (refused or broken: staging removed)
    VERIFIED -> INSTALLED                    (the identical version is already installed)

The rename into ``models/`` (-> INSTALLED) is the commit point. Recovery (edge.agent.recovery,
at every store open) undoes an install that died before VALIDATED (its staging folder goes)
and finishes one that died at VALIDATED or later: its staging folder is sealed, fsynced and
was loaded by the child process, so recovery renames it and makes the activation it asked for.

An install in flight holds an exclusive ``flock`` on ``journal/<id>.lock`` for its whole life;
the kernel releases it when the process dies, however it dies. Recovery only touches entries
whose lock it can take, so an agent starting while ``edge flash`` runs leaves that flash alone.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

from edge.agent.files import TMP_PREFIX, dump_json, fsync_dir, read_json, write_atomic
from edge.errors import StoreError


class InstallState(str, Enum):
    """How far one install got."""

    RECEIVED = "received"  # journal entry written; nothing checked yet
    VERIFIED = "verified"  # signature, expiry, compatibility and budgets checked
    EXTRACTED = "extracted"  # payload hashed while written to staging/<id>/, fsynced
    VALIDATED = "validated"  # a child process loaded the model and ran it once
    INSTALLED = "installed"  # renamed into models/<name>/<version>/ (the commit point)
    ACTIVE = "active"  # state.json names it as the active version
    FAILED = "failed"  # refused or broken; staging removed


TRANSITIONS: dict[InstallState, frozenset[InstallState]] = {
    InstallState.RECEIVED: frozenset({InstallState.VERIFIED, InstallState.FAILED}),
    InstallState.VERIFIED: frozenset({InstallState.EXTRACTED, InstallState.INSTALLED, InstallState.FAILED}),
    InstallState.EXTRACTED: frozenset({InstallState.VALIDATED, InstallState.FAILED}),
    InstallState.VALIDATED: frozenset({InstallState.INSTALLED, InstallState.FAILED}),
    InstallState.INSTALLED: frozenset({InstallState.ACTIVE}),
    InstallState.ACTIVE: frozenset(),
    InstallState.FAILED: frozenset(),
}

# States in which nothing is left to do; the entry is deleted once one is reached.
TERMINAL = frozenset({InstallState.INSTALLED, InstallState.ACTIVE, InstallState.FAILED})
# States whose staging folder holds bytes not yet committed (what the disk budget must count).
STAGING_STATES = frozenset({InstallState.VERIFIED, InstallState.EXTRACTED, InstallState.VALIDATED})


def now_iso() -> str:
    """Return the current UTC time, ISO 8601, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class JournalEntry:
    """The persisted record of one install."""

    id: str
    state: InstallState
    bundle: str
    activate: bool
    started_at: str
    name: str | None = None
    version: str | None = None
    payload_bytes: int = 0
    key_id: str | None = None  # the trusted key that signed the manifest (VERIFIED on)
    reason: str | None = None
    steps: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (state, time) so far

    def to_dict(self) -> dict:
        """Return the entry as JSON-able data."""
        return {
            "id": self.id, "state": self.state.value, "bundle": self.bundle, "activate": self.activate,
            "started_at": self.started_at, "name": self.name, "version": self.version,
            "payload_bytes": self.payload_bytes, "key_id": self.key_id, "reason": self.reason,
            "steps": [list(s) for s in self.steps],
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict, source: Path) -> "JournalEntry":
        """Parse an entry strictly."""
        try:
            return cls(
                id=str(data["id"]), state=InstallState(data["state"]), bundle=str(data["bundle"]),
                activate=bool(data["activate"]), started_at=str(data["started_at"]), name=data.get("name"),
                version=data.get("version"), payload_bytes=int(data.get("payload_bytes", 0)),
                key_id=data.get("key_id"), reason=data.get("reason"),
                steps=tuple(tuple(s) for s in data.get("steps", ())),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"journal entry {source} is corrupt: {exc}") from exc


class Ticket:
    """An install in flight: its entry and the lock that says its owner is alive."""

    def __init__(self, entry: JournalEntry, lock_fd: int) -> None:
        self.entry = entry
        self.lock_fd = lock_fd

    @property
    def id(self) -> str:
        """Return the install id (also the name of its staging folder)."""
        return self.entry.id


class Journal:
    """The ``journal/`` folder of a store."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _json(self, install_id: str) -> Path:
        return self.folder / f"{install_id}.json"

    def _lock(self, install_id: str) -> Path:
        return self.folder / f"{install_id}.lock"

    def begin(self, bundle: Path, activate: bool) -> Ticket:
        """Start an install: take its lock, then write its RECEIVED entry (call under the store lock)."""
        install_id = uuid.uuid4().hex[:16]
        fd = os.open(self._lock(install_id), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        at = now_iso()
        entry = JournalEntry(install_id, InstallState.RECEIVED, str(bundle), activate, at,
                             steps=((InstallState.RECEIVED.value, at),))
        try:
            write_atomic(self._json(install_id), dump_json(entry.to_dict()))
        except BaseException:
            self._release(install_id, fd)
            raise
        return Ticket(entry, fd)

    def advance(self, ticket: Ticket, to: InstallState, **fields: object) -> None:
        """Move an install to ``to`` (checked against :data:`TRANSITIONS`) and persist it."""
        entry = ticket.entry
        if to not in TRANSITIONS[entry.state]:
            raise StoreError(f"install {entry.id}: cannot go from {entry.state.value} to {to.value}")
        steps = (*entry.steps, (to.value, now_iso()))
        ticket.entry = replace(entry, state=to, steps=steps, **fields)  # type: ignore[arg-type]
        write_atomic(self._json(entry.id), dump_json(ticket.entry.to_dict()))

    def finish(self, ticket: Ticket) -> None:
        """Forget a finished install: delete its entry, then its lock (call under the store lock)."""
        self._json(ticket.id).unlink(missing_ok=True)
        fsync_dir(self.folder)
        self._release(ticket.id, ticket.lock_fd)

    def _release(self, install_id: str, fd: int) -> None:
        self._lock(install_id).unlink(missing_ok=True)
        os.close(fd)

    def entries(self) -> list[JournalEntry]:
        """Return every entry on disk (in flight or abandoned)."""
        out = []
        for path in sorted(self.folder.glob("*.json")):
            if path.name.startswith(TMP_PREFIX):
                continue
            try:
                out.append(JournalEntry.from_dict(read_json(path), path))
            except FileNotFoundError:  # finished meanwhile
                continue
        return out

    def is_live(self, install_id: str) -> bool:
        """Return whether a live process owns this install (holds its lock)."""
        if not self._lock(install_id).exists():
            return False
        fd = self._try_lock(install_id)
        if fd is None:
            return True
        os.close(fd)
        return False

    def _try_lock(self, install_id: str) -> int | None:
        try:
            fd = os.open(self._lock(install_id), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot open the journal lock of install {install_id}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def abandoned(self) -> list[Ticket]:
        """Return tickets for entries whose owner died, their locks now held by the caller."""
        tickets = []
        for entry in self.entries():
            fd = self._try_lock(entry.id)
            if fd is not None:
                tickets.append(Ticket(entry, fd))
        return tickets

    def sweep_locks(self) -> None:
        """Delete lock files with no entry and no owner, and temporary files (under the store lock)."""
        for path in self.folder.iterdir():
            if path.name.startswith(TMP_PREFIX):
                path.unlink(missing_ok=True)
            elif path.suffix == ".lock" and not self._json(path.stem).exists():
                fd = self._try_lock(path.stem)
                if fd is not None:
                    self._release(path.stem, fd)

    def in_flight_bytes(self, exclude: str | None = None) -> int:
        """Return the payload bytes that installs in flight are writing or hold in staging."""
        return sum(e.payload_bytes for e in self.entries() if e.state in STAGING_STATES and e.id != exclude)
