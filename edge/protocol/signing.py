"""Ed25519 signatures over bundle manifests, in a DSSE-style envelope.

The envelope signs DSSE's pre-authentication encoding of the manifest bytes, so it upgrades
cleanly to in-toto/sigstore tooling later. Keys are PEM files; a key's id is the first 16 hex
digits of the SHA-256 of its raw public bytes.

``cryptography`` is imported only where a key is made, loaded in an unusual form, or used: it
adds ~9 MB to a process, and a serving agent holds a trust store but verifies only on install.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Protocol

from edge.errors import ConfigError, NotFoundError, SignatureError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PAYLOAD_TYPE = "application/vnd.edge.manifest+json; version=1"
# An envelope larger than this is refused before parsing: a real one holds a few signatures.
MAX_ENVELOPE_BYTES = 64 * 1024
# A key id as key_id() writes it: 16 hex digits (64 bits of the public key's SHA-256).
KEY_ID_PATTERN = re.compile(r"[0-9a-f]{16}")
# DER header of an Ed25519 SubjectPublicKeyInfo (RFC 8410: SEQUENCE, algorithm 1.3.101.112,
# BIT STRING of 32 bytes): what `edge keys generate` writes, parsed here without cryptography.
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


def _pae(payload_type: str, body: bytes) -> bytes:
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def key_id(public: Ed25519PublicKey) -> str:
    """Return the short id of a public key."""
    from cryptography.hazmat.primitives import serialization

    return raw_key_id(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def raw_key_id(raw: bytes) -> str:
    """Return the short id of a public key given as its 32 raw bytes."""
    return hashlib.sha256(raw).hexdigest()[:16]


class Verifier(Protocol):
    """What a trust store needs of a public key (``Ed25519PublicKey`` has the same method)."""

    def verify(self, signature: bytes, data: bytes) -> None:
        """Raise ``InvalidSignature`` unless ``signature`` signs ``data``."""


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key kept as raw bytes; cryptography loads on the first verify."""

    raw: bytes

    @property
    def id(self) -> str:
        """Return the key's short id."""
        return raw_key_id(self.raw)

    def verify(self, signature: bytes, data: bytes) -> None:
        """Raise ``InvalidSignature`` unless ``signature`` signs ``data`` with this key."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)


@dataclass(frozen=True)
class SigningKey:
    """A private key with its id."""

    private: Ed25519PrivateKey
    id: str


def generate_keypair(out_dir: Path, name: str = "edge") -> tuple[Path, Path]:
    """Write a new private/public key pair into ``out_dir``; refuse to overwrite."""
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise ConfigError(f"{p} already exists", hint="choose another --name or folder")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    priv_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(priv_pem)
    pub_path.write_bytes(pub_pem)
    return priv_path, pub_path


def load_signing_key(path: Path) -> SigningKey:
    """Load an Ed25519 private key from a PEM file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"signing key {path} not found", hint="create one with `edge keys generate`") from None
    except OSError as exc:
        raise ConfigError(f"cannot read signing key {path}: {exc}") from exc
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key", hint="create one with `edge keys generate`")
    return SigningKey(key, key_id(key.public_key()))


def _read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"public key {path} not found") from None
    except OSError as exc:
        raise ConfigError(f"cannot read public key {path}: {exc}") from exc


def _plain_ed25519_pem(data: bytes) -> bytes | None:
    """Return the raw key of a plain Ed25519 ``PUBLIC KEY`` PEM, None for any other content."""
    lines = data.strip().splitlines()
    if len(lines) < 3 or lines[0] != b"-----BEGIN PUBLIC KEY-----" or lines[-1] != b"-----END PUBLIC KEY-----":
        return None
    try:
        der = base64.b64decode(b"".join(line.strip() for line in lines[1:-1]), validate=True)
    except ValueError:
        return None
    if len(der) != len(_ED25519_SPKI_PREFIX) + 32 or not der.startswith(_ED25519_SPKI_PREFIX):
        return None
    return der[len(_ED25519_SPKI_PREFIX):]


def read_public_key(path: Path) -> PublicKey:
    """Load an Ed25519 public key file as a :class:`PublicKey` (cryptography only for unusual forms)."""
    raw = _plain_ed25519_pem(_read_key_file(path))
    if raw is not None:
        return PublicKey(raw)
    from cryptography.hazmat.primitives import serialization

    return PublicKey(load_public_key(path).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file (or the public half of a private key)."""
    data = _read_key_file(path)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        if b"PRIVATE KEY" in data:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a PEM Ed25519 public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return key


@dataclass(frozen=True)
class TrustStore:
    """The public keys a device or controller accepts, and the ids it has revoked."""

    keys: dict[str, Verifier] = field(default_factory=dict)
    revoked: frozenset[str] = frozenset()

    @classmethod
    def from_files(cls, paths: list[Path], revoked: frozenset[str] = frozenset()) -> "TrustStore":
        """Build a trust store from public key files."""
        keys: dict[str, Verifier] = {}
        for p in paths:
            pub = read_public_key(p)
            keys[pub.id] = pub
        return cls(keys, revoked)

    def ids(self) -> list[str]:
        """Return the trusted key ids."""
        return sorted(self.keys)


def resolve_revoked(values: Iterable[str]) -> frozenset[str]:
    """Turn revoked keys given as key ids or key files into key ids; refuse anything else."""
    out = set()
    for raw in values:
        value = raw.strip()
        if KEY_ID_PATTERN.fullmatch(value.lower()):
            out.add(value.lower())
        elif value and Path(value).expanduser().is_file():
            out.add(read_public_key(Path(value).expanduser()).id)
        else:
            raise ConfigError(f"revoked key {raw!r} is neither a key id nor a key file",
                              hint="give the 16-hex-digit id `edge keys show PUB` prints, or the PUB file")
    return frozenset(out)


def sign_manifest(manifest_bytes: bytes, key: SigningKey) -> bytes:
    """Return a signature envelope (JSON bytes) over the manifest bytes."""
    sig = key.private.sign(_pae(PAYLOAD_TYPE, manifest_bytes))
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payloadSha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "signatures": [{"keyid": key.id, "sig": base64.b64encode(sig).decode()}],
    }
    return json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode()


def read_envelope(raw: bytes) -> dict:
    """Parse an envelope strictly."""
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise SignatureError(f"signature envelope is {len(raw)} bytes, over {MAX_ENVELOPE_BYTES}")
    try:
        env = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, Python's int digit limit, deep nesting
        raise SignatureError(f"signature envelope is not valid JSON: {exc}") from exc
    if (
        not isinstance(env, dict)
        or env.get("payloadType") != PAYLOAD_TYPE
        or not isinstance(env.get("signatures"), list)
        or not all(
            isinstance(s, dict) and isinstance(s.get("keyid"), str) and isinstance(s.get("sig"), str)
            for s in env["signatures"]
        )
    ):
        raise SignatureError("signature envelope is malformed", hint="re-sign with `edge bundle sign`")
    return env


def verify_manifest(manifest_bytes: bytes, envelope_raw: bytes | None, trust: TrustStore) -> str:
    """Check that a trusted, unrevoked key signed exactly these manifest bytes; return its id."""
    if envelope_raw is None:
        raise SignatureError("bundle is not signed", hint="sign it with `edge bundle sign BUNDLE --key KEY`")
    if not trust.keys:
        raise SignatureError("no trusted keys configured", hint="pass --trusted-key PUB.pem")
    env = read_envelope(envelope_raw)
    from cryptography.exceptions import InvalidSignature

    message = _pae(PAYLOAD_TYPE, manifest_bytes)
    # A revoked key anywhere in the envelope refuses the bundle, whatever the order of signatures.
    for entry in env["signatures"]:
        if entry["keyid"] in trust.revoked:
            raise SignatureError(f"bundle is signed by revoked key {entry['keyid']}", hint="re-sign with a current key")
    seen_ids = []
    for entry in env["signatures"]:
        kid = entry["keyid"]
        seen_ids.append(kid)
        pub = trust.keys.get(kid)
        if pub is None:
            continue
        try:
            sig = base64.b64decode(entry["sig"], validate=True)
            pub.verify(sig, message)
        except (InvalidSignature, ValueError) as exc:
            raise SignatureError(
                f"signature by key {kid} does not match the manifest (edited after signing?)"
            ) from exc
        return kid
    raise SignatureError(
        f"bundle is signed by untrusted key(s) {', '.join(seen_ids) or '(none)'}",
        hint=f"trusted keys: {', '.join(trust.ids())}",
    )
