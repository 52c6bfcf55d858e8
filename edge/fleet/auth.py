"""Who may call the controller: API tokens with a role, and signed bundle download URLs.

Tokens are random, shown once, and stored as their SHA-256 only. ``read`` tokens may call every
GET route; ``admin`` tokens may also change things. The first start generates an admin token
(printed once by `edge fleet serve`) unless one is configured (EDGE_FLEET_ADMIN_TOKEN). Devices
carry no API token: the download URL in their desired state is signed with an HMAC of the bundle
hash and the device id, so a URL works for that one device and that one bundle.

This is the one module that decides who is who; the dashboard adds browser sessions here.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import Enum
from typing import Any

from sqlalchemy import select, update

from edge.errors import AuthError, ConfigError, ForbiddenError, NotFoundError
from edge.fleet.db import Clock, Database, get_meta, now, set_meta, tokens_t

TOKEN_PREFIX = "edge_"
# 32 random bytes: the same strength as the HMAC key below; urlsafe so it fits in a header.
TOKEN_BYTES = 32
CONFIGURED_ADMIN = "configured-admin"
GENERATED_ADMIN = "admin"


class Role(str, Enum):
    """What a token may do."""

    READ = "read"
    ADMIN = "admin"

    def allows(self, needed: "Role") -> bool:
        """Return whether this role covers ``needed``."""
        return self is Role.ADMIN or needed is Role.READ


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    token_id: str
    name: str
    role: Role

    def require(self, needed: Role) -> None:
        """Raise AuthError unless this caller has ``needed``."""
        if not self.role.allows(needed):
            raise ForbiddenError(f"token {self.name!r} is {self.role.value}-only; this needs {needed.value}",
                            hint="use an admin token")


def hash_token(token: str) -> str:
    """Return the stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """Return a fresh random token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def create_token(db: Database, name: str, role: Role, clock: Clock = now, token: str | None = None) -> dict[str, Any]:
    """Store a token (a new random one unless given); return its record with the plain token once."""
    if not name or len(name) > 64:
        raise ConfigError("a token needs a name of 1-64 characters")
    plain = token or new_token()
    row = {"id": secrets.token_hex(6), "name": name, "role": role.value, "hash": hash_token(plain),
           "created_at": clock(), "revoked": False}
    with db.write() as conn:
        conn.execute(tokens_t.insert().values(**row))
    return {"id": row["id"], "name": name, "role": role.value, "created_at": row["created_at"], "token": plain}


def list_tokens(db: Database) -> list[dict[str, Any]]:
    """Return every token's record (never the token)."""
    with db.read() as conn:
        rows = conn.execute(select(tokens_t).order_by(tokens_t.c.created_at)).mappings().all()
    return [{"id": r["id"], "name": r["name"], "role": r["role"], "created_at": r["created_at"],
             "revoked": r["revoked"]} for r in rows]


def revoke_token(db: Database, token_id: str) -> None:
    """Revoke one token by id."""
    with db.write() as conn:
        if conn.execute(update(tokens_t).where(tokens_t.c.id == token_id).values(revoked=True)).rowcount == 0:
            raise NotFoundError(f"no token with id {token_id!r}")


def ensure_admin_token(db: Database, configured: str | None, clock: Clock = now) -> str | None:
    """Make sure an admin token exists; return a newly generated one (to print once), else None.

    A configured token replaces the previously configured one; a generated one is made only when
    no admin token exists at all.
    """
    with db.write() as conn:
        if configured:
            if len(configured) < 16:
                raise ConfigError("EDGE_FLEET_ADMIN_TOKEN is too short", hint="use at least 16 random characters")
            h = hash_token(configured)
            conn.execute(update(tokens_t).where(tokens_t.c.name == CONFIGURED_ADMIN, tokens_t.c.hash != h)
                         .values(revoked=True))
            if conn.execute(select(tokens_t.c.id).where(tokens_t.c.hash == h)).first() is None:
                conn.execute(tokens_t.insert().values(id=secrets.token_hex(6), name=CONFIGURED_ADMIN, role="admin",
                                                      hash=h, created_at=clock(), revoked=False))
            return None
        has_admin = conn.execute(select(tokens_t.c.id).where(
            tokens_t.c.role == Role.ADMIN.value, tokens_t.c.revoked.is_(False))).first()
        if has_admin is not None:
            return None
    return create_token(db, GENERATED_ADMIN, Role.ADMIN, clock)["token"]


def authenticate(db: Database, authorization: str | None) -> Principal:
    """Return the caller of an ``Authorization: Bearer <token>`` header, or raise AuthError."""
    if not authorization:
        raise AuthError("no API token given", hint="send Authorization: Bearer <token> (or set EDGE_FLEET_TOKEN)")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("malformed Authorization header", hint="use: Authorization: Bearer <token>")
    h = hash_token(token.strip())
    with db.read() as conn:
        row = conn.execute(select(tokens_t).where(tokens_t.c.hash == h)).mappings().first()
    if row is None or row["revoked"]:
        raise AuthError("unknown or revoked API token")
    return Principal(row["id"], row["name"], Role(row["role"]))


def authenticate_request(db: Database, request: Any) -> Principal:
    """Return the caller of an HTTP request: its bearer token, else its dashboard session cookie."""
    header = request.headers.get("authorization")
    if header is None:
        from edge.fleet.dashboard import sessions  # browser sessions (and their CSRF check) live there

        principal = sessions.authenticate(db, request)
        if principal is not None:
            return principal
    return authenticate(db, header)


def download_secret(db: Database) -> bytes:
    """Return the HMAC key of signed download URLs, generated at first use and kept in the database."""
    with db.write() as conn:
        value = get_meta(conn, "download_secret")
        if value is None:
            value = secrets.token_hex(32)
            set_meta(conn, "download_secret", value)
    return bytes.fromhex(value)


def sign_download(secret: bytes, sha256: str, device_id: str) -> str:
    """Return the signature of one device's download URL of one bundle."""
    return hmac.new(secret, f"{sha256}:{device_id}".encode(), hashlib.sha256).hexdigest()[:32]


def check_download(secret: bytes, sha256: str, device_id: str, signature: str) -> bool:
    """Return whether ``signature`` is right for this bundle and device."""
    return hmac.compare_digest(sign_download(secret, sha256, device_id), signature or "")
