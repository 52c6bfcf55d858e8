"""One install, step by step through the journal's state machine (edge.agent.journal).

The bundle file is opened once and every check and every byte comes from that one open file;
payload bytes are hashed while they are written into ``staging/<id>/``, so nothing can swap
the file between the check and the use (RAUC CVE-2020-25860). Each payload file is made
read-only and fingerprinted (:func:`~edge.agent.versions.file_identity`) on the descriptor
that wrote it; after the child process has loaded the model the fingerprints are compared
again (a changed file is hashed again) and recorded in ``install.json`` for every later load,
and only then is the folder renamed into ``models/``.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from edge.agent import faults
from edge.agent.compatibility import check_budgets, check_fit, check_validity
from edge.agent.files import (
    FILE_MODE, dump_json, ensure_dir, fsync_dir, remove_tree, seal_tree, tree_bytes, write_new,
)  # fmt: skip
from edge.agent.journal import InstallState, Ticket, now_iso
from edge.agent.record import read_record
from edge.agent.versions import (
    INSTALL_FILE, MANIFEST_FILE, PAYLOAD_DIR, SIGNATURE_FILE, InstalledModel, check_payload, file_identity,
    read_manifest,
)  # fmt: skip
from edge.errors import BundleError, CompatibilityError, EdgeError, ResourceError, StoreError
from edge.protocol.bundle import BundleReader
from edge.protocol.manifest import Manifest, version_key

if TYPE_CHECKING:
    from edge.agent.store import Store

log = logging.getLogger(__name__)


def install_bundle(store: "Store", bundle_path: Path, activate: bool) -> InstalledModel:
    """Run one install to its end: INSTALLED (or ACTIVE), or FAILED with the store unchanged."""
    with BundleReader(bundle_path) as reader:
        with store.locked():
            ticket = store.journal.begin(bundle_path, activate)
        faults.reach("after-journal")
        try:
            if verify(store, reader, ticket):
                stage(store, reader, ticket)
                with store.locked():
                    move_into_place(store, ticket)
                    faults.reach("after-installed")
        except BaseException as exc:
            abandon(store, ticket, exc)
            raise
    return finish(store, ticket)


def verify(store: "Store", reader: BundleReader, ticket: Ticket) -> bool:
    """RECEIVED -> VERIFIED; False when the identical version is installed (-> INSTALLED)."""
    key_id = reader.check_signature(store.trust)
    m = reader.manifest
    m.file(m.model_file)  # the model file must be a listed, hashed payload file
    check_validity(m)
    check_fit(m, store.profile, store.facts())
    with store.locked():
        twin = installed_twin(store, m, reader.manifest_bytes)
        if twin is None:
            refuse_downgrade(store, m)
            _check_budgets(store, m, ticket.id)
        store.journal.advance(ticket, InstallState.VERIFIED, name=m.name, version=m.version, key_id=key_id,
                              payload_bytes=0 if twin else m.payload_size())
        if twin is not None:
            store.journal.advance(ticket, InstallState.INSTALLED)
            return False
    faults.reach("after-verify")
    return True


def installed_twin(store: "Store", m: Manifest, manifest_bytes: bytes) -> InstalledModel | None:
    """Return the installed version with these exact manifest bytes; refuse other bytes."""
    root = store.version_dir(m.name, m.version)
    if not root.exists():
        return None
    if (root / MANIFEST_FILE).read_bytes() != manifest_bytes:
        raise StoreError(f"{m.ref} is already installed with different content",
                         hint="publish changed bytes under a new version")
    return store.read_installed(m.name, m.version)


def refuse_downgrade(store: "Store", m: Manifest) -> None:
    """Refuse a version older than the newest installed one unless the manifest allows it."""
    versions = store.versions(m.name)
    if versions and not m.allow_downgrade and version_key(m.version) < version_key(versions[-1]):
        raise CompatibilityError(
            f"{m.ref} is older than the installed {m.name}@{versions[-1]} (a replayed old bundle?)",
            hint="a deliberate downgrade needs allow_downgrade: true in the signed manifest",
        )


def _check_budgets(store: "Store", m: Manifest, install_id: str) -> None:
    others = 0  # RAM promised to the active versions of the other models
    for name in store.names():
        rec = read_record(store.models_dir / name)
        if name != m.name and rec is not None and rec.active:
            try:
                others += read_manifest(store.version_dir(name, rec.active)).min_ram_mb
            except (OSError, BundleError):
                continue
    check_budgets(
        m, store.profile, store.facts(),
        store_bytes=tree_bytes(store.models_dir) + store.journal.in_flight_bytes(exclude=install_id),
        free_disk_bytes=shutil.disk_usage(store.root).free, other_active_ram_mb=others,
    )  # fmt: skip


def stage(store: "Store", reader: BundleReader, ticket: Ticket) -> None:
    """VERIFIED -> EXTRACTED -> VALIDATED: write, hash, trial-load and seal in staging/<id>/."""
    from edge.agent.validate_child import memory_cap_mb, validate_in_child

    m = reader.manifest
    staging = store.staging_dir / ticket.id
    identities: dict[str, list[int]] = {}

    def seal(path: str, fd: int) -> None:  # on the descriptor that wrote the hashed bytes
        os.fchmod(fd, FILE_MODE)
        identities[path] = file_identity(os.fstat(fd))

    try:
        os.mkdir(staging, 0o755)
        fsync_dir(store.staging_dir)
        reader.extract(staging / PAYLOAD_DIR, None, seal)  # hashes while writing; signature checked above
        write_new(staging / MANIFEST_FILE, reader.manifest_bytes)
        if reader.signature_bytes is not None:
            write_new(staging / SIGNATURE_FILE, reader.signature_bytes)
        fsync_dir(staging)
    except OSError as exc:
        raise os_error(f"cannot write {m.ref} to {staging}", exc) from exc
    faults.reach("after-extract")
    store.journal.advance(ticket, InstallState.EXTRACTED)
    providers = store.providers()
    report = validate_in_child(staging, m, providers, store.validate_timeout_s, memory_cap_mb(m, providers))
    # Anything that replaced or wrote a payload file since it was hashed (while the child
    # loaded it, say) is caught here: the file is hashed again and refused unless it matches.
    identities = check_payload(staging / PAYLOAD_DIR, m, identities=identities)
    meta = {"key_id": ticket.entry.key_id, "installed_at": now_iso(), "bundle": Path(ticket.entry.bundle).name,
            "validation": report.to_dict(), "files": identities}
    try:
        write_new(staging / INSTALL_FILE, dump_json(meta))
        seal_tree(staging)  # files read-only, every folder fsynced
    except OSError as exc:
        raise os_error(f"cannot write {m.ref} to {staging}", exc) from exc
    store.journal.advance(ticket, InstallState.VALIDATED)
    faults.reach("after-validate")


def move_into_place(store: "Store", ticket: Ticket) -> None:
    """VALIDATED -> INSTALLED: rename staging/<id> to models/<name>/<version> (under the lock)."""
    name, version = ticket.entry.name, ticket.entry.version
    assert name is not None and version is not None
    staging, target = store.staging_dir / ticket.id, store.version_dir(name, version)
    manifest = read_manifest(staging)
    if installed_twin(store, manifest, (staging / MANIFEST_FILE).read_bytes()) is not None:
        remove_tree(staging)  # another process installed the same bytes meanwhile
    else:
        refuse_downgrade(store, manifest)  # a newer version may have arrived meanwhile
        faults.reach("before-rename")
        try:
            ensure_dir(store.models_dir / name)
            os.rename(staging, target)
            fsync_dir(store.models_dir / name)
            fsync_dir(store.staging_dir)
        except OSError as exc:
            raise os_error(f"cannot move {name}@{version} into place", exc) from exc
        faults.reach("after-rename")
    store.journal.advance(ticket, InstallState.INSTALLED)


def abandon(store: "Store", ticket: Ticket, exc: BaseException) -> None:
    """-> FAILED: remove staging and forget the install, leaving the store as it was."""
    with store.locked():
        if ticket.entry.state not in (InstallState.INSTALLED, InstallState.ACTIVE):
            remove_tree(store.staging_dir / ticket.id)
            reason = str(exc) if isinstance(exc, EdgeError) else f"{type(exc).__name__}: {exc}"
            store.journal.advance(ticket, InstallState.FAILED, reason=reason)
            log.info("install of %s failed: %s", ticket.entry.bundle, reason)
        store.journal.finish(ticket)


def finish(store: "Store", ticket: Ticket) -> InstalledModel:
    """INSTALLED -> ACTIVE when asked; forget the install."""
    name, version = ticket.entry.name, ticket.entry.version
    assert name is not None and version is not None
    with store.locked():
        try:
            if ticket.entry.activate:
                store.activate_locked(name, version, event="installed and activated")
                store.journal.advance(ticket, InstallState.ACTIVE)
        finally:
            store.journal.finish(ticket)
        return store.read_installed(name, version)


def os_error(what: str, exc: OSError) -> EdgeError:
    """Translate an OSError of the store's own file work (disk full is a ResourceError)."""
    if exc.errno == errno.ENOSPC:
        return ResourceError(f"{what}: disk full", hint="free space or remove an old version")
    return StoreError(f"{what}: {exc}")
