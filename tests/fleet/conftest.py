"""Fixtures of the fleet tests: real SQLite files and the real PostgreSQL, a fake clock for pure
rollout logic, a controller context (artifacts, rollouts, desired state) and the REST API on a
real loopback port."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from sqlalchemy import create_engine, text

from edge.fleet import auth
from edge.fleet.api import ApiContext, create_app
from edge.fleet.artifacts import ArtifactStore
from edge.fleet.db import Base, Database, open_database
from edge.fleet.desired import DesiredPublisher
from edge.fleet.rollout import RolloutEngine
from edge.fleet.service import HttpServer
from edge.protocol.signing import SigningKey, TrustStore
from edge.protocol.topics import Topics

# The PostgreSQL of the build machines (trust auth on loopback); tests skip when it is absent.
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
PG_DATABASE = "test"


def pg_available() -> bool:
    """Return whether the test PostgreSQL answers."""
    try:
        engine = create_engine(f"postgresql+psycopg://{PG_SERVER.split('://', 1)[1]}/{PG_DATABASE}",
                               connect_args={"connect_timeout": 2})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


class PgSchemas:
    """Schemas of one test session in the test database, each a separate controller database."""

    def __init__(self) -> None:
        self.admin = create_engine(f"postgresql+psycopg://{PG_SERVER.split('://', 1)[1]}/{PG_DATABASE}",
                                   isolation_level="AUTOCOMMIT")
        self.made: list[str] = []

    def new(self) -> str:
        """Create an empty schema; return a URL whose connections use it."""
        name = f"edge_t_{secrets.token_hex(6)}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{name}"'))
        self.made.append(name)
        # Commits need not wait for the disk in tests (a crash loses a test, not data).
        return f"{PG_SERVER}/{PG_DATABASE}?options=-csearch_path%3D{name}%20-csynchronous_commit%3Doff"

    def drop_all(self) -> None:
        """Drop every schema this session made."""
        with self.admin.connect() as conn:
            for name in self.made:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        self.admin.dispose()


@pytest.fixture(scope="session")
def pg_schemas() -> Iterator[PgSchemas]:
    """Yield the session's schema factory (skips when PostgreSQL is not there)."""
    if not pg_available():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    schemas = PgSchemas()
    try:
        yield schemas
    finally:
        schemas.drop_all()


@pytest.fixture(scope="session")
def _pg_shared(pg_schemas: PgSchemas) -> Iterator[tuple[str, Database]]:
    # One schema for the in-process tests, emptied before each: creating the tables once costs
    # ~0.7 s on PostgreSQL, emptying them a few milliseconds.
    url = pg_schemas.new()
    db = open_database(url, Path("."))
    try:
        yield url, db
    finally:
        db.dispose()


def _empty(db: Database) -> None:
    # DELETE, not TRUNCATE: on a handful of rows it takes 40 ms where TRUNCATE takes 500.
    with db.write() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            if table.name != "meta":
                conn.execute(table.delete())
        conn.execute(text("DELETE FROM meta WHERE key <> 'schema_version'"))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Return a fresh, empty database URL: a SQLite file, or a PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    url, db = request.getfixturevalue("_pg_shared")
    _empty(db)
    return url


@pytest.fixture()
def db(db_url: str, tmp_path: Path) -> Iterator[Database]:
    """Yield an open, empty database (SQLite and PostgreSQL in turn)."""
    database = open_database(db_url, tmp_path)
    try:
        yield database
    finally:
        database.dispose()


class FakeClock:
    """A clock tests move by hand (for pure rollout logic only)."""

    def __init__(self, start: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        """Move the clock forward."""
        self.t += seconds
        return self.t


@pytest.fixture()
def clock() -> FakeClock:
    """Return a fake clock at 2026-01-01T00:00:00Z."""
    return FakeClock()


@dataclass
class Controller:
    """The controller's parts over one database, without MQTT."""

    db: Database
    store: ArtifactStore
    engine: RolloutEngine
    desired: DesiredPublisher
    secret: bytes
    topics: Topics
    clock: Any
    bundles_dir: Path
    signing_key: SigningKey

    def publish_bundle(self, name: str = "tiny", version: str = "1.0.0", profile: str = "generic-cpu",
                       **overrides: Any) -> dict[str, Any]:
        """Build, sign and store a bundle variant; return its record."""
        from tests.fixtures.bundles import make_generic_bundle

        path = make_generic_bundle(self.bundles_dir, self.signing_key, name, version, profile, **overrides)
        record, _ = self.store.add_file(path)
        return record


@pytest.fixture()
def controller(db: Database, tmp_path: Path, trust: TrustStore, signing_key: SigningKey, clock: FakeClock) -> Controller:
    """Return a controller over ``db`` with the fake clock."""
    store = ArtifactStore(db, tmp_path / "store", trust, clock)
    secret = auth.download_secret(db)
    topics = Topics(fleet="t")
    return Controller(db, store, RolloutEngine(db, store, clock), DesiredPublisher(db, topics, "http://ctl", secret, clock),
                      secret, topics, clock, tmp_path / "bundles", signing_key)


@dataclass
class Api:
    """The REST API served on a real loopback port."""

    url: str
    admin: str
    reader: str
    controller: Controller


@pytest.fixture()
def api(controller: Controller) -> Iterator[Api]:
    """Serve the REST API of ``controller`` on 127.0.0.1:0; yield its URL and tokens."""
    c = controller
    admin = auth.create_token(c.db, "test-admin", auth.Role.ADMIN)["token"]
    reader = auth.create_token(c.db, "test-reader", auth.Role.READ)["token"]
    ctx = ApiContext(c.db, c.store, c.engine, c.desired, c.secret, c.clock)
    server = HttpServer(create_app(ctx), "127.0.0.1", 0).start()
    try:
        yield Api(server.url, admin, reader, c)
    finally:
        server.stop()


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
