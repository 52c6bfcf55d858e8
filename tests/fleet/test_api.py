"""The REST API over real HTTP: devices, labels, commands, rollouts, tokens and roles."""

from __future__ import annotations

import httpx
import pytest

from tests.fleet.harness import Harness
from tests.fleet.helpers import ingest


class Client:
    def __init__(self, api, token: str) -> None:
        self.http = httpx.Client(base_url=api.url, headers={"authorization": f"Bearer {token}"}, timeout=30)

    def __getattr__(self, name: str):
        return getattr(self.http, name)


@pytest.fixture()
def admin(api) -> Client:
    return Client(api, api.admin)


@pytest.fixture()
def reader(api) -> Client:
    return Client(api, api.reader)


def test_health_needs_no_token_everything_else_does(api) -> None:
    assert httpx.get(f"{api.url}/api/v1/health").json()["ok"] is True
    r = httpx.get(f"{api.url}/api/v1/devices")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "unauthorized"
    assert httpx.get(f"{api.url}/api/v1/devices", headers={"authorization": "Basic x"}).status_code == 401


def test_device_list_detail_and_history(api, reader: Client, admin: Client) -> None:
    h = Harness(api.controller)
    ids = h.add(5, profile="x86-avx2", running={"tiny": "1.0.0"})
    ingest(h.ing, h.dev.telemetry(ids[0], models={"tiny": "1.0.0"}, requests=7))
    r = reader.get("/api/v1/devices", params={"limit": 2})
    page = r.json()
    assert r.status_code == 200 and page["total"] == 5 and len(page["items"]) == 2 and page["next"] == ids[1]
    assert reader.get("/api/v1/devices", params={"after": page["next"], "limit": 10}).json()["items"][0]["id"] == ids[2]
    assert reader.get("/api/v1/devices", params={"model": "tiny", "version": "1.0.0"}).json()["total"] == 5
    assert reader.get("/api/v1/devices", params={"status": "sleeping"}).status_code == 400
    assert reader.get("/api/v1/devices", params={"limit": "many"}).status_code == 400
    detail = reader.get(f"/api/v1/devices/{ids[0]}").json()
    assert detail["status"] == "online" and detail["models"][0]["version"] == "1.0.0"
    assert detail["telemetry_history"][0]["requests"] == 7 and detail["desired"] == {"type": "desired", "generation": 0, "models": {}}
    assert reader.get(f"/api/v1/devices/{ids[0]}/telemetry").json()["items"][0]["requests"] == 7
    assert reader.get("/api/v1/devices/nope").status_code == 404


def test_tags_and_groups(api, reader: Client, admin: Client) -> None:
    dev = Harness(api.controller).add(1)[0]
    assert admin.put(f"/api/v1/devices/{dev}/tags", json={"tags": ["b", "a"]}).json()["tags"] == ["a", "b"]
    assert admin.post(f"/api/v1/devices/{dev}/tags", json={"add": ["c"], "remove": ["a"]}).json()["tags"] == ["b", "c"]
    assert admin.post(f"/api/v1/devices/{dev}/groups", json={"add": ["store-7"]}).json()["groups"] == ["store-7"]
    assert reader.get("/api/v1/devices", params={"tag": "c"}).json()["total"] == 1
    assert reader.get("/api/v1/devices", params={"group": "store-7"}).json()["total"] == 1
    bad = admin.post(f"/api/v1/devices/{dev}/tags", json={"add": ["x/+"]})
    assert bad.status_code == 400 and "invalid tag" in bad.json()["error"]["message"]
    assert admin.post(f"/api/v1/devices/{dev}/tags", json={"colour": []}).status_code == 400
    assert reader.post(f"/api/v1/devices/{dev}/tags", json={"add": ["z"]}).status_code == 403


def test_commands_are_stored_and_matched_with_their_answer(api, admin: Client, reader: Client) -> None:
    from edge.fleet.commands import send_pending
    from edge.protocol.messages import decode

    c = api.controller
    h = Harness(c)
    dev = h.add(1)[0]
    r = admin.post(f"/api/v1/devices/{dev}/commands", json={"command": "ping"})
    assert r.status_code == 202
    cmd = r.json()
    assert cmd["state"] == "pending" and cmd["id"].startswith("cmd-")
    sent = []

    class Ack:
        def wait(self, timeout: float) -> bool:
            return True

    def publish(topic: str, payload: bytes) -> Ack:
        sent.append((topic, decode(payload)))
        return Ack()

    assert send_pending(c.db, c.topics, publish, c.clock) == 1
    topic, env = sent[0]
    assert topic == c.topics.device(dev, __import__("edge.protocol.topics", fromlist=["Channel"]).Channel.CMD,
                                    __import__("edge.protocol.topics", fromlist=["Command"]).Command.PING)
    assert env.id == cmd["id"] and env.body.command == "ping"
    assert reader.get(f"/api/v1/commands/{cmd['id']}").json()["state"] == "sent"
    ingest(h.ing, h.dev.response("intruder", cmd["id"], ok=False))  # another device cannot answer it
    assert reader.get(f"/api/v1/commands/{cmd['id']}").json()["state"] == "sent"
    ingest(h.ing, h.dev.response(dev, cmd["id"], result={"pong": True}))
    answered = reader.get(f"/api/v1/commands/{cmd['id']}").json()
    assert answered["state"] == "answered" and answered["ok"] is True and answered["result"] == {"pong": True}
    assert reader.get(f"/api/v1/devices/{dev}/commands").json()["items"][0]["id"] == cmd["id"]
    assert admin.post(f"/api/v1/devices/{dev}/commands", json={"command": "format-disk"}).status_code == 400
    assert admin.post("/api/v1/devices/nope/commands", json={"command": "ping"}).status_code == 404


def test_rollback_command_also_moves_desired_state_back(api, admin: Client) -> None:
    c = api.controller
    h = Harness(c)
    dev = h.add(1, running={"tiny": "1.0.0"})[0]
    c.publish_bundle(version="1.0.0")
    c.publish_bundle(version="2.0.0")
    rid = h.create(waves=["100%"])
    h.tick()
    h.follow([dev])  # now runs 2.0.0, reports 1.0.0 as previous
    assert h.wanted(dev) == "2.0.0"
    r = admin.post(f"/api/v1/devices/{dev}/commands", json={"command": "rollback", "args": {"name": "tiny"}})
    assert r.status_code == 202 and r.json()["args"] == {"name": "tiny", "version": "1.0.0"}
    assert "set to 1.0.0" in r.json()["note"]
    h.publish()
    assert h.wanted(dev) == "1.0.0" and h.desired[dev].models["tiny"].deployment_id is None
    assert rid


def test_rollouts_over_http(api, admin: Client, reader: Client) -> None:
    c = api.controller
    h = Harness(c)
    h.add(3)
    sha = c.publish_bundle(version="2.0.0")["sha256"]
    body = {"model": "tiny", "version": "2.0.0", "target": {"kind": "all"}, "plan": {"waves": ["1", "100%"], "soak_s": 60}}
    r = admin.post("/api/v1/rollouts", json=body)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert admin.post("/api/v1/rollouts", json=body).status_code == 409
    bad = admin.post("/api/v1/rollouts", json={**body, "plan": {"soak_s": -1}})
    assert bad.status_code == 400 and "plan.soak_s" in bad.json()["error"]["message"]
    assert reader.post("/api/v1/rollouts", json=body).status_code == 403
    h.tick()
    st = reader.get(f"/api/v1/rollouts/{rid}").json()
    assert st["state"] == "deploying" and st["devices"] == {"notified": 1, "queued": 2}
    members = reader.get(f"/api/v1/rollouts/{rid}/devices", params={"state": "notified"}).json()["items"]
    assert members[0]["bundle_sha256"] == sha
    assert admin.post(f"/api/v1/rollouts/{rid}/pause", json={"reason": "lunch"}).json()["state"] == "paused"
    assert admin.post(f"/api/v1/rollouts/{rid}/pause").status_code == 409
    assert admin.post(f"/api/v1/rollouts/{rid}/resume").json()["state"] == "deploying"
    assert admin.post(f"/api/v1/rollouts/{rid}/abort").json()["state"] == "aborted"
    assert admin.post(f"/api/v1/rollouts/{rid}/rollback").json()["state"] == "reverting"
    assert [x["id"] for x in reader.get("/api/v1/rollouts").json()["items"]] == [rid]
    assert reader.get("/api/v1/rollouts/ro-missing").status_code == 404
    detail = reader.get(f"/api/v1/rollouts/{rid}").json()
    assert [t["event"] for t in detail["transitions"]] == ["create", "start", "pause", "resume", "abort", "rollback"]


def test_tokens_roles_and_revocation(api, admin: Client) -> None:
    made = admin.post("/api/v1/tokens", json={"name": "dashboard", "role": "read"})
    assert made.status_code == 201
    token = made.json()["token"]
    ro = httpx.Client(base_url=api.url, headers={"authorization": f"Bearer {token}"})
    assert ro.get("/api/v1/devices").status_code == 200
    assert ro.post("/api/v1/tokens", json={"name": "x"}).status_code == 403
    listed = admin.get("/api/v1/tokens").json()["items"]
    assert "token" not in listed[0] and "hash" not in listed[0]
    assert admin.delete(f"/api/v1/tokens/{made.json()['id']}").status_code == 204
    assert ro.get("/api/v1/devices").status_code == 401
    assert admin.post("/api/v1/tokens", json={"name": "x", "role": "root"}).status_code == 400


def test_admin_token_generated_once_or_configured(db) -> None:
    from edge.fleet import auth

    first = auth.ensure_admin_token(db, None)
    assert first and first.startswith("edge_")
    assert auth.ensure_admin_token(db, None) is None  # printed once, never again
    assert auth.authenticate(db, f"Bearer {first}").role is auth.Role.ADMIN
    configured = "s3cret-admin-token-of-the-ops-team"
    assert auth.ensure_admin_token(db, configured) is None
    assert auth.authenticate(db, f"Bearer {configured}").name == auth.CONFIGURED_ADMIN
    auth.ensure_admin_token(db, configured + "-rotated")
    with pytest.raises(Exception, match="unknown or revoked"):
        auth.authenticate(db, f"Bearer {configured}")
    tokens = auth.list_tokens(db)
    assert all(len(t["id"]) == 12 for t in tokens)
    from sqlalchemy import select

    from edge.fleet.db import tokens_t
    with db.read() as conn:
        hashes = list(conn.execute(select(tokens_t.c.hash)).scalars())
    assert first not in hashes and auth.hash_token(first) in hashes  # stored hashed only
