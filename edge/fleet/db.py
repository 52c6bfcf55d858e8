"""The controller's database: SQLAlchemy 2 models and the engine.

SQLite in WAL mode by default (``<data>/fleet.db``), PostgreSQL through psycopg 3 when given a
``postgresql://`` URL; the same code runs on both. Timestamps are unix seconds (floats), like
the message envelope's ``ts``. Statements are SQLAlchemy Core on the mapped tables: ingestion
writes in batches, and the REST API reads columns, never ORM objects.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from edge.errors import ConfigError, StoreError

# Bump when a table or column changes; a database of another version is refused, not guessed at.
SCHEMA_VERSION = 1
# Writers wait this long for SQLite's single write lock before failing (ingest batches take ms).
SQLITE_BUSY_MS = 30_000

Clock = Callable[[], float]

ID = String(64)  # device, rollout, command and token ids; the topic alphabet bounds them at 64


class Base(DeclarativeBase):
    """Declarative base of every controller table."""


class Meta(Base):
    """Key/value facts about this database (schema version, secrets for signed URLs)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Device(Base):
    """One device, as its births, deaths, telemetry and reported state describe it."""

    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(ID, primary_key=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    # The session counter (bdSeq) of the last status applied; -1 before the first one.
    session: Mapped[int] = mapped_column(BigInteger, default=-1)
    status_ts: Mapped[float] = mapped_column(Float, default=0.0)
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float, index=True)
    profile: Mapped[str] = mapped_column(String(64), default="", index=True)
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    architecture: Mapped[str] = mapped_column(String(32), default="")
    capabilities: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    http_url: Mapped[str | None] = mapped_column(String(512), nullable=True)
    offline_reason: Mapped[str | None] = mapped_column(String(256), nullable=True)
    reported_generation: Mapped[int] = mapped_column(BigInteger, default=-1)
    reported_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_telemetry: Mapped[str | None] = mapped_column(String(64), nullable=True)  # msg_id of the newest
    # Desired state: bumped when desired_models rows change; `dirty` until the broker acked it.
    desired_generation: Mapped[int] = mapped_column(BigInteger, default=0)
    desired_published: Mapped[int] = mapped_column(BigInteger, default=0)
    desired_dirty: Mapped[bool] = mapped_column(Boolean, default=False, index=True)


class DeviceLabel(Base):
    """A tag or group the user set on a device."""

    __tablename__ = "device_labels"
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # "tag" or "group"
    value: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(ID, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    __table_args__ = (Index("ix_device_labels_device", "device_id"),)


class DeviceModel(Base):
    """One model a device reports running."""

    __tablename__ = "device_models"
    device_id: Mapped[str] = mapped_column(ID, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32))
    provider: Mapped[str | None] = mapped_column(String(64), nullable=True)
    previous: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    __table_args__ = (Index("ix_device_models_version", "model", "version"),)


class TelemetryRow(Base):
    """One telemetry message; ``msg_id`` is unique so a redelivered message adds no row."""

    __tablename__ = "telemetry"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    msg_id: Mapped[str] = mapped_column(String(64), unique=True)
    device_id: Mapped[str] = mapped_column(ID)
    ts: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)  # when the controller got it from the broker
    stored_at: Mapped[float] = mapped_column(Float)  # when its batch was written (lag = stored_at - ts)
    seq: Mapped[int] = mapped_column(BigInteger)
    session: Mapped[int] = mapped_column(BigInteger)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    payload: Mapped[str] = mapped_column(Text)  # the message as received (stored, not re-encoded)
    __table_args__ = (Index("ix_telemetry_device_ts", "device_id", "ts"), Index("ix_telemetry_ts", "ts"))


class HealthSample(Base):
    """Per-model health figures from one telemetry message, for rollout gates."""

    __tablename__ = "health_samples"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    msg_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(ID)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    ts: Mapped[float] = mapped_column(Float)
    session: Mapped[int] = mapped_column(BigInteger)
    requests: Mapped[float] = mapped_column(Float, default=0.0)
    errors: Mapped[float] = mapped_column(Float, default=0.0)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    __table_args__ = (
        UniqueConstraint("msg_id", "model", name="uq_health_msg_model"),
        Index("ix_health_model_version_device", "model", "version", "device_id", "ts"),
    )


class HealthCounter(Base):
    """The last since-start request/error counters of a device's model, to turn the agent's
    cumulative counters into per-interval figures."""

    __tablename__ = "health_counters"
    device_id: Mapped[str] = mapped_column(ID, primary_key=True)
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    ts: Mapped[float] = mapped_column(Float)
    requests: Mapped[float] = mapped_column(Float)
    errors: Mapped[float] = mapped_column(Float)


class EventRow(Base):
    """One deployment step a device reported; ``msg_id`` is unique."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    msg_id: Mapped[str] = mapped_column(String(64), unique=True)
    device_id: Mapped[str] = mapped_column(ID)
    ts: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(64), nullable=True)
    version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    deployment_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    __table_args__ = (Index("ix_events_device_ts", "device_id", "ts"), Index("ix_events_deployment", "deployment_id"))


class CommandRow(Base):
    """A command sent to a device, and its response."""

    __tablename__ = "commands"
    id: Mapped[str] = mapped_column(ID, primary_key=True)
    device_id: Mapped[str] = mapped_column(ID)
    command: Mapped[str] = mapped_column(String(32))
    args: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16), index=True)  # CommandState
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    answered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ok: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    __table_args__ = (Index("ix_commands_device", "device_id", "created_at"),)


class BundleRow(Base):
    """A verified bundle in the content-addressed repository."""

    __tablename__ = "bundles"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    profile: Mapped[str] = mapped_column(String(64))
    architecture: Mapped[str] = mapped_column(String(32))
    precision: Mapped[str] = mapped_column(String(16))
    task: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column(BigInteger)
    key_id: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[str] = mapped_column(Text)  # the exact signed bytes, as text
    uploaded_at: Mapped[float] = mapped_column(Float)
    __table_args__ = (UniqueConstraint("name", "version", "profile", name="uq_bundle_variant"),)


class DesiredModelRow(Base):
    """One model one device should run; the retained desired message is built from these rows."""

    __tablename__ = "desired_models"
    device_id: Mapped[str] = mapped_column(ID, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(64))
    bundle_sha256: Mapped[str] = mapped_column(String(64))
    rollout_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    activate_after: Mapped[float | None] = mapped_column(Float, nullable=True)
    maintenance_window: Mapped[str | None] = mapped_column(String(16), nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)


class RolloutRow(Base):
    """A rollout: its plan, and where its state machine stands."""

    __tablename__ = "rollouts"
    id: Mapped[str] = mapped_column(ID, primary_key=True)
    # Creation order (clocks tie and jump): "newer rollout" always means a larger seq.
    seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    model: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    target_kind: Mapped[str] = mapped_column(String(8))  # all, tag, group, profile
    target_value: Mapped[str] = mapped_column(String(64), default="")
    plan: Mapped[dict] = mapped_column(JSON)  # RolloutPlan: waves, soak, gates, windows
    wave_index: Mapped[int] = mapped_column(Integer, default=-1)
    wave_started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    soak_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    paused_from: Mapped[str | None] = mapped_column(String(16), nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    last_gate: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class RolloutDeviceRow(Base):
    """One device's part in a rollout."""

    __tablename__ = "rollout_devices"
    rollout_id: Mapped[str] = mapped_column(ID, ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ID, primary_key=True)
    state: Mapped[str] = mapped_column(String(16))  # DeviceRolloutState
    wave: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bundle_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    profile: Mapped[str] = mapped_column(String(64), default="")
    # What the device's desired state held before; a revert restores exactly this.
    previous_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    previous_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    joined_at: Mapped[float] = mapped_column(Float)
    assigned_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    deadline: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)
    detail: Mapped[str] = mapped_column(Text, default="")
    __table_args__ = (
        Index("ix_rollout_devices_state", "rollout_id", "state"),
        Index("ix_rollout_devices_device", "device_id"),
    )


class RolloutTransition(Base):
    """Every transition a rollout's state machine took, in order (its audit trail)."""

    __tablename__ = "rollout_transitions"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(ID, ForeignKey("rollouts.id", ondelete="CASCADE"), index=True)
    ts: Mapped[float] = mapped_column(Float)
    from_state: Mapped[str] = mapped_column(String(16))
    event: Mapped[str] = mapped_column(String(24))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")


class TokenRow(Base):
    """An API token, stored as its SHA-256 only."""

    __tablename__ = "tokens"
    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


# Shorthands for Core statements on the mapped tables.
meta_t = Meta.__table__
devices_t = Device.__table__
labels_t = DeviceLabel.__table__
device_models_t = DeviceModel.__table__
telemetry_t = TelemetryRow.__table__
health_t = HealthSample.__table__
counters_t = HealthCounter.__table__
events_t = EventRow.__table__
commands_t = CommandRow.__table__
bundles_t = BundleRow.__table__
desired_t = DesiredModelRow.__table__
rollouts_t = RolloutRow.__table__
rollout_devices_t = RolloutDeviceRow.__table__
transitions_t = RolloutTransition.__table__
tokens_t = TokenRow.__table__


def normalize_url(url: str | None, data_dir: Path) -> str:
    """Return a SQLAlchemy URL: SQLite under ``data_dir`` by default, psycopg 3 for PostgreSQL."""
    if not url:
        data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(data_dir / 'fleet.db').resolve()}"
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith(("sqlite:", "postgresql+psycopg:")):
        return url
    if "://" not in url:  # a plain path means a SQLite file
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    raise ConfigError(f"unsupported database URL {redact(url)!r}", hint="use sqlite:///PATH or postgresql://USER@HOST/DB")


def redact(url: str) -> str:
    """Return ``url`` without its password, for logs and errors."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


@dataclass
class Database:
    """The engine plus transaction helpers; ``write()`` takes SQLite's write lock up front."""

    engine: Engine
    url: str

    @property
    def is_sqlite(self) -> bool:
        """Return whether this is SQLite (single writer) rather than PostgreSQL."""
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """Yield a connection inside a read transaction."""
        try:
            with self.engine.connect() as conn:
                with conn.begin():
                    yield conn
        except OperationalError as exc:
            raise StoreError(f"database {redact(self.url)} failed: {exc.orig}") from exc

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """Yield a connection inside a write transaction, committed on success."""
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(edge_write=True)
                with conn.begin():
                    yield conn
        except OperationalError as exc:
            raise StoreError(f"database {redact(self.url)} failed: {exc.orig}") from exc

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # We issue BEGIN ourselves (below): pysqlite's implicit BEGIN cannot take the lock early.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the ingest writer
        cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, fast commits
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A deferred transaction that reads then writes can fail with SQLITE_BUSY without waiting
        # when another writer committed in between; writers take the lock first instead.
        immediate = conn.get_execution_options().get("edge_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def open_database(url: str | None, data_dir: Path, *, create: bool = True) -> Database:
    """Open (and by default create) the controller database at ``url``."""
    sa_url = normalize_url(url, data_dir)
    try:
        if sa_url.startswith("sqlite"):
            engine = create_engine(sa_url, connect_args={"timeout": SQLITE_BUSY_MS / 1000, "check_same_thread": False})
            _install_sqlite_hooks(engine)
        else:
            engine = create_engine(sa_url, pool_size=10, max_overflow=10, pool_pre_ping=True)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(f"cannot use database {redact(sa_url)}: {exc}",
                          hint='for PostgreSQL: pip install "psycopg[binary]"') from exc
    db = Database(engine, sa_url)
    try:
        if create:
            Base.metadata.create_all(engine)
        _check_schema(db)
    except OperationalError as exc:
        engine.dispose()
        raise StoreError(f"cannot open database {redact(sa_url)}: {exc.orig}",
                         hint="check that the server runs and the URL is right") from exc
    except SQLAlchemyError as exc:
        engine.dispose()
        raise StoreError(f"cannot open database {redact(sa_url)}: {exc}") from exc
    return db


def _check_schema(db: Database) -> None:
    with db.write() as conn:
        found = conn.execute(select(meta_t.c.value).where(meta_t.c.key == "schema_version")).scalar()
        if found is None:
            conn.execute(meta_t.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
        elif int(found) != SCHEMA_VERSION:
            raise StoreError(
                f"database schema is version {found}, this controller expects {SCHEMA_VERSION}",
                hint="use a controller of the matching version or migrate the database",
            )


def get_meta(conn: Connection, key: str) -> str | None:
    """Return one meta value."""
    return conn.execute(select(meta_t.c.value).where(meta_t.c.key == key)).scalar()


def set_meta(conn: Connection, key: str, value: str) -> None:
    """Set one meta value."""
    if conn.execute(meta_t.update().where(meta_t.c.key == key).values(value=value)).rowcount == 0:
        conn.execute(meta_t.insert().values(key=key, value=value))


def insert_ignoring(conn: Connection, table: Any, rows: Sequence[dict], keys: Sequence[str]) -> int:
    """Insert ``rows``, skipping any whose unique ``keys`` already exist; return how many were new."""
    if not rows:
        return 0
    if conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert
    # RETURNING counts the rows really inserted on both databases (psycopg's executemany
    # rowcount is -1); SQLAlchemy batches it into multi-row INSERTs ("insertmanyvalues").
    stmt = insert(table).on_conflict_do_nothing(index_elements=list(keys)).returning(table.c[keys[0]])
    return len(conn.execute(stmt, list(rows)).all())


def bulk(conn: Connection, sql: str, rows: Sequence[tuple]) -> int:
    """Run one statement (``?`` placeholders) for many rows straight through the driver's
    executemany; return the rows changed. The ingest hot path: SQLAlchemy's per-row parameter
    processing costs more than the database's own work there."""
    if not rows:
        return 0
    if conn.dialect.name != "sqlite":
        sql = sql.replace("?", "%s")  # psycopg's placeholder
    return max(conn.exec_driver_sql(sql, list(rows)).rowcount, 0)


def now() -> float:
    """Return the wall clock (the default Clock)."""
    return time.time()
