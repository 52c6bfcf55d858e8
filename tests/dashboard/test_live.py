"""The live stream: what the watcher reports as devices come and go, report, fail and roll out;
and the read models behind the overview and the charts. Messages go through real ingestion."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from edge.fleet.dashboard import queries
from edge.fleet.dashboard.events import Watcher
from edge.fleet.db import Database
from edge.fleet.ingest import Ingestor
from edge.protocol.messages import EventKind
from edge.protocol.topics import Topics
from tests.dashboard.conftest import Served
from tests.fleet.conftest import FakeClock, _pg_shared, db, db_url, pg_schemas  # noqa: F401 (SQLite and PostgreSQL)
from tests.fleet.helpers import Devices, ingest


class World:
    """Devices sending through real ingestion, and a watcher polling the same database."""

    def __init__(self, db: Database, device: str | None = None) -> None:
        self.db, self.clock = db, FakeClock()
        self.topics = Topics()
        self.ing = Ingestor(db, self.topics, self.clock)
        self.dev = Devices(self.topics, self.clock)
        self.watcher = Watcher(device)

    def send(self, *raws: Any) -> None:
        ingest(self.ing, *raws)

    def start(self) -> list[tuple[str, dict]]:
        with self.db.read() as conn:
            return self.watcher.start(conn, self.clock())

    def poll(self, advance: float = 1.0) -> dict[str, list[dict]]:
        self.clock.advance(advance)
        with self.db.read() as conn:
            events = self.watcher.poll(conn, self.clock())
        out: dict[str, list[dict]] = {}
        for name, data in events:
            out.setdefault(name, []).append(data)
        return out


def test_status_changes_counts_and_seen_devices(db: Database) -> None:
    w = World(db)
    w.send(w.dev.birth("a", 1))
    hello = w.start()
    assert hello == [("hello", {"at": w.clock(), "stats": {"total": 1, "online": 1, "degraded": 0, "offline": 0}})]
    assert w.poll() == {}  # nothing happened

    w.send(w.dev.birth("b", 1))
    got = w.poll()
    assert got["status"] == [{"id": "b", "status": "online", "reason": None, "profile": "generic-cpu"}]
    assert got["stats"] == [{"total": 2, "online": 2, "degraded": 0, "offline": 0}]
    assert got["seen"] == [{"ids": ["b"], "more": False}]

    w.send(w.dev.death("a", 1, reason="connection lost"))
    got = w.poll()
    assert got["status"] == [{"id": "a", "status": "offline", "reason": "connection lost", "profile": "generic-cpu"}]
    assert got["stats"][0]["offline"] == 1

    w.send(w.dev.birth("a", 2))  # back, in a new session
    assert w.poll()["status"][0] == {"id": "a", "status": "online", "reason": None, "profile": "generic-cpu"}


def test_failures_and_the_watched_device(db: Database) -> None:
    w = World(db, device="a")
    w.send(w.dev.birth("a", 1), w.dev.birth("b", 1))
    w.start()
    w.send(w.dev.telemetry("b", models={"tiny": "1.0.0"}))
    assert "device" not in w.poll()  # another device's telemetry
    w.send(w.dev.telemetry("a", models={"tiny": "1.0.0"}))
    assert w.poll()["device"] == [{"id": "a", "telemetry": True}]
    w.send(w.dev.event("a", EventKind.FAILED, "ro-1", detail="disk full"))
    got = w.poll()
    assert got["failure"][0]["device_id"] == "a" and got["failure"][0]["detail"] == "disk full"
    assert {"id": "a", "events": True} in got["device"]


def test_a_device_silent_too_long_or_with_a_failed_model_is_degraded(db: Database) -> None:
    w = World(db)
    w.send(w.dev.birth("quiet", 1), w.dev.birth("broken", 1), w.dev.birth("fine", 1))
    w.send(w.dev.reported("broken", {"tiny": "1.0.0"}))
    with db.write() as conn:
        conn.execute(queries.device_models_t.update().where(queries.device_models_t.c.device_id == "broken")
                     .values(state="failed", error="health check failed"))
    w.clock.advance(queries.SILENT_S / 2)
    w.send(w.dev.telemetry("broken"), w.dev.telemetry("fine"))
    w.clock.advance(queries.SILENT_S / 2 + 1)
    w.send(w.dev.telemetry("fine"))
    with db.read() as conn:
        o = queries.overview(conn, w.clock())
    assert o["devices"] == {"total": 3, "online": 1, "degraded": 2, "offline": 0}
    assert o["versions"] == []  # the one model reported is failed, not active


def test_chart_series_turn_counters_into_rates_and_skip_restarts(db: Database) -> None:
    w = World(db)
    w.send(w.dev.birth("a", 1))
    t0 = w.clock()
    sends = [(1, 0, 0), (1, 100, 1), (1, 300, 1), (2, 10, 0), (2, 70, 3)]  # session 2: the agent restarted
    for i, (session, requests, errors) in enumerate(sends):
        w.send(w.dev.telemetry("a", session=session, requests=requests, errors=errors, p95=20.0 + i, ts=t0 + 10 * i))
    with db.read() as conn:
        s = queries.series(conn, "a", t0 - 1, t0 + 100)
    assert s["samples"] == 5
    assert s["t"] == [t0 + 10 * i for i in range(5)]
    assert s["rps"] == [None, 10.0, 20.0, None, 6.0]
    assert s["eps"] == [None, 0.1, 0.0, None, 0.3]
    assert s["p95"] == [20.0, 21.0, 22.0, 23.0, 24.0]
    assert s["cpu"] == [12.5] * 5 and s["temp"] == [None] * 5
    with db.read() as conn:
        assert queries.series(conn, "a", t0 + 15, t0 + 35)["t"] == [t0 + 20, t0 + 30]


def test_the_stream_over_http_sends_hello_then_changes(served: Served) -> None:
    ing, dev = Ingestor(served.db, Topics()), Devices(Topics(), time.time)
    ingest(ing, dev.birth("a", 1))
    events: list[tuple[str, Any]] = []
    with served.client(served.reader) as c, c.stream("GET", "/dashboard/events", timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name:
                events.append((name, json.loads(line[6:])))
                if name == "hello":
                    ingest(ing, dev.death("a", 1))
                if name == "status":
                    break
    assert events[0][0] == "hello" and events[0][1]["stats"]["online"] == 1
    assert ("status", {"id": "a", "status": "offline", "reason": "will", "profile": "generic-cpu"}) in events
    assert httpx.get(served.url + "/dashboard/events").status_code == 401
