"""The bundle repository: verified on upload, stored by content hash, served with Range and ETag.

An upload is streamed to a private temporary file while it is hashed, verified there (signature
by a trusted key, every payload byte), then renamed to ``<root>/sha256/<ab>/<sha256>`` and made
read-only. The bytes verified are the bytes served: nothing else writes that file. A variant is
one bundle per (name, version, profile); re-uploading a variant with other bytes is refused,
since devices and rollouts refer to versions as immutable.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import select
from sqlalchemy.engine import Connection

from edge.errors import BundleError, ConflictError, NotFoundError, ResourceError
from edge.fleet.db import Clock, Database, bundles_t, now
from edge.protocol.bundle import verify_bundle
from edge.protocol.signing import TrustStore

# Larger uploads are refused while streaming: the biggest real bundles (1.5B LLMs in fp16) are ~3.5 GB.
MAX_UPLOAD_BYTES = 16 << 30
SHA_PATTERN = "^[0-9a-f]{64}$"


def _row_dict(row: Any) -> dict[str, Any]:
    return {
        "sha256": row["sha256"], "name": row["name"], "version": row["version"], "profile": row["profile"],
        "architecture": row["architecture"], "precision": row["precision"], "task": row["task"],
        "size": row["size"], "key_id": row["key_id"], "uploaded_at": row["uploaded_at"],
    }


class ArtifactStore:
    """Bundles on disk under ``root``, indexed in the database."""

    def __init__(self, db: Database, root: Path, trust: TrustStore, clock: Clock = now,
                 max_bytes: int = MAX_UPLOAD_BYTES) -> None:
        self.db, self.root, self.trust, self.clock, self.max_bytes = db, Path(root), trust, clock, max_bytes
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    def path_of(self, sha256: str) -> Path:
        """Return where the bundle with this hash is stored."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise NotFoundError(f"{sha256!r} is not a bundle hash")
        return self.root / "sha256" / sha256[:2] / sha256

    def spool_path(self) -> Path:
        """Return a fresh private temporary path for an upload (same filesystem as the store)."""
        return self.root / "tmp" / f"upload-{uuid.uuid4().hex}"

    def admit(self, tmp: Path, sha256: str, size: int) -> tuple[dict[str, Any], bool]:
        """Verify a spooled upload and store it; return (its record, whether it was new).

        ``sha256`` and ``size`` were computed while the bytes were written; the file is removed
        on failure.
        """
        try:
            if size == 0:
                raise BundleError("upload is empty", hint="send the .edgebundle file as the request body")
            return self._admit(tmp, sha256, size)
        finally:
            tmp.unlink(missing_ok=True)

    def add_stream(self, chunks: Iterable[bytes]) -> tuple[dict[str, Any], bool]:
        """Store an uploaded bundle after verifying it; return (its record, whether it was new)."""
        tmp = self.spool_path()
        h, size = hashlib.sha256(), 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise ResourceError(f"upload is over the {self.max_bytes}-byte limit")
                    h.update(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self.admit(tmp, h.hexdigest(), size)

    def add_file(self, path: Path) -> tuple[dict[str, Any], bool]:
        """Store a local bundle file (copied, then verified as an upload is)."""
        def chunks() -> Iterable[bytes]:
            with open(path, "rb") as fh:
                yield from iter(lambda: fh.read(1 << 20), b"")
        try:
            return self.add_stream(chunks())
        except FileNotFoundError:
            raise NotFoundError(f"bundle {path} not found") from None

    def _admit(self, tmp: Path, sha: str, size: int) -> tuple[dict[str, Any], bool]:
        verified = verify_bundle(tmp, self.trust)
        m = verified.manifest
        if m.expires_at and _parse_time(m.expires_at) <= self.clock():
            raise BundleError(f"bundle {m.ref} for {m.profile} expired at {m.expires_at}",
                              hint="rebuild it with a later expiry")
        with self.db.write() as conn:
            existing = conn.execute(select(bundles_t).where(bundles_t.c.sha256 == sha)).mappings().first()
            if existing is not None:
                return _row_dict(existing), False
            clash = conn.execute(select(bundles_t.c.sha256).where(
                bundles_t.c.name == m.name, bundles_t.c.version == m.version, bundles_t.c.profile == m.profile)).scalar()
            if clash is not None:
                raise ConflictError(
                    f"{m.ref} for profile {m.profile} is already stored with other bytes (sha256 {clash[:12]}...)",
                    hint="versions are immutable: bump the version and upload again")
            final = self.path_of(sha)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            os.chmod(final, 0o444)
            row = {"sha256": sha, "name": m.name, "version": m.version, "profile": m.profile,
                   "architecture": m.architecture.value, "precision": m.precision.value, "task": m.task.value,
                   "size": size, "key_id": verified.key_id or "", "manifest": verified.manifest_bytes.decode(),
                   "uploaded_at": self.clock()}
            conn.execute(bundles_t.insert().values(**row))
        return _row_dict(row), True

    def list(self, conn: Connection, name: str | None = None, version: str | None = None) -> list[dict[str, Any]]:
        """Return stored bundles, newest first, optionally of one name and version."""
        stmt = select(bundles_t)
        if name:
            stmt = stmt.where(bundles_t.c.name == name)
        if version:
            stmt = stmt.where(bundles_t.c.version == version)
        rows = conn.execute(stmt.order_by(bundles_t.c.uploaded_at.desc(), bundles_t.c.sha256)).mappings()
        return [_row_dict(r) for r in rows]

    def get(self, conn: Connection, sha256: str) -> dict[str, Any]:
        """Return one bundle's record, or raise NotFoundError."""
        row = conn.execute(select(bundles_t).where(bundles_t.c.sha256 == sha256)).mappings().first()
        if row is None:
            raise NotFoundError(f"no bundle with sha256 {sha256}", hint="list bundles with `edge fleet bundles`")
        return _row_dict(row)

    def manifest_bytes(self, conn: Connection, sha256: str) -> bytes:
        """Return the exact signed manifest bytes of one bundle."""
        m = conn.execute(select(bundles_t.c.manifest).where(bundles_t.c.sha256 == sha256)).scalar()
        if m is None:
            raise NotFoundError(f"no bundle with sha256 {sha256}")
        return m.encode()

    def variants(self, conn: Connection, name: str, version: str) -> dict[str, dict[str, Any]]:
        """Return the bundles of ``name@version`` by profile."""
        return {b["profile"]: b for b in self.list(conn, name, version)}


def _parse_time(text: str) -> float:
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BundleError(f"invalid time {text!r} in manifest") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def file_response(store: ArtifactStore, sha256: str, if_none_match: str | None) -> Any:
    """Return the HTTP response serving one bundle: Range (206/416) and If-Range by Starlette,
    a strong ETag (the content hash) and 304 on If-None-Match."""
    from starlette.responses import FileResponse, Response

    path = store.path_of(sha256)
    if not path.is_file():
        raise NotFoundError(f"no bundle with sha256 {sha256}")
    etag = f'"{sha256}"'
    headers = {"etag": etag, "cache-control": "private, max-age=31536000, immutable"}
    if if_none_match and (if_none_match.strip() == "*" or etag in [t.strip() for t in if_none_match.split(",")]):
        return Response(status_code=304, headers=headers)
    return FileResponse(path, headers=headers, media_type="application/x-tar",
                        filename=f"{sha256[:16]}.edgebundle", stat_result=path.stat())
