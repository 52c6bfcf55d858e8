"""The cases of the bad-bundle matrix (tests/hardening/test_bad_bundles.py): how each hostile
bundle is built, and how the store must refuse it.

A case builds its bundle from a :class:`Ctx` (the sandbox, the keys, the parts of a sound
tiny@2.0.0) with the tar writers of :mod:`tests.fixtures.hostile_bundles`, and names the exact
error class and a regular expression its message must contain.
"""

from __future__ import annotations

import json
import os
import platform
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edge.errors import (
    BundleError, CompatibilityError, DownloadError, EdgeError, IntegrityError, ModelValidationError, ResourceError,
    SignatureError, StoreError, UnsafePathError,
)  # fmt: skip
from edge.protocol.signing import SigningKey, TrustStore, sign_manifest
from tests.fixtures.bundles import external_data_model_bytes, garbage_model_bytes, tamper_payload
from tests.fixtures.hostile_bundles import (
    HostileServer, Member, bundle_parts, canonical, sha256_of_zeros, signed_members, with_files, write_members,
    write_sparse_tail,
)  # fmt: skip

# A payload over 2 GiB, so a length or offset kept in 32 bits would wrap (RAUC CVE-2026-34155).
OVER_2_GIB = (2 << 30) + 4096


def _other_arch() -> str:
    return "aarch64" if platform.machine() in ("x86_64", "AMD64") else "x86_64"


@dataclass(frozen=True)
class Keys:
    """The trusted key, a key that is trusted but revoked, and a key nobody trusts."""

    trusted: SigningKey
    trusted_pub: Path
    revoked: SigningKey
    revoked_pub: Path
    other: SigningKey

    def trust(self) -> TrustStore:
        """Return the store's trust: both public keys configured, the revoked one revoked."""
        return TrustStore.from_files([self.trusted_pub, self.revoked_pub], frozenset({self.revoked.id}))



@dataclass
class Ctx:
    """What a case builds with: the sandbox, keys, and the parts of the sound tiny@2.0.0."""

    sandbox: Path
    keys: Keys
    good: Path
    server: HostileServer
    doc: dict[str, Any] = field(init=False)
    files: dict[str, bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.doc, self.files = bundle_parts(self.good)

    @property
    def data(self) -> Path:
        return self.sandbox / "data"

    @property
    def bundles(self) -> Path:
        return self.sandbox / "bundles"

    def write(self, members: list[Member], **kw: Any) -> Path:
        """Write a hostile bundle into bundles/."""
        return write_members(self.bundles / "hostile.edgebundle", members, **kw)

    def signed(self, *, doc: dict[str, Any] | None = None, files: dict[str, bytes] | None = None,
               key: SigningKey | None | str = "trusted", extra: tuple[Member, ...] = (), **changes: Any) -> Path:
        """Write a bundle whose manifest (``doc`` plus ``changes``) is validly signed by ``key``."""
        signer = getattr(self.keys, key) if isinstance(key, str) else key
        return self.write([*signed_members({**(doc or self.doc), **changes}, files or self.files, signer), *extra])



@dataclass(frozen=True)
class Case:
    """One hostile input: how to build it, and how it must be refused."""

    build: Callable[[Ctx], Path]
    error: type[EdgeError]
    reason: str  # a regular expression the error message must contain
    targets: tuple[str, ...] = ()  # sandbox names a hostile member aims at: they must never appear
    env: dict[str, str] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)  # overrides of the device profile
    download: str | None = None  # "short", "endless" or "wrong": fetched over HTTP first


def _envelope(manifest: bytes, *keys: SigningKey, keyid: str | None = None) -> bytes:
    """Return an envelope with one genuine signature of ``manifest`` per key (the first relabelled)."""
    signatures = [json.loads(sign_manifest(manifest, key))["signatures"][0] for key in keys]
    if keyid is not None:
        signatures[0]["keyid"] = keyid
    return json.dumps({**json.loads(sign_manifest(manifest, keys[0])), "signatures": signatures}).encode()


def _enveloped(ctx: Ctx, manifest: bytes, envelope: bytes) -> Path:
    return ctx.write([Member("manifest.json", manifest), Member("signature.json", envelope),
                      *[Member(f"payload/{p}", d) for p, d in ctx.files.items()]])


def _edited_after_signing(ctx: Ctx) -> Path:
    signed = canonical(ctx.doc)
    return _enveloped(ctx, canonical({**ctx.doc, "min_ram_mb": 1}), _envelope(signed, ctx.keys.trusted))


def _signature_over_other_bytes(ctx: Ctx) -> Path:
    other = canonical({**ctx.doc, "version": "2.0.1"})  # a genuine signature, of another manifest
    return _enveloped(ctx, canonical(ctx.doc), _envelope(other, ctx.keys.trusted))


def _unknown_key_id(ctx: Ctx) -> Path:
    manifest = canonical(ctx.doc)
    return _enveloped(ctx, manifest, _envelope(manifest, ctx.keys.trusted, keyid="0123456789abcdef"))


def _revoked_cosigner(ctx: Ctx, first: str = "revoked", second: str = "trusted") -> Path:
    manifest = canonical(ctx.doc)
    return _enveloped(ctx, manifest, _envelope(manifest, getattr(ctx.keys, first), getattr(ctx.keys, second)))


def _unknown_cosigner(ctx: Ctx) -> Path:
    manifest = canonical(ctx.doc)
    return _enveloped(ctx, manifest, _envelope(manifest, ctx.keys.other, ctx.keys.trusted))


def _not_a_tar(ctx: Ctx) -> Path:
    path = ctx.bundles / "hostile.edgebundle"
    path.write_bytes(os.urandom(4096))
    return path


def _members(ctx: Ctx) -> list[Member]:
    return signed_members(ctx.doc, ctx.files, ctx.keys.trusted)


def _swap(members: list[Member], name: str, data: bytes) -> list[Member]:
    return [Member(m.name, data) if m.name == name else m for m in members]


def _truncated(ctx: Ctx) -> Path:
    path = ctx.write(_members(ctx))
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.index(ctx.files["model.onnx"]) + 100])  # cut inside the model's bytes
    return path


def _external(location: Callable[[Ctx], str]) -> Callable[[Ctx], Path]:
    def build(ctx: Ctx) -> Path:
        return ctx.signed(files={"model.onnx": external_data_model_bytes(location(ctx))})
    return build


def _sparse(ctx: Ctx, name: str, size: int, tail: bytes, sha256: str) -> Path:
    """A signed bundle whose extra file ``name`` is ``size`` zeros (on disk: a hole) ending in ``tail``."""
    doc = with_files(ctx.doc, ctx.files)
    entry = {"path": name, "size": size, "sha256": sha256, "role": "other"}
    doc = {**doc, "files": [*doc["files"], entry]}
    members = signed_members(doc, ctx.files, ctx.keys.trusted, describe=False)
    return write_sparse_tail(ctx.bundles / "hostile.edgebundle", members, f"payload/{name}", size, tail)


def _gzip(ctx: Ctx) -> Path:
    import gzip

    path = ctx.write(_members(ctx))
    path.write_bytes(gzip.compress(path.read_bytes()))
    return path


def _download_source(ctx: Ctx) -> Path:
    return ctx.good


CASES: dict[str, Case] = {
    # --- signatures and keys
    "unsigned": Case(lambda c: c.signed(key=None), SignatureError, r"bundle is not signed"),
    "signed by an untrusted key": Case(lambda c: c.signed(key="other"), SignatureError,
                                       r"signed by untrusted key\(s\) [0-9a-f]{16}"),
    "signed by a revoked key": Case(lambda c: c.signed(key="revoked"), SignatureError,
                                    r"signed by revoked key [0-9a-f]{16}"),
    "revoked key before a trusted signature": Case(_revoked_cosigner, SignatureError, r"signed by revoked key"),
    "revoked key after a trusted signature": Case(lambda c: _revoked_cosigner(c, "trusted", "revoked"),
                                                  SignatureError, r"signed by revoked key"),
    "unknown key id in the envelope": Case(_unknown_key_id, SignatureError, r"untrusted key\(s\) 0123456789abcdef"),
    "signature over other bytes": Case(_signature_over_other_bytes, SignatureError, r"does not match the manifest"),
    "manifest edited after signing": Case(_edited_after_signing, SignatureError, r"does not match the manifest"),
    "malformed signature envelope": Case(
        lambda c: c.write(_swap(_members(c), "signature.json", b"{not json")), SignatureError, r"not valid JSON"),
    "signature expired": Case(lambda c: c.signed(expires_at="2020-01-01T00:00:00Z"), SignatureError,
                              r"signature expired at 2020-01-01"),
    "expiry that is no time": Case(lambda c: c.signed(expires_at="next tuesday"), SignatureError,
                                   r"expires_at 'next tuesday' is not an ISO 8601 time"),
    # --- archive structure
    "not a tar": Case(_not_a_tar, BundleError, r"is not a bundle"),
    "compressed tar": Case(_gzip, BundleError, r"not an uncompressed tar"),
    "truncated bundle file": Case(_truncated, BundleError, r"is truncated or corrupt"),
    "manifest missing": Case(lambda c: c.write(_members(c)[1:]), BundleError, r"first member must be manifest\.json"),
    "signature before manifest": Case(lambda c: c.write([_members(c)[1], _members(c)[0], *_members(c)[2:]]),
                                      BundleError, r"first member must be manifest\.json"),
    "manifest duplicated": Case(lambda c: c.write([*_members(c), _members(c)[0]]), UnsafePathError,
                                r"'manifest\.json' appears twice"),
    "signature duplicated": Case(lambda c: c.write([*_members(c), _members(c)[1]]), UnsafePathError,
                                 r"'signature\.json' appears twice"),
    "manifest over the size limit": Case(
        lambda c: c.write(_swap(_members(c), "manifest.json", b" " * ((1 << 20) + 1))), BundleError,
        r"manifest\.json is 1048577 bytes, over the 1048576-byte limit"),
    "manifest is not JSON": Case(lambda c: c.write([Member("manifest.json", b"\xff\xfe"), *_members(c)[1:]]),
                                 BundleError, r"manifest is not valid JSON"),
    "manifest with an unknown field": Case(lambda c: c.signed(run_as_root=True), BundleError,
                                           r"run_as_root: Extra inputs are not permitted"),
    "manifest of another schema version": Case(lambda c: c.signed(schema_version=2), BundleError,
                                               r"schema_version: Input should be 1"),
    "model file not listed": Case(lambda c: c.signed(model_file="other.onnx"), BundleError,
                                  r"lists no payload file 'other\.onnx'"),
    # --- payload bytes
    "payload swapped after signing": Case(
        lambda c: tamper_payload(c.signed(), c.bundles / "tampered.edgebundle"), IntegrityError,
        r"'model\.onnx' does not match its SHA-256 in the manifest"),
    "payload file listed but missing": Case(
        lambda c: c.write([m for m in _members(c) if m.name != "payload/model.onnx"]), IntegrityError,
        r"missing from the bundle: model\.onnx"),
    "extra unlisted payload file": Case(lambda c: c.write([*_members(c), Member("payload/evil.sh", b"rm -rf /\n")]),
                                        IntegrityError, r"'evil\.sh' is not listed in the manifest"),
    "member size differs from the manifest": Case(
        lambda c: c.write(_swap(_members(c), "payload/model.onnx", c.files["model.onnx"] + b"\0" * 38)),
        IntegrityError, r"'model\.onnx' is \d+ bytes, manifest says \d+"),
    "member size beyond the end of the file": Case(
        lambda c: c.write([*_members(c)[:2], Member("payload/model.onnx", c.files["model.onnx"], size=1 << 40)],
                          end=False), BundleError, r"truncated or corrupt"),
    "huge declared payload": Case(lambda c: _sparse(c, "huge.bin", 5 << 30, b"", "0" * 64), ResourceError,
                                  r"over the profile's max_bundle_mb 4096"),
    # --- names and member types
    "path traversal": Case(lambda c: c.write([*_members(c), Member("payload/../../../../escaped", b"owned")]),
                           UnsafePathError, r"has '\.\.'", targets=("escaped",)),
    "path traversal, signed": Case(
        lambda c: c.signed(files={**c.files, "../../../../escaped": b"owned"}), UnsafePathError, r"has '\.\.'",
        targets=("escaped",)),
    "absolute path": Case(lambda c: c.write([*_members(c), Member(str(c.sandbox / "abs-escaped"), b"owned")]),
                          UnsafePathError, r"is an absolute path", targets=("abs-escaped",)),
    "absolute path under payload/": Case(
        lambda c: c.write([*_members(c), Member("payload/" + str(c.sandbox / "abs-escaped"), b"owned")]),
        UnsafePathError, r"is an absolute path", targets=("abs-escaped",)),
    "member outside payload/": Case(lambda c: c.write([*_members(c), Member("escaped", b"owned")]),
                                    UnsafePathError, r"'escaped' is outside payload/", targets=("escaped",)),
    "backslash path": Case(lambda c: c.write([*_members(c), Member("payload/..\\..\\..\\..\\escaped", b"x")]),
                           UnsafePathError, r"backslash", targets=("escaped",)),
    "symlink out of the store": Case(
        lambda c: c.write([*_members(c), Member("payload/link", type=tarfile.SYMTYPE,
                                                linkname=str(c.sandbox / "link-target"))]),
        UnsafePathError, r"'payload/link' is a link to", targets=("link-target",)),
    "file through a symlinked folder": Case(
        lambda c: c.write([*_members(c), Member("payload/sub", type=tarfile.SYMTYPE, linkname=str(c.sandbox)),
                           Member("payload/sub/through-link", b"owned")]),
        UnsafePathError, r"'payload/sub' is a link to", targets=("through-link",)),
    "hardlink to a file outside": Case(
        lambda c: c.write([*_members(c), Member("payload/hard", type=tarfile.LNKTYPE, linkname=str(c.sandbox / "w.bin"))]),
        UnsafePathError, r"'payload/hard' is a link to"),
    "character device": Case(lambda c: c.write([*_members(c), Member("payload/null", type=tarfile.CHRTYPE)]),
                             UnsafePathError, r"'payload/null' is a device or FIFO"),
    "block device": Case(lambda c: c.write([*_members(c), Member("payload/sda", type=tarfile.BLKTYPE)]),
                         UnsafePathError, r"'payload/sda' is a device or FIFO"),
    "FIFO": Case(lambda c: c.write([*_members(c), Member("payload/fifo", type=tarfile.FIFOTYPE)]),
                 UnsafePathError, r"'payload/fifo' is a device or FIFO"),
    "directory member": Case(lambda c: c.write([*_members(c), Member("payload/dir", type=tarfile.DIRTYPE)]),
                             UnsafePathError, r"'payload/dir' is a directory"),
    "case twin of a payload file": Case(lambda c: c.write([*_members(c), Member("payload/MODEL.onnx", b"x")]),
                                        UnsafePathError, r"'payload/MODEL\.onnx' appears twice"),
    "path too deep": Case(lambda c: c.write([*_members(c), Member("payload/a/b/c/d/e", b"x")]),
                          UnsafePathError, r"too deep or too long"),
    "name not NFC-normalized": Case(lambda c: c.write([*_members(c), Member("payload/cafe\u0301.bin", b"x")]),
                                    UnsafePathError, r"non-normalized"),
    # --- device fit and budgets
    "other profile": Case(lambda c: c.signed(profile="x86-avx2"), CompatibilityError,
                          r"built for profile x86-avx2, this device is generic-cpu"),
    "other architecture": Case(lambda c: c.signed(architecture=_other_arch()), CompatibilityError,
                               rf"built for {_other_arch()}, this device is {platform.machine()}"),
    "provider not available": Case(lambda c: c.signed(required_providers=["TensorrtExecutionProvider"]),
                                   CompatibilityError, r"needs one of TensorrtExecutionProvider; this device offers"),
    "unknown provider": Case(lambda c: c.signed(required_providers=["MagicExecutionProvider"]), CompatibilityError,
                             r"unknown execution provider\(s\) MagicExecutionProvider"),
    "RAM budget exceeded": Case(lambda c: c.signed(min_ram_mb=4096), ResourceError,
                                r"needs 4096 MB of RAM; profile generic-cpu budgets 2048 MB"),
    "disk budget exceeded": Case(lambda c: c.signed(files={**c.files, "blob.bin": bytes(1_200_000)}), ResourceError,
                                 r"of disk; the store holds", profile={"disk_mb": 1, "max_bundle_mb": 2}),
    "older version (rollback attack)": Case(lambda c: c.signed(version="0.9.0"), CompatibilityError,
                                            r"tiny@0\.9\.0 is older than the installed tiny@1\.0\.0"),
    "same version, other bytes": Case(lambda c: c.signed(version="1.0.0", min_ram_mb=65), StoreError,
                                      r"tiny@1\.0\.0 is already installed with different content"),
    # --- the model itself (the trial load in a child process)
    "model that crashes the loader": Case(lambda c: c.signed(), ModelValidationError,
                                          r"killed the validation process with SIGSEGV",
                                          env={"EDGE_FAULT_POINT": "validate-child"}),
    "model that is no ONNX": Case(lambda c: c.signed(files={"model.onnx": garbage_model_bytes()}),
                                  ModelValidationError, r"failed its trial run"),
    "ONNX external data via ../": Case(_external(lambda c: "../../../../w.bin"), ModelValidationError,
                                       r"tensor 'w' reads external data outside the payload: .*'\.\.'"),
    "ONNX external data at an absolute path": Case(_external(lambda c: str(c.sandbox / "w.bin")),
                                                   ModelValidationError,
                                                   r"reads external data outside the payload: .*absolute path"),
    "ONNX external data not in the manifest": Case(_external(lambda c: "w.bin"), ModelValidationError,
                                                   r"reads external data 'w\.bin', which the manifest does not list"),
    # --- downloads (the deployer's path: download, then install)
    "truncated download": Case(_download_source, DownloadError, r"after \d+ of \d+ bytes", download="short"),
    "endless download": Case(_download_source, DownloadError, r"sends more than the \d+ bytes", download="endless"),
    "download of other bytes": Case(lambda c: tamper_payload(c.good, c.bundles / "tiny.edgebundle"), IntegrityError,
                                    r"downloaded bytes do not match the SHA-256", download="wrong"),
    # --- a payload over 2 GiB whose last byte changed after signing (slow: 2 GiB written)
    "payload over 2 GiB with a modified tail": Case(
        lambda c: _sparse(c, "blob.bin", OVER_2_GIB, b"\x01", sha256_of_zeros(OVER_2_GIB)), IntegrityError,
        r"'blob\.bin' does not match its SHA-256"),
}

SLOW = {"payload over 2 GiB with a modified tail"}
# Cases also run through `edge flash` (every kind of refusal, with the flash's own options).
FLASH = [
    "unsigned", "signed by an untrusted key", "signed by a revoked key", "manifest edited after signing",
    "signature expired", "truncated bundle file", "manifest with an unknown field", "payload swapped after signing",
    "path traversal", "absolute path", "symlink out of the store", "hardlink to a file outside", "FIFO",
    "other profile", "other architecture", "provider not available", "RAM budget exceeded",
    "older version (rollback attack)", "model that crashes the loader", "ONNX external data via ../",
]



ACCEPTED = {
    # The same checks let these through: the refusals above are not blanket refusals.
    "signed, not yet expired": lambda c: c.signed(expires_at="2999-01-01T00:00:00Z"),
    "older version, signed as a deliberate downgrade": lambda c: c.signed(version="0.9.0", allow_downgrade=True),
    "an untrusted co-signer beside a trusted signature": _unknown_cosigner,
}

