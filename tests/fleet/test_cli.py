"""`edge fleet` read/write verbs against a real controller API on a loopback port."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge.cli.main import main
from edge.errors import AuthError, ConflictError, ConnectError, NotFoundError, SignatureError
from tests.fixtures.bundles import make_generic_bundle
from tests.fleet.harness import Harness


@pytest.fixture()
def cli(api, monkeypatch):
    monkeypatch.setenv("EDGE_CONTROLLER", api.url)
    monkeypatch.setenv("EDGE_FLEET_TOKEN", api.admin)

    def run(capsys, *argv: str, code: int = 0):
        rc = main(["fleet", *argv])
        out = capsys.readouterr()
        assert rc == code, out.err
        return json.loads(out.out) if "--json" in argv and rc == 0 else out
    return run


@pytest.fixture()
def db_url(tmp_path: Path) -> str:  # the CLI talks HTTP: one database kind is enough here
    return f"sqlite:///{tmp_path / 'fleet.db'}"


def test_publish_list_and_roll_out_from_the_cli(api, cli, capsys, tmp_path: Path, signing_key) -> None:
    h = Harness(api.controller)
    ids = h.add(3, tags=["lab"])
    bundle = make_generic_bundle(tmp_path, signing_key, version="2.0.0")
    stored = cli(capsys, "publish", str(bundle), "--json")
    assert stored["new"] and stored["version"] == "2.0.0"
    assert "already stored" in cli(capsys, "publish", str(bundle)).out
    assert [b["sha256"] for b in cli(capsys, "bundles", "--json")] == [stored["sha256"]]
    assert "tiny" in cli(capsys, "bundles").out

    created = cli(capsys, "rollout", "create", "tiny", "2.0.0", "--tag", "lab", "--waves", "1,100%", "--soak", "60",
                  "--window", "01:00-05:00", "--json")
    rid = created["id"]
    assert created["state"] == "pending" and created["plan"]["maintenance_window"] == "01:00-05:00"
    h.tick()
    status = cli(capsys, "rollout", "status", rid, "--json")
    assert status["state"] == "deploying" and status["devices"] == {"notified": 1, "queued": 2}
    text = cli(capsys, "rollout", "status", rid).out
    assert rid in text and "deploying" in text and "wave 1/2" in text
    assert cli(capsys, "rollout", "status", "--json")[0]["id"] == rid
    assert cli(capsys, "rollout", "pause", rid, "--reason", "checking", "--json")["state"] == "paused"
    assert cli(capsys, "rollout", "resume", rid, "--json")["state"] == "deploying"
    assert cli(capsys, "rollout", "abort", rid, "--json")["state"] == "aborted"
    assert "reverting" in cli(capsys, "rollout", "rollback", rid).out
    err = cli(capsys, "rollout", "pause", rid, code=ConflictError.exit_code).err
    assert err.startswith("Error: cannot pause a rollout that is reverting")

    listed = cli(capsys, "devices", "--tag", "lab", "--json")
    assert listed["total"] == 3 and [d["id"] for d in listed["items"]] == ids
    assert "3 of 3 devices" in cli(capsys, "devices", "--tag", "lab").out
    assert cli(capsys, "device", ids[0], "--json")["tags"] == ["lab"]
    assert cli(capsys, "group", ids[0], "store-1", "--json")["groups"] == ["store-1"]
    assert cli(capsys, "tag", ids[0], "lab", "--remove", "--json")["tags"] == []
    status = cli(capsys, "status", "--json")
    assert status["devices"] == 3 and status["online"] == 3


def test_cli_errors_carry_the_controller_error(api, cli, capsys, tmp_path: Path, monkeypatch) -> None:
    unsigned = make_generic_bundle(tmp_path, None)
    err = cli(capsys, "publish", str(unsigned), code=SignatureError.exit_code).err
    assert err.startswith("Error: bundle is not signed")
    assert "Error: no bundle of tiny@9.9.9" in cli(capsys, "rollout", "create", "tiny", "9.9.9", code=NotFoundError.exit_code).err
    monkeypatch.setenv("EDGE_FLEET_TOKEN", api.reader)
    assert "admin" in cli(capsys, "rollout", "create", "tiny", "1.0.0", code=AuthError.exit_code).err
    monkeypatch.delenv("EDGE_FLEET_TOKEN")
    err = cli(capsys, "devices", code=AuthError.exit_code).err
    assert "no API token given" in err and "EDGE_FLEET_TOKEN" in err
    err = cli(capsys, "devices", "--controller", "http://127.0.0.1:9", "--token", "x", code=ConnectError.exit_code).err
    assert "cannot reach the controller at http://127.0.0.1:9" in err and "edge fleet serve" in err


def test_fleet_help_lists_the_verbs(capsys) -> None:
    assert main(["fleet", "--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("serve", "devices", "bundles", "publish", "rollout", "status", "token"):
        assert verb in out
    assert main(["fleet", "rollout", "--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("create", "status", "pause", "resume", "abort", "rollback"):
        assert verb in out


def test_a_lost_admin_token_is_replaced_from_the_database(tmp_path: Path, capsys) -> None:
    from edge.fleet import auth
    from edge.fleet.db import open_database

    db = open_database(None, tmp_path)
    assert auth.ensure_admin_token(db, None)  # printed once at first start, then lost
    assert main(["fleet", "token", "admin", "--data", str(tmp_path)]) == 0
    token = capsys.readouterr().out.split()[-1]
    assert auth.authenticate(db, f"Bearer {token}").role is auth.Role.ADMIN
    db.dispose()
    assert main(["fleet", "token", "admin", "--data", str(tmp_path / "nothing")]) == 2
    assert "no controller database" in capsys.readouterr().err
