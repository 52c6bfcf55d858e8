"""The fleet half of `edge demo`: a controller and local agents as real subprocesses."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

from edge import settings
from edge.errors import EdgeError
from edge.protocol.profile import DeviceProfile

# Seconds a controller or agent may take to come up on a slow 2-core machine.
START_TIMEOUT_S = 120.0
# Seconds a rollout of two real models to three devices may take (download, verify, trial load,
# health check) on a slow 2-core machine.
ROLLOUT_TIMEOUT_S = 900.0


def _wait(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise EdgeError(f"timed out after {timeout:.0f} s waiting for {what}", hint="see the logs in the demo folder")


@dataclass
class DemoFleet:
    """`edge fleet serve` plus N `edge agent run` processes, with their logs in ``folder``."""

    folder: Path
    profile: DeviceProfile
    trusted_key: Path
    devices: int = 3
    token: str = field(default_factory=lambda: "demo-" + secrets.token_hex(16))
    procs: list[subprocess.Popen] = field(default_factory=list)
    url: str = ""
    broker: str = ""

    def _env(self) -> dict[str, str]:
        # A child inherits no EDGE_* setting of the user's shell: the demo is self-contained.
        env = {k: v for k, v in settings.environ_for_child().items() if not k.startswith("EDGE_")}
        env.update(EDGE_HOME=str(self.folder / "home"), EDGE_FLEET_ADMIN_TOKEN=self.token)
        return env

    def _spawn(self, argv: list[str], log: Path) -> tuple[subprocess.Popen, Path]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "edge.cli.main", *argv], stdout=out,
                                    stderr=subprocess.STDOUT, env=self._env(), start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def start(self) -> None:
        """Start the controller (embedded broker, SQLite) and the agents."""
        proc, log = self._spawn(["fleet", "serve", "--data", str(self.folder / "controller"), "--port", "0",
                                 "--mqtt-port", "0", "--trusted-key", str(self.trusted_key)],
                                self.folder / "logs" / "controller.log")

        def started() -> re.Match | None:
            if proc.poll() is not None:
                raise EdgeError(f"the controller exited: {log.read_text(errors='replace')[-2000:]}")
            return re.search(r"edge fleet: api (\S+) broker (\S+)", log.read_text(errors="replace"))

        m = _wait(started, START_TIMEOUT_S, "the controller")
        self.url, self.broker = m.group(1), m.group(2)
        for i in range(1, self.devices + 1):
            name = f"demo-{i}"
            self._spawn(["agent", "run", "--device-id", name, "--data", str(self.folder / "devices" / name),
                         "--profile", self.profile.name, "--http", "127.0.0.1:0", "--broker", self.broker,
                         "--trusted-key", str(self.trusted_key), "--telemetry-interval", "2"],
                        self.folder / "logs" / f"{name}.log")

    def api(self) -> httpx.Client:
        """Return a REST client with the admin token."""
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {self.token}"}, timeout=60)

    def wait_online(self) -> list[dict]:
        """Wait until every agent announced itself; return the devices."""
        with self.api() as c:
            return _wait(lambda: (r := c.get("/api/v1/devices", params={"status": "online"}).json())["total"]
                         >= self.devices and r["items"], START_TIMEOUT_S, f"{self.devices} agents online")

    def publish(self, bundle: Path) -> dict:
        """Upload a signed bundle to the controller's artifact repository."""
        with self.api() as c, open(bundle, "rb") as fh:
            r = c.post("/api/v1/bundles", content=fh.read(), headers={"content-type": "application/x-tar"})
        r.raise_for_status()
        return r.json()

    def roll_out(self, model: str, version: str, progress: Callable[[str], None]) -> dict:
        """Roll a model out in waves (a canary, then everyone) and wait until it completes."""
        with self.api() as c:
            r = c.post("/api/v1/rollouts", json={"model": model, "version": version,
                                                 "plan": {"waves": ["1", "100%"], "soak_s": 3}})
            r.raise_for_status()
            rid = r.json()["id"]
            seen: set[str] = set()

            def done() -> dict | None:
                st = c.get(f"/api/v1/rollouts/{rid}").json()
                key = f"{st['state']} wave {st.get('wave')} {st.get('devices')}"
                if key not in seen:
                    seen.add(key)
                    progress(f"  {model}@{version}: {st['state']}, wave {st.get('wave')}, devices {st.get('devices')}")
                if st["state"] in ("halted", "reverted", "aborted"):
                    raise EdgeError(f"rollout of {model}@{version} ended {st['state']}: {st.get('reason')}")
                return st if st["state"] == "completed" else None

            return _wait(done, ROLLOUT_TIMEOUT_S, f"the rollout of {model}@{version}", interval=1.0)

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL)."""
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
