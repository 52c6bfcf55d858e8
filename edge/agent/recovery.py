"""Recovery at store open: finish or undo whatever a crash interrupted.

Runs under the store lock, before any other operation of the opening process:

* installs whose owner died (their journal lock is free): one that reached VALIDATED is
  committed (its staging folder is sealed and whole) and activated if it asked to be; one that
  reached INSTALLED is activated if it asked to be; an earlier one is undone (staging removed);
* staging folders of no live install, ``trash/``, and temporary files are deleted;
* every model's record is made to name sound versions only: an active version whose files are
  damaged is replaced by a sound previous one (or none), a damaged previous is dropped.

Installs still running in another process (``edge flash`` while the agent starts) hold their
journal lock and are left alone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from edge.agent.files import TMP_PREFIX, fsync_dir, remove_tree
from edge.agent.install import move_into_place
from edge.agent.journal import InstallState, Ticket
from edge.agent.record import ModelRecord, read_record
from edge.agent.versions import INSTALL_FILE, PAYLOAD_DIR, check_payload, read_manifest
from edge.errors import EdgeError, IntegrityError, StoreError

if TYPE_CHECKING:
    from edge.agent.store import Store

log = logging.getLogger(__name__)


def recover(store: "Store") -> None:
    """Bring the store back to a state where every model serves one sound version (locked)."""
    for ticket in store.journal.abandoned():
        _recover_install(store, ticket)
    store.journal.sweep_locks()
    for path in list(store.staging_dir.iterdir()):  # listed before the liveness check (see journal)
        if not store.journal.is_live(path.name):
            log.warning("removing leftover staging folder %s", path)
            remove_tree(path)
    for path in list(store.trash_dir.iterdir()):
        remove_tree(path)
    for path in list(store.root.iterdir()):
        if path.name.startswith(TMP_PREFIX):
            path.unlink(missing_ok=True)
    for name in store.names():
        _repair_model(store, name)
    fsync_dir(store.staging_dir)
    fsync_dir(store.trash_dir)


def _recover_install(store: "Store", ticket: Ticket) -> None:
    """Undo an install that died before its commit; finish one that died after it."""
    entry = ticket.entry
    staging = store.staging_dir / entry.id
    try:
        if entry.state is InstallState.VALIDATED:
            _resume_commit(store, ticket)
        if ticket.entry.state is InstallState.INSTALLED:
            if entry.activate:
                store.activate_locked(entry.name, entry.version,  # type: ignore[arg-type]
                                      event="activated (install resumed after a crash)")
                store.journal.advance(ticket, InstallState.ACTIVE)
            log.warning("finished install %s of %s@%s after a crash", entry.id, entry.name, entry.version)
        elif ticket.entry.state not in (InstallState.ACTIVE, InstallState.FAILED):
            remove_tree(staging)
            store.journal.advance(ticket, InstallState.FAILED, reason="interrupted: the process died")
            log.warning("undid install %s of %s, interrupted at %s", entry.id, entry.bundle, entry.state.value)
    except EdgeError as exc:
        log.error("cannot finish install %s of %s after a crash: %s", entry.id, entry.bundle, exc)
        remove_tree(staging)
    finally:
        store.journal.finish(ticket)


def _resume_commit(store: "Store", ticket: Ticket) -> None:
    """A VALIDATED install: either the rename happened, or its sealed staging folder is whole."""
    name, version = ticket.entry.name, ticket.entry.version
    assert name is not None and version is not None
    staging = store.staging_dir / ticket.id
    if not staging.exists():
        if store.version_dir(name, version).exists():
            store.journal.advance(ticket, InstallState.INSTALLED)  # it died right after the rename
        else:
            store.journal.advance(ticket, InstallState.FAILED, reason="staging folder vanished")
        return
    manifest = read_manifest(staging)
    if (manifest.name, manifest.version) != (name, version) or not (staging / INSTALL_FILE).exists():
        raise IntegrityError(f"staging folder {staging} is not the validated {name}@{version}")
    check_payload(staging / PAYLOAD_DIR, manifest)
    move_into_place(store, ticket)


def _repair_model(store: "Store", name: str) -> None:
    """Make the record name sound versions only; fall back when the active one is damaged."""
    folder = store.models_dir / name
    for path in list(folder.iterdir()):
        if path.name.startswith(TMP_PREFIX):
            path.unlink(missing_ok=True)
    try:
        rec = read_record(folder)
    except StoreError as exc:
        log.error("%s; rebuilding it with no active version", exc)
        rec = ModelRecord(name)
        rec.note("record rebuilt", None, str(exc))
        store.write_record(rec)
    if rec is None:
        store.drop_if_empty(name)
        return
    changed = False
    if rec.active is not None and (problem := store.problem_of(name, rec.active)):
        bad, rec.active = rec.active, None
        rec.failed[bad] = f"damaged: {problem}"
        if rec.previous and rec.previous not in rec.failed and store.problem_of(name, rec.previous) is None:
            rec.active, rec.previous = rec.previous, None
        rec.note("damaged at open", bad, problem)
        log.error("active version %s@%s is damaged (%s); now active: %s", name, bad, problem, rec.active)
        changed = True
    if rec.previous is not None and store.problem_of(name, rec.previous) is not None:
        rec.previous = None
        changed = True
    if changed:
        store.write_record(rec)
    store.drop_if_empty(name)
