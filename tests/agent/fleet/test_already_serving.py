"""A rollout that names the version a device already serves is acknowledged at once."""

from __future__ import annotations

from edge.agent.deployer import Deployer
from edge.agent.deployment import DeploymentJournal, DeployState
from edge.protocol.messages import Desired, DesiredModel, Event
from tests.transport.helpers import wait_until


class _NoCheck:
    def check(self, installed):  # pragma: no cover - a failure if reached
        raise AssertionError("nothing is deployed, so nothing is checked")

    def restore(self, name: str) -> None:
        pass

    def release(self, name: str) -> None:
        pass


def test_a_rollout_naming_the_version_already_served_is_acknowledged_once(device) -> None:
    agent = device("dev-1", seeded=True)  # tiny@1.0.0 active: flashed by hand, the controller did not know
    folder = agent.data_dir / "fleet" / "deployments"
    events: list[Event] = []
    deployer = Deployer(agent.store, folder, _NoCheck(), emit=events.append)
    model = DesiredModel(version="1.0.0", bundle_url="http://127.0.0.1:9/never", sha256="0" * 64, size=1,
                         deployment_id="r7")
    deployer.start()
    try:
        for generation in (1, 2):  # the same desired state again (a reconnect): acknowledged once
            deployer.desire(Desired(generation=generation, models={"tiny": model}))
            assert wait_until(lambda: deployer.generation == generation)
    finally:
        deployer.stop()
    # Without the event the rollout would wait for this device until its timeout, then count it failed.
    assert [(e.kind.value, e.version, e.deployment_id, e.detail) for e in events] == [
        ("committed", "1.0.0", "r7", "already serving this version")]
    assert DeploymentJournal(folder).load()["tiny"].state is DeployState.COMMITTED
    assert [m.version for m in agent.store.active()] == ["1.0.0"]
    assert deployer.report()[0].state == "active" and len(deployer.report()) == 1
