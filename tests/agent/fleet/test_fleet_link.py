"""The fleet link end to end: a real broker, a real artifact server, a real store and real inference."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from edge.agent.fleet_link import FleetLink, FleetOptions, SessionCounter
from edge.agent.runner import Agent, AgentOptions
from edge.errors import ConfigError
from edge.protocol.messages import Desired, DesiredModel, Status, encode, wrap
from edge.protocol.topics import Channel, Command
from tests.agent.fleet.helpers import FAST, Controller, Cut
from tests.fixtures.bundles import expected_output
from tests.transport.helpers import WAIT_S, wait_until

ROOT = Path(__file__).resolve().parents[3]
# Deployments spawn two child processes (the store's trial load, the health check) that import
# onnxruntime: give them room on a busy 2-core machine.
DEPLOY_WAIT_S = 90.0
STEPS = ["download_started", "downloaded", "verified", "installed", "activated", "health_ok", "committed"]


@pytest.mark.parametrize("bad", ["a/b", "dev+1", "#", "$SYS", "dev 1", "", "x" * 65])
def test_unsafe_device_ids_are_refused(bad: str, device, broker) -> None:
    agent = device("ok")
    agent.device_id = bad
    with pytest.raises(ConfigError, match="invalid device id"):
        FleetLink(FleetOptions(broker.url)).start(agent)


def test_options_are_validated(broker) -> None:
    with pytest.raises(ConfigError, match="unsupported broker URL scheme"):
        FleetOptions("http://127.0.0.1:1883")
    with pytest.raises(ConfigError, match="telemetry interval"):
        FleetOptions(broker.url, telemetry_interval=0)


def test_session_counter_only_goes_up(tmp_path: Path) -> None:
    counter = SessionCounter(tmp_path / "session")
    assert [counter.next(), counter.next()] == [1, 2]
    assert SessionCounter(tmp_path / "session").next() == 3
    (tmp_path / "session").write_text("garbage")
    assert SessionCounter(tmp_path / "session").next() > 1_000_000_000  # never reused after corruption


AGENT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from edge.agent.fleet_link import FleetLink, FleetOptions
    from edge.agent.store import Store
    from edge.protocol.catalog import load_catalog
    from edge.protocol.signing import TrustStore
    from edge.protocol.topics import Topics
    from tests.agent.fleet.helpers import FAST, FakeAgent
    url, data, fleet = sys.argv[1:4]
    profile = load_catalog().get("generic-cpu")
    agent = FakeAgent("dev-1", Path(data), Store(Path(data), profile, TrustStore()), profile)
    link = FleetLink(FleetOptions(url, topics=Topics(fleet=fleet), reconnect=FAST, telemetry_interval=60))
    link.start(agent)
    assert link.client.wait_connected(30), link.client.last_error
    print("ready", link.session, flush=True)
    time.sleep(300)
    """
)


def test_birth_and_death_carry_the_session(broker, topics, controller: Controller, device, links) -> None:
    agent = device("dev-1")
    proc = subprocess.Popen([sys.executable, "-c", AGENT_SCRIPT, broker.url, str(agent.data_dir), topics.fleet],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline().split()
        assert line[:1] == ["ready"], proc.stderr.read()
        session = int(line[1])
        assert controller.wait_for(lambda c: any(s.state == "online" for s in c.statuses()))
        proc.send_signal(signal.SIGKILL)  # a crash: the broker publishes the will
        proc.wait(WAIT_S)
        assert controller.wait_for(lambda c: c.statuses()[-1].state == "offline")
    finally:
        if proc.poll() is None:
            proc.kill()
    online, will = controller.statuses()[-2:]
    assert (online.state, online.session) == ("online", session)
    assert (will.state, will.session, will.reason) == ("offline", session, "connection lost")
    assert online.profile == "generic-cpu" and online.capabilities is not None
    assert online.capabilities.ram_mb > 0 and "CPUExecutionProvider" in online.capabilities.providers

    link = links(agent)  # the agent comes back: a newer session, so the stale will is recognisable
    assert controller.wait_for(lambda c: c.statuses()[-1].state == "online")
    assert controller.statuses()[-1].session == link.session > session
    link.stop()
    assert controller.wait_for(lambda c: c.statuses()[-1].state == "offline")
    goodbye = controller.statuses()[-1]
    assert (goodbye.session, goodbye.reason) == (link.session, "shutdown")


def test_a_stale_will_that_overwrote_the_birth_is_corrected(controller: Controller, device, links, topics) -> None:
    link = links(device("dev-1"))
    assert controller.wait_for(lambda c: any(s.state == "online" for s in c.statuses()))
    # The broker noticed the previous connection's death late: its will lands after the birth.
    stale = Status(state="offline", session=link.session - 1, reason="connection lost")
    topic = topics.device("dev-1", Channel.STATUS)
    assert controller.client.publish(topic, encode(wrap("dev-1", stale)), retain=True).wait(WAIT_S)
    assert controller.wait_for(lambda c: c.statuses()[-1].state == "online" and c.statuses()[-2] == stale)
    assert controller.statuses()[-1].session == link.session


def test_desired_state_is_downloaded_resumed_installed_activated_and_committed(
    controller: Controller, device, links, artifacts, bundles
) -> None:
    bundle = bundles("1.0.0", padding=256 * 1024)
    model = artifacts.publish(bundle)
    artifacts.cuts.append(Cut("/" + bundle.name, after=100_000))  # the first attempt breaks off
    agent = device("dev-1", serving=True)
    links(agent)
    controller.desire(1, {"tiny": model.model_copy(update={"deployment_id": "rollout-1"})})
    assert controller.wait_for(lambda c: "committed" in c.kinds(), DEPLOY_WAIT_S), controller.kinds()
    assert controller.kinds("1.0.0") == STEPS
    assert all(e.deployment_id == "rollout-1" for e in controller.events())
    ranges = [r["range"] for r in artifacts.requests]
    assert ranges[0] == "" and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"  # resumed
    assert [m.version for m in agent.store.active()] == ["1.0.0"]
    assert agent.registry.resolve("tiny").version == "1.0.0"  # the health check loaded it for serving
    assert controller.wait_for(lambda c: c.reported() and c.reported()[-1].models
                               and c.reported()[-1].models[-1].state == "active")
    final = controller.reported()[-1]
    assert final.generation == 1
    assert [(m.name, m.version, m.state) for m in final.models] == [("tiny", "1.0.0", "active")]
    def active_sample(c: Controller):
        return next((t for t in reversed(c.telemetry()) if t.models and t.models[0].provider), None)

    assert controller.wait_for(lambda c: active_sample(c) is not None)
    sample = active_sample(controller)
    assert sample.models[0].version == "1.0.0" and sample.session >= 1 and sample.ram_total_mb > 0
    assert sample.models[0].state == "active"
    assert sample.models[0].provider == "CPUExecutionProvider"  # what ORT actually uses, from the server
    assert sample.agent_version and sample.outbox_dropped == 0


@pytest.mark.parametrize("serving", [False, True], ids=["child-check", "registry-check"])
def test_a_bundle_that_fails_its_health_check_is_rolled_back_and_never_retried(
    serving: bool, controller: Controller, device, links, artifacts, bundles
) -> None:
    agent = device("dev-1", serving=serving, seeded=True)  # tiny@1.0.0 in service
    bad = artifacts.publish(bundles("1.2.0", nan=True))
    links(agent)
    controller.desire(1, {"tiny": bad})
    assert controller.wait_for(lambda c: "rolled_back" in c.kinds(), DEPLOY_WAIT_S), controller.kinds()
    assert controller.kinds("1.2.0") == [*STEPS[:5], "health_failed", "rolled_back"]
    failed = next(e for e in controller.events() if e.kind.value == "health_failed")
    assert "NaN" in failed.detail and failed.error_code == "inference_failed"
    back = next(e for e in controller.events() if e.kind.value == "rolled_back")
    assert back.detail.startswith("back to 1.0.0") and "NaN" in back.detail
    assert [m.version for m in agent.store.active()] == ["1.0.0"]
    if serving:
        assert agent.registry.resolve("tiny").version == "1.0.0"  # requests go to the good version again
    status = next(s for s in agent.store.list() if s.name == "tiny")
    assert next(v for v in status.versions if v.version == "1.2.0").failed

    def reported_rollback(c: Controller) -> bool:
        r = c.reported()
        return bool(r) and {(m.version, m.state) for m in r[-1].models} == {("1.0.0", "active"), ("1.2.0", "rolled_back")}

    assert controller.wait_for(reported_rollback)
    error = next(m.error for m in controller.reported()[-1].models if m.version == "1.2.0")
    assert "NaN" in error

    # The same desired state again (a newer generation): the device remembers and does not loop.
    controller.desire(2, {"tiny": bad})
    assert controller.wait_for(lambda c: c.reported()[-1].generation == 2)
    assert controller.kinds("1.2.0").count("download_started") == 1
    assert [m.version for m in agent.store.active()] == ["1.0.0"]


def test_commands_are_answered_once_per_id(controller: Controller, device, links, artifacts, bundles) -> None:
    agent = device("dev-1", serving=True, seeded=True)
    agent.store.activate("tiny", "1.1.0")  # 1.0.0 becomes the rollback target
    link = links(agent)

    pong = controller.response(controller.command(Command.PING))
    assert pong.ok and pong.result["pong"] and pong.result["session"] == link.session

    cid = controller.command(Command.SET_CONFIG, {"telemetry_interval": 30})
    first = controller.response(cid)
    assert first.ok and first.result == {"telemetry_interval": 30.0}
    controller.command(Command.SET_CONFIG, {"telemetry_interval": 5}, command_id=cid)  # a redelivery
    assert controller.wait_for(lambda c: sum(r.command_id == cid for r in c.responses()) == 2)
    assert [r for r in controller.responses() if r.command_id == cid][1] == first  # not run again

    bad = controller.response(controller.command(Command.SET_CONFIG, {"colour": "red"}))
    assert not bad.ok and bad.error_code == "config_invalid" and "valid: telemetry_interval" in bad.error
    late = controller.response(controller.command(Command.PING, expires_at=time.time() - 60))
    assert not late.ok and late.error_code == "expired"

    back = controller.response(controller.command(Command.ROLLBACK, {"name": "tiny"}))
    assert back.ok and back.result == {"model": "tiny", "active": "1.0.0"}
    assert [m.version for m in agent.store.active()] == ["1.0.0"]
    assert controller.wait_for(lambda c: "rolled_back" in c.kinds())

    wrong = controller.response(controller.command(Command.DEPLOY, {"name": "tiny", "version": "x"}))
    assert not wrong.ok and wrong.error_code == "config_invalid" and "invalid deploy arguments" in wrong.error
    model = artifacts.publish(bundles("1.1.0"))  # the same bytes the store already holds
    deploy = controller.response(controller.command(Command.DEPLOY, {"name": "tiny", **model.model_dump()}))
    assert deploy.ok and deploy.result == {"accepted": True, "model": "tiny", "version": "1.1.0"}
    assert controller.wait_for(lambda c: "committed" in c.kinds("1.1.0"), DEPLOY_WAIT_S), controller.kinds()
    assert [m.version for m in agent.store.active()] == ["1.1.0"]

    restart = controller.response(controller.command(Command.RESTART))
    assert restart.ok and wait_until(lambda: agent.stopped == [True])


def test_a_restart_in_the_middle_of_a_download_resumes_it(
    controller: Controller, device, links, artifacts, bundles
) -> None:
    bundle = bundles("1.0.0", padding=256 * 1024)
    model = artifacts.publish(bundle)
    artifacts.cuts.append(Cut("/" + bundle.name, after=100_000))
    agent = device("dev-1", serving=True)
    slow = links(agent, download_backoff=FAST.__class__(initial=600, maximum=600))  # waits after the cut
    controller.desire(1, {"tiny": model})
    part = agent.data_dir / "fleet" / "deployments" / "downloads" / (
        f"tiny-1.0.0-{model.sha256[:12]}.edgebundle.part")
    assert wait_until(lambda: part.exists() and slow.deployer.deployments()["tiny"].attempts == 1)
    slow.stop()  # the agent stops while it waits to retry
    have = part.stat().st_size
    assert 0 < have <= 100_000
    links(agent)  # ... and starts again: the download resumes where it stopped
    assert controller.wait_for(lambda c: "committed" in c.kinds(), DEPLOY_WAIT_S), controller.kinds()
    assert artifacts.requests[-1]["range"] == f"bytes={have}-"
    assert controller.kinds("1.0.0").count("download_started") == 1
    assert [m.version for m in agent.store.active()] == ["1.0.0"]


def test_a_newer_desired_version_supersedes_a_download_in_progress(
    controller: Controller, device, links, artifacts, bundles
) -> None:
    first = bundles("1.0.0", padding=128 * 1024)
    artifacts.cuts.append(Cut("/" + first.name, after=10_000))
    agent = device("dev-1", serving=True)
    links(agent, download_backoff=FAST.__class__(initial=600, maximum=600))
    controller.desire(1, {"tiny": artifacts.publish(first)})
    assert controller.wait_for(lambda c: "download_started" in c.kinds("1.0.0"))
    controller.desire(2, {"tiny": artifacts.publish(bundles("1.0.1"))})
    assert controller.wait_for(lambda c: "committed" in c.kinds("1.0.1"), DEPLOY_WAIT_S), controller.kinds()
    cancelled = [e for e in controller.events() if e.version == "1.0.0" and e.kind.value == "failed"]
    assert cancelled and "superseded by tiny@1.0.1" in cancelled[0].detail
    assert [m.version for m in agent.store.active()] == ["1.0.1"]


def test_desired_for_another_device_or_garbage_is_ignored(controller: Controller, device, links, broker, topics) -> None:
    agent = device("dev-1")
    link = links(agent)
    assert link.client.wait_connected(WAIT_S)
    wrong = encode(wrap("dev-2", Desired(generation=9, models={"tiny": DesiredModel(
        version="9.0.0", bundle_url="http://127.0.0.1:9/x", sha256="0" * 64, size=1)})))
    topic = topics.device("dev-1", Channel.DESIRED)
    assert controller.client.publish(topic, wrong, retain=True).wait(WAIT_S)
    assert controller.client.publish(topic, b"{not json", retain=True).wait(WAIT_S)
    controller.response(controller.command(Command.PING))  # processed after the two messages
    assert link.deployer.deployments() == {}
    assert isinstance(controller.statuses()[-1], Status)


def test_the_runner_serves_what_the_fleet_deploys(broker, topics, controller: Controller, artifacts, bundles,
                                                  device, profile) -> None:
    seed = device("seed", seeded=True)  # a store with tiny@1.0.0 active
    link = FleetLink(FleetOptions(broker.url, topics=topics, reconnect=FAST, telemetry_interval=0.5))
    agent = Agent(AgentOptions(device_id="dev-1", data_dir=seed.data_dir, port=0, profile=profile.name),
                  connector=link, store=seed.store, profile=profile)
    server = threading.Thread(target=agent.serve, daemon=True)
    server.start()
    try:
        assert wait_until(lambda: link.client is not None and link.wait_ready(0.1))
        assert controller.wait_for(lambda c: any(s.state == "online" for s in c.statuses()))
        host, port = agent.address
        assert controller.statuses()[-1].http_url == f"http://{host}:{port}"
        x = [[1.0, 2.0, 3.0, 4.0]]

        def infer() -> tuple[str, list[float]]:
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x[0]}]}
            r = httpx.post(f"http://{host}:{port}/v2/models/tiny/infer", json=body, timeout=30)
            assert r.status_code == 200, r.text
            return r.json()["model_version"], r.json()["outputs"][0]["data"]

        assert wait_until(lambda: agent.registry.readiness()[0])
        assert infer() == ("1.0.0", expected_output("1.0.0", np.array(x)).ravel().tolist())
        controller.desire(1, {"tiny": artifacts.publish(bundles("1.2.0"))})
        assert controller.wait_for(lambda c: "committed" in c.kinds("1.2.0"), DEPLOY_WAIT_S), controller.kinds()
        version, y = infer()  # requests reach the new version, from the same process, no restart
        assert version == "1.2.0"
        assert y == expected_output("1.2.0", np.array(x)).ravel().tolist()
    finally:
        agent.stop()
        server.join(30)
    assert controller.wait_for(lambda c: c.statuses()[-1].reason == "shutdown")  # the runner stopped the link
