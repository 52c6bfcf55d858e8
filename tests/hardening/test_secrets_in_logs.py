"""No secret in the logs: a controller and an agent as real processes, logging at DEBUG.

Both connect to mosquitto over TLS with a user name and password in the broker URL
(``mqtts://user:pass@...``); the test creates API tokens, makes a dashboard user, logs in with
the password and with a token (session cookies), fails logins, and rolls a bundle out so the
agent downloads it from its signed URL. Then no password, token, cookie, CSRF token, download
signature or the download-signing secret may appear anywhere in either process's stdout or
stderr. Each kind of secret is also checked to have been logged in masked form where the code
logs it, so a test whose logs never mention them could not pass by accident.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from edge.cli.main import main
from edge.fleet.auth import sign_download
from edge.fleet.pki import FleetPki, Role
from edge.redact import MASK
from tests.fixtures.broker import MOSQUITTO, MosquittoBroker
from tests.fixtures.bundles import make_generic_bundle
from tests.fleet.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
START_S = 90.0

pytestmark = pytest.mark.skipif(MOSQUITTO is None or MOSQUITTO_PASSWD is None, reason="mosquitto is not installed")

CTL_PASS = "ctl-broker-" + secrets.token_hex(8)
DEV_PASS = "dev-broker-" + secrets.token_hex(8)
ADMIN = "admin-" + secrets.token_hex(16)
USER_PASS = "user-passphrase-" + secrets.token_hex(8)
WRONG_PASS = "wrong-passphrase-" + secrets.token_hex(8)
WRONG_TOKEN = "edge_" + secrets.token_urlsafe(32)


def child_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env.update(EDGE_HOME=str(home), PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1", EDGE_LOG_LEVEL="DEBUG",
               EDGE_FLEET_ADMIN_TOKEN=ADMIN)
    return env


def tls_broker(tmp: Path) -> tuple[MosquittoBroker, Path]:
    """mosquitto with TLS and a password file; return it and the CA file."""
    pki = FleetPki.init(tmp / "pki", "sec")
    server = pki.issue("127.0.0.1", Role.SERVER, hosts=("localhost",))
    passwd = tmp / "mosquitto.passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-b", "-c", str(passwd), "ctl", CTL_PASS], check=True, capture_output=True)
    subprocess.run([MOSQUITTO_PASSWD, "-b", str(passwd), "dev-1", DEV_PASS], check=True, capture_output=True)
    config = "\n".join([f"cafile {pki.ca_file}", f"certfile {pki.folder / server.cert_file}",
                        f"keyfile {pki.folder / server.key_file}", f"password_file {passwd}"])
    return MosquittoBroker(tmp / "mosquitto", extra_config=config, anonymous=False).start(), pki.ca_file


def start(cmd: list[str], log: Path, env: dict[str, str], ready: str) -> tuple[subprocess.Popen, str]:
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edge.cli.main", *cmd], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)
    deadline = time.monotonic() + START_S
    while not (m := re.search(ready, log.read_text(errors="replace"))):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{cmd[:2]} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return proc, m.group(1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def exercise(url: str, found: dict[str, str]) -> None:
    """Use every credential the controller knows; record each secret seen in ``found``."""
    api = httpx.Client(base_url=url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)
    created = api.post("/api/v1/tokens", json={"name": "ci", "role": "admin"})
    assert created.status_code == 201, created.text
    found["api token"] = created.json()["token"]
    for token, status in ((found["api token"], 200), (WRONG_TOKEN, 401)):
        assert httpx.get(url + "/api/v1/devices", headers={"authorization": f"Bearer {token}"}).status_code == status
    user = {"name": "olivia", "password": USER_PASS, "role": "admin"}
    assert api.post("/dashboard/users", json=user).status_code == 201
    browser = {"origin": url}
    for i, body in enumerate(({"username": "olivia", "password": USER_PASS}, {"token": found["api token"]})):
        with httpx.Client(base_url=url, headers=browser, timeout=30) as b:
            r = b.post("/dashboard/login", json=body)
            assert r.status_code == 200, r.text
            found[f"session cookie {i}"] = b.cookies["edge_session"]
            found[f"csrf token {i}"] = r.json()["csrf"]
            assert b.get("/dashboard/overview").status_code == 200
            assert b.post("/dashboard/logout", headers={"x-csrf-token": r.json()["csrf"]}).status_code == 204
    r = httpx.post(url + "/dashboard/login", json={"username": "olivia", "password": WRONG_PASS}, headers=browser)
    assert r.status_code == 401


def test_no_secret_reaches_the_logs(tmp_path: Path, key_pair: tuple[Path, Path], signing_key, capsys) -> None:
    broker, ca = tls_broker(tmp_path)
    procs: list[subprocess.Popen] = []
    found: dict[str, str] = {}
    try:
        base = f"127.0.0.1:{broker.port}"
        ctl, url = start(["fleet", "serve", "--data", str(tmp_path / "ctl"), "--port", "0", "--trusted-key",
                          str(key_pair[1]), "--broker", f"mqtts://ctl:{CTL_PASS}@{base}?ca={ca}"],
                         tmp_path / "controller.log", child_env(tmp_path / "home-ctl"), r"edge fleet: api (\S+)")
        procs.append(ctl)
        agent, _ = start(["agent", "run", "--device-id", "dev-1", "--data", str(tmp_path / "dev-1"), "--http",
                          "127.0.0.1:0", "--profile", "generic-cpu", "--trusted-key", str(key_pair[1]), "--broker",
                          f"mqtts://dev-1:{DEV_PASS}@{base}", "--ca-file", str(ca), "--telemetry-interval", "1"],
                         tmp_path / "agent.log", child_env(tmp_path / "home-dev"), r"serving on (\S+)")
        procs.append(agent)
        api = httpx.Client(base_url=url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)
        wait_for(lambda: api.get("/api/v1/devices", params={"status": "online"}).json()["total"] == 1,
                 timeout=START_S, interval=0.3, what="the agent online")
        exercise(url, found)
        bundle = make_generic_bundle(tmp_path / "bundles", signing_key, version="1.0.0")
        stored = api.post("/api/v1/bundles", content=bundle.read_bytes())
        assert stored.status_code == 201, stored.text
        assert api.post("/api/v1/rollouts", json={"model": "tiny", "version": "1.0.0",
                                                  "plan": {"waves": ["100%"]}}).status_code == 201
        wait_for(lambda: api.get("/api/v1/devices", params={"model": "tiny", "version": "1.0.0"}).json()["total"] == 1,
                 timeout=START_S, interval=0.3, what="the agent running the bundle")
        with sqlite3.connect(tmp_path / "ctl" / "fleet.db") as db:
            secret = db.execute("SELECT value FROM meta WHERE key = 'download_secret'").fetchone()[0]
        found["download secret"] = secret
        found["download signature"] = sign_download(bytes.fromhex(secret), stored.json()["sha256"], "dev-1")
    finally:
        for p in reversed(procs):
            stop(p)
        broker.stop()
    # a broker URL refused at start: the error names the URL, not its password
    assert main(["agent", "run", "--device-id", "d", "--data", str(tmp_path / "d"), "--profile", "generic-cpu",
                 "--broker", f"mqtt://:{DEV_PASS}@127.0.0.1:1"]) == 2
    cli_err = capsys.readouterr().err
    assert f":{MASK}@127.0.0.1" in cli_err, cli_err

    logs = {name: (tmp_path / name).read_text(errors="replace") for name in ("controller.log", "agent.log")}
    known = {"controller broker password": CTL_PASS, "agent broker password": DEV_PASS, "admin token": ADMIN,
             "user password": USER_PASS, "wrong password": WRONG_PASS, "wrong token": WRONG_TOKEN, **found}
    for log_name, text in [*logs.items(), ("CLI error", cli_err)]:
        leaked = [what for what, value in known.items() if value in text]
        assert not leaked, f"{log_name} shows the {', '.join(leaked)}"
    # the places that would show them were logged, masked
    assert " DEBUG " in logs["controller.log"] and " DEBUG " in logs["agent.log"]
    assert f"mqtts://ctl:{MASK}@{base}" in logs["controller.log"]
    assert "sig=" + MASK in logs["agent.log"], "the agent did not log its download URL"
