"""Agents as real subprocesses (`python -m edge.cli.main agent run`) on free loopback ports."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from edge.agent.store import Store
from edge.protocol.catalog import load_catalog
from edge.protocol.signing import SigningKey, TrustStore
from edge.settings import environ_for_child
from tests.agent.server.tiny import make_encoder_bundle, make_llm_bundle
from tests.fixtures.bundles import make_generic_bundle

PROFILE = "generic-cpu"
# Seconds an agent may take to listen and to load tiny models on a busy 2-core machine.
START_TIMEOUT_S = 60


class AgentProcess:
    """One `edge agent run` child process; its stderr is collected in the background."""

    def __init__(self, data: Path, home: Path, *extra: str) -> None:
        self.data = data
        cmd = [sys.executable, "-m", "edge.cli.main", "agent", "run", "--device-id", "test-device",
               "--data", str(data), "--profile", PROFILE, "--http", "127.0.0.1:0", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=environ_for_child({"EDGE_HOME": str(home), "EDGE_LOG_LEVEL": "INFO"}))
        self.lines: list[str] = []
        self._listening = threading.Event()
        self.url = ""
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._listening.wait(START_TIMEOUT_S):
            self.stop()
            raise AssertionError(f"agent did not listen within {START_TIMEOUT_S} s:\n{self.stderr}")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"serving on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                self._listening.set()
        self._listening.set()  # the process ended: stop waiting

    @property
    def stderr(self) -> str:
        """Return what the agent wrote to stderr so far."""
        return "".join(self.lines)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Poll /v2/health/ready until 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.stderr}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"agent not ready within {timeout} s:\n{self.stderr}")

    def stop(self, timeout: float = 20) -> int:
        """Send SIGTERM and return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def profile():
    """Return the profile the test agents run with."""
    return load_catalog().get(PROFILE)


def install(data: Path, profile, trust: TrustStore, bundles: list[tuple[Path, bool]]) -> None:
    """Install bundles into a store folder the way the device does, then release it."""
    with Store(data, profile, trust) as store:
        for bundle, activate in bundles:
            store.install(bundle, activate=activate)


@pytest.fixture(scope="session")
def agent(tmp_path_factory: pytest.TempPathFactory, signing_key: SigningKey, trust: TrustStore,
          key_pair: tuple[Path, Path], profile) -> Iterator[AgentProcess]:
    """An agent serving tiny@1.0.0 (the generic model), an embedder and a chat model.

    Shared by the HTTP tests (starting an agent and installing costs seconds); a test that
    changes what it serves puts it back. Its body limit is 1 MiB so 413 is cheap to test.
    """
    root = tmp_path_factory.mktemp("agent")
    install(root / "data", profile, trust, [
        (make_generic_bundle(root, signing_key, version="1.0.0"), True),
        (make_encoder_bundle(root, signing_key), True),
        (make_llm_bundle(root, signing_key), True),
    ])
    proc = AgentProcess(root / "data", root / "home", "--trusted-key", str(key_pair[1]), "--max-body-mb", "1")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
