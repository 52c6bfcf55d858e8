"""The bundle file: one uncompressed tar holding a manifest, its signature and the payload.

Layout, in this order::

    manifest.json        canonical JSON, the signed bytes
    signature.json       DSSE-style envelope (absent in an unsigned bundle)
    payload/<path>       every file the manifest lists, nothing else

Reading never trusts names inside the archive: members are checked one by one (regular files
only, no absolute or parent paths, no duplicates) and payload bytes are hashed while they are
copied, so the bytes checked are the bytes written.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import tarfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator

from edge.errors import BundleError, IntegrityError, ResourceError, SignatureError, UnsafePathError
from edge.protocol.manifest import FileEntry, Manifest, parse_manifest
from edge.protocol.signing import SigningKey, TrustStore, sign_manifest, verify_manifest

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "signature.json"
PAYLOAD_PREFIX = "payload/"
BUNDLE_SUFFIX = ".edgebundle"
# Copy in 1 MiB chunks: large enough for disk throughput, small enough to bound memory.
CHUNK = 1 << 20
# Payload file names are at most this deep: real bundles use one folder level at most.
MAX_DEPTH = 4


def sha256_file(path: Path) -> str:
    """Return the SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def check_payload_name(name: str) -> str:
    """Return a safe relative payload path or raise naming what is wrong with it."""
    if not name or "\x00" in name or "\\" in name:
        raise UnsafePathError(f"payload name {name!r} is empty or has NUL or backslash")
    if name != unicodedata.normalize("NFC", name) or any(ord(c) < 32 for c in name):
        raise UnsafePathError(f"payload name {name!r} has control or non-normalized characters")
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("/"):
        raise UnsafePathError(f"payload name {name!r} is an absolute path")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafePathError(f"payload name {name!r} has '..', '.' or an empty part")
    if len(parts) > MAX_DEPTH or len(name) > 255:
        raise UnsafePathError(f"payload name {name!r} is too deep or too long")
    return name


def _describe(member: tarfile.TarInfo) -> str:
    if member.issym() or member.islnk():
        return f"a link to {member.linkname!r}"
    if member.isdir():
        return "a directory"
    if member.ischr() or member.isblk() or member.isfifo():
        return "a device or FIFO"
    return "not a regular file"


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature and payload hashes were checked."""

    manifest: Manifest
    manifest_bytes: bytes
    key_id: str | None


class BundleReader:
    """Read a bundle file strictly. Use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._fh: BinaryIO = open(self.path, "rb")
        except FileNotFoundError:
            raise BundleError(f"bundle {self.path} not found") from None
        except OSError as exc:
            raise BundleError(f"cannot open bundle {self.path}: {exc}") from exc
        try:
            self._tar = tarfile.open(fileobj=self._fh, mode="r:")
        except (tarfile.TarError, EOFError, OSError) as exc:
            self._fh.close()
            raise BundleError(f"{self.path} is not a bundle (not an uncompressed tar): {exc}") from exc
        self._members: list[tarfile.TarInfo] | None = None
        try:
            self.manifest_bytes, self.signature_bytes = self._read_head()
            self.manifest = parse_manifest(self.manifest_bytes)
        except BaseException:
            self.close()  # a refused bundle must not leak its file handle
            raise

    def __enter__(self) -> "BundleReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying file."""
        self._tar.close()
        self._fh.close()

    def _iter_members(self) -> Iterator[tarfile.TarInfo]:
        try:
            while True:
                member = self._tar.next()
                if member is None:
                    return
                yield member
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise BundleError(f"{self.path} is truncated or corrupt: {exc}") from exc

    def members(self) -> list[tarfile.TarInfo]:
        """Return every member after checking names and types (read once, cached)."""
        if self._members is None:
            seen: set[str] = set()
            out = []
            for m in self._iter_members():
                if not m.isreg():
                    raise UnsafePathError(f"bundle member {m.name!r} is {_describe(m)}; only regular files are allowed")
                if m.name in (MANIFEST_NAME, SIGNATURE_NAME):
                    rel = m.name
                elif m.name.startswith(PAYLOAD_PREFIX):
                    rel = PAYLOAD_PREFIX + check_payload_name(m.name[len(PAYLOAD_PREFIX):])
                else:
                    check_payload_name(m.name)
                    raise UnsafePathError(f"bundle member {m.name!r} is outside payload/")
                key = rel.casefold()
                if key in seen:
                    raise UnsafePathError(f"bundle member {m.name!r} appears twice")
                seen.add(key)
                out.append(m)
            self._members = out
        return self._members

    def _read_head(self) -> tuple[bytes, bytes | None]:
        members = self.members()
        if not members or members[0].name != MANIFEST_NAME:
            raise BundleError(f"{self.path}: first member must be {MANIFEST_NAME}")
        manifest = self._read_small(members[0], 1 << 20)
        signature = None
        if len(members) > 1 and members[1].name == SIGNATURE_NAME:
            signature = self._read_small(members[1], 64 * 1024)
        elif any(m.name == SIGNATURE_NAME for m in members):
            raise BundleError(f"{self.path}: {SIGNATURE_NAME} must follow {MANIFEST_NAME}")
        return manifest, signature

    def _read_small(self, member: tarfile.TarInfo, limit: int) -> bytes:
        if member.size > limit:
            raise BundleError(f"{member.name} is {member.size} bytes, over the {limit}-byte limit")
        fh = self._extract(member)
        return fh.read()

    def _extract(self, member: tarfile.TarInfo) -> BinaryIO:
        try:
            fh = self._tar.extractfile(member)
        except (tarfile.TarError, OSError) as exc:
            raise BundleError(f"cannot read {member.name}: {exc}") from exc
        if fh is None:
            raise UnsafePathError(f"{member.name} is not a regular file")
        return fh  # type: ignore[return-value]

    def payload_members(self) -> list[tuple[tarfile.TarInfo, FileEntry]]:
        """Pair every payload member with its manifest entry; refuse extras and omissions."""
        entries = {f.path: f for f in self.manifest.files}
        pairs = []
        for m in self.members():
            if not m.name.startswith(PAYLOAD_PREFIX):
                continue
            rel = m.name[len(PAYLOAD_PREFIX):]
            entry = entries.pop(rel, None)
            if entry is None:
                raise IntegrityError(f"payload file {rel!r} is not listed in the manifest")
            if m.size != entry.size:
                raise IntegrityError(f"payload file {rel!r} is {m.size} bytes, manifest says {entry.size}")
            pairs.append((m, entry))
        if entries:
            raise IntegrityError(f"payload file(s) missing from the bundle: {', '.join(sorted(entries))}")
        return pairs

    def check_signature(self, trust: TrustStore) -> str:
        """Check the manifest signature; return the signing key id."""
        return verify_manifest(self.manifest_bytes, self.signature_bytes, trust)

    def _copy(self, member: tarfile.TarInfo, entry: FileEntry, out: BinaryIO | None) -> None:
        h = hashlib.sha256()
        remaining = entry.size
        src = self._extract(member)
        try:
            while remaining:
                chunk = src.read(min(CHUNK, remaining))
                if not chunk:
                    raise IntegrityError(f"payload file {entry.path!r} is truncated")
                h.update(chunk)
                if out is not None:
                    out.write(chunk)
                remaining -= len(chunk)
        except (tarfile.TarError, EOFError) as exc:
            raise IntegrityError(f"payload file {entry.path!r} is truncated: {exc}") from exc
        if h.hexdigest() != entry.sha256:
            raise IntegrityError(
                f"payload file {entry.path!r} does not match its SHA-256 in the manifest "
                f"(modified after signing?)"
            )

    def verify(self, trust: TrustStore | None) -> VerifiedBundle:
        """Check the signature (when ``trust`` is given) and every byte of every payload file."""
        kid = self.check_signature(trust) if trust is not None else None
        for member, entry in self.payload_members():
            self._copy(member, entry, None)
        return VerifiedBundle(self.manifest, self.manifest_bytes, kid)

    def extract(self, target: Path, trust: TrustStore | None,
                on_file: Callable[[str, int], None] | None = None) -> VerifiedBundle:
        """Verify and write the payload into the empty folder ``target``, hashing while writing.

        ``on_file(path, fd)`` runs for each file once its bytes matched their hash, on the
        descriptor that wrote them, before it is fsynced and closed (the store seals and
        fingerprints the file there). On any error the files written so far are removed;
        ``target`` itself is left empty.
        """
        kid = self.check_signature(trust) if trust is not None else None
        target = Path(target)
        target.mkdir(parents=True, exist_ok=True)
        if any(target.iterdir()):
            raise BundleError(f"extraction target {target} is not empty")
        written: list[Path] = []
        try:
            for member, entry in self.payload_members():
                dest = _safe_dest(target, entry.path)
                written.append(dest)
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "wb") as out:
                    self._copy(member, entry, out)
                    out.flush()
                    if on_file is not None:
                        on_file(entry.path, out.fileno())
                    os.fsync(out.fileno())
        except OSError as exc:
            _remove_all(target)
            if exc.errno == errno.ENOSPC:
                raise ResourceError(f"disk full while extracting to {target}", hint="free space and retry") from exc
            raise BundleError(f"cannot extract to {target}: {exc}") from exc
        except BaseException:
            _remove_all(target)
            raise
        return VerifiedBundle(self.manifest, self.manifest_bytes, kid)


def _safe_dest(root: Path, rel: str) -> Path:
    check_payload_name(rel)
    dest = root / rel
    parent = root
    for part in rel.split("/")[:-1]:
        parent = parent / part
        try:
            os.mkdir(parent, 0o755)
        except FileExistsError:
            st = os.lstat(parent)
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafePathError(f"payload path {rel!r} crosses a non-directory") from None
    return dest


def _remove_all(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0  # reproducible bytes for the same content
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def describe_payload(payload_dir: Path, roles: dict[str, str]) -> list[FileEntry]:
    """Hash every regular file under ``payload_dir`` into manifest entries."""
    entries = []
    for path in sorted(payload_dir.rglob("*")):
        if path.is_symlink():
            raise UnsafePathError(f"{path} is a symlink; bundles hold regular files only")
        if path.is_dir():
            continue
        rel = path.relative_to(payload_dir).as_posix()
        check_payload_name(rel)
        entries.append(
            FileEntry(path=rel, size=path.stat().st_size, sha256=sha256_file(path), role=roles.get(rel, "other"))
        )
    return entries


def write_bundle(out: Path, manifest: Manifest, payload_dir: Path, key: SigningKey | None) -> Path:
    """Write a bundle atomically: to a temporary file beside ``out``, fsynced, then renamed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    listed = {f.path: f for f in manifest.files}
    on_disk = {e.path for e in describe_payload(payload_dir, {})} if payload_dir.exists() else set()
    if set(listed) != on_disk:
        raise BundleError(f"payload folder does not match the manifest: {sorted(set(listed) ^ on_disk)}")
    manifest_bytes = manifest.to_bytes()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(_tarinfo(MANIFEST_NAME, len(manifest_bytes)), io.BytesIO(manifest_bytes))
                if key is not None:
                    env = sign_manifest(manifest_bytes, key)
                    tar.addfile(_tarinfo(SIGNATURE_NAME, len(env)), io.BytesIO(env))
                for entry in manifest.files:
                    src = payload_dir / entry.path
                    if src.stat().st_size != entry.size:
                        raise IntegrityError(f"{src} changed size while packing")
                    with open(src, "rb") as data:
                        tar.addfile(_tarinfo(PAYLOAD_PREFIX + entry.path, entry.size), data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise ResourceError(f"disk full while writing {out}", hint="free space or choose another -o") from exc
        raise BundleError(f"cannot write bundle {out}: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def resign_bundle(path: Path, key: SigningKey, out: Path | None = None) -> Path:
    """Replace a bundle's signature (after checking its payload hashes), atomically."""
    out = Path(out or path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with BundleReader(path) as reader:
        reader.verify(None)
        env = sign_manifest(reader.manifest_bytes, key)
        try:
            with open(tmp, "wb") as fh:
                with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    mb = reader.manifest_bytes
                    tar.addfile(_tarinfo(MANIFEST_NAME, len(mb)), io.BytesIO(mb))
                    tar.addfile(_tarinfo(SIGNATURE_NAME, len(env)), io.BytesIO(env))
                    for member, entry in reader.payload_members():
                        tar.addfile(_tarinfo(member.name, entry.size), reader._extract(member))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise ResourceError(f"disk full while writing {out}") from exc
            raise BundleError(f"cannot write bundle {out}: {exc}") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return out


def verify_bundle(path: Path, trust: TrustStore) -> VerifiedBundle:
    """Open a bundle and check its signature and every payload byte."""
    with BundleReader(path) as reader:
        return reader.verify(trust)


def is_signed(path: Path) -> bool:
    """Return whether a bundle carries a signature envelope (not whether it is valid)."""
    with BundleReader(path) as reader:
        return reader.signature_bytes is not None


__all__ = [
    "BundleReader", "VerifiedBundle", "write_bundle", "resign_bundle", "verify_bundle",
    "describe_payload", "sha256_file", "check_payload_name", "SignatureError", "BUNDLE_SUFFIX",
]  # fmt: skip
