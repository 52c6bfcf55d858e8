"""Crash campaign of the agent: SIGKILL at every named step and at random moments, then restart.

The killed processes run the real store, outbox, fleet link and deployment state machine
(:mod:`tests.hardening.crash_jobs`), forked from a driver process with everything imported
(:mod:`tests.hardening.crash_driver`), against a real broker and a real artifact server; a few
runs are real ``edge agent run`` processes. After each kill the agent is started again and the
checks of :mod:`tests.hardening.crash_checks` run: one verified version served per model, the
deployment records in a legal state that ends where the desired state says, and no
acknowledged message lost (an ``Outbox.put`` that returned), duplicates only as QoS 1 resends
with the same envelope id. Totals go to ``agent-crash-campaign.json`` in pytest's base temp
folder and one summary line is printed. ``EDGE_CRASH_SEED`` changes the random kills.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from edge.agent.faults import DEPLOYMENT_POINTS, FAULT_POINTS, OUTBOX_POINTS, STORE_POINTS
from edge.agent.outbox import WINDOW, Outbox
from edge.protocol.messages import Desired, DesiredModel, encode, wrap
from edge.protocol.topics import Channel, Topics
from tests.agent.fleet.conftest import nan_model_bytes
from tests.agent.fleet.helpers import ArtifactServer
from tests.agent.test_store_crash import check_outcome
from tests.fixtures.broker import broker  # noqa: F401
from tests.fixtures.bundles import expected_output, make_generic_bundle
from tests.hardening.crash_checks import (
    Delivered, check_acknowledged, check_records, check_serving, queued_ids, read_lines,
)  # fmt: skip
from tests.hardening.crash_driver import Driver
from tests.hardening.crash_jobs import open_store
from tests.transport.helpers import WAIT_S, client, unique, wait_until

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("EDGE_CRASH_SEED", "20261128"))
ROOT = Path(__file__).resolve().parents[2]
# Random kills per kind (with the named points and the real agents: over 200 kills in all).
DEPLOY_KILLS, OUTBOX_KILLS, STORE_KILLS = 50, 80, 25
# Seconds after a job's start within which a random kill lands: at first a guess of how long each
# flow takes (a fresh install is mostly its trial load in a child process), then learned from the
# runs, so the kills land inside the flows on a fast machine and on a loaded one alike.
FLOW_WINDOW_S = {"commit": 0.5, "rollback": 0.5, "fail": 0.3, "cancel": 0.6, "fresh": 2.5}
OUTBOX_WINDOW_S, STORE_WINDOW_S, STORE_INSTALL_WINDOW_S = 0.3, 0.06, 1.0
# A waiting deployment's activation time: far enough that the install surely ends before it.
ACTIVATE_IN_S = 3.0
# Bytes per second of the download a newer desired state supersedes (its bundle is padded well
# past the 64 KiB burst, so it is still downloading when the newer state arrives).
SLOW_RATE = 32 * 1024
# Seconds a real `edge agent run` may take to start, reach its fault point, or serve.
AGENT_S = 90.0

# Each named point and the run that reaches it: the install steps a deployment of a version not
# installed yet ("fresh"), the state.json steps the activation of an installed one ("commit"), the
# trash steps a removal, each deployment state the flow that goes through it.
STATE_FLOWS = {"waiting": "wait", "rolling_back": "rollback", "rolled_back": "rollback", "failed": "fail",
               "cancelled": "cancel"}
NAMED = (
    {p: "fresh" for p in STORE_POINTS[:7]} | {p: "commit" for p in STORE_POINTS[7:10]}
    | {"before-trash": "remove", "after-trash": "remove", "validate-child": "fresh"}
    | {p: STATE_FLOWS.get(p.split("-", 2)[-1], "commit") for p in DEPLOYMENT_POINTS}
    | {p: "outbox" for p in OUTBOX_POINTS}
)
# Where each flow ends: the final deployment state and the active tiny version.
OUTCOME = {"commit": ("committed", "1.1.0"), "wait": ("committed", "1.1.0"), "rollback": ("rolled_back", "1.0.0"),
           "fail": ("failed", "1.0.0"), "fresh": ("committed", "1.2.0"), "cancel": ("committed", "1.1.0")}
REAL_AGENT_POINTS = ("outbox-after-put-commit", "deploy-after-pending", "deploy-after-downloading",
                     "deploy-after-verifying", "deploy-after-activating", "deploy-after-health_check", None)


class Campaign:
    """Totals of the whole file, written and printed once at its end."""

    def __init__(self) -> None:
        self.runs = self.kills = 0
        self.points: set[str] = set()
        self.kinds: dict[str, int] = {}
        self.killed_in: dict[str, int] = {}
        self.acknowledged = self.duplicates = 0
        self.started = time.monotonic()

    def count(self, kind: str, result: dict[str, Any], point: str | None = None, state: str | None = None) -> None:
        """Count one run."""
        self.runs += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if result["exitcode"] == -signal.SIGKILL:
            self.kills += 1
            if point:
                self.points.add(point)
            if state:
                self.killed_in[state] = self.killed_in.get(state, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        """Return the totals."""
        return {"runs": self.runs, "kills": self.kills, "named_points_hit": len(self.points),
                "named_points": len(FAULT_POINTS), "runs_by_kind": self.kinds,
                "random_deploy_kills_by_state": self.killed_in, "acknowledged_checked": self.acknowledged,
                "duplicates_delivered": self.duplicates, "seconds": round(time.monotonic() - self.started, 1),
                "seed": SEED}


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Campaign]:
    totals = Campaign()
    yield totals
    data = totals.to_dict()
    out = tmp_path_factory.getbasetemp() / "agent-crash-campaign.json"
    out.write_text(json.dumps(data, indent=2) + "\n")
    line = (f"agent crash campaign: {data['runs']} runs, {data['kills']} kills, {data['named_points_hit']}/"
            f"{data['named_points']} named points, {data['acknowledged_checked']} acknowledged messages checked, "
            f"{data['duplicates_delivered']} duplicates, {data['seconds']} s (seed {SEED}; {out})")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():  # shown even without -s
            print("\n" + line)
    else:
        print(line)


@pytest.fixture(scope="module")
def driver() -> Iterator[Driver]:
    d = Driver()
    yield d
    d.close()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, signing_key) -> dict[str, Path]:
    """tiny 1.0.0-1.2.0, 1.3.0 (padded: a slow download), 1.9.0 (answers NaN), embed 1.0.0."""
    out = tmp_path_factory.mktemp("campaign-bundles")
    made = {f"tiny@{v}": make_generic_bundle(out, signing_key, version=v, allow_downgrade=True)
            for v in ("1.0.0", "1.1.0", "1.2.0")}
    made["tiny@1.3.0"] = make_generic_bundle(out, signing_key, version="1.3.0", allow_downgrade=True,
                                             extra_files={"padding.bin": bytes(192 * 1024)})
    made["tiny@1.9.0"] = make_generic_bundle(out, signing_key, version="1.9.0", allow_downgrade=True,
                                             model=nan_model_bytes())
    made["embed@1.0.0"] = make_generic_bundle(out, signing_key, name="embed", allow_downgrade=True)
    return made


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory, bundles, key_pair) -> dict[str, Path]:
    """"base": tiny@1.0.0 and embed@1.0.0 active, tiny@1.1.0 installed; "full" adds tiny@1.9.0."""
    root = tmp_path_factory.mktemp("campaign-templates")
    with open_store(str(root / "base"), str(key_pair[1])) as store:
        store.install(bundles["tiny@1.0.0"])
        store.install(bundles["embed@1.0.0"])
        store.install(bundles["tiny@1.1.0"], activate=False)
    shutil.copytree(root / "base", root / "full", symlinks=True)
    with open_store(str(root / "full"), str(key_pair[1])) as store:
        store.install(bundles["tiny@1.9.0"], activate=False)
    return {"base": root / "base", "full": root / "full"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArtifactServer]:
    server = ArtifactServer(tmp_path_factory.mktemp("campaign-www"))
    yield server
    server.close()


class Fleet:
    """One test's broker, topic tree, subscriber and desired-state publisher."""

    def __init__(self, broker_url: str, tmp: Path, trusted: Path) -> None:
        self.broker_url, self.tmp, self.trusted = broker_url, tmp, str(trusted)
        self.topics = Topics(fleet=unique("crash"))
        self.delivered = Delivered(broker_url, self.topics)
        self.publisher = client(broker_url, "crash-controller")
        self.devices = 0
        self.dropped: set[str] = set()  # acknowledged messages dropped on purpose (a refusal)
        self.checked: set[str] = set()  # acknowledged messages found queued or delivered after a kill

    def device(self) -> str:
        """Return a new device id."""
        self.devices += 1
        return f"dev-{self.devices:03d}"

    def desire(self, device: str, generation: int, models: dict[str, DesiredModel]) -> None:
        """Publish the retained desired state of ``device``."""
        env = wrap(device, Desired(generation=generation, models=models))
        topic = self.topics.device(device, Channel.DESIRED)
        assert self.publisher.publish(topic, encode(env), qos=1, retain=True).wait(WAIT_S)

    def args(self, device: str, data: Path) -> dict[str, Any]:
        """Return the job arguments every agent and outbox job takes."""
        return {"data": str(data), "broker_url": self.broker_url, "fleet": self.topics.fleet, "device": device,
                "log": str(self.tmp / f"{device}.log"), "acks": str(self.tmp / f"{device}.acks")}

    def close(self) -> None:
        """Disconnect."""
        self.delivered.close()
        self.publisher.stop()


@pytest.fixture()
def fleet(broker, tmp_path: Path, key_pair) -> Iterator[Fleet]:  # noqa: F811
    f = Fleet(broker.url, tmp_path, key_pair[1])
    yield f
    f.close()


# ---------------------------------------------------------------------------- deployments


def plan(flow: str, device: str, artifacts: ArtifactServer, bundles: dict[str, Path]) -> tuple[dict, Desired | None]:
    """Return the desired models of ``flow`` (generation 1) and the newer state that supersedes it."""
    def want(version: str, **update: Any) -> DesiredModel:
        published = artifacts.publish(bundles[f"tiny@{version}"])
        return published.model_copy(update={"deployment_id": f"ro-{device}", **update})

    if flow == "cancel":
        newer = {"tiny": want("1.1.0", deployment_id=f"ro-{device}-2")}
        return {"tiny": want("1.3.0")}, Desired(generation=2, models=newer)
    version = {"commit": "1.1.0", "wait": "1.1.0", "rollback": "1.9.0", "fail": "1.1.0", "fresh": "1.2.0"}[flow]
    update: dict[str, Any] = {}
    if flow == "wait":
        update["activate_after"] = time.time() + ACTIVATE_IN_S
    if flow == "fail":
        update["sha256"] = "0" * 64  # the bytes never match: a deployment that fails
    return {"tiny": want(version, **update)}, None


def deploy_run(fleet: Fleet, driver: Driver, templates: dict[str, Path], artifacts: ArtifactServer,
               bundles: dict[str, Path], flow: str, fault: str | None = None,
               kill: dict[str, Any] | None = None) -> tuple[dict[str, Any], str | None, float | None]:
    """Deploy through a fleet link that is killed, restart it, check; return the kill, the state it
    hit, and how long the flow took when it ended before the kill."""
    device = fleet.device()
    data = fleet.tmp / device
    shutil.copytree(templates["full"], data, symlinks=True)
    models, newer = plan(flow, device, artifacts, bundles)
    fleet.desire(device, 1, models)
    args = {**fleet.args(device, data), "trusted": fleet.trusted, "generation": 1}
    first = {**args, "rate": SLOW_RATE, "supersede": newer.model_dump(mode="json")} if newer else dict(args)
    first["linger"] = kill is not None  # a random kill may land after the deployment, in an idle agent
    killed = driver.run("agent", first, fault=fault, kill=kill)
    assert not killed["hung"], f"{flow} run with {fault} hung"
    if killed["exitcode"] not in (0, -signal.SIGKILL):
        pytest.fail(f"{flow} run with {fault} failed:\n{_error(args)}")
    states = check_records(data)  # right after the kill: every record whole and legal
    took = next((json.loads(line)["seconds"] for line in read_lines(Path(args["log"]))
                 if json.loads(line)["phase"] == "done"), None)
    if newer is not None:
        fleet.desire(device, 2, newer.models)
    result = fleet.tmp / f"{device}.json"
    again = driver.run("agent", {**args, "generation": 2 if newer else 1, "result": str(result)})
    assert again["exitcode"] == 0, f"the restart after {fault or 'a random kill'} in {flow} failed:\n{_error(args)}"
    end = json.loads(result.read_text())
    state, active = OUTCOME[flow]
    if fault == "validate-child":  # the trial load crashed: refused, remembered, never retried
        state, active = "failed", "1.0.0"
    dep = end["deployments"]["tiny"]
    assert dep["state"] == state, (flow, fault, dep)
    summary = check_serving(data, fleet.trusted)
    assert summary["tiny"][0] == active and summary["embed"][0] == "1.0.0", (flow, fault, summary)
    if flow == "rollback":
        assert "1.9.0" in end["models"]["tiny"][2], end  # marked failed: never chosen again
    kind = {"committed": "committed", "rolled_back": "rolled_back", "failed": "failed"}[state]
    assert wait_until(lambda: fleet.delivered.final_event(device, kind, dep["deployment_id"])), \
        f"the {kind} event of {flow} after {fault or 'a random kill'} never reached the controller"
    fleet.checked |= check_acknowledged(Path(args["acks"]), data, fleet.delivered)
    return killed, states.get("tiny"), took


def _error(args: dict[str, Any]) -> str:
    path = Path(args["log"]).with_suffix(".error")
    return path.read_text() if path.exists() else "(no traceback: killed or exited)"


# ---------------------------------------------------------------------------- outbox and store


def outbox_run(fleet: Fleet, driver: Driver, device: str, data: Path, fault: str | None = None,
               kill: dict[str, Any] | None = None, drop: bool = False, count: int | None = None) -> dict[str, Any]:
    """Queue and deliver until killed (or ``count`` queued and all delivered); check nothing
    acknowledged was lost; return how the run ended."""
    args = fleet.args(device, data)
    Path(args["log"]).unlink(missing_ok=True)  # the driver counts this run's start records only
    before = _dropped(data)
    result = driver.run("outbox", {**args, "drop": drop, "count": count}, fault=fault, kill=kill)
    assert not result["hung"] and result["exitcode"] in (0, -signal.SIGKILL), _error(args)
    dropped: set[str] = set()
    for line in read_lines(Path(args["log"])):
        record = json.loads(line)
        if record["phase"] == "drop":
            dropped.add(record["id"])
    if dropped:
        (victim,) = dropped
        gone = victim not in queued_ids(data)
        assert _dropped(data) == before + (1 if gone else 0), "a drop and its count are one transaction"
        assert victim not in fleet.delivered.ids(), "a dropped message was sent"
        if not gone:
            dropped = set()  # the drop did not commit: the message is still owed
    fleet.dropped |= dropped
    fleet.checked |= check_acknowledged(Path(args["acks"]), data, fleet.delivered, fleet.dropped)
    return result


def _dropped(data: Path) -> int:
    path = data / "fleet" / "outbox.db"
    if not path.exists():
        return 0
    box = Outbox(path)
    try:
        return box.dropped_total()
    finally:
        box.close()


def store_run(driver: Driver, data: Path, trusted: str, bundles: dict[str, Path], seed: int, log: Path,
              script: list[list[str]] | None = None, fault: str | None = None,
              kill: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """Run store operations until killed; reopen and check the store; return the kill and where it hit."""
    log.unlink(missing_ok=True)
    paths = {k: str(v) for k, v in bundles.items() if k != "tiny@1.9.0" and k != "tiny@1.3.0"}
    args = {"data": str(data), "trusted": trusted, "bundles": paths, "seed": seed, "log": str(log), "script": script}
    result = driver.run("store", args, fault=fault, kill=kill)
    assert not result["hung"] and result["exitcode"] in (0, -signal.SIGKILL), _error(args)
    summary = check_serving(data, trusted)
    return result, check_outcome(log, summary)


# ---------------------------------------------------------------------------- the tests


def test_the_campaign_covers_every_named_point_and_over_200_kills() -> None:
    assert set(NAMED) == set(FAULT_POINTS)
    named_kills = len(NAMED) - 1  # validate-child kills the trial-load child, not the agent
    assert named_kills + DEPLOY_KILLS + OUTBOX_KILLS + STORE_KILLS + len(REAL_AGENT_POINTS) >= 200


@pytest.mark.parametrize("area", ["store", "outbox", "deployment"])
def test_a_kill_at_every_named_point_leaves_one_verified_version_and_loses_nothing(
        area: str, fleet: Fleet, driver: Driver, templates, artifacts, bundles, campaign: Campaign) -> None:
    points = {"store": STORE_POINTS, "outbox": OUTBOX_POINTS, "deployment": DEPLOYMENT_POINTS}[area]
    kills = 0
    for point in points:
        flow = NAMED[point]
        if flow == "outbox":
            device = fleet.device()
            result = outbox_run(fleet, driver, device, fleet.tmp / device, fault=point, drop="drop" in point,
                                count=200)  # ends on its own (and fails the test) if the point is never reached
            outbox_run(fleet, driver, device, fleet.tmp / device, count=20)  # the restart delivers what was left
        elif flow == "remove":  # tiny@1.1.0 is installed, not active: removing it reaches the trash steps
            data = fleet.tmp / f"store-{point}"
            shutil.copytree(templates["base"], data, symlinks=True)
            result, _ = store_run(driver, data, fleet.trusted, bundles, SEED, fleet.tmp / "store.log",
                                  script=[["remove", "tiny", "1.1.0"]], fault=point)
        else:
            result, _, _ = deploy_run(fleet, driver, templates, artifacts, bundles, flow, fault=point)
        expected = 0 if point == "validate-child" else -signal.SIGKILL  # that one kills the trial-load child
        assert result["exitcode"] == expected, f"{point} was not reached in the {flow} run"
        campaign.count("named", result, point)
        kills += result["exitcode"] == -signal.SIGKILL
        if point == "validate-child":
            campaign.points.add(point)
    dups = fleet.delivered.duplicates()
    campaign.duplicates += dups
    campaign.acknowledged += len(fleet.checked)
    assert dups <= kills * WINDOW, (dups, kills)


def test_random_kills_during_deployments(fleet: Fleet, driver: Driver, templates, artifacts, bundles,
                                         campaign: Campaign) -> None:
    rng = random.Random(SEED)
    flows = ["commit", "rollback", "fail", "cancel", "commit", "rollback", "commit", "cancel", "fail", "fresh"]
    window = dict(FLOW_WINDOW_S)
    kills = 0
    for run in range(DEPLOY_KILLS):
        flow = flows[run % len(flows)]
        kill = {"starts": 1, "delay": rng.uniform(0, window[flow])}
        result, state, took = deploy_run(fleet, driver, templates, artifacts, bundles, flow, kill=kill)
        if took is not None:  # the flow ended before the kill: aim shorter next time
            window[flow] = 0.5 * window[flow] + 0.5 * took
        assert result["exitcode"] == -signal.SIGKILL, "the agent ended on its own"
        campaign.count("deploy", result, state=state or "none")
        kills += 1
    dups = fleet.delivered.duplicates()
    campaign.duplicates += dups
    campaign.acknowledged += len(fleet.checked)
    assert dups <= kills * WINDOW, (dups, kills)
    assert len(campaign.killed_in) >= 4, campaign.killed_in  # kills landed in several states


def test_random_kills_during_outbox_enqueue_and_delivery(fleet: Fleet, driver: Driver, campaign: Campaign) -> None:
    rng = random.Random(SEED + 1)
    device, data = "outbox-1", fleet.tmp / "outbox-1"
    kills = 0
    for _ in range(OUTBOX_KILLS):
        result = outbox_run(fleet, driver, device, data, kill={"starts": 1, "delay": rng.uniform(0, OUTBOX_WINDOW_S)})
        campaign.count("outbox", result)
        kills += result["exitcode"] == -signal.SIGKILL
    # A last, clean run delivers what the kills left queued: then every acknowledged message arrived.
    args = fleet.args(device, data)
    assert outbox_run(fleet, driver, device, data, count=0)["exitcode"] == 0
    assert queued_ids(data) == []
    acked = set(read_lines(Path(args["acks"])))
    assert acked <= fleet.delivered.ids()
    dups = fleet.delivered.duplicates()
    assert dups <= kills * WINDOW, (dups, kills)
    campaign.acknowledged += len(fleet.checked)
    campaign.duplicates += dups
    assert kills == OUTBOX_KILLS  # every run was killed mid-stream (the job never ends on its own)


def test_random_kills_during_store_installs_activations_and_rollbacks(driver: Driver, templates, bundles, key_pair,
                                                                       tmp_path: Path, campaign: Campaign) -> None:
    rng = random.Random(SEED + 2)
    data = Path(shutil.copytree(templates["base"], tmp_path / "data", symlinks=True))
    seen: dict[str, int] = {}
    for run in range(STORE_KILLS):
        kill = {"starts": rng.randrange(1, 3), "delay": rng.uniform(0, STORE_WINDOW_S),
                "install_delay": rng.uniform(0, STORE_INSTALL_WINDOW_S)}
        result, where = store_run(driver, data, str(key_pair[1]), bundles, SEED + run, tmp_path / "ops.jsonl",
                                  kill=kill)
        assert result["exitcode"] == -signal.SIGKILL, "the store worker ended on its own"
        campaign.count("store", result)
        seen[where] = seen.get(where, 0) + 1
    assert seen.get("during install") and (seen.get("during activate") or seen.get("during rollback")), seen


def test_real_agent_processes_killed_mid_deployment_resume_and_serve(
        fleet: Fleet, templates, artifacts, bundles, key_pair, tmp_path: Path, campaign: Campaign) -> None:
    device, data = "real-1", tmp_path / "real-1"
    shutil.copytree(templates["full"], data, symlinks=True)
    models, _ = plan("commit", device, artifacts, bundles)
    fleet.desire(device, 1, models)
    rng = random.Random(SEED + 3)
    for i, point in enumerate(REAL_AGENT_POINTS):
        proc = _agent(device, data, fleet, key_pair[1], tmp_path / f"agent-{i}.log", point)
        if point is None:  # a kill at a random moment of a start
            time.sleep(rng.uniform(0.5, 3.0))
            proc.kill()
        try:
            code = proc.wait(AGENT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"the agent never reached {point}:\n{(tmp_path / f'agent-{i}.log').read_text()[-3000:]}")
        assert code == -signal.SIGKILL, \
            f"the agent ended with {code} before {point}:\n{(tmp_path / f'agent-{i}.log').read_text()[-3000:]}"
        check_records(data)
        campaign.count("edge agent run", {"exitcode": code}, point)
    log = tmp_path / "agent-final.log"
    proc = _agent(device, data, fleet, key_pair[1], log, None)
    try:
        assert wait_until(lambda: fleet.delivered.final_event(device, "committed", f"ro-{device}"), timeout=AGENT_S), \
            log.read_text()[-3000:]
        assert wait_until(lambda: bool(re.search(r"serving on (http://\S+)", log.read_text())), timeout=AGENT_S)
        url = re.search(r"serving on (http://\S+)", log.read_text()).group(1)  # type: ignore[union-attr]
        assert wait_until(lambda: _ready(url), timeout=AGENT_S), log.read_text()[-3000:]
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
        answer = httpx.post(f"{url}/v2/models/tiny/infer", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        y = np.array(answer.json()["outputs"][0]["data"], np.float32).reshape(1, 2)
        np.testing.assert_allclose(y, expected_output("1.1.0", x), rtol=1e-5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(AGENT_S)
    assert proc.returncode == 0
    assert check_records(data) == {"tiny": "committed"}
    summary = check_serving(data, str(key_pair[1]))
    assert summary["tiny"][:2] == ["1.1.0", "1.0.0"]


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _agent(device: str, data: Path, fleet: Fleet, trusted: Path, log: Path, fault: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env.update(EDGE_HOME=str(data.parent / "home"), PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    if fault:
        env["EDGE_FAULT_POINT"] = fault
    cmd = [sys.executable, "-m", "edge.cli.main", "agent", "run", "--device-id", device, "--data", str(data),
           "--broker", fleet.broker_url, "--fleet", fleet.topics.fleet, "--trusted-key", str(trusted),
           "--http", "127.0.0.1:0", "--profile", "generic-cpu", "--telemetry-interval", "1"]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
