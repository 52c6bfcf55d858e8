"""Taking a model off devices (`POST /api/v1/undeploy`, `edge fleet undeploy`), and set-config
from the CLI: what the controller stores and publishes. The agent's side is in
tests/agent/fleet/test_removal.py and, with real processes, tests/fleet/test_e2e_faults.py."""

from __future__ import annotations

import json

import httpx

from edge.cli.main import main
from edge.errors import ConfigError, ConflictError
from tests.fleet.harness import Harness
from tests.fleet.test_rollout import finish_baseline


def _client(api, token: str) -> httpx.Client:
    return httpx.Client(base_url=api.url, headers={"authorization": f"Bearer {token}"}, timeout=30)


def test_undeploy_drops_the_model_from_the_desired_state_of_its_target_only(api) -> None:
    h = Harness(api.controller)
    lab = h.add(3, tags=["lab"])
    other = h.add(1)
    rid = finish_baseline(h, lab + other, "2.0.0")
    admin = _client(api, api.admin)
    before = {d: h.desired[d].generation for d in lab + other}

    r = admin.post("/api/v1/undeploy", json={"model": "tiny", "target": {"kind": "tag", "value": "lab"}})
    assert r.status_code == 200, r.text
    assert r.json() == {"model": "tiny", "removed": 3, "unchanged": 0, "devices": lab}
    h.publish()
    assert [h.wanted(d) for d in lab + other] == [None, None, None, "2.0.0"]
    assert all(h.desired[d].generation > before[d] for d in lab) and h.desired[other[0]].generation == before[other[0]]
    # The completed rollout does not hand it back to the devices it already covered.
    h.tick(advance=60)
    assert [h.wanted(d) for d in lab] == [None, None, None] and h.state(rid) == "completed"
    # Again: nothing left to take; by device id: the last one.
    assert admin.post("/api/v1/undeploy", json={"model": "tiny", "target": {"kind": "tag", "value": "lab"}}).json()[
        "unchanged"] == 3
    r = admin.post("/api/v1/undeploy", json={"model": "tiny", "devices": other})
    assert r.json() == {"model": "tiny", "removed": 1, "unchanged": 0, "devices": other}
    h.publish()
    assert h.wanted(other[0]) is None


def test_undeploy_refuses_bad_requests_and_a_rollout_in_flight(api) -> None:
    h = Harness(api.controller)
    ids = h.add(2)
    api.controller.publish_bundle(version="2.0.0")
    admin, reader = _client(api, api.admin), _client(api, api.reader)
    for body, words in [
        ({"model": "tiny"}, "either target"),
        ({"model": "tiny", "devices": ids, "target": {"kind": "all"}}, "either target"),
        ({"model": "Tiny!", "devices": ids}, "model"),
        ({"model": "tiny", "devices": []}, "devices"),
        ({"model": "tiny", "devices": ["a/b"]}, "invalid device id"),
        ({"model": "tiny", "target": {"kind": "fleet"}}, "target"),
        ({"model": "tiny", "devices": ids, "colour": "red"}, "colour"),
    ]:
        r = admin.post("/api/v1/undeploy", json=body)
        assert r.status_code == 400 and words in r.json()["error"]["message"], (body, r.text)
    r = admin.post("/api/v1/undeploy", json={"model": "tiny", "devices": [ids[0], "ghost"]})
    assert r.status_code == 404 and "ghost" in r.json()["error"]["message"]
    assert reader.post("/api/v1/undeploy", json={"model": "tiny", "devices": ids}).status_code == 403

    rid = h.create(version="2.0.0", waves=["1", "100%"], soak_s=600)
    h.tick()
    r = admin.post("/api/v1/undeploy", json={"model": "tiny", "target": {"kind": "all"}})
    assert r.status_code == 409 and rid in r.json()["error"]["message"]
    assert f"edge fleet rollout abort {rid}" in r.json()["error"]["hint"]
    h.publish()
    assert [h.wanted(d) for d in ids].count("2.0.0") == 1  # the canary keeps its desired version


def test_undeploy_and_set_config_from_the_cli(api, capsys, monkeypatch) -> None:
    monkeypatch.setenv("EDGE_CONTROLLER", api.url)
    monkeypatch.setenv("EDGE_FLEET_TOKEN", api.admin)
    h = Harness(api.controller)
    ids = h.add(2, tags=["lab"])
    finish_baseline(h, ids, "2.0.0")

    assert main(["fleet", "undeploy", "tiny"]) == ConfigError.exit_code
    assert "one of --device ID" in capsys.readouterr().err
    assert main(["fleet", "undeploy", "tiny", "--all", "--tag", "lab"]) == ConfigError.exit_code
    capsys.readouterr()
    assert main(["fleet", "undeploy", "tiny", "--device", ids[0]]) == 0
    assert capsys.readouterr().out.split() == f"tiny leaves the desired state of 1 device(s): {ids[0]}; 0 did not have it".split()
    assert main(["fleet", "undeploy", "tiny", "--tag", "lab", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"model": "tiny", "removed": 1, "unchanged": 1, "devices": [ids[1]]}
    h.publish()
    assert [h.wanted(d) for d in ids] == [None, None]

    h.c.publish_bundle(version="2.1.0")
    h.create(version="2.1.0")
    h.tick()
    assert main(["fleet", "undeploy", "tiny", "--all"]) == ConflictError.exit_code
    assert "abort" in capsys.readouterr().err

    assert main(["fleet", "command", ids[0], "set-config", "--set", "telemetry_interval=30", "--set",
                 "download_rate_kb=null", "--wait", "0", "--json"]) == 0
    sent = json.loads(capsys.readouterr().out)
    assert sent["command"] == "set-config" and sent["args"] == {"telemetry_interval": 30, "download_rate_kb": None}
    assert main(["fleet", "command", ids[0], "set-config", "--set", "oops", "--wait", "0"]) == ConfigError.exit_code
    assert "is not KEY=VALUE" in capsys.readouterr().err
