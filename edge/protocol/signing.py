"""Ed25519 signatures over bundle manifests, in a DSSE-style envelope.

The envelope signs DSSE's pre-authentication encoding of the manifest bytes, so it upgrades
cleanly to in-toto/sigstore tooling later. Keys are PEM files; a key's id is the first 16 hex
digits of the SHA-256 of its raw public bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.errors import ConfigError, NotFoundError, SignatureError

PAYLOAD_TYPE = "application/vnd.edge.manifest+json; version=1"
# An envelope larger than this is refused before parsing: a real one holds a few signatures.
MAX_ENVELOPE_BYTES = 64 * 1024


def _pae(payload_type: str, body: bytes) -> bytes:
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def key_id(public: Ed25519PublicKey) -> str:
    """Return the short id of a public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


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
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key", hint="create one with `edge keys generate`")
    return SigningKey(key, key_id(key.public_key()))


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file (or the public half of a private key)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"public key {path} not found") from None
    except OSError as exc:
        raise ConfigError(f"cannot read public key {path}: {exc}") from exc
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

    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    revoked: frozenset[str] = frozenset()

    @classmethod
    def from_files(cls, paths: list[Path], revoked: frozenset[str] = frozenset()) -> "TrustStore":
        """Build a trust store from public key files."""
        keys = {}
        for p in paths:
            pub = load_public_key(p)
            keys[key_id(pub)] = pub
        return cls(keys, revoked)

    def ids(self) -> list[str]:
        """Return the trusted key ids."""
        return sorted(self.keys)


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
    message = _pae(PAYLOAD_TYPE, manifest_bytes)
    seen_ids = []
    for entry in env["signatures"]:
        kid = entry["keyid"]
        seen_ids.append(kid)
        if kid in trust.revoked:
            raise SignatureError(f"bundle is signed by revoked key {kid}", hint="re-sign with a current key")
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
