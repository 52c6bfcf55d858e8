"""Real processes for the end-to-end tests: `edge fleet serve` and `edge agent run --broker`.

Both run as subprocesses of this test process, each with its own EDGE_HOME, data folder and
log file (one per start, kept for the failure message), and can be stopped, killed and started
again on the same data folder.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "e2e-admin-token-0123456789abcdef"
# Seconds a process gets to print its address: imports alone take seconds on a busy 2-core box.
START_S = 90.0


def child_env(home: Path, **extra: str) -> dict[str, str]:
    """Return the environment of a child: ours without EDGE_*, plus its own EDGE_HOME and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env.update(EDGE_HOME=str(home), PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1", EDGE_FLEET_ADMIN_TOKEN=ADMIN)
    env.update(extra)
    return env


def _wait_for_line(proc: subprocess.Popen, log: Path, pattern: str, what: str) -> str:
    deadline = time.monotonic() + START_S
    while not (m := re.search(pattern, log.read_text(errors="replace"))):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    return m.group(1)


class Controller:
    """`edge fleet serve` in a subprocess, restartable on the same data folder and port."""

    def __init__(self, folder: Path, broker_url: str, trusted: Path, fleet: str | None = None,
                 db_url: str | None = None) -> None:
        self.folder, self.broker_url, self.trusted, self.fleet, self.db_url = folder, broker_url, trusted, fleet, db_url
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.starts = 0

    def start(self) -> "Controller":
        self.starts += 1
        log = self.folder / f"controller-{self.starts}.log"
        cmd = [sys.executable, "-m", "edge.cli.main", "fleet", "serve", "--data", str(self.folder / "data"),
               "--broker", self.broker_url, "--port", str(self.port), "--trusted-key", str(self.trusted)]
        cmd += (["--fleet", self.fleet] if self.fleet else []) + (["--db", self.db_url] if self.db_url else [])
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(self.folder / "home"),
                                         cwd=ROOT)
        self.url = _wait_for_line(self.proc, log, r"edge fleet: api (\S+) broker", "edge fleet serve")
        self.port = int(self.url.rsplit(":", 1)[1])  # a restart keeps the URL devices were given
        return self

    def kill(self) -> None:
        """SIGKILL: no goodbye, nothing flushed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)


class AgentProcess:
    """`edge agent run --broker` in a subprocess, restartable on the same data folder."""

    def __init__(self, device_id: str, folder: Path, broker_url: str, trusted: Path,
                 telemetry_interval: float = 1.0) -> None:
        self.device_id, self.folder, self.broker_url, self.trusted = device_id, folder, broker_url, trusted
        self.data = folder / device_id
        self.telemetry_interval = telemetry_interval
        self.proc: subprocess.Popen | None = None
        self.url = ""  # its HTTP address (a new port at every start)
        self.started_at = 0.0
        self.starts = 0
        self.log = folder / f"{device_id}-0.log"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "edge.cli.main", "agent", "run", "--device-id", self.device_id,
                "--data", str(self.data), "--broker", self.broker_url, "--trusted-key", str(self.trusted),
                "--http", "127.0.0.1:0", "--profile", "generic-cpu",
                "--telemetry-interval", f"{self.telemetry_interval:g}"]

    def start(self, **env: str) -> "AgentProcess":
        """Start it (``env``: extra variables, e.g. EDGE_FAULT_POINT); return once it serves HTTP."""
        self.starts += 1
        self.log = self.folder / f"{self.device_id}-{self.starts}.log"
        self.started_at = time.time()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env=child_env(self.folder / f"home-{self.device_id}", **env))
        self.url = _wait_for_line(self.proc, self.log, rf"edge agent {re.escape(self.device_id)}: serving on (\S+)",
                                  f"agent {self.device_id}")
        deadline = time.monotonic() + START_S
        while not self._ready():  # listening, and the store's models loaded
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"agent {self.device_id} did not get ready:\n"
                                     f"{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        return self

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v2/health/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM (it says goodbye: a retained offline status) and wait."""
        if self.running:
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to end by itself; return its exit status (-9: SIGKILL)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent {self.device_id} still runs after {timeout} s:\n"
                                 f"{self.log.read_text(errors='replace')[-3000:]}") from None
