"""A model the desired state stops naming is taken off the device (policy: edge.agent.removal)."""

from __future__ import annotations

import pytest

from edge.agent.deployer import Deployer
from edge.agent.deployment import Deployment, DeploymentJournal, DeployState
from edge.agent.health import RegistryHealthCheck
from edge.errors import NotFoundError, StoreError
from edge.protocol.messages import Desired, DesiredModel, Event
from tests.agent.fleet.helpers import Cut
from tests.transport.helpers import wait_until

S = DeployState
# What the seeded store already runs: naming it never downloads anything.
RUNNING = DesiredModel(version="1.0.0", bundle_url="http://127.0.0.1:9/never", sha256="0" * 64, size=1)


def kinds(events: list[Event]) -> list[tuple[str, str | None]]:
    return [(e.kind.value, e.version) for e in events]


def desire(deployer: Deployer, generation: int, **models: DesiredModel) -> None:
    """Hand over a desired state; return once the worker took it."""
    deployer.desire(Desired(generation=generation, models=models))
    assert wait_until(lambda: deployer.generation == generation)


def settle(deployer: Deployer, generation: int, **models: DesiredModel) -> None:
    """Desire twice: the worker takes the second only after the turn of the first (its removals
    included) is over."""
    desire(deployer, generation, **models)
    desire(deployer, generation + 1, **models)


class Healthy:
    def __init__(self) -> None:
        self.released: list[str] = []

    def check(self, installed) -> str:
        return "CPUExecutionProvider"

    def restore(self, name: str) -> None:
        pass

    def release(self, name: str) -> None:
        self.released.append(name)


def test_a_dropped_model_stops_serving_and_leaves_the_store_and_a_flashed_one_stays(device) -> None:
    agent = device("dev-1", serving=True, seeded=True)  # tiny@1.0.0 active and loaded, 1.1.0 installed
    folder = agent.data_dir / "fleet" / "deployments"
    events: list[Event] = []
    deployer = Deployer(agent.store, folder, RegistryHealthCheck(agent.registry), emit=events.append)
    deployer.start()
    try:
        settle(deployer, 1)  # never named by a desired state (flashed by hand): not the fleet's to remove
        assert [m.version for m in agent.store.active()] == ["1.0.0"] and events == []
        settle(deployer, 3, tiny=RUNNING)  # named: from now on the desired state manages it
        assert DeploymentJournal(folder).managed() == {"tiny"} and events == []
    finally:
        deployer.stop()

    deployer = Deployer(agent.store, folder, RegistryHealthCheck(agent.registry), emit=events.append)
    deployer.start()  # a restart: what the desired state manages is remembered
    try:
        deployer.desire(Desired(generation=5, models={}))
        assert wait_until(lambda: len(events) == 2), events
        settle(deployer, 6)
    finally:
        deployer.stop()
    assert kinds(events) == [("removed", "1.0.0"), ("removed", "1.1.0")]
    assert "stopped serving it" in events[0].detail and "stopped serving" not in events[1].detail
    assert agent.store.list() == [] and not (agent.data_dir / "models" / "tiny").exists()
    with pytest.raises(NotFoundError, match="unknown model 'tiny'"):
        agent.registry.resolve("tiny")  # requests answer 404 now
    assert DeploymentJournal(folder).managed() == set()
    assert deployer.report() == ()


def test_a_switch_in_progress_finishes_before_the_removal(device) -> None:
    agent = device("dev-1", seeded=True)  # 1.1.0 installed, not active
    folder = agent.data_dir / "fleet" / "deployments"
    journal = DeploymentJournal(folder)
    journal.save(Deployment("tiny", "1.1.0", "http://x/b", "0" * 64, 10, deployment_id="r1", state=S.ACTIVATING))
    journal.save_managed({"tiny"})
    events: list[Event] = []
    health = Healthy()
    deployer = Deployer(agent.store, folder, health, emit=events.append)
    deployer.desire(Desired(generation=1, models={}))  # arrives before the worker resumes the switch
    deployer.start()
    try:
        assert wait_until(lambda: len(events) == 5), events
    finally:
        deployer.stop()
    assert kinds(events) == [("activated", "1.1.0"), ("health_ok", "1.1.0"), ("committed", "1.1.0"),
                             ("removed", "1.0.0"), ("removed", "1.1.0")]
    assert health.released == ["tiny"] and agent.store.list() == []
    assert "tiny" not in deployer.deployments() and not (folder / "tiny.json").exists()


def test_a_download_in_progress_is_cancelled_and_its_partial_file_deleted(
        device, artifacts, bundles) -> None:
    from edge.transport import Backoff

    bundle = bundles("1.2.0", padding=64 * 1024)
    artifacts.cuts.append(Cut("/" + bundle.name, after=10_000))
    model = artifacts.publish(bundle)
    agent = device("dev-1")
    folder = agent.data_dir / "fleet" / "deployments"
    events: list[Event] = []
    deployer = Deployer(agent.store, folder, Healthy(), emit=events.append,
                        backoff=Backoff(initial=600, maximum=600))  # waits after the cut
    deployer.start()
    try:
        deployer.desire(Desired(generation=1, models={"tiny": model}))
        part = folder / "downloads" / f"tiny-1.2.0-{model.sha256[:12]}.edgebundle.part"
        assert wait_until(lambda: part.exists() and deployer.deployments()["tiny"].attempts == 1)
        deployer.desire(Desired(generation=2, models={}))
        assert wait_until(lambda: "tiny" not in deployer.deployments()), deployer.deployments()
    finally:
        deployer.stop(timeout=30)
    assert kinds(events) == [("download_started", "1.2.0"), ("failed", "1.2.0")]
    assert events[1].detail == "cancelled: removed from the desired state" and events[1].error_code == "cancelled"
    assert not part.exists() and agent.store.list() == []


def test_a_deploy_command_takes_a_model_out_of_the_desired_states_hands(device) -> None:
    agent = device("dev-1", seeded=True)
    folder = agent.data_dir / "fleet" / "deployments"
    events: list[Event] = []
    deployer = Deployer(agent.store, folder, Healthy(), emit=events.append)
    deployer.start()
    try:
        settle(deployer, 1, tiny=RUNNING)
        deployer.deploy("tiny", RUNNING)  # the operator takes it over
        settle(deployer, 3)
    finally:
        deployer.stop()
    assert events == [] and [m.version for m in agent.store.active()] == ["1.0.0"]
    assert DeploymentJournal(folder).managed() == set()


def test_an_interrupted_uninstall_stops_serving_at_once_and_finishes_when_run_again(device, monkeypatch) -> None:
    store = device("dev-1", seeded=True).store  # tiny@1.0.0 active, 1.1.0 installed
    real, removed = store.remove, []

    def dies_after_one(name: str, version: str) -> None:
        if removed:
            raise StoreError("the power went")
        removed.append(version)
        real(name, version)

    monkeypatch.setattr(store, "remove", dies_after_one)
    with pytest.raises(StoreError, match="the power went"):
        store.uninstall("tiny")
    assert store.active() == [] and store.versions("tiny") == ["1.1.0"]  # the commit point came first
    monkeypatch.undo()
    assert store.uninstall("tiny") == ["1.1.0"] and store.list() == []
    assert store.uninstall("tiny") == []  # nothing left: a no-op
    with pytest.raises(NotFoundError, match="invalid model name"):
        store.uninstall("../models")
