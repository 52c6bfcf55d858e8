"""Key management on the command line: trusted keys per fleet, rotation, revocation.

Every command docs/security.md shows under "Signing keys" runs here, through the CLI:
``edge keys generate|show``, ``edge bundle sign``, ``edge flash --trusted-key ... --revoked-key``,
``edge agent run --revoked-key`` (a real agent process: models signed by a key revoked after
they were installed stop being served at the next start) and ``edge fleet serve --revoked-key``
(a real controller process: uploads signed by a revoked key are refused), and the
``EDGE_REVOKED_KEYS`` setting.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from edge.agent.runner import load_trust
from edge.agent.store import Store
from edge.cli.main import main
from edge.errors import ConfigError, SignatureError
from edge.fleet.service import ServiceConfig, trust_store
from edge.protocol.catalog import Catalog
from edge.protocol.signing import TrustStore, load_signing_key, resolve_revoked
from edge.settings import environ_for_child
from tests.agent.server.conftest import AgentProcess
from tests.fixtures.bundles import expected_output, make_generic_bundle

ROOT = Path(__file__).resolve().parents[2]
PROFILE = "generic-cpu"
X = [[1.0, 2.0, 3.0, 4.0]]
# Seconds `edge fleet serve` may take to listen on a busy 2-core machine.
START_TIMEOUT_S = 60


def run(capsys: pytest.CaptureFixture[str], *argv: str, code: int = 0) -> tuple[str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    assert rc == code, out.err
    return out.out, out.err


def error_line(err: str) -> str:
    return next(line for line in err.splitlines() if line.startswith("Error: "))


@pytest.fixture()
def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    """Two key pairs made with `edge keys generate`: this year's (old) and next year's (new)."""
    folder = tmp_path / "keys"
    run(capsys, "keys", "generate", "--name", "edge-2026", "-o", str(folder))
    out, _ = run(capsys, "keys", "generate", "--name", "edge-2027", "-o", str(folder))
    assert "key id" in out
    return {"old.key": folder / "edge-2026.key", "old.pub": folder / "edge-2026.pub",
            "new.key": folder / "edge-2027.key", "new.pub": folder / "edge-2027.pub"}


def key_id_of(capsys: pytest.CaptureFixture[str], pub: Path) -> str:
    out, _ = run(capsys, "keys", "show", str(pub))
    kid = out.strip()
    assert re.fullmatch(r"[0-9a-f]{16}", kid)
    return kid


def test_revoked_keys_are_given_as_ids_or_files(tmp_path: Path, keys: dict[str, Path], capsys,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    kid = key_id_of(capsys, keys["old.pub"])
    assert resolve_revoked([kid.upper(), str(keys["new.pub"]), f" {keys['old.key']} "]) == {
        kid, key_id_of(capsys, keys["new.pub"])}  # a private key file names its public half
    for bad in ("nope", "0123", str(tmp_path / "missing.pub"), ""):
        with pytest.raises(ConfigError, match="is neither a key id nor a key file"):
            resolve_revoked([bad])
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key")
    with pytest.raises(ConfigError, match="is not a PEM Ed25519 public key"):
        resolve_revoked([str(garbage)])
    # The setting adds to the options of the agent, the flash and the controller alike.
    monkeypatch.setenv("EDGE_REVOKED_KEYS", f"{kid}, {keys['new.pub']}")
    both = {kid, key_id_of(capsys, keys["new.pub"])}
    assert load_trust((keys["new.pub"],)).revoked == both
    assert load_trust((), ()).revoked == both  # no trusted key at all: revocation still applies
    assert trust_store(ServiceConfig(data_dir=tmp_path / "fleet", trusted_keys=(keys["old.pub"],))).revoked == both
    monkeypatch.setenv("EDGE_REVOKED_KEYS", "oops")
    with pytest.raises(ConfigError, match="'oops' is neither a key id nor a key file"):
        load_trust((keys["new.pub"],))


def test_rotation_then_revocation_with_edge_flash(tmp_path: Path, keys: dict[str, Path], capsys,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = load_signing_key(keys["old.key"]), load_signing_key(keys["new.key"])
    old_id, new_id = key_id_of(capsys, keys["old.pub"]), key_id_of(capsys, keys["new.pub"])
    data = tmp_path / "sdcard"
    # This year: devices trust the old key.
    first = make_generic_bundle(tmp_path, old, version="1.0.0")
    run(capsys, "flash", str(first), "--data", str(data), "--profile", PROFILE, "--trusted-key", str(keys["old.pub"]))
    # Rotation: both keys trusted; new versions are signed with the new key (here: re-signed).
    second = make_generic_bundle(tmp_path, old, version="1.1.0")
    out, _ = run(capsys, "bundle", "sign", str(second), "--key", str(keys["new.key"]))
    assert new_id in out
    run(capsys, "flash", str(second), "--data", str(data), "--trusted-key", str(keys["old.pub"]),
        "--trusted-key", str(keys["new.pub"]))
    # Revocation of the old key: by id, by file, or through the setting; trusted or not, it is refused.
    third = make_generic_bundle(tmp_path, old, version="1.2.0")
    for revoked in (["--revoked-key", old_id], ["--revoked-key", str(keys["old.pub"])]):
        _, err = run(capsys, "flash", str(third), "--data", str(data), "--trusted-key", str(keys["old.pub"]),
                     "--trusted-key", str(keys["new.pub"]), *revoked, code=SignatureError.exit_code)
        assert error_line(err) == f"Error: bundle is signed by revoked key {old_id} (re-sign with a current key)"
    monkeypatch.setenv("EDGE_REVOKED_KEYS", old_id)
    _, err = run(capsys, "flash", str(third), "--data", str(data), "--trusted-key", str(keys["old.pub"]),
                 code=SignatureError.exit_code)
    assert f"signed by revoked key {old_id}" in error_line(err)
    # Versions the revoked key signed can no longer be activated; the new key's still can.
    _, err = run(capsys, "models", "rollback", "tiny", "--data", str(data), code=SignatureError.exit_code)
    assert error_line(err).startswith(f"Error: tiny@1.0.0 is signed by revoked key {old_id}")
    _, err = run(capsys, "models", "activate", "tiny@1.0.0", "--data", str(data), code=SignatureError.exit_code)
    assert error_line(err).startswith(f"Error: tiny@1.0.0 is signed by revoked key {old_id}")
    run(capsys, "models", "activate", "tiny@1.1.0", "--data", str(data))
    monkeypatch.delenv("EDGE_REVOKED_KEYS")
    _, err = run(capsys, "flash", str(third), "--data", str(data), "--trusted-key", str(keys["new.pub"]),
                 "--revoked-key", "not-a-key", code=ConfigError.exit_code)
    assert "'not-a-key' is neither a key id nor a key file" in error_line(err)
    out, _ = run(capsys, "models", "list", "--data", str(data), "--json")
    [tiny] = json.loads(out)
    assert tiny["active"] == "1.1.0" and [v["key_id"] for v in tiny["versions"]] == [old_id, new_id]


def _infer(url: str) -> tuple[str, list[float]]:
    r = httpx.post(f"{url}/v2/models/tiny/infer", timeout=30,
                   json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": X[0]}]})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["model_version"], body["outputs"][0]["data"]


def test_models_signed_by_a_key_revoked_later_stop_being_served_at_the_next_start(
        tmp_path: Path, keys: dict[str, Path], catalog: Catalog, capsys) -> None:
    old, new = load_signing_key(keys["old.key"]), load_signing_key(keys["new.key"])
    old_id = key_id_of(capsys, keys["old.pub"])
    data = tmp_path / "data"
    both = TrustStore.from_files([keys["old.pub"], keys["new.pub"]])
    with Store(data, catalog.get(PROFILE), both) as store:
        store.install(make_generic_bundle(tmp_path, new, version="1.0.0"))  # tiny@1.0.0: the new key
        store.install(make_generic_bundle(tmp_path, old, version="1.1.0"))  # tiny@1.1.0 (active): the old key
        store.install(make_generic_bundle(tmp_path, old, name="other"))  # other@1.0.0: the old key only
    before = shutil.copytree(data, tmp_path / "before", symlinks=True)
    with Store(before, catalog.get(PROFILE), both) as store:  # without the revocation: both served as installed
        assert store.begin_load("tiny").version == "1.1.0" and store.begin_load("other").version == "1.0.0"

    agent = AgentProcess(data, tmp_path / "home", "--trusted-key", str(keys["old.pub"]),
                         "--trusted-key", str(keys["new.pub"]), "--revoked-key", old_id)
    try:
        deadline = time.monotonic() + 60
        while httpx.get(f"{agent.url}/v2/models/tiny/ready").status_code != 200:
            assert time.monotonic() < deadline and agent.proc.poll() is None, agent.stderr
            time.sleep(0.05)
        version, answer = _infer(agent.url)
        other = httpx.post(f"{agent.url}/v2/models/other/infer",
                           json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": X[0]}]})
        ready = httpx.get(f"{agent.url}/v2/health/ready")
    finally:
        assert agent.stop() == 0, agent.stderr
    assert version == "1.0.0"  # rolled back to the version the new key signed
    np.testing.assert_allclose(answer, expected_output("1.0.0", np.array(X, np.float32)).ravel())
    assert other.status_code == 503 and "other" in other.json()["error"]
    assert ready.status_code == 503
    out, _ = run(capsys, "models", "list", "--data", str(data), "--json")
    status = {m["name"]: m for m in json.loads(out)}
    assert status["tiny"]["active"] == "1.0.0"
    assert status["tiny"]["versions"][1]["failed"] == f"signed by revoked key {old_id}"
    assert status["other"]["versions"][0]["failed"] == f"signed by revoked key {old_id}"


def test_the_controller_refuses_uploads_signed_by_a_revoked_key(tmp_path: Path, keys: dict[str, Path],
                                                               capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = load_signing_key(keys["old.key"]), load_signing_key(keys["new.key"])
    old_id = key_id_of(capsys, keys["old.pub"])
    token = "test-admin-token-revoked-keys-0123"
    log = tmp_path / "controller.log"
    cmd = [sys.executable, "-m", "edge.cli.main", "fleet", "serve", "--data", str(tmp_path / "fleet"), "--port", "0",
           "--mqtt-port", "0", "--ingest-connections", "1", "--trusted-key", str(keys["old.pub"]),
           "--trusted-key", str(keys["new.pub"]), "--revoked-key", old_id]
    env = environ_for_child({"EDGE_HOME": str(tmp_path / "home"), "EDGE_FLEET_ADMIN_TOKEN": token})
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (ready := re.search(r"edge fleet: api (\S+) ", log.read_text(errors="replace"))):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        monkeypatch.setenv("EDGE_CONTROLLER", ready.group(1))
        monkeypatch.setenv("EDGE_FLEET_TOKEN", token)
        _, err = run(capsys, "fleet", "publish", str(make_generic_bundle(tmp_path, old, version="1.0.0")),
                     code=SignatureError.exit_code)
        assert error_line(err).startswith(f"Error: bundle is signed by revoked key {old_id}")
        out, _ = run(capsys, "fleet", "publish", str(make_generic_bundle(tmp_path, new, version="1.1.0")), "--json")
        assert json.loads(out)["version"] == "1.1.0"
        out, _ = run(capsys, "fleet", "bundles", "--json")
        assert [b["version"] for b in json.loads(out)] == ["1.1.0"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
