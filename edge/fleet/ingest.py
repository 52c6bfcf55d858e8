"""Ingestion: MQTT messages to the database in batches, never dropped silently.

MQTT handlers run in the transport's network thread, so :meth:`Ingestor.handle` only queues the
raw message. One writer thread decodes a batch (up to :data:`BATCH_MAX` messages or
:data:`FLUSH_S` of waiting) and writes it in one transaction. A full queue blocks the network
thread, which pushes back on the broker instead of growing memory without bound; a database
error keeps the batch and retries it. A message that is not valid (bad topic, bad envelope, a
device speaking for another) is counted and logged with its topic and a truncated payload.

Messages are acknowledged to the broker only after the transaction holding them committed (the
transport's deferred acks): a controller killed between receipt and commit gets them again from
its persistent session, and the unique message ids keep the rows unique.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from edge.errors import ConfigError, EdgeError, TransportError
from edge.fleet import registry
from edge.fleet.db import Clock, Database, now
from edge.fleet.registry import Received
from edge.fleet.rollout import apply_device_events
from edge.protocol.messages import Event, Reported, Response, Status, Telemetry, decode
from edge.protocol.topics import Channel, Topics

log = logging.getLogger(__name__)

# Messages per transaction: large enough to amortize a commit, small enough to keep lag low.
BATCH_MAX = 5000
# Longest a message waits in the queue for its batch to fill. A commit costs milliseconds (at
# 10,000 devices most rows land on pages of their own), so bigger batches cost less per message:
# at 2,000 messages a second, 0.1 s means batches of about 200 (BENCHMARKS.md, fleet ingest),
# for about 50 ms more lag than 0.05 s.
FLUSH_S = 0.1
# Raw messages held in memory before the network thread is made to wait (~100 MB at 1 KiB each).
QUEUE_MAX = 100_000
# Retry delays after a failed write, capped: the batch is kept, never dropped.
RETRY_S = (0.5, 1, 2, 5)
# Bytes of an invalid payload shown in the log.
LOG_PAYLOAD_BYTES = 200
BODY_OF = {Channel.STATUS: Status, Channel.TELEMETRY: Telemetry, Channel.EVENTS: Event,
           Channel.REPORTED: Reported, Channel.RESP: Response}
# Device ids remembered as having a row; beyond this the set starts over (a cache, not state).
KNOWN_MAX = 1_000_000
# Lag histogram (send time to committed row) for the stats endpoint: 5 ms buckets up to 60 s.
LAG_BUCKET_S = 0.005
LAG_BUCKETS = 12_000


@dataclass(frozen=True)
class Raw:
    """A message as the transport delivered it."""

    topic: str
    payload: bytes
    retained: bool
    received_at: float
    ack: Callable[[], None] | None = None  # tells the broker the message is stored


class Ingestor:
    """Queue incoming messages and write them in batches from one thread."""

    def __init__(self, db: Database, topics: Topics, clock: Clock = now,
                 on_events: Callable[[], None] = lambda: None, queue_max: int = QUEUE_MAX) -> None:
        self.db, self.topics, self.clock, self.on_events = db, topics, clock, on_events
        self._queue: queue.Queue[Raw | None] = queue.Queue(maxsize=queue_max)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.counts: Counter[str] = Counter()
        self._lag_hist = [0] * (LAG_BUCKETS + 1)  # the last bucket holds everything slower
        self._known: set[str] = set()  # device ids known to have a row (devices are never deleted)
        self._writing = 0  # messages of the batch being written (the writer thread's own)
        self._lock = threading.Lock()

    # -- called from the network thread --------------------------------------------------

    def handle(self, topic: str, payload: bytes, retained: bool, ack: Callable[[], None] | None = None) -> None:
        """Queue one message (blocks while the queue is full: backpressure, not loss); ``ack`` is
        called once it is committed."""
        if self._stop.is_set() and ack is not None:
            return  # never written now; unacknowledged, the broker sends it again after a restart
        self._queue.put(Raw(topic, payload, retained, self.clock(), ack))

    def process(self, raws: list[Raw]) -> None:
        """Decode and write messages now, in the caller's thread (tests and tools)."""
        self._write_with_retry(list(raws))

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> "Ingestor":
        """Start the writer thread."""
        self._thread = threading.Thread(target=self._run, name="edge-fleet-ingest", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the writer thread."""
        if self._thread is None:
            return
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    @property
    def depth(self) -> int:
        """Return how many messages wait to be written."""
        return self._queue.qsize()

    def stats(self) -> dict[str, Any]:
        """Return counters, queue depth and percentiles of the lag from a message's send time
        (its envelope ``ts``) to its row being committed, over every live message so far."""
        with self._lock:
            hist = list(self._lag_hist)
            counts = dict(self.counts)
        out: dict[str, Any] = {"queue": self.depth, "uncommitted": self.depth + self._writing, **counts}
        total = sum(hist)
        for name, q in (("persisted_p50_s", 0.5), ("persisted_p99_s", 0.99)):
            if total:
                rank, seen = q * total, 0
                for i, n in enumerate(hist):
                    seen += n
                    if seen >= rank:
                        out[name] = round((i + 1) * LAG_BUCKET_S, 3)
                        break
        return out

    # -- writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._write_with_retry(batch)

    def _next_batch(self) -> list[Raw] | None:
        try:
            first = self._queue.get(timeout=0.5)
        except queue.Empty:
            return None if self._stop.is_set() else []
        if first is None:
            return self._drain_rest()
        batch = [first]
        if self._queue.qsize() < BATCH_MAX:
            # Sleep through the flush window, then take what came: waiting in get() instead would
            # wake this thread (a switch, the GIL handed over twice) for every message.
            self._stop.wait(FLUSH_S)
        while len(batch) < BATCH_MAX:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # seen again after this batch is written
                break
            batch.append(item)
        return batch

    def _drain_rest(self) -> list[Raw] | None:
        rest = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                rest.append(item)
        if rest:
            self._write_with_retry(rest)
        return None

    def _write_with_retry(self, batch: list[Raw]) -> None:
        self._writing = len(batch)
        try:
            self._write_batch(batch)
        finally:
            self._writing = 0

    def _write_batch(self, batch: list[Raw]) -> None:
        decoded = self._decode(batch)
        attempt = 0
        while True:
            try:
                self._write(decoded)
                break
            except EdgeError as exc:
                delay = RETRY_S[min(attempt, len(RETRY_S) - 1)]
                attempt += 1
                self._count("write_retries")
                log.error("ingest: writing %d messages failed (%s); retrying in %s s", len(batch), exc, delay)
                if self._stop.wait(delay) and attempt > len(RETRY_S) + 5:
                    lost = sum(1 for raw in batch if raw.ack is None)
                    log.critical("ingest: giving up on %d messages at shutdown after %d attempts (%d of them "
                                 "unacknowledged: the broker sends those again)", len(batch), attempt, len(batch) - lost)
                    self._count("lost_at_shutdown", lost)
                    return
        for raw in batch:  # in the order received, as MQTT wants acknowledgements sent
            if raw.ack is not None:
                raw.ack()

    def _decode(self, batch: list[Raw]) -> dict[Channel, list[Received]]:
        out: dict[Channel, list[Received]] = {c: [] for c in BODY_OF}
        for raw in batch:
            if not raw.payload:
                self._count("cleared_retained")  # a retained message being deleted
                continue
            try:
                device, channel, _ = self.topics.parse(raw.topic)
                body_type = BODY_OF.get(channel)
                if body_type is None:
                    raise TransportError(f"the controller does not ingest {channel.value} messages")
                env = decode(raw.payload)
                if env.device != device:
                    raise TransportError(f"envelope names device {env.device!r} on the topic of {device!r}")
                if not isinstance(env.body, body_type):
                    raise TransportError(f"a {env.body.type} message on the {channel.value} topic")
            except (ConfigError, TransportError) as exc:
                self._count("invalid")
                log.warning("ingest: refused message on %s: %s (payload %r)", raw.topic, exc,
                            raw.payload[:LOG_PAYLOAD_BYTES])
                continue
            out[channel].append(Received(env, raw.received_at, raw.retained, raw.payload))
        return out

    def _write(self, batch: dict[Channel, list[Received]]) -> None:
        t0 = time.monotonic()
        seen: dict[str, float] = {}
        for items in batch.values():
            for item in items:
                seen[item.envelope.device] = max(seen.get(item.envelope.device, 0.0), item.received_at)
        if not seen:
            return
        with self.db.write() as conn:
            unknown = [d for d in seen if d not in self._known]
            registry.ensure_devices(conn, unknown, self.clock())
            applied = registry.apply_statuses(conn, batch[Channel.STATUS])
            new_telemetry = registry.insert_telemetry(conn, batch[Channel.TELEMETRY], self.clock())
            new_events = registry.insert_events(conn, batch[Channel.EVENTS])
            progressed = apply_device_events(conn, batch[Channel.EVENTS], self.clock)
            registry.apply_reported(conn, batch[Channel.REPORTED])
            registry.apply_responses(conn, batch[Channel.RESP])
            told = {i.envelope.device for i in batch[Channel.TELEMETRY]}  # insert_telemetry set theirs
            registry.touch(conn, {d: t for d, t in seen.items() if d not in told})
        self._known.update(unknown)  # only after the commit: a rolled-back batch retries them
        if len(self._known) > KNOWN_MAX:
            self._known.clear()
        written_at = self.clock()
        with self._lock:
            for channel, items in batch.items():
                self.counts[f"{channel.value}"] += len(items)
                for i in items:
                    if not i.retained:  # a retained message may be days old: not lag
                        b = int(max(0.0, written_at - i.envelope.ts) / LAG_BUCKET_S)
                        self._lag_hist[min(b, LAG_BUCKETS)] += 1
            self.counts["status_applied"] += applied
            self.counts["telemetry_new"] += new_telemetry
            self.counts["events_new"] += new_events
            self.counts["batches"] += 1
            self.counts["last_batch_ms"] = int((time.monotonic() - t0) * 1000)
        if progressed or batch[Channel.EVENTS]:
            self.on_events()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n
