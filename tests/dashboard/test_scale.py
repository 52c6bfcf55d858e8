"""The device list with 10,000 registered devices: paging and every filter answer correctly.

How fast it answers is measured by tools/bench_dashboard.py (figures in BENCHMARKS.md); a test
never times."""

from __future__ import annotations

import time

import pytest

from typing import Any, Iterator

from tests.dashboard.conftest import Served, serve
from tests.dashboard.seed import device_id, expected, seed_devices

N = 10_000


@pytest.fixture(scope="module")
def fleet10k(tmp_path_factory: pytest.TempPathFactory, trust: Any) -> Iterator[Served]:
    """Serve a controller database holding 10,000 devices (seeded once for the module)."""
    with serve(tmp_path_factory.mktemp("fleet10k"), trust) as served:
        seed_devices(served.db, N, time.time())
        yield served


def test_pages_walk_every_device_once_in_id_order(fleet10k: Served) -> None:
    with fleet10k.client(fleet10k.reader) as c:
        seen: list[str] = []
        after = None
        pages = 0
        while True:
            r = c.get("/dashboard/devices", params={"limit": 1000, **({"after": after} if after else {})})
            assert r.status_code == 200, r.text
            page = r.json()
            assert page["total"] == N
            seen += [d["id"] for d in page["items"]]
            pages += 1
            after = page["next"]
            if after is None:
                break
        assert pages == N // 1000
        assert seen == [device_id(i) for i in range(N)]

        first = c.get("/dashboard/devices", params={"limit": 50}).json()
        assert [d["id"] for d in first["items"]] == [device_id(i) for i in range(50)]
        assert first["next"] == device_id(49)
        second = c.get("/dashboard/devices", params={"limit": 50, "after": first["next"]}).json()
        assert second["items"][0]["id"] == device_id(50)


@pytest.mark.parametrize(("params", "key"), [
    ({"status": "offline"}, "offline"),
    ({"tag": "canary"}, "canary"),
    ({"tag": "site-07"}, "site-07"),
    ({"group": "store-042"}, "store-042"),
    ({"profile": "jetson-orin-nano"}, "jetson-orin-nano"),
    ({"model": "minilm", "version": "1.1.0"}, "minilm@1.1.0"),
])
def test_each_filter_counts_and_pages_what_it_should(fleet10k: Served, params: dict[str, str], key: str) -> None:
    want = expected(N)[key]
    with fleet10k.client(fleet10k.reader) as c:
        page = c.get("/dashboard/devices", params={**params, "limit": 25}).json()
    assert page["total"] == want
    assert len(page["items"]) == min(25, want)
    for d in page["items"]:
        if "status" in params:
            assert d["status"] == params["status"] and d["health"]["state"] == "offline"
        if "tag" in params:
            assert params["tag"] in d["tags"]
        if "group" in params:
            assert params["group"] in d["groups"]
        if "profile" in params:
            assert d["profile"] == params["profile"]
        if "model" in params:
            assert {(m["model"], m["version"]) for m in d["models"]} == {(params["model"], params["version"])}


def test_search_and_combined_filters(fleet10k: Served) -> None:
    with fleet10k.client(fleet10k.reader) as c:
        hit = c.get("/dashboard/devices", params={"search": "dev-0420"}).json()
        assert [d["id"] for d in hit["items"]] == [f"dev-0420{i}" for i in range(10)] and hit["total"] == 10
        # canary (every 100th) and offline (every 20th): every 100th is both.
        both = c.get("/dashboard/devices", params={"tag": "canary", "status": "offline", "limit": 1000}).json()
        assert both["total"] == expected(N)["canary"]
        none = c.get("/dashboard/devices", params={"search": "no-such-device"}).json()
        assert none == {"items": [], "total": 0, "next": None}


def test_overview_and_facets_summarise_the_fleet(fleet10k: Served) -> None:
    want = expected(N)
    with fleet10k.client(fleet10k.reader) as c:
        o = c.get("/dashboard/overview").json()
        f = c.get("/dashboard/facets").json()
    assert o["devices"]["total"] == N
    assert o["devices"]["offline"] == want["offline"]
    assert o["devices"]["degraded"] == want["failed_online"]
    assert o["devices"]["online"] == N - want["offline"] - want["failed_online"]
    running = {(v["version"], v["profile"]): v["devices"] for v in o["versions"]}
    assert sum(running.values()) == N - want["failed"]  # failed models are not active
    assert len(f["tags"]) == 21 and "canary" in f["tags"] and len(f["groups"]) == 250
    assert {m["version"]: m["devices"] for m in f["models"]} == {"1.1.0": want["minilm@1.1.0"], "1.0.0": N - want["minilm@1.1.0"]}
