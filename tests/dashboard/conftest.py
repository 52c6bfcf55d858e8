"""Fixtures of the dashboard tests: a real `edge fleet serve` process, real agents, real Chromium.

The controller runs as `edge fleet serve --port 0 --mqtt-port 0` (its embedded broker) in a
subprocess; its admin token and URLs are read from what it prints. Agents are real agent
processes (:mod:`tests.dashboard.agent_main`) killed with SIGKILL to go offline, so the broker
publishes their last will. The browser is Debian's Chromium driven by Playwright; screenshots
go to ``test-artifacts/dashboard/``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.fleet.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
# Flags for a sandboxed CI machine: no GPU, no network beyond loopback, nothing phoning home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Seconds to wait for the controller (and agents) to come up on a busy 2-core machine.
START_TIMEOUT_S = 60.0


@dataclass
class Fleet:
    """A running `edge fleet serve`."""

    proc: subprocess.Popen
    url: str
    broker: str
    token: str
    data: Path
    log: Path
    trusted_key: Path

    def client(self, token: str | None = None) -> httpx.Client:
        """Return an HTTP client with a bearer token (the admin one by default)."""
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {token or self.token}"}, timeout=30)

    def device(self, device_id: str) -> dict[str, Any] | None:
        """Return a device's detail, or None while the controller does not know it."""
        with self.client() as c:
            r = c.get(f"/api/v1/devices/{device_id}")
        return r.json() if r.status_code == 200 else None

    def stop(self) -> None:
        """Stop the controller (SIGTERM: a clean shutdown)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_fleet(folder: Path, trusted_key: Path, env: dict[str, str]) -> Fleet:
    """Start `edge fleet serve` on free ports and return it once it listens."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "controller.log"
    cmd = [sys.executable, "-m", "edge.cli.main", "fleet", "serve", "--data", str(folder / "data"), "--port", "0",
           "--mqtt-port", "0", "--trusted-key", str(trusted_key), "--ingest-connections", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        text = log.read_text(errors="replace")
        ready = re.search(r"edge fleet: api (\S+) broker (\S+)", text)
        token = re.search(r"admin token \(shown once.*\n\s+(edge_\S+)", text)
        if ready and token:
            return Fleet(proc, ready.group(1), ready.group(2), token.group(1), folder / "data", log, trusted_key)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"edge fleet serve did not start:\n{text[-3000:]}")
        time.sleep(0.1)


@dataclass
class Agents:
    """Real agent processes connected to one fleet."""

    fleet: Fleet
    folder: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, *device_ids: str, wait: bool = True) -> list[str]:
        """Start agents (no-op for ones running); return their ids, online once ``wait``."""
        for d in device_ids:
            if d in self.procs and self.procs[d].poll() is None:
                continue
            log = open(self.folder / f"{d}.log", "ab")
            self.procs[d] = subprocess.Popen(
                [sys.executable, "-m", "tests.dashboard.agent_main", "--device-id", d, "--data", str(self.folder / d),
                 "--broker", self.fleet.broker, "--trusted-key", str(self.fleet.trusted_key)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
            log.close()
        if wait:
            for d in device_ids:
                wait_for(lambda: (self.fleet.device(d) or {}).get("status") == "online", START_TIMEOUT_S,
                         0.2, f"agent {d} online")
        return list(device_ids)

    def kill(self, device_id: str) -> None:
        """Kill an agent without a goodbye: the broker publishes its last will."""
        proc = self.procs.pop(device_id)
        proc.kill()
        proc.wait(10)

    def stop_all(self) -> None:
        """Stop every agent (SIGTERM, then SIGKILL)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


def _child_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env.update(EDGE_HOME=str(home), PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(ROOT))
    return env


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, key_pair: tuple[Path, Path]) -> Iterator[Fleet]:
    """Yield a running controller (one per test module)."""
    folder = tmp_path_factory.mktemp("fleet")
    running = start_fleet(folder, key_pair[1], _child_env(folder / "home"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def agents(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    """Yield the agent pool of the module's controller."""
    folder = tmp_path_factory.mktemp("agents")
    pool = Agents(fleet, folder, _child_env(folder / "home"))
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Yield Debian's Chromium driven by Playwright (skips where either is missing)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    if CHROMIUM is None:
        pytest.skip("no Chromium: install Debian's chromium package (scripts/test.sh does, as root)")
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # screenshots of this run only
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class PageErrors(list):
    """JavaScript errors a page raised; a test fails on any."""


@pytest.fixture()
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Yield a fresh browser page (own cookies); screenshot it if the test failed."""
    context = browser.new_context(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
    context.set_default_timeout(20_000)
    pg = context.new_page()
    errors = PageErrors()
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" and "401" not in msg.text
          and "Failed to load resource" not in msg.text else None)
    pg.errors = errors
    try:
        yield pg
        assert not errors, f"JavaScript errors on the page: {errors}"
    finally:
        if getattr(request.node, "rep_failed", False):
            shot(pg, f"FAILED-{request.node.name}")
        context.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        item.rep_failed = True  # type: ignore[attr-defined]


def shot(pg: Any, name: str) -> Path:
    """Save a full-page screenshot under test-artifacts/dashboard/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    try:
        pg.screenshot(path=str(path), full_page=True)
    except Exception as exc:  # a screenshot of a broken page must not hide the real failure
        print(f"screenshot {name} failed: {exc}", file=sys.stderr)
    return path


def login_with_token(pg: Any, fleet: Fleet, token: str | None = None) -> None:
    """Open the dashboard and log in with an API token (the first-run admin one by default)."""
    from playwright.sync_api import expect

    pg.goto(fleet.url + "/")
    pg.get_by_role("tab", name="API token").click()
    pg.locator("#token").fill(token or fleet.token)
    pg.locator("#login-submit").click()
    expect(pg.locator(".topbar .user-name")).to_be_visible()


def login_with_password(pg: Any, fleet: Fleet, name: str, password: str) -> None:
    """Open the dashboard and log in with a user name and password."""
    from playwright.sync_api import expect

    pg.goto(fleet.url + "/ui/")
    pg.locator("#username").fill(name)
    pg.locator("#password").fill(password)
    pg.locator("#login-submit").click()
    expect(pg.locator(".topbar .user-name")).to_have_text(name)


@dataclass
class Served:
    """The REST API and the dashboard of one database, served in this process on a loopback port."""

    url: str
    db: Any
    admin: str
    reader: str
    dashboard: Any
    server: Any

    def client(self, token: str | None = None, headers: dict[str, str] | None = None) -> httpx.Client:
        """Return a client (with a bearer token when given)."""
        headers = {**({"authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def browser_client(self, token: str | None = None) -> tuple[httpx.Client, str]:
        """Return a client logged in like a browser (session cookie) and its CSRF token."""
        c = self.client(headers={"origin": self.url})
        r = c.post("/dashboard/login", json={"token": token or self.admin})
        assert r.status_code == 200, r.text
        return c, r.json()["csrf"]


@contextmanager
def serve(folder: Path, trust: Any) -> Iterator[Served]:
    """Serve the API and dashboard over a fresh SQLite database under ``folder`` (no MQTT)."""
    from edge.fleet import auth
    from edge.fleet.api import ApiContext, create_app
    from edge.fleet.artifacts import ArtifactStore
    from edge.fleet.dashboard.routes import Dashboard
    from edge.fleet.db import open_database
    from edge.fleet.desired import DesiredPublisher
    from edge.fleet.rollout import RolloutEngine
    from edge.fleet.service import HttpServer
    from edge.protocol.topics import Topics

    db = open_database(None, folder / "ctl")
    store = ArtifactStore(db, folder / "store", trust)
    secret = auth.download_secret(db)
    ctx = ApiContext(db, store, RolloutEngine(db, store), DesiredPublisher(db, Topics(), "http://ctl", secret), secret)
    dashboard = Dashboard(db)
    server = HttpServer(create_app(ctx, dashboard.routes()), "127.0.0.1", 0).start()
    admin = auth.create_token(db, "test-admin", auth.Role.ADMIN)["token"]
    reader = auth.create_token(db, "test-reader", auth.Role.READ)["token"]
    try:
        yield Served(server.url, db, admin, reader, dashboard, server)
    finally:
        dashboard.close()
        server.stop()
        db.dispose()


@pytest.fixture()
def served(tmp_path: Path, trust: Any) -> Iterator[Served]:
    """Serve the API and dashboard over a fresh SQLite database (no MQTT)."""
    with serve(tmp_path, trust) as s:
        yield s
