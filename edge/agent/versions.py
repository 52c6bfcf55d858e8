"""An installed version on disk: its folder layout, how it is read back, and how it is checked.

::

    models/<name>/<version>/
        manifest.json    the signed manifest bytes, exactly as in the bundle
        signature.json   the signature envelope
        install.json     key id, install time, the child process's validation report
        payload/         the payload files, read-only

Checks are cheap by default (every file a regular file of the manifest's size, nothing extra);
``full`` adds the SHA-256 of every file.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.agent.files import read_json
from edge.errors import BundleError, IntegrityError, NotFoundError, StoreError
from edge.protocol.bundle import CHUNK
from edge.protocol.manifest import Manifest, parse_manifest

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "signature.json"
INSTALL_FILE = "install.json"
PAYLOAD_DIR = "payload"


@dataclass(frozen=True)
class InstalledModel:
    """One installed version: its payload folder (what the runtime loads) and its manifest."""

    name: str
    version: str
    folder: Path  # models/<name>/<version>/payload
    manifest: Manifest
    key_id: str | None
    installed_at: str = ""

    @property
    def ref(self) -> str:
        """Return ``name@version``."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class VersionStatus:
    """One installed version as `edge models list` shows it."""

    name: str
    version: str
    active: bool
    previous: bool
    task: str | None
    precision: str | None
    payload_bytes: int
    key_id: str | None
    installed_at: str | None
    healthy: bool  # passed a health check on this device
    failed: str | None  # why it failed a health check, if it did
    problem: str | None  # why the check at open refuses it, if it does

    def to_dict(self) -> dict[str, Any]:
        """Return the status as JSON-able data."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class ModelStatus:
    """One model name: its versions (oldest first) and which one serves."""

    name: str
    active: str | None
    previous: str | None
    versions: tuple[VersionStatus, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return the status as JSON-able data."""
        return {"name": self.name, "active": self.active, "previous": self.previous,
                "versions": [v.to_dict() for v in self.versions]}


def read_manifest(root: Path) -> Manifest:
    """Parse the manifest kept in a version (or staging) folder."""
    return parse_manifest((root / MANIFEST_FILE).read_bytes())


def read_version(root: Path, name: str, version: str, *, full: bool = False, recheck: bool = False) -> InstalledModel:
    """Read and check the version folder ``root``; raise IntegrityError when it is damaged.

    ``recheck`` hashes again every payload file whose identity differs from the one recorded
    at install (see :func:`file_identity`).
    """
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        raise NotFoundError(f"{name}@{version} is not installed") from None
    if not stat.S_ISDIR(st.st_mode):
        raise IntegrityError(f"{name}@{version}: {root} is not a directory")
    try:
        manifest = read_manifest(root)
        meta = read_json(root / INSTALL_FILE)
    except (OSError, BundleError, StoreError) as exc:
        raise IntegrityError(f"{name}@{version}: manifest or install record unreadable: {exc}") from exc
    if (manifest.name, manifest.version) != (name, version):
        raise IntegrityError(f"{name}@{version}: its folder holds {manifest.ref}")
    recorded = meta.get("files") if recheck and isinstance(meta, dict) else None
    check_payload(root / PAYLOAD_DIR, manifest, full=full,
                  identities=recorded if isinstance(recorded, dict) else None)
    return InstalledModel(name, version, root / PAYLOAD_DIR, manifest, meta.get("key_id"),
                          str(meta.get("installed_at", "")))


def file_identity(st: os.stat_result) -> list[int]:
    """Return what changes whenever a file's bytes or the file itself change: inode, size, mtime
    and ctime (a write, a replacement or a chmod each change one; user code cannot set ctime)."""
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def check_payload(payload: Path, manifest: Manifest, *, full: bool = False,
                  identities: dict[str, Any] | None = None) -> dict[str, list[int]]:
    """Compare a payload folder with its manifest: regular files only, sizes, hashes if ``full``.

    With ``identities`` (path -> :func:`file_identity` recorded when the file was verified),
    a file whose identity differs is hashed again. Return the identity of every file checked.
    """
    expected = {f.path: f for f in manifest.files}
    seen: dict[str, list[int]] = {}
    for dirpath, dirnames, filenames in os.walk(payload):
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            st = os.lstat(path)
            rel = path.relative_to(payload).as_posix()
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise IntegrityError(f"{manifest.ref}: payload {rel!r} is not a regular file")
            entry = expected.get(rel)
            if entry is None:
                raise IntegrityError(f"{manifest.ref}: payload holds {rel!r}, which its manifest does not list")
            if st.st_size != entry.size:
                raise IntegrityError(f"{manifest.ref}: payload {rel!r} is {st.st_size} bytes, manifest says {entry.size}")
            changed = identities is not None and identities.get(rel) != file_identity(st)
            if full or changed:
                _rehash(path, st, entry.sha256, f"{manifest.ref}: payload {rel!r}",
                        " (it changed after it was verified)" if changed else "")
            seen[rel] = file_identity(st)
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise IntegrityError(f"{manifest.ref}: payload file(s) missing: {', '.join(missing)}")
    return seen


def _rehash(path: Path, st: os.stat_result, sha256: str, what: str, why: str) -> None:
    """Hash the file ``st`` describes; the descriptor must show that same, unchanging file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise IntegrityError(f"{what} cannot be read: {exc}") from exc
    with os.fdopen(fd, "rb") as fh:
        before = file_identity(os.fstat(fd))
        h = hashlib.sha256()
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
        after = file_identity(os.fstat(fd))
    if before != file_identity(st) or after != before:
        raise IntegrityError(f"{what} changed while it was being checked")
    if h.hexdigest() != sha256:
        raise IntegrityError(f"{what} does not match its SHA-256{why}")


def version_status(root: Path, name: str, version: str, **flags: Any) -> VersionStatus:
    """Describe one version folder for listings, damaged or not."""
    problem = None
    try:
        read_version(root, name, version)
    except (IntegrityError, NotFoundError) as exc:
        problem = str(exc)
    manifest: Manifest | None = None
    meta: dict[str, Any] = {}
    try:
        manifest = read_manifest(root)
        meta = read_json(root / INSTALL_FILE)
    except (OSError, BundleError, StoreError):
        pass
    return VersionStatus(
        name=name, version=version, task=manifest.task.value if manifest else None,
        precision=manifest.precision.value if manifest else None,
        payload_bytes=manifest.payload_size() if manifest else 0, key_id=meta.get("key_id"),
        installed_at=meta.get("installed_at"), problem=problem, **flags,
    )  # fmt: skip
