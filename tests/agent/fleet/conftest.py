"""Brokers, an artifact server, bundles and device factories for the fleet link tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest

from edge.agent.fleet_link import FleetLink, FleetOptions
from edge.agent.store import Store
from edge.protocol.catalog import Catalog
from edge.protocol.profile import DeviceProfile
from edge.protocol.signing import SigningKey, TrustStore
from edge.protocol.topics import Topics
from tests.agent.fleet.helpers import FAST, ArtifactServer, Controller, FakeAgent
from tests.fixtures.broker import any_broker, broker, embedded_broker  # noqa: F401
from tests.fixtures.bundles import make_generic_bundle, nan_model_bytes
from tests.transport.helpers import WAIT_S, unique


@pytest.fixture()
def profile(catalog: Catalog) -> DeviceProfile:
    """Return the portable CPU profile."""
    return catalog.get("generic-cpu")


@pytest.fixture()
def artifacts(tmp_path: Path) -> Iterator[ArtifactServer]:
    """Yield an HTTP server for bundles."""
    root = tmp_path / "www"
    root.mkdir()
    server = ArtifactServer(root)
    yield server
    server.close()


@pytest.fixture()
def bundles(tmp_path: Path, signing_key: SigningKey) -> Callable[..., Path]:
    """Return a factory of signed bundles: ``bundles(version, nan=False, padding=0)``."""

    def make(version: str = "1.0.0", *, nan: bool = False, padding: int = 0, name: str = "tiny") -> Path:
        extra = {"padding.bin": bytes(range(256)) * (padding // 256)} if padding else None
        return make_generic_bundle(tmp_path / "bundles", signing_key, name=name, version=version,
                                   model=nan_model_bytes() if nan else None, extra_files=extra)

    return make


@pytest.fixture()
def topics() -> Topics:
    """Return a topic tree of this test's own (a fleet id no other test uses)."""
    return Topics(fleet=unique("fleet"))


@pytest.fixture(scope="session")
def seeded_store(tmp_path_factory: pytest.TempPathFactory, catalog: Catalog, signing_key: SigningKey,
                 trust: TrustStore) -> Path:
    """Return a store folder holding tiny@1.0.0 (active) and tiny@1.1.0 (installed, not active).

    Installing runs a child process per bundle (seconds on a busy machine): tests copy this
    folder instead of installing the same bundles again.
    """
    root = tmp_path_factory.mktemp("seed")
    store = Store(root / "data", catalog.get("generic-cpu"), trust)
    store.install(make_generic_bundle(root / "bundles", signing_key, version="1.0.0"))
    store.install(make_generic_bundle(root / "bundles", signing_key, version="1.1.0"), activate=False)
    store.close()
    return root / "data"


@pytest.fixture()
def device(tmp_path: Path, profile: DeviceProfile, trust: TrustStore,
           seeded_store: Path) -> Iterator[Callable[..., FakeAgent]]:
    """Return a factory of devices (a real store in a data folder), one per device id."""
    made: dict[str, FakeAgent] = {}

    def make(device_id: str = "dev-1", serving: bool = False, seeded: bool = False) -> FakeAgent:
        """``serving``: the agent's real model registry and metrics (as `edge agent run`);
        ``seeded``: the store starts with tiny@1.0.0 active and tiny@1.1.0 installed."""
        if device_id not in made:
            data = tmp_path / f"data-{device_id}"
            if seeded:
                shutil.copytree(seeded_store, data, symlinks=True)
            agent = FakeAgent(device_id, data, Store(data, profile, trust), profile)
            if serving:
                from edge.agent.server.metrics import Metrics
                from edge.agent.server.registry import Registry

                agent.metrics = Metrics()
                agent.registry = Registry(agent.store, profile, threads=1, metrics=agent.metrics)
                agent.registry.start()
                assert agent.registry.wait_loaded(WAIT_S)
            made[device_id] = agent
        return made[device_id]

    yield make
    for agent in made.values():
        if agent.registry is not None:
            agent.registry.close()


@pytest.fixture()
def links(broker, topics: Topics) -> Iterator[Callable[..., FleetLink]]:  # noqa: F811
    """Return a factory of started fleet links (stopped at the end of the test)."""
    started: list[FleetLink] = []

    def make(agent: FakeAgent, **options) -> FleetLink:
        opts = dict(topics=topics, reconnect=FAST, telemetry_interval=0.5, download_backoff=FAST)
        opts.update(options)
        link = FleetLink(FleetOptions(broker.url, **opts))
        link.start(agent)
        started.append(link)
        assert link.wait_ready(WAIT_S), link.client.last_error
        return link

    yield make
    for link in started:
        link.stop()


@pytest.fixture()
def controller(broker, topics: Topics) -> Iterator[Controller]:  # noqa: F811
    """Yield the controller's view of device ``dev-1``."""
    c = Controller(broker.url, topics, "dev-1")
    yield c
    c.stop()
