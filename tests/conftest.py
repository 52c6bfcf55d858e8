"""Fixtures shared by every test: keys, profiles and a per-test EDGE_HOME."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.protocol.catalog import Catalog, load_catalog
from edge.protocol.signing import SigningKey, TrustStore, generate_keypair, load_signing_key


@pytest.fixture(autouse=True)
def _isolated_edge_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Give every test its own EDGE_HOME so no test reads or writes the user's keys."""
    home = tmp_path_factory.mktemp("edge-home")
    monkeypatch.setenv("EDGE_HOME", str(home))
    monkeypatch.delenv("EDGE_SIGNING_KEY", raising=False)
    monkeypatch.delenv("EDGE_PROFILE_PATH", raising=False)
    return home


@pytest.fixture(scope="session")
def key_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Return (private, public) key files of a signing key made for this test session."""
    return generate_keypair(tmp_path_factory.mktemp("keys"), "test")


@pytest.fixture(scope="session")
def signing_key(key_pair: tuple[Path, Path]) -> SigningKey:
    """Return the session's signing key."""
    return load_signing_key(key_pair[0])


@pytest.fixture(scope="session")
def trust(key_pair: tuple[Path, Path]) -> TrustStore:
    """Return a trust store holding the session's public key."""
    return TrustStore.from_files([key_pair[1]])


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    """Return the built-in profile catalog."""
    return load_catalog()
