"""Crash campaign of the controller: `edge fleet serve` is SIGKILLed 20 times at random moments of
a rollout across simulated devices, on SQLite and on PostgreSQL, and started again each time.

At the end the rollout completed (every device on the new version), or, in the second scenario
where the new version starts failing requests late in the rollout, its health gate failed and
it was reverted (every device back on the version it ran). Checked in the database itself: one
row per device, per rollout member and per desired model; every device event stored exactly
once (events are acknowledged to the broker only once committed, and deduplicated by message
id); the recorded transitions form one unbroken chain, with each step taken once.

The devices act on their desired state only when the test hands them a turn, one per kill, so
the rollout cannot finish before the last kill and every kill lands mid-rollout.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from sqlalchemy import create_engine, text

from edge.fleet.db import normalize_url
from edge.protocol.messages import DesiredModel, Event, EventKind, ModelReport, Reported
from edge.protocol.topics import Channel, Topics
from tests.fixtures.broker import MOSQUITTO, broker  # noqa: F401
from tests.fixtures.bundles import make_generic_bundle
from tests.fleet.conftest import PgSchemas, pg_available, wait_for
from tests.fleet.processes import Controller
from tests.fleet.simdevice import SimDevice
from tests.transport.helpers import unique

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")]

SEED = int(os.environ.get("EDGE_CRASH_SEED", "20261128"))
KILLS = 20
# More devices than kills, each acting once per turn: the rollout outlives the campaign.
DEVICES = 24
# Seconds a controller runs before its kill: from right after start-up to a few ticks (1 s) in.
UPTIME_S = (0.05, 1.5)
# Seconds to wait for a start, a rollout's end or the devices' convergence.
WAIT_S = 90.0
# In the second scenario the new version fails every request from this turn on: late enough that
# several waves passed their gates first.
BAD_FROM_TURN = 10
ACTIVE = ("pending", "deploying", "soaking", "reverting")
STEPS = (EventKind.DOWNLOAD_STARTED, EventKind.DOWNLOADED, EventKind.ACTIVATED, EventKind.COMMITTED)


class Devices:
    """The simulated devices' side: each acts on its desired state when it has a turn, and all
    report telemetry (cumulative counters) every half second."""

    def __init__(self, devices: list[SimDevice]) -> None:
        self.devices = devices
        self.turns = threading.Semaphore(0)
        self.free = threading.Event()  # every device acts at once
        self.bad = threading.Event()  # the new version fails every request from now on
        self.events: dict[tuple[str, str | None], int] = {}  # (device, deployment) -> events sent
        self.failure: BaseException | None = None
        self._counters = {d.id: [0, 0] for d in devices}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-devices", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_telemetry = 0.0
        try:
            while not self._stop.wait(0.05):
                for dev in self.devices:
                    want = dev.desired.models.get("tiny") if dev.desired else None
                    if want is None or dev.running.get("tiny") == want.version:
                        continue
                    if self.free.is_set() or self.turns.acquire(blocking=False):
                        self._install(dev, want)
                if time.monotonic() >= next_telemetry:
                    next_telemetry = time.monotonic() + 0.5
                    for dev in self.devices:
                        if "tiny" in dev.running:
                            counters = self._counters[dev.id]
                            counters[0] += 10
                            counters[1] += 10 if self.bad.is_set() and dev.running["tiny"] == "2.0.0" else 0
                            dev.telemetry(requests=counters[0], errors=counters[1])
        except BaseException as exc:  # reported by the test
            self.failure = exc

    def _install(self, dev: SimDevice, want: DesiredModel) -> None:
        """Report the steps of one install (SimDevice.install, pinned to the desired model read)."""
        for kind in STEPS:
            dev.send(Channel.EVENTS, Event(kind=kind, model="tiny", version=want.version,
                                           deployment_id=want.deployment_id))
        key = (dev.id, want.deployment_id)
        self.events[key] = self.events.get(key, 0) + len(STEPS)
        previous, dev.running["tiny"] = dev.running.get("tiny"), want.version
        generation = dev.desired.generation if dev.desired else 0
        dev.send(Channel.REPORTED, Reported(generation=generation, models=(
            ModelReport(name="tiny", version=want.version, state="active", previous=previous),)))

    def running(self) -> dict[str, str | None]:
        """Return each device's version of tiny."""
        return {d.id: d.running.get("tiny") for d in self.devices}

    def stop(self) -> None:
        """Stop acting and reporting."""
        self._stop.set()
        self._thread.join(10)


@pytest.fixture()
def db_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None (SQLite in the controller's data folder), or a fresh PostgreSQL schema of this test."""
    if request.param == "sqlite":
        yield None
        return
    if not pg_available():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    schemas = PgSchemas()
    try:
        yield schemas.new()
    finally:
        schemas.drop_all()


def rollout(c: httpx.Client, version: str, waves: list[str], soak_s: float) -> str:
    """Create a rollout of tiny@version to every device; return its id."""
    r = c.post("/api/v1/rollouts", json={"model": "tiny", "version": version,
                                         "plan": {"waves": waves, "soak_s": soak_s}})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def wait_state(ctl: Controller, rid: str, states: tuple[str, ...]) -> dict[str, Any]:
    """Wait until the rollout is in one of ``states``; return it."""
    with ctl.api() as c:
        return wait_for(lambda: (s := c.get(f"/api/v1/rollouts/{rid}").json())["state"] in states and s,
                        timeout=WAIT_S, interval=0.2, what=f"rollout {rid} to reach {states}")


def query(ctl: Controller, sql: str, **params: Any) -> list[tuple]:
    """Run one read-only query on the controller's database."""
    url = normalize_url(ctl.db_url, ctl.folder / "data")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


# Both databases see a rollout through; the gate scenario runs on PostgreSQL, the production
# database (three runs of ~50 s keep the file within its three-minute budget).
@pytest.mark.parametrize("db_url, scenario", [("sqlite", "completes"), ("postgresql", "completes"),
                                              ("postgresql", "gate-fails")], indirect=["db_url"])
def test_a_controller_killed_20_times_mid_rollout_finishes_it_correctly(
        scenario: str, db_url: str | None, broker, tmp_path: Path, key_pair, signing_key,  # noqa: F811
        request: pytest.FixtureRequest) -> None:
    began = time.monotonic()
    rng = random.Random(f"{SEED}-{scenario}")
    fleet = unique("ctl")
    ctl = Controller(tmp_path, broker.url, key_pair[1], fleet, db_url).start()
    sims = [SimDevice(broker.url, Topics(fleet=fleet), f"sim-{i:02d}").start() for i in range(DEVICES)]
    devices = Devices(sims)
    try:
        with ctl.api() as c:
            wait_for(lambda: c.get("/api/v1/devices", params={"status": "online"}).json()["total"] == DEVICES,
                     timeout=WAIT_S, what="the births")
            for version in ("1.0.0", "2.0.0"):
                bundle = make_generic_bundle(tmp_path / "bundles", signing_key, version=version)
                assert c.post("/api/v1/bundles", content=bundle.read_bytes()).status_code == 201
            # Every device runs 1.0.0 first: the version a revert goes back to.
            devices.free.set()
            base = rollout(c, "1.0.0", ["100%"], 0)
        wait_state(ctl, base, ("completed",))
        wait_for(lambda: set(devices.running().values()) == {"1.0.0"}, timeout=WAIT_S, what="1.0.0 everywhere")
        devices.free.clear()
        with ctl.api() as c:
            rid = rollout(c, "2.0.0", ["1", "4", "8", "16", "100%"], 0.5)

        mid_rollout = 0
        for turn in range(KILLS):
            if scenario == "gate-fails" and turn == BAD_FROM_TURN:
                devices.bad.set()
            devices.turns.release()
            time.sleep(rng.uniform(*UPTIME_S))
            ctl.kill()
            (state,) = query(ctl, "SELECT state FROM rollouts WHERE id = :rid", rid=rid)[0]
            mid_rollout += state in ACTIVE
            ctl.start()
        assert devices.failure is None, devices.failure
        devices.free.set()  # the last start: every device acts at once
        end = "completed" if scenario == "completes" else "reverted"
        st = wait_state(ctl, rid, ("completed", "reverted", "aborted", "halted"))
        assert st["state"] == end, st["transitions"]
        final = "2.0.0" if end == "completed" else "1.0.0"
        wait_for(lambda: set(devices.running().values()) == {final}, timeout=WAIT_S,
                 what=f"every device on {final}")
    finally:
        devices.stop()
        ctl.stop()
        for d in sims:
            d.client.stop()

    assert mid_rollout >= KILLS - 5, f"only {mid_rollout} of {KILLS} kills landed mid-rollout"
    events = [t["event"] for t in st["transitions"]]
    for i in range(1, len(st["transitions"])):  # one unbroken chain: no step lost or taken twice
        assert st["transitions"][i]["from"] == st["transitions"][i - 1]["to"], st["transitions"]
    assert events[:2] == ["create", "start"] and events.count("start") == 1
    if end == "completed":
        assert events.count("wave_done") == 5 and events.count("soak_passed") == 4 and events[-1] == "finished"
        assert st["devices"] == {"committed": DEVICES}
    else:
        assert events[-2:] == ["auto_revert", "revert_done"], events
        assert st["transitions"][-2]["reason"].startswith("health gate failed"), st["transitions"][-2]

    # The database itself: one row per device, member and desired model; every event once.
    assert query(ctl, "SELECT COUNT(*), COUNT(DISTINCT id) FROM devices") == [(DEVICES, DEVICES)]
    assert query(ctl, "SELECT COUNT(*), COUNT(DISTINCT device_id) FROM rollout_devices WHERE rollout_id = :r",
                 r=rid) == [(DEVICES, DEVICES)]
    desired = query(ctl, "SELECT device_id, version FROM desired_models WHERE model = 'tiny'")
    assert len(desired) == DEVICES and {v for _, v in desired} == {final}
    stored = dict(((d, dep), n) for d, dep, n in query(
        ctl, "SELECT device_id, deployment_id, COUNT(*) FROM events GROUP BY device_id, deployment_id"))
    assert stored == devices.events, "device events lost or stored twice"
    assert query(ctl, "SELECT COUNT(*) - COUNT(DISTINCT msg_id) FROM events") == [(0,)]
    line = (f"controller crash campaign [{'postgresql' if db_url else 'sqlite'}, {scenario}]: {KILLS} kills, "
            f"{mid_rollout} mid-rollout, {ctl.starts} starts, rollout {end}, {sum(stored.values())} device events "
            f"stored once, {time.monotonic() - began:.0f} s (seed {SEED})")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # shown even without -s
        print("\n" + line)
