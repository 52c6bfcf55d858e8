"""The agent's durable outbox: what it must tell the fleet, kept on disk until the broker acks it.

Messages (telemetry, events, command responses, reported state) go into SQLite (WAL,
``DATA/fleet/outbox.db``) first; :class:`OutboxSender` publishes them in insertion order
whenever the broker is reachable and deletes each row only after its PUBACK. A restart, a
power cut or a week offline loses nothing that was committed.

Bounded, with an explicit drop policy (:class:`OutboxLimits`):

1. A retained message (reported state) replaces any queued older one on the same topic: only
   the newest value of a retained topic means anything. This is not counted as a drop.
2. Past ``max_rows``, ``max_bytes`` or the disk budget (``max_disk_bytes``: the database file,
   its WAL and the WAL index together, :mod:`edge.agent.outbox_disk`), the oldest *telemetry*
   goes first: telemetry is periodic and the next sample supersedes it.
3. Only when no telemetry is left does the oldest *event* go (the hard cap); events are
   never dropped while telemetry could make room.
4. A message the broker refuses outright (not authorized, too large) is dropped, not retried
   forever.

Every drop is counted, per kind, in the database itself; telemetry reports the total
(``outbox_dropped``) so the controller sees that a device lost data.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from edge.agent import faults, outbox_disk
from edge.errors import ConnectError, ResourceError, StoreError
from edge.transport import MqttClient, PublishHandle

log = logging.getLogger(__name__)

# Publishes in flight at once: enough to fill the link to a remote broker, few enough that a
# reconnect resends little (paho resends unacked QoS 1 messages itself, in order).
WINDOW = 32
# Seconds the sender sleeps when idle; a put() wakes it at once.
IDLE_WAIT_S = 1.0


class Kind(str, Enum):
    """How precious a message is, which decides what is dropped first."""

    TELEMETRY = "telemetry"  # periodic; the next sample supersedes it
    EVENT = "event"  # events, responses, reported state: dropped only at the hard cap


@dataclass(frozen=True)
class OutboxLimits:
    """Bounds of the outbox. Defaults hold days of 10-second telemetry and all events of a week."""

    max_rows: int = 50_000
    max_bytes: int = 64 * 1024 * 1024  # message bytes: payloads and topics
    # Disk the files may take; None: twice max_bytes (SQLite's page overhead) plus 1 MiB for the
    # schema, the WAL and its index.
    max_disk_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.max_bytes < 1024:
            raise ValueError("outbox limits must allow at least 1 row and 1 KiB")
        if self.max_disk_bytes is not None and self.max_disk_bytes < outbox_disk.MIN_DISK_BYTES:
            raise ValueError(f"the outbox needs a disk budget of at least {outbox_disk.MIN_DISK_BYTES // 1024} KiB")

    @property
    def disk_bytes(self) -> int:
        """Return the disk budget of the outbox's files."""
        return self.max_disk_bytes if self.max_disk_bytes is not None else 2 * self.max_bytes + 1024 * 1024


@dataclass(frozen=True)
class Queued:
    """One queued message."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: Kind
    created: float


SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    kind TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_kind ON messages (kind, id);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Outbox:
    """A bounded, durable FIFO of MQTT messages in SQLite. Thread-safe."""

    def __init__(self, path: Path, limits: OutboxLimits | None = None) -> None:
        self.path = Path(path)
        self.limits = limits or OutboxLimits()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Autocommit mode; every change runs in an explicit BEGIN IMMEDIATE transaction.
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed event survives a power cut, not only a process crash (one fsync per
            # put; events are rare and telemetry comes every few seconds).
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
            self._disk = outbox_disk.plan(self.limits.disk_bytes, page_size)
            outbox_disk.apply(self._db, self._disk)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the outbox {self.path}: {exc}", hint="delete it to start empty") from exc
        self._lock = threading.Lock()
        self.wake = threading.Event()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def put(self, topic: str, payload: bytes, *, kind: Kind = Kind.EVENT, qos: int = 1, retain: bool = False) -> int:
        """Queue one message durably; return its id. May drop older messages (see the module doc)."""
        size = len(payload) + len(topic.encode())
        if size > min(self.limits.max_bytes, self._disk.max_message):
            raise ResourceError(f"a {size}-byte message does not fit the {self.limits.max_bytes}-byte outbox "
                                f"with {self.limits.disk_bytes} bytes of disk")
        with self._lock, self._transaction("put"):
            if retain:
                self._db.execute("DELETE FROM messages WHERE topic = ? AND retain = 1", (topic,))
            self._make_disk_room(self._disk.pages_for(size))  # before: the file must not grow past it
            cur = self._db.execute(
                "INSERT INTO messages (topic, payload, qos, retain, kind, created) VALUES (?, ?, ?, ?, ?, ?)",
                (topic, payload, qos, int(retain), Kind(kind).value, time.time()),
            )
            new_id = int(cur.lastrowid)
            self._enforce_limits()
            self._make_disk_room(0)
        self.wake.set()
        return new_id

    def peek(self, limit: int, after: int = 0) -> list[Queued]:
        """Return up to ``limit`` queued messages with an id above ``after``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain, kind, created FROM messages WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [Queued(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), Kind(r[5]), r[6]) for r in rows]

    def delete(self, ids: list[int]) -> None:
        """Forget delivered messages."""
        if not ids:
            return
        with self._lock, self._transaction("delete"):
            self._db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in ids])

    def drop(self, message: Queued, why: str) -> None:
        """Drop one message the broker refused, counting it."""
        log.error("outbox: dropping message %d on %s: %s", message.id, message.topic, why)
        with self._lock, self._transaction("drop"):
            self._db.execute("DELETE FROM messages WHERE id = ?", (message.id,))
            self._count(f"dropped_{message.kind.value}", 1)

    def depth(self) -> int:
        """Return how many messages wait."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    def dropped(self) -> dict[str, int]:
        """Return how many messages were dropped, per kind, since the outbox was created."""
        with self._lock:
            rows = self._db.execute("SELECT name, value FROM counters WHERE name LIKE 'dropped_%'").fetchall()
        found = {name[len("dropped_"):]: int(value) for name, value in rows}
        return {k.value: found.get(k.value, 0) for k in Kind}

    def dropped_total(self) -> int:
        """Return the number of dropped messages of every kind."""
        return sum(self.dropped().values())

    # -- internals (caller holds self._lock) --------------------------------------------------

    def _transaction(self, name: str) -> "_Transaction":
        return _Transaction(self._db, name)

    def _count(self, name: str, n: int) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
            (name, n, n),
        )

    def _totals(self) -> tuple[int, int]:
        rows, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload) + LENGTH(CAST(topic AS BLOB))), 0) FROM messages"
        ).fetchone()
        return int(rows), int(size)

    def _enforce_limits(self) -> None:
        rows, size = self._totals()
        for kind in (Kind.TELEMETRY, Kind.EVENT):
            if rows <= self.limits.max_rows and size <= self.limits.max_bytes:
                return
            dropped = 0
            cursor = self._db.execute(
                "SELECT id, LENGTH(payload) + LENGTH(CAST(topic AS BLOB)) FROM messages WHERE kind = ? ORDER BY id",
                (kind.value,),
            )
            victims = []
            for msg_id, msg_size in cursor:
                if rows <= self.limits.max_rows and size <= self.limits.max_bytes:
                    break
                victims.append((msg_id,))
                rows, size, dropped = rows - 1, size - msg_size, dropped + 1
            self._db.executemany("DELETE FROM messages WHERE id = ?", victims)
            if dropped:
                self._count(f"dropped_{kind.value}", dropped)
                log.warning("outbox full: dropped the %d oldest %s message(s)", dropped, kind.value)

    def _make_disk_room(self, extra_pages: int) -> None:
        """Drop by the same policy until the pages in use, plus ``extra_pages``, fit the disk budget."""
        budget = self._disk.db_pages - extra_pages
        if outbox_disk.used_pages(self._db) <= budget:
            return
        for kind in (Kind.TELEMETRY, Kind.EVENT):
            dropped, last, fits = 0, 0, False
            while not fits:
                ids = [r[0] for r in self._db.execute(
                    "SELECT id FROM messages WHERE kind = ? AND id > ? ORDER BY id LIMIT 64", (kind.value, last))]
                if not ids:
                    break
                for last in ids:  # one at a time: a row frees a page only when its page empties
                    self._db.execute("DELETE FROM messages WHERE id = ?", (last,))
                    dropped += 1
                    if outbox_disk.used_pages(self._db) <= budget:
                        fits = True
                        break
            if dropped:
                self._count(f"dropped_{kind.value}", dropped)
                log.warning("outbox over its %d-byte disk budget: dropped the %d oldest %s message(s)",
                            self.limits.disk_bytes, dropped, kind.value)
            if fits:
                return


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an error), with fault points around the commit."""

    def __init__(self, db: sqlite3.Connection, name: str) -> None:
        self.db, self.name = db, name

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type:
            self.db.execute("ROLLBACK")
            return
        faults.reach(f"outbox-before-{self.name}-commit")
        self.db.execute("COMMIT")
        faults.reach(f"outbox-after-{self.name}-commit")


class OutboxSender:
    """Publish the outbox in order whenever connected; delete each message after its PUBACK."""

    def __init__(self, outbox: Outbox, client: MqttClient, window: int = WINDOW) -> None:
        self.outbox = outbox
        self.client = client
        self.window = window
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the sender thread."""
        self._thread = threading.Thread(target=self._run, name="edge-outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the sender thread (queued messages stay on disk)."""
        self._stop.set()
        self.outbox.wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty (everything acked); return whether it is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.outbox.depth() == 0:
                return True
            time.sleep(0.05)
        return self.outbox.depth() == 0

    def _run(self) -> None:
        inflight: dict[int, tuple[Queued, PublishHandle]] = {}
        last = 0
        while not self._stop.is_set():
            try:
                last = self._turn(inflight, last)
            except Exception:  # a database hiccup must not end delivery for good
                log.exception("outbox sender failed; retrying")
                self._stop.wait(IDLE_WAIT_S)

    def _turn(self, inflight: dict[int, tuple[Queued, PublishHandle]], last: int) -> int:
        if not self.client.connected:
            self.client.wait_connected(IDLE_WAIT_S)
            return last
        acked, rewind = [], None
        for msg_id, (msg, handle) in list(inflight.items()):
            if not handle.done:
                continue
            del inflight[msg_id]
            if handle.acked:
                acked.append(msg_id)
            elif isinstance(handle.error, ConnectError):
                rewind = msg_id if rewind is None else min(rewind, msg_id)  # not sent: send again
            else:
                self.outbox.drop(msg, str(handle.error))
        self.outbox.delete(acked)
        if rewind is not None:
            last = min(last, rewind - 1)
        self.outbox.wake.clear()
        room = self.window - len(inflight)
        batch = self.outbox.peek(room, after=last) if room > 0 else []
        for msg in batch:
            inflight[msg.id] = (msg, self.client.publish(msg.topic, msg.payload, msg.qos, msg.retain))
            last = msg.id
        if inflight:
            oldest = next(iter(inflight.values()))[1]
            oldest.wait(0.2)
        elif not batch:
            self.outbox.wake.wait(IDLE_WAIT_S)
        return last
