"""The deployment state machine: its table, schedules, and what a restart does mid-deployment."""

from __future__ import annotations

import calendar
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge.agent.deployer import Deployer
from edge.agent.deployment import (
    INTERRUPTIBLE, TERMINAL, TRANSITIONS, Deployment, DeploymentJournal, DeployState, in_window,
)  # fmt: skip
from edge.agent.health import HEALTH_TIMEOUT_S, ChildHealthCheck, RegistryHealthCheck
from edge.errors import ConfigError, StoreError
from edge.protocol.messages import Desired, DesiredModel, Event
from tests.transport.helpers import wait_until

S = DeployState


def test_every_state_can_reach_an_end_and_ends_are_final() -> None:
    assert TERMINAL == {S.COMMITTED, S.ROLLED_BACK, S.FAILED, S.CANCELLED}
    for state in DeployState:
        seen, todo = set(), [state]
        while todo:
            s = todo.pop()
            seen.add(s)
            todo.extend(TRANSITIONS[s] - seen)
        assert seen & TERMINAL, state
    # Once a version was switched, nothing may cancel the deployment half-way.
    assert not INTERRUPTIBLE & {S.ACTIVATING, S.HEALTH_CHECK, S.ROLLING_BACK}
    dep = Deployment("tiny", "1.0.0", "http://x/b", "0" * 64, 10)
    with pytest.raises(StoreError, match="cannot go from pending to committed"):
        dep.move(S.COMMITTED)


def test_maintenance_windows_and_activation_times() -> None:
    t = calendar.timegm((2026, 1, 1, 2, 30, 0))  # 02:30 UTC
    assert in_window("01:00-04:00", t) and not in_window("03:00-04:00", t)
    assert in_window("23:00-03:00", t)  # wraps midnight
    with pytest.raises(ConfigError, match="HH:MM-HH:MM"):
        in_window("2am-4am", t)
    later = Deployment("tiny", "1.0.0", "u", "0" * 64, 1, activate_after=t + 60, maintenance_window="01:00-04:00")
    assert not later.may_activate(t) and later.may_activate(t + 61)
    model = DesiredModel(version="1.0.0", bundle_url="u", sha256="0" * 64, size=1, maintenance_window="25:00-26:00")
    with pytest.raises(ConfigError):
        Deployment.for_target("tiny", model, 1, False)


def test_the_memory_of_failures_survives_in_order(tmp_path: Path) -> None:
    journal = DeploymentJournal(tmp_path)
    journal.save_failures({"b": "2", "a": "1"})
    assert list(journal.failures().items()) == [("b", "2"), ("a", "1")]


@pytest.mark.parametrize("name", ["failed", "managed"])
def test_a_model_named_like_the_journal_files_keeps_its_own_record(tmp_path: Path, name: str) -> None:
    journal = DeploymentJournal(tmp_path)
    journal.save_failures({"tiny@2.0.0": "health check failed"})
    journal.save_managed({name})
    journal.save(Deployment(name, "1.0.0", "u", "0" * 64, 1))
    reopened = DeploymentJournal(tmp_path)
    assert reopened.load()[name].version == "1.0.0"
    assert reopened.failures() == {"tiny@2.0.0": "health check failed"}
    assert reopened.managed() == {name}


def test_failures_kept_under_the_old_file_name_are_moved(tmp_path: Path) -> None:
    (tmp_path / "failed.json").write_text('[["tiny@2.0.0", "health check failed"]]')
    journal = DeploymentJournal(tmp_path)
    assert journal.failures() == {"tiny@2.0.0": "health check failed"}
    assert not (tmp_path / "failed.json").exists() and journal.load() == {}


class _NeverCalled:
    def check(self, installed):  # pragma: no cover - a failure if reached
        raise AssertionError("the health check must not run a third time")

    def restore(self, name: str) -> None:
        self.restored = name


def test_a_crash_during_the_health_check_twice_rolls_back_at_restart(tmp_path: Path, device) -> None:
    agent = device("dev-1", seeded=True)
    agent.store.activate("tiny", "1.1.0")  # the switch happened, then the agent died
    folder = agent.data_dir / "fleet" / "deployments"
    record = Deployment("tiny", "1.1.0", "http://x/b", "0" * 64, 10, deployment_id="r1", state=S.HEALTH_CHECK,
                        health_attempts=2, previous="1.0.0")
    DeploymentJournal(folder).save(record)
    events: list[Event] = []
    health = _NeverCalled()
    deployer = Deployer(agent.store, folder, health, emit=events.append)
    deployer.start()
    try:
        assert wait_until(lambda: deployer.deployments()["tiny"].state is S.ROLLED_BACK)
    finally:
        deployer.stop()
    assert [e.kind.value for e in events] == ["health_failed", "rolled_back"]
    assert "stopped during 2 health checks" in events[0].detail and events[1].deployment_id == "r1"
    assert [m.version for m in agent.store.active()] == ["1.0.0"] and health.restored == "tiny"
    assert DeploymentJournal(folder).load()["tiny"].state is S.ROLLED_BACK  # persisted
    assert any(k.startswith("r1:tiny@1.1.0") for k in DeploymentJournal(folder).failures())


def test_an_interrupted_activation_is_finished_at_restart(tmp_path: Path, device) -> None:
    agent = device("dev-1", seeded=True)  # 1.1.0 installed, not yet active
    folder = agent.data_dir / "fleet" / "deployments"
    DeploymentJournal(folder).save(Deployment("tiny", "1.1.0", "http://x/b", "0" * 64, 10, state=S.ACTIVATING))

    class Healthy:
        def check(self, installed):
            return "CPUExecutionProvider"

        def restore(self, name: str) -> None:
            pass

    events: list[Event] = []
    deployer = Deployer(agent.store, folder, Healthy(), emit=events.append)
    deployer.start()
    try:
        assert wait_until(lambda: deployer.deployments()["tiny"].state is S.COMMITTED)
    finally:
        deployer.stop()
    assert [e.kind.value for e in events] == ["activated", "health_ok", "committed"]
    assert [m.version for m in agent.store.active()] == ["1.1.0"]
    assert deployer.deployments()["tiny"].previous == "1.0.0"


class _SlowRegistry:
    """A serving registry whose load of tiny@1.1.0 hangs (until released); other loads return."""

    def __init__(self, store, release: threading.Event) -> None:
        self.store, self.release = store, release

    def load(self, name: str) -> SimpleNamespace:
        inst = self.store.get(name)
        if inst.version == "1.1.0":
            self.release.wait(60)
        return SimpleNamespace(version=inst.version, served=None)

    def index(self) -> list[dict[str, str]]:
        return []


def test_a_health_check_without_an_answer_by_its_deadline_rolls_back_and_is_never_retried(device) -> None:
    # The promise: an activated version that fails its health check is rolled back within 60 s.
    # Both kinds of check give up at the same configured deadline (no wall clock is asserted here).
    assert HEALTH_TIMEOUT_S <= 60
    assert RegistryHealthCheck(None).timeout_s == ChildHealthCheck(None).timeout_s == HEALTH_TIMEOUT_S
    agent = device("dev-1", seeded=True)  # 1.0.0 active, 1.1.0 installed
    folder = agent.data_dir / "fleet" / "deployments"
    DeploymentJournal(folder).save(Deployment("tiny", "1.1.0", "http://x/b", "0" * 64, 10, deployment_id="r1",
                                              state=S.ACTIVATING))
    release = threading.Event()
    events: list[Event] = []
    deployer = Deployer(agent.store, folder, RegistryHealthCheck(_SlowRegistry(agent.store, release), timeout_s=0.2),
                        emit=events.append)
    deployer.start()
    try:
        assert wait_until(lambda: deployer.deployments()["tiny"].state is S.ROLLED_BACK)
    finally:
        release.set()
        deployer.stop()
    assert [e.kind.value for e in events] == ["activated", "health_failed", "rolled_back"]
    assert "tiny@1.1.0: no answer within 0.2 s" in events[1].detail
    assert [m.version for m in agent.store.active()] == ["1.0.0"]

    # A restart, and the controller still desires 1.1.0 for r1: the cap holds, nothing is tried again.
    events.clear()
    again = Deployer(agent.store, folder, _NeverCalled(), emit=events.append)
    again.start()
    try:
        target = DesiredModel(version="1.1.0", bundle_url="http://x/b", sha256="0" * 64, size=10, deployment_id="r1")
        again.desire(Desired(generation=2, models={"tiny": target}))
        assert wait_until(lambda: again.generation == 2)  # absorbed: the deployments are decided by now
        assert again.deployments()["tiny"].state is S.ROLLED_BACK and events == []
    finally:
        again.stop()
    assert [m.version for m in agent.store.active()] == ["1.0.0"]
