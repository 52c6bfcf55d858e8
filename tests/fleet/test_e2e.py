"""End to end with real processes: `edge fleet serve`, mosquitto, and three real agents.

A bundle is published with the CLI and rolled out in waves; the controller is killed (SIGKILL)
in the middle of the rollout and started again, and the rollout still completes. The
agents really download, verify, install and serve each version: the test asks one of them to
infer and checks the answer is the new version's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

from edge.cli.main import main
from tests.fixtures.broker import MOSQUITTO, broker  # noqa: F401
from tests.fixtures.bundles import expected_output, make_generic_bundle
from tests.fleet.conftest import wait_for
from tests.fleet.processes import ADMIN, ROOT, START_S, Controller, child_env

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")


def agent_command(device_id: str, data: Path, broker_url: str, trusted: Path) -> list[str]:
    """The real agent: `edge agent run` with its fleet link."""
    return [sys.executable, "-m", "edge.cli.main", "agent", "run", "--device-id", device_id, "--data", str(data),
            "--broker", broker_url, "--trusted-key", str(trusted), "--http", "127.0.0.1:0",
            "--profile", "generic-cpu", "--telemetry-interval", "1"]


@pytest.fixture()
def controller(tmp_path: Path, broker, key_pair) -> Iterator[Controller]:
    c = Controller(tmp_path / "ctl", broker.url, key_pair[1])
    (tmp_path / "ctl").mkdir()
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture()
def agents(tmp_path: Path, broker, key_pair) -> Iterator[dict[str, subprocess.Popen]]:
    procs: dict[str, subprocess.Popen] = {}
    for i in range(3):
        d = f"edge-{i}"
        log = open(tmp_path / f"{d}.log", "wb")
        procs[d] = subprocess.Popen(agent_command(d, tmp_path / d, broker.url, key_pair[1]), stdout=log,
                                    stderr=subprocess.STDOUT, env=child_env(tmp_path / f"home-{d}"), cwd=ROOT)
        log.close()
    try:
        yield procs
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def rollout(c: Controller, version: str, soak: float) -> str:
    r = c.api().post("/api/v1/rollouts", json={"model": "tiny", "version": version,
                                               "plan": {"waves": ["1", "100%"], "soak_s": soak}})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def status(c: Controller, rid: str) -> dict:
    return c.api().get(f"/api/v1/rollouts/{rid}").json()


def running(c: Controller, version: str) -> list[str]:
    items = c.api().get("/api/v1/devices", params={"model": "tiny", "version": version}).json()["items"]
    return [d["id"] for d in items if any(m["version"] == version and m["state"] == "active" for m in d["models"])]


def test_publish_and_roll_out_in_waves_to_three_agents_across_a_controller_crash(
        controller: Controller, agents, tmp_path: Path, signing_key, capsys, monkeypatch) -> None:
    c = controller
    wait_for(lambda: c.api().get("/api/v1/devices", params={"status": "online"}).json()["total"] == 3,
             timeout=START_S, interval=0.3, what="three agents online")
    monkeypatch.setenv("EDGE_CONTROLLER", c.url)
    monkeypatch.setenv("EDGE_FLEET_TOKEN", ADMIN)
    assert main(["fleet", "publish", str(make_generic_bundle(tmp_path, signing_key, version="2.0.0"))]) == 0
    assert "stored tiny@2.0.0" in capsys.readouterr().out

    second = rollout(c, "2.0.0", soak=5)
    st = wait_for(lambda: (s := status(c, second))["state"] == "soaking" and s, timeout=START_S, interval=0.3,
                  what="the canary of 2.0.0")
    canary = [d for d in running(c, "2.0.0")]
    assert len(canary) == 1 and st["devices"] == {"committed": 1, "queued": 2}
    c.kill()  # no goodbye: whatever was in memory is gone
    c.start()
    st = wait_for(lambda: (s := status(c, second))["state"] == "completed" and s, timeout=START_S, interval=0.3,
                  what="rollout 2 after the restart")
    assert st["devices"] == {"committed": 3}
    assert [t["event"] for t in st["transitions"]] == ["create", "start", "wave_done", "soak_passed", "wave_done",
                                                       "finished"]
    wait_for(lambda: len(running(c, "2.0.0")) == 3, timeout=30, interval=0.3, what="2.0.0 active everywhere")

    detail = c.api().get(f"/api/v1/devices/{canary[0]}").json()
    kinds = [e["kind"] for e in detail["events"] if e.get("deployment_id") == second][::-1]
    assert kinds[0] == "download_started" and kinds[-1] == "committed", kinds
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    answer = httpx.post(f"{detail['http_url']}/v2/models/tiny/infer", json={
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}, timeout=30)
    assert answer.status_code == 200, answer.text
    y = np.array(answer.json()["outputs"][0]["data"], np.float32).reshape(1, 2)
    np.testing.assert_allclose(y, expected_output("2.0.0", x), rtol=1e-5)
