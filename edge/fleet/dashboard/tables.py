"""The dashboard's tables: users with passwords, and browser sessions.

They live in the controller's database, beside its tables, in their own metadata: the
controller's schema (and its version) does not change when the dashboard's does. The
dashboard's schema version is kept in ``meta`` under :data:`VERSION_KEY`.
"""

from __future__ import annotations

from sqlalchemy import Column, Float, Index, MetaData, String, Table
from sqlalchemy.exc import SQLAlchemyError

from edge.errors import StoreError
from edge.fleet.db import Database, get_meta, redact, set_meta

# Bump when a table or column below changes; another version is refused, not guessed at.
SCHEMA_VERSION = 1
VERSION_KEY = "dashboard_schema_version"

metadata = MetaData()

users_t = Table(
    "dashboard_users", metadata,
    Column("name", String(64), primary_key=True),
    Column("role", String(16), nullable=False),  # auth.Role
    Column("password", String(256), nullable=False),  # scrypt parameters, salt and hash (users.py)
    Column("created_at", Float, nullable=False),
    Column("created_by", String(64), nullable=False, default=""),
)

sessions_t = Table(
    "dashboard_sessions", metadata,
    Column("id", String(64), primary_key=True),  # SHA-256 of the cookie value, never the value
    Column("csrf", String(64), nullable=False),
    Column("kind", String(8), nullable=False),  # "user" or "token": what the browser logged in with
    Column("subject", String(64), nullable=False),  # the user name or the API token's id
    Column("name", String(64), nullable=False),
    Column("role", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),  # absolute end, whatever the activity
    Column("idle_s", Float, nullable=False),  # ends this long after the last request
    Column("last_seen", Float, nullable=False),
    Column("address", String(64), nullable=False, default=""),
    Index("ix_dashboard_sessions_subject", "kind", "subject"),
)


def ensure_tables(db: Database) -> None:
    """Create the dashboard's tables if missing; refuse a database of another dashboard schema."""
    try:
        metadata.create_all(db.engine)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot create the dashboard tables in {redact(db.url)}: {exc}") from exc
    with db.write() as conn:
        found = get_meta(conn, VERSION_KEY)
        if found is None:
            set_meta(conn, VERSION_KEY, str(SCHEMA_VERSION))
        elif int(found) != SCHEMA_VERSION:
            raise StoreError(f"dashboard schema is version {found}, this controller expects {SCHEMA_VERSION}",
                             hint="use a controller of the matching version or migrate the database")
