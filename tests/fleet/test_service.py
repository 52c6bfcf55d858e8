"""The controller process in-process on a real broker: births and wills, ingestion, retained
desired state, waves, and a restart in the middle of a rollout that loses nothing."""

from __future__ import annotations

from pathlib import Path

import httpx
from edge.fleet.service import FleetService, ServiceConfig
from edge.protocol.topics import Topics
from tests.fixtures.bundles import make_generic_bundle
from tests.fixtures.broker import broker, embedded_broker  # noqa: F401
from tests.fleet.conftest import wait_for
from tests.fleet.simdevice import SimDevice

ADMIN = "test-admin-token-0123456789"


def start_service(data: Path, db_url: str, broker_url: str | None, key_pair, **kw) -> FleetService:
    config = ServiceConfig(data_dir=data, db_url=db_url, broker_url=broker_url, port=0, mqtt_port=0, fleet="svc",
                           trusted_keys=(key_pair[1],), admin_token=ADMIN, tick_s=0.2, **kw)
    return FleetService(config).start()


def api(svc: FleetService) -> httpx.Client:
    assert svc.http is not None
    return httpx.Client(base_url=svc.http.url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)


def rollout_state(client: httpx.Client, rid: str) -> dict:
    return client.get(f"/api/v1/rollouts/{rid}").json()


def test_restart_mid_rollout_resumes_and_loses_nothing(tmp_path: Path, db_url: str, broker, key_pair, signing_key) -> None:
    topics = Topics(fleet="svc")
    svc = start_service(tmp_path / "ctl", db_url, broker.url, key_pair)
    devices = []
    try:
        c = api(svc)
        devices = [SimDevice(broker.url, topics, f"dev-{i}").start() for i in range(3)]
        wait_for(lambda: c.get("/api/v1/devices", params={"status": "online"}).json()["total"] == 3, what="3 births")
        bundle = make_generic_bundle(tmp_path, signing_key, version="2.0.0")
        assert c.post("/api/v1/bundles", content=bundle.read_bytes()).status_code == 201
        r = c.post("/api/v1/rollouts", json={"model": "tiny", "version": "2.0.0",
                                             "plan": {"waves": ["1", "100%"], "soak_s": 0.5}})
        rid = r.json()["id"]
        canary = wait_for(lambda: c.get(f"/api/v1/rollouts/{rid}/devices", params={"state": "notified"}).json()["items"],
                          what="a canary")[0]["device_id"]
        dev = next(d for d in devices if d.id == canary)
        want = dev.wait_desired("tiny", "2.0.0")
        assert want.deployment_id == rid and want.bundle_url.startswith(svc.http.url)
        download = httpx.get(want.bundle_url)  # the signed URL works without a token
        assert download.status_code == 200 and download.content == bundle.read_bytes()
        c.close()
    finally:
        svc.stop()  # the controller goes away with the canary mid-install

    dev.install("tiny")  # reported while no controller runs: the broker keeps it (persistent session)
    dev.telemetry(requests=25, errors=0)
    svc = start_service(tmp_path / "ctl", db_url, broker.url, key_pair)
    try:
        c = api(svc)
        # The rollout row and its device counts are two reads: wait until both show the second
        # wave (under load the counts can be read just after the ticker moved soaking -> deploying).
        st = wait_for(lambda: (s := rollout_state(c, rid))["devices"].get("notified") == 2
                      and s["state"] == "deploying" and s, timeout=60, what="the second wave after the restart")
        assert st["devices"]["committed"] == 1
        for d in devices:
            d.wait_desired("tiny", "2.0.0")
            if d is not dev:
                d.install("tiny")
        st = wait_for(lambda: (s := rollout_state(c, rid))["state"] == "completed" and s, timeout=60, what="completion")
        assert st["devices"] == {"committed": 3}
        events = [t["event"] for t in st["transitions"]]
        assert events == ["create", "start", "wave_done", "soak_passed", "wave_done", "finished"]
        detail = c.get(f"/api/v1/devices/{canary}").json()
        assert detail["telemetry_history"][0]["requests"] == 25  # sent while the controller was down
        assert [e["kind"] for e in detail["events"]][::-1] == ["download_started", "downloaded", "activated", "committed"]
        assert detail["models"] == [{"model": "tiny", "version": "2.0.0", "state": "active"}]
        devices[1].stop()
        wait_for(lambda: c.get(f"/api/v1/devices/{devices[1].id}").json()["status"] == "offline", what="a death")
        c.close()
    finally:
        for d in devices:
            if d.client.connected:
                d.client.stop()
        svc.stop()


def test_zero_config_serve_uses_the_embedded_broker_and_sqlite(tmp_path: Path, key_pair, monkeypatch) -> None:
    monkeypatch.setenv("EDGE_FLEET_DATA", str(tmp_path / "fleet"))
    config = ServiceConfig(data_dir=tmp_path / "fleet", port=0, mqtt_port=0, fleet="svc", tick_s=0.2)
    svc = FleetService(config).start()
    try:
        assert svc.broker is not None and svc.broker_url.startswith("mqtt://127.0.0.1:")
        assert (tmp_path / "fleet" / "fleet.db").exists()
        token = svc.generated_token
        assert token and token.startswith("edge_")
        dev = SimDevice(svc.broker_url, Topics(fleet="svc"), "pi-1").start()
        c = httpx.Client(base_url=svc.http.url, headers={"authorization": f"Bearer {token}"})
        wait_for(lambda: c.get("/api/v1/devices/pi-1").status_code == 200, what="the birth")
        assert c.get("/api/v1/devices/pi-1").json()["status"] == "online"
        assert svc.stats()["mqtt_protocol"] == "3.1.1"
        dev.client.stop()
        c.close()
    finally:
        svc.stop()


def test_ingest_workers_share_the_shared_subscriptions(tmp_path: Path, broker, key_pair) -> None:
    svc = start_service(tmp_path / "ctl", f"sqlite:///{tmp_path / 'fleet.db'}", broker.url, key_pair,
                        ingest_connections=1, ingest_workers=1)
    dev = None
    try:
        assert len(svc.workers) == 1 and svc.workers[0].is_alive()
        c = api(svc)
        dev = SimDevice(broker.url, Topics(fleet="svc"), "busy-1").start()
        wait_for(lambda: c.get("/api/v1/devices/busy-1").status_code == 200, what="the birth")
        assert svc.wait_workers(60)  # until then the controller alone is in the group
        for _ in range(40):
            dev.telemetry(requests=1)
        wait_for(lambda: len(c.get("/api/v1/devices/busy-1/telemetry", params={"limit": 100}).json()["items"]) == 40,
                 what="40 telemetry rows")
        written_here = svc.stats()["telemetry"]
        assert 0 < written_here < 40  # the broker handed the rest to the worker process
        c.close()
    finally:
        if dev is not None:
            dev.client.stop()
        svc.stop()
    assert svc.workers == []
