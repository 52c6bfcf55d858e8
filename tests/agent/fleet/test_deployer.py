"""The deployment state machine: its table, schedules, and what a restart does mid-deployment."""

from __future__ import annotations

import calendar
from pathlib import Path

import pytest

from edge.agent.deployer import Deployer
from edge.agent.deployment import (
    INTERRUPTIBLE, TERMINAL, TRANSITIONS, Deployment, DeploymentJournal, DeployState, in_window,
)  # fmt: skip
from edge.errors import ConfigError, StoreError
from edge.protocol.messages import DesiredModel, Event
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
