"""Dashboard users: a name, a role and a password stored as a salted scrypt hash.

The first admin needs no user: `edge fleet serve` prints an admin API token once (or takes
EDGE_FLEET_ADMIN_TOKEN), and the login page accepts it. Admins then add users here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from edge.errors import AuthError, ConfigError, ConflictError, NotFoundError
from edge.fleet.auth import Role
from edge.fleet.dashboard.tables import sessions_t, users_t
from edge.fleet.db import Clock, Database, now
from edge.protocol.topics import check_id

# scrypt cost: 2**15 x 8 x 1 needs 32 MiB and ~0.1-0.4 s per check (a quarter of OWASP's 2**17,
# since controllers run on small boxes): logins are rare, and each guess costs as much.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SCRYPT_MAXMEM = 64 * 1024 * 1024
SALT_BYTES = 16
# Long enough that a passphrase of a few words fits and a guessable word does not.
MIN_PASSWORD = 12
# Bounds the work a login does before the hash (scrypt reads the whole password).
MAX_PASSWORD = 1024


def hash_password(password: str) -> str:
    """Return the stored form of a password: ``scrypt$n$r$p$salt$hash`` (base64)."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=SCRYPT_MAXMEM)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt)}${b64(digest)}"


def check_password(stored: str, password: str) -> bool:
    """Return whether ``password`` matches the stored hash (constant time)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=SCRYPT_MAXMEM, dklen=len(want))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


# Checked against when the user does not exist, so a miss takes as long as a wrong password
# (the hash of a random password nobody kept).
DUMMY_HASH = ("scrypt$32768$8$1$vhY/Fp+CeIni0RSPbtL06A==$E1A5l4pNo3KELmwKwJ6pK9f+I+mTTjMvdlGGHC1MZiZT8M/XH+1XoiUbRl"
              "HlvV74GS32YwsxZrzuE7oNNn9cTA==")


def _check_new_password(password: Any) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise ConfigError(f"a password needs {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return password


def _public(row: Any) -> dict[str, Any]:
    return {"name": row["name"], "role": row["role"], "created_at": row["created_at"], "created_by": row["created_by"]}


def create_user(db: Database, name: str, password: str, role: Role, created_by: str = "",
                clock: Clock = now) -> dict[str, Any]:
    """Add a user; raise ConflictError if the name is taken."""
    check_id(name, "user name")
    row = {"name": name, "role": role.value, "password": hash_password(_check_new_password(password)),
           "created_at": clock(), "created_by": created_by[:64]}
    try:
        with db.write() as conn:
            if conn.execute(select(users_t.c.name).where(users_t.c.name == name)).first() is not None:
                raise ConflictError(f"user {name!r} exists", hint="pick another name or delete that user first")
            conn.execute(users_t.insert().values(**row))
    except IntegrityError as exc:  # two admins adding the same name at once
        raise ConflictError(f"user {name!r} exists") from exc
    return _public(row)


def set_password(db: Database, name: str, password: str) -> None:
    """Change a user's password and end the user's sessions."""
    stored = hash_password(_check_new_password(password))
    with db.write() as conn:
        if conn.execute(users_t.update().where(users_t.c.name == name).values(password=stored)).rowcount == 0:
            raise NotFoundError(f"no user {name!r}")
        conn.execute(delete(sessions_t).where(sessions_t.c.kind == "user", sessions_t.c.subject == name))


def list_users(db: Database) -> list[dict[str, Any]]:
    """Return every user (never the password hash)."""
    with db.read() as conn:
        return [_public(r) for r in conn.execute(select(users_t).order_by(users_t.c.name)).mappings()]


def delete_user(db: Database, name: str) -> None:
    """Remove a user and end the user's sessions."""
    with db.write() as conn:
        if conn.execute(delete(users_t).where(users_t.c.name == name)).rowcount == 0:
            raise NotFoundError(f"no user {name!r}")
        conn.execute(delete(sessions_t).where(sessions_t.c.kind == "user", sessions_t.c.subject == name))


def verify_user(db: Database, name: str, password: str) -> dict[str, Any]:
    """Return the user whose name and password these are, or raise AuthError (same for both misses)."""
    if not isinstance(name, str) or not isinstance(password, str) or len(password) > MAX_PASSWORD:
        raise AuthError("wrong user name or password")
    with db.read() as conn:
        row = conn.execute(select(users_t).where(users_t.c.name == name)).mappings().first()
    if row is None:
        check_password(DUMMY_HASH, password)
        raise AuthError("wrong user name or password")
    if not check_password(row["password"], password):
        raise AuthError("wrong user name or password")
    return _public(row)
