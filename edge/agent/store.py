"""The device's offline model store: verified installs, atomic activation, instant rollback.

Layout under the data folder (an SD card mounted on a laptop, or the device's own disk)::

    device.json                   the profile this store belongs to (written at first open)
    store.lock                    flock: one store operation at a time, across processes
    journal/<id>.json, <id>.lock  installs in flight (edge.agent.journal)
    staging/<id>/                 an install being written (same layout as a version folder)
    trash/<id>/                   a removed version being deleted
    models/<name>/state.json      active and previous version, health (edge.agent.record)
    models/<name>/<version>/      manifest.json, signature.json, install.json, payload/
                                  (edge.agent.versions)

Install: the bundle is opened once; its signature, expiry, profile, architecture, providers
and budgets are checked; the payload is hashed while it is written into ``staging/<id>/``, so
the bytes checked are the bytes on disk and nothing can swap them in between; a child process
loads the model and runs it once; the folder is made read-only and renamed into ``models/``
(the commit point); activation is one atomic rewrite of ``state.json``. Every step is written
to the journal first, and the next :class:`Store` opened on the folder undoes an install that
died before its trial load passed and finishes one that died after it (edge.agent.recovery).

Checks at open and on every read are cheap (file types and sizes, nothing extra, manifests
parse); payload hashes are computed once, at install, from the bytes written. Re-hashing a
1 GB model at every boot would cost seconds on an SD card, while the files are read-only and
written by nobody else; :meth:`Store.verify` (``edge models verify``) re-hashes on demand.
Install also records each payload file's identity (inode, size, mtime, ctime, taken from the
descriptor that wrote and hashed it): before the commit and before every load, a file whose
identity changed (replaced, written, or its mode changed: the kernel updates ctime, nobody
can set it back) is hashed again, so what is loaded is what was hashed.

Health: :meth:`Store.begin_load` counts loads of a version no health check has confirmed yet
and rolls back after :data:`MAX_LOAD_ATTEMPTS`; :meth:`Store.mark_unhealthy` rolls back at
once. A version that failed is never chosen automatically again, so a device never loops.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edge.agent import faults
from edge.agent.compatibility import DeviceFacts
from edge.agent.device import bind_profile, stored_profile_name
from edge.agent.files import ensure_dir, fsync_dir, remove_tree
from edge.agent.install import install_bundle, os_error
from edge.agent.journal import Journal
from edge.agent.record import ModelRecord, read_record, write_record
from edge.agent.recovery import recover
from edge.agent.versions import InstalledModel, ModelStatus, read_version, version_status
from edge.errors import EdgeError, IntegrityError, NotFoundError, SignatureError, StoreError
from edge.protocol.manifest import NAME_PATTERN, VERSION_PATTERN, version_key
from edge.protocol.profile import DeviceProfile
from edge.protocol.signing import TrustStore

log = logging.getLogger(__name__)

LOCK_FILE = "store.lock"
# Seconds the child process may take to load a model and run it once: a 1.5B-parameter LLM
# loads in ~20 s on a Jetson Orin; a model still loading after 5 minutes is refused.
VALIDATE_TIMEOUT_S = 300.0
# Loads of an unconfirmed active version before it is rolled back: one failure may be
# transient (memory pressure at boot), three in a row mean the version is bad, and the cap
# stops a model that crashes the agent from looping the device forever.
MAX_LOAD_ATTEMPTS = 3

__all__ = ["Store", "InstalledModel", "ModelStatus", "stored_profile_name", "MAX_LOAD_ATTEMPTS", "VALIDATE_TIMEOUT_S"]


class Store:
    """A model store in a data folder; safe to share between threads and processes."""

    def __init__(
        self,
        data_dir: Path,
        profile: DeviceProfile,
        trust: TrustStore,
        *,
        device: DeviceFacts | None = None,
        validate_timeout_s: float = VALIDATE_TIMEOUT_S,
    ) -> None:
        faults.check_setting()
        self.root = Path(data_dir).absolute()
        self.profile = profile
        self.trust = trust
        self.validate_timeout_s = validate_timeout_s
        self._device = device
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.models_dir = ensure_dir(self.root / "models")
            self.staging_dir = ensure_dir(self.root / "staging")
            self.trash_dir = ensure_dir(self.root / "trash")
            self.journal = Journal(ensure_dir(self.root / "journal"))
            self._lock_fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot open the model store {self.root}: {exc}") from exc
        self._thread_lock = threading.RLock()
        self._depth = 0
        try:
            with self.locked():
                bind_profile(self.root, profile)
                recover(self)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the lock file; the store must not be used afterwards."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ shared with install and recovery
    # The server uses the methods from "install" on; these are the building blocks that
    # edge.agent.install and edge.agent.recovery share with them.
    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store lock (re-entrant in a thread; exclusive across threads and processes)."""
        with self._thread_lock:
            if self._depth == 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def model_dir(self, name: str) -> Path:
        """Return ``models/<name>``."""
        return self.models_dir / name

    def version_dir(self, name: str, version: str) -> Path:
        """Return ``models/<name>/<version>``."""
        return self.models_dir / name / version

    def names(self) -> list[str]:
        """Return the installed model names, sorted."""
        return sorted(p.name for p in self.models_dir.iterdir() if p.is_dir() and re.match(NAME_PATTERN, p.name))

    def versions(self, name: str) -> list[str]:
        """Return the installed versions of a model, oldest first."""
        folder = self.model_dir(name)
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if p.is_dir() and re.match(VERSION_PATTERN, p.name)]
        return sorted(found, key=version_key)

    def read_installed(self, name: str, version: str, *, full: bool = False, recheck: bool = False) -> InstalledModel:
        """Read one version after checking its files (sizes; hashes too when ``full``, or with
        ``recheck`` of the files changed since install)."""
        try:
            return read_version(self.version_dir(name, version), name, version, full=full, recheck=recheck)
        except NotFoundError:
            known = ", ".join(self.versions(name)) or "none"
            raise NotFoundError(f"{name}@{version} is not installed", hint=f"installed versions: {known}") from None

    def problem_of(self, name: str, version: str) -> str | None:
        """Return why a version fails its check, or None when it is sound."""
        try:
            self.read_installed(name, version)
        except EdgeError as exc:
            return str(exc)
        return None

    def facts(self) -> DeviceFacts:
        """Return what the target device offers (read once, lazily: it imports onnxruntime)."""
        if self._device is None:
            self._device = DeviceFacts.for_profile(self.profile)
        return self._device

    def providers(self) -> list[tuple[str, dict[str, str]]]:
        """Return the execution providers a trial load uses."""
        if not self.facts().local:  # flashing for another device: validate on this CPU
            return [("CPUExecutionProvider", {})]
        from edge.runtime.session import usable_providers

        return usable_providers(self.profile)

    # ------------------------------------------------------------------ install
    def install(self, bundle_path: Path, activate: bool = True) -> InstalledModel:
        """Verify, extract, trial-load and commit a bundle; activate it unless told not to.

        Refusals: SignatureError (untrusted, revoked, tampered manifest, expired),
        IntegrityError (payload bytes), CompatibilityError (profile, architecture, providers,
        downgrade), ResourceError (RAM, disk), ModelValidationError (the trial load failed),
        StoreError (same version, other bytes). A refused install leaves the store unchanged.
        """
        return install_bundle(self, Path(bundle_path), activate)

    # ------------------------------------------------------------------ activation
    def activate(self, name: str, version: str, *, force: bool = False) -> InstalledModel:
        """Make ``version`` active; the active one becomes the rollback target.

        A version that failed a health check needs ``force`` (which clears its failure).
        """
        with self.locked():
            return self.activate_locked(name, version, force=force)

    def activate_locked(self, name: str, version: str, *, force: bool = False,
                        event: str = "activated") -> InstalledModel:
        """Activate under the already-held lock (see :meth:`activate`)."""
        inst = self.read_installed(name, version)
        self._refuse_revoked(inst)
        rec = read_record(self.model_dir(name)) or ModelRecord(name)
        if version in rec.failed and not force:
            raise StoreError(f"{inst.ref} failed before: {rec.failed[version]}",
                             hint="activate it with --force to try it again")
        if rec.active == version and not force:
            return inst
        rec.failed.pop(version, None)
        rec.attempts.pop(version, None)
        if rec.active not in (None, version):
            rec.previous = rec.active
        rec.active = version
        rec.note(event, version)
        self.write_record(rec)
        return inst

    def rollback(self, name: str) -> InstalledModel:
        """Switch back to the previous version; the active one becomes the previous."""
        with self.locked():
            rec = self._record(name)
            if rec.previous is None:
                raise StoreError(f"model {name} has no previous version to roll back to",
                                 hint="activate a version with `edge models activate NAME@VERSION`")
            if rec.previous in rec.failed:
                raise StoreError(f"{name}@{rec.previous} failed before: {rec.failed[rec.previous]}",
                                 hint=f"activate it with `edge models activate {name}@{rec.previous} --force`")
            inst = self.read_installed(name, rec.previous)
            self._refuse_revoked(inst)
            rec.active, rec.previous = rec.previous, rec.active
            rec.note("rolled back", rec.active)
            self.write_record(rec)
            return inst

    def _refuse_revoked(self, inst: InstalledModel) -> None:
        if inst.key_id is not None and inst.key_id in self.trust.revoked:
            raise SignatureError(f"{inst.ref} is signed by revoked key {inst.key_id}",
                                 hint="install a version signed by a current key")

    def _record(self, name: str) -> ModelRecord:
        rec = read_record(self.model_dir(name))
        if rec is not None:
            return rec
        if self.versions(name):
            return ModelRecord(name)
        known = ", ".join(self.names()) or "none"
        raise NotFoundError(f"model {name!r} is not installed", hint=f"installed models: {known}")

    def write_record(self, rec: ModelRecord) -> None:
        """Replace a model's state.json atomically (with the fault points around it)."""
        faults.reach("before-state-write")
        write_record(self.model_dir(rec.name), rec, lambda: faults.reach("mid-state-write"))
        faults.reach("after-state-write")

    # ------------------------------------------------------------------ removal
    def remove(self, name: str, version: str) -> None:
        """Delete an installed version; the active one is refused."""
        with self.locked():
            rec = self._record(name)
            if rec.active == version:
                raise StoreError(f"{name}@{version} is the active version",
                                 hint="activate another version or roll back first")
            target = self.version_dir(name, version)
            if not os.path.lexists(target):
                known = ", ".join(self.versions(name)) or "none"
                raise NotFoundError(f"{name}@{version} is not installed", hint=f"installed versions: {known}")
            rec.forget(version)
            rec.note("removed", version)
            self.write_record(rec)
            faults.reach("before-trash")
            trash = self.trash_dir / uuid.uuid4().hex[:16]
            try:
                os.rename(target, trash)  # one atomic step: the version is whole or gone
                fsync_dir(self.model_dir(name))
                fsync_dir(self.trash_dir)
                faults.reach("after-trash")
                remove_tree(trash)
            except OSError as exc:
                raise os_error(f"cannot remove {name}@{version}", exc) from exc
            self.drop_if_empty(name)

    def uninstall(self, name: str) -> list[str]:
        """Stop serving ``name`` and delete every installed version; return the versions deleted.

        The record is rewritten without an active version first (the commit point: from then
        on nothing serves the model, even after a crash), then each version goes as in
        :meth:`remove`. Running it again finishes an interrupted one; nothing installed is a no-op.
        """
        if not re.match(NAME_PATTERN, name):
            raise NotFoundError(f"invalid model name {name!r}")
        with self.locked():
            versions = self.versions(name)
            rec = read_record(self.model_dir(name))
            if rec is not None and rec.active is not None:
                rec.note("deactivated", rec.active)
                rec.active = None
                self.write_record(rec)
            for version in versions:
                self.remove(name, version)
            if os.path.lexists(self.model_dir(name)):
                self.drop_if_empty(name)
            return versions

    def drop_if_empty(self, name: str) -> None:
        """Delete a model's folder once it holds no version and no active pointer."""
        rec = read_record(self.model_dir(name))
        if not self.versions(name) and (rec is None or rec.active is None):
            remove_tree(self.model_dir(name))
            fsync_dir(self.models_dir)

    # ------------------------------------------------------------------ health
    def begin_load(self, name: str) -> InstalledModel | None:
        """Return the version of ``name`` to load now (None: nothing sound to load).

        Call it before loading, and :meth:`mark_healthy` once the model answers. Each call for
        a version not yet confirmed counts one attempt, persisted before the load, so loads that
        crash the agent are counted too; past :data:`MAX_LOAD_ATTEMPTS` the version is marked
        failed and the previous one is tried instead. A version whose files changed since
        install, or signed by a key revoked since, is marked failed the same way.
        """
        with self.locked():
            rec = self._record(name)
            active = rec.active
            if active is None or active in rec.failed:
                return None
            try:
                # What is loaded next must be what was hashed at install: a file replaced or
                # written since then is hashed again here (the others cost one lstat).
                inst = self.read_installed(name, active, recheck=True)
            except (IntegrityError, NotFoundError) as exc:
                self._auto_rollback(rec, f"damaged: {exc}")
                return self.begin_load(name)
            if inst.key_id is not None and inst.key_id in self.trust.revoked:
                self._auto_rollback(rec, f"signed by revoked key {inst.key_id}")
                return self.begin_load(name)
            if active not in rec.healthy:
                if rec.attempts.get(active, 0) >= MAX_LOAD_ATTEMPTS:
                    self._auto_rollback(rec, f"not confirmed healthy after {MAX_LOAD_ATTEMPTS} loads")
                    return self.begin_load(name)  # ends: each turn marks one more version failed
                rec.attempts[active] = rec.attempts.get(active, 0) + 1
                self.write_record(rec)
            return inst

    def mark_healthy(self, name: str, version: str) -> None:
        """Record that ``version`` loaded and answered: a trusted rollback target from now on."""
        with self.locked():
            rec = self._record(name)
            if version in rec.healthy and version not in rec.attempts:
                return
            rec.healthy = sorted({*rec.healthy, version}, key=version_key)
            rec.attempts.pop(version, None)
            rec.note("healthy", version)
            self.write_record(rec)

    def mark_unhealthy(self, name: str, version: str, reason: str) -> InstalledModel | None:
        """Record a failed health check; roll the active version back to a sound previous one.

        Return the version now active after the rollback, or None when none happened (not the
        active version, no previous, or the previous failed too).
        """
        with self.locked():
            rec = self._record(name)
            if rec.active != version:
                rec.failed[version] = reason
                rec.healthy = [v for v in rec.healthy if v != version]
                rec.note("unhealthy", version, reason)
                self.write_record(rec)
                return None
            return self._auto_rollback(rec, reason)

    def _auto_rollback(self, rec: ModelRecord, reason: str) -> InstalledModel | None:
        bad = rec.active
        assert bad is not None
        rec.failed[bad] = reason
        rec.healthy = [v for v in rec.healthy if v != bad]
        rec.attempts.pop(bad, None)
        rec.note("unhealthy", bad, reason)
        target, inst = rec.previous, None
        if target is not None and target not in rec.failed:
            try:
                inst = self.read_installed(rec.name, target)
                self._refuse_revoked(inst)
            except EdgeError as exc:
                log.error("cannot roll %s back to %s: %s", rec.name, target, exc)
                inst = None
        if inst is None:
            log.error("%s@%s is unhealthy (%s); no sound version to roll back to", rec.name, bad, reason)
        else:
            rec.active, rec.previous = target, bad
            rec.note("automatic rollback", target, f"{bad}: {reason}")
            log.warning("%s@%s is unhealthy (%s): rolled back to %s", rec.name, bad, reason, target)
        self.write_record(rec)
        return inst

    # ------------------------------------------------------------------ queries
    def active(self) -> list[InstalledModel]:
        """Return the active version of every model (one per name), checked cheaply."""
        with self.locked():
            out = []
            for name in self.names():
                rec = read_record(self.model_dir(name))
                if rec is None or rec.active is None:
                    continue
                try:
                    out.append(self.read_installed(name, rec.active))
                except EdgeError as exc:  # damaged since open: never serve it
                    log.error("active version %s@%s is damaged: %s", name, rec.active, exc)
            return out

    def get(self, name: str, version: str | None = None) -> InstalledModel:
        """Return one installed version (the active one when ``version`` is None)."""
        with self.locked():
            if version is None:
                rec = self._record(name)
                if rec.active is None:
                    raise NotFoundError(f"model {name!r} has no active version", hint="activate one first")
                version = rec.active
            return self.read_installed(name, version)

    def list(self) -> list[ModelStatus]:
        """Return every model with its versions (oldest first), active and previous."""
        with self.locked():
            out = []
            for name in self.names():
                rec = read_record(self.model_dir(name)) or ModelRecord(name)
                rows = tuple(
                    version_status(self.version_dir(name, v), name, v, active=rec.active == v,
                                   previous=rec.previous == v, healthy=v in rec.healthy, failed=rec.failed.get(v))
                    for v in self.versions(name)
                )
                out.append(ModelStatus(name, rec.active, rec.previous, rows))
            return out

    def verify(self, name: str, version: str | None = None) -> InstalledModel:
        """Re-hash every payload file of one version (the active one by default)."""
        with self.locked():
            return self.read_installed(name, self.get(name, version).version, full=True)
