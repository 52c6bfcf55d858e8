"""Device registry: session counters, telemetry and event dedup, reported state, labels, queries.

Every test runs on a real SQLite file and on the real PostgreSQL (the ``db`` fixture)."""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import func, select

from edge.errors import ConfigError, NotFoundError
from edge.fleet import registry
from edge.fleet.db import Database, events_t, health_t, telemetry_t
from edge.fleet.ingest import Ingestor
from edge.fleet.registry import DeviceQuery
from edge.protocol.messages import EventKind
from edge.protocol.topics import Topics
from tests.fleet.helpers import Devices, ingest


@pytest.fixture()
def fleet(db: Database, clock) -> tuple[Ingestor, Devices]:
    topics = Topics(fleet="t")
    return Ingestor(db, topics, clock), Devices(topics, clock)


def device(db: Database, device_id: str) -> dict:
    with db.read() as conn:
        return registry.get_device(conn, device_id)


def test_birth_then_stale_death_of_an_older_session_is_ignored(db, fleet) -> None:
    ing, dev = fleet
    ingest(ing, dev.birth("d1", session=1))
    ingest(ing, dev.birth("d1", session=2))  # reconnected before the broker sent session 1's will
    ingest(ing, dev.death("d1", session=1))  # the stale will arrives late
    d = device(db, "d1")
    assert d["status"] == "online" and d["session"] == 2
    ingest(ing, dev.death("d1", session=2))  # the real death of the current session applies
    assert device(db, "d1")["status"] == "offline"


def test_final_state_does_not_depend_on_arrival_order(db, fleet) -> None:
    ing, dev = fleet
    for n, order in enumerate(itertools.permutations(range(4))):
        d_id = f"d{n}"
        msgs = [dev.birth(d_id, 1), dev.death(d_id, 1), dev.birth(d_id, 2), dev.death(d_id, 1, reason="late")]
        for i in order:  # one message per batch, in every order
            ingest(ing, msgs[i])
        d = device(db, d_id)
        assert (d["status"], d["session"]) == ("online", 2), order


def test_death_wins_over_a_repeated_birth_of_the_same_session(db, fleet) -> None:
    ing, dev = fleet
    ingest(ing, dev.birth("d1", 5), dev.death("d1", 5), dev.birth("d1", 5))  # one batch, QoS 1 redelivery
    d = device(db, "d1")
    assert (d["status"], d["session"], d["offline_reason"]) == ("offline", 5, "will")


def test_birth_records_profile_and_capabilities(db, fleet) -> None:
    ing, dev = fleet
    ingest(ing, dev.birth("pi-1", 1, profile="raspberry-pi-5", http_url="http://10.0.0.7:8080"))
    d = device(db, "pi-1")
    assert d["profile"] == "raspberry-pi-5" and d["architecture"] == "aarch64"
    assert d["capabilities"]["providers"][0] == "XnnpackExecutionProvider" and d["http_url"].endswith(":8080")


def test_telemetry_is_stored_once_per_message_id(db, fleet, clock) -> None:
    ing, dev = fleet
    first = dev.telemetry("d1", models={"tiny": "1.0.0"}, requests=10, errors=1, msg_id="m-1")
    again = dev.telemetry("d1", models={"tiny": "1.0.0"}, requests=10, errors=1, msg_id="m-1")
    clock.advance(10)
    other = dev.telemetry("d1", models={"tiny": "1.0.0"}, requests=15, msg_id="m-2")
    ingest(ing, first, again)  # a duplicate inside one batch
    ingest(ing, again, other)  # and across batches
    with db.read() as conn:
        assert conn.execute(select(func.count()).select_from(telemetry_t)).scalar_one() == 2
        assert conn.execute(select(func.count()).select_from(health_t)).scalar_one() == 2
        history = registry.telemetry_history(conn, "d1")
    assert sorted(h["id"] for h in history) == ["m-1", "m-2"]
    assert ing.counts["telemetry"] == 4 and ing.counts["telemetry_new"] == 2


def test_since_start_counters_become_per_interval_health_figures(db, fleet, clock) -> None:
    ing, dev = fleet
    sent = []
    for requests, errors in ((40, 0), (100, 2), (250, 5)):
        clock.advance(10)
        sent.append(dev.telemetry("d1", models={"tiny": "1.0.0"}, requests=requests, errors=errors, p95=20.0))
    clock.advance(10)
    restarted = dev.telemetry("d1", session=2, models={"tiny": "1.0.0"}, requests=30, errors=1)
    ingest(ing, sent[0], sent[2])
    ingest(ing, sent[1])  # late: its interval is already inside the next one
    ingest(ing, restarted)  # the agent restarted: its counters began again from zero
    with db.read() as conn:
        rows = conn.execute(select(health_t.c.requests, health_t.c.errors).order_by(health_t.c.ts)).all()
    assert [tuple(r) for r in rows] == [(0, 0), (210, 5), (30, 1)]  # the first only sets the baseline


def test_events_are_stored_once_per_message_id(db, fleet) -> None:
    ing, dev = fleet
    e = dev.event("d1", EventKind.DOWNLOAD_STARTED, "ro-1", msg_id="e-1")
    ingest(ing, e, e)
    ingest(ing, e)
    with db.read() as conn:
        assert conn.execute(select(func.count()).select_from(events_t)).scalar_one() == 1
        assert registry.event_history(conn, "d1")[0]["kind"] == "download_started"


def test_telemetry_of_a_newer_session_marks_the_device_online(db, fleet) -> None:
    ing, dev = fleet
    ingest(ing, dev.birth("d1", 1), dev.death("d1", 1))
    ingest(ing, dev.telemetry("d1", session=1))  # late telemetry of the dead session: still offline
    assert device(db, "d1")["status"] == "offline"
    ingest(ing, dev.telemetry("d1", session=2))  # the birth of session 2 is still in flight
    d = device(db, "d1")
    assert (d["status"], d["session"]) == ("online", 2)
    assert d["telemetry"]["cpu_percent"] == 12.5


def test_reported_state_newest_wins_and_lists_models(db, fleet, clock) -> None:
    ing, dev = fleet
    new = dev.reported("d1", {"tiny": "2.0.0"}, generation=2, previous={"tiny": "1.0.0"})
    clock.advance(-10)
    old = dev.reported("d1", {"tiny": "1.0.0"}, generation=1)
    clock.advance(10)
    ingest(ing, new)
    ingest(ing, old)
    d = device(db, "d1")
    assert d["models"] == [{"model": "tiny", "version": "2.0.0", "state": "active", "previous": "1.0.0"}]


def test_invalid_messages_are_counted_not_stored(db, fleet) -> None:
    from edge.fleet.ingest import Raw

    ing, dev = fleet
    good = dev.birth("d1", 1)
    spoofed = Raw(Topics(fleet="t").device("d2", __import__("edge.protocol.topics", fromlist=["Channel"]).Channel.STATUS),
                  good.payload, True, 0.0)  # d1's message on d2's topic
    ingest(ing, spoofed, Raw("edge/v1/t/d3/status", b"{not json", False, 0.0),
           Raw("edge/v1/t/d3/telemetry", good.payload, False, 0.0),  # a status body on the telemetry topic
           Raw("edge/v1/t/d4/status", b"", True, 0.0))  # a cleared retained message
    assert ing.counts["invalid"] == 3 and ing.counts["cleared_retained"] == 1
    with db.read() as conn:
        assert registry.counts(conn)["devices"] == 0


def test_labels_set_add_remove_and_refuse_unsafe_values(db, fleet) -> None:
    ing, dev = fleet
    ingest(ing, dev.birth("d1", 1))
    with db.write() as conn:
        assert registry.set_labels(conn, "d1", "tag", replace=["b", "a"]) == ["a", "b"]
        assert registry.set_labels(conn, "d1", "tag", add=["c"], remove=["a"]) == ["b", "c"]
        assert registry.set_labels(conn, "d1", "group", add=["store-42"]) == ["store-42"]
    with pytest.raises(ConfigError, match="invalid tag"):
        with db.write() as conn:
            registry.set_labels(conn, "d1", "tag", add=["a/#"])
    with pytest.raises(NotFoundError):
        with db.write() as conn:
            registry.set_labels(conn, "nope", "tag", add=["x"])
    d = device(db, "d1")
    assert d["tags"] == ["b", "c"] and d["groups"] == ["store-42"]


def test_device_list_filters_search_and_keyset_paging(db, fleet) -> None:
    ing, dev = fleet
    msgs = []
    for i in range(30):
        profile = "raspberry-pi-5" if i % 3 == 0 else "x86-avx2"
        msgs.append(dev.birth(f"dev-{i:03d}", 1, profile=profile))
        msgs.append(dev.reported(f"dev-{i:03d}", {"tiny": "2.0.0" if i < 10 else "1.0.0"}))
    msgs.append(dev.death("dev-001", 1))
    ingest(ing, *msgs)
    with db.write() as conn:
        for i in range(0, 30, 5):
            registry.set_labels(conn, f"dev-{i:03d}", "tag", add=["lab"])
        registry.set_labels(conn, "dev-002", "group", add=["store-1"])
    with db.read() as conn:
        def ids(**kw) -> list[str]:
            return [d["id"] for d in registry.list_devices(conn, DeviceQuery(**kw))["items"]]

        assert ids(tag="lab") == [f"dev-{i:03d}" for i in range(0, 30, 5)]
        assert ids(group="store-1") == ["dev-002"]
        assert len(ids(profile="raspberry-pi-5")) == 10
        assert ids(status="offline") == ["dev-001"]
        assert len(ids(model="tiny", version="2.0.0")) == 10
        assert ids(search="02", limit=100) == ["dev-002", "dev-020", "dev-021", "dev-022", "dev-023", "dev-024",
                                               "dev-025", "dev-026", "dev-027", "dev-028", "dev-029"]
        assert ids(search="%") == [] and ids(search="_") == []  # LIKE wildcards are literal
        pages, after = [], None
        while True:
            page = registry.list_devices(conn, DeviceQuery(limit=7, after=after))
            pages.append([d["id"] for d in page["items"]])
            assert page["total"] == 30
            after = page["next"]
            if after is None:
                break
        assert [len(p) for p in pages] == [7, 7, 7, 7, 2]
        assert sum(pages, []) == sorted(f"dev-{i:03d}" for i in range(30))
