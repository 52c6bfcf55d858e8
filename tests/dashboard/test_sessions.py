"""Browser logins: passwords, sessions that expire, CSRF on every cookie mutation, roles.

Session lifetimes run on a fake clock against a real SQLite database; the HTTP checks go to the
real API and dashboard on a loopback port."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from edge.errors import AuthError, ConfigError, ConflictError, ForbiddenError
from edge.fleet import auth
from edge.fleet.auth import Role
from edge.fleet.dashboard import sessions, users
from edge.fleet.dashboard.sessions import SessionPolicy
from edge.fleet.dashboard.tables import ensure_tables
from edge.fleet.db import Database, open_database
from tests.dashboard.conftest import Served
from tests.fleet.conftest import FakeClock

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _cheap_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 32nd of the production cost: the hash records its parameters, so checks still work.
    monkeypatch.setattr(users, "SCRYPT_N", 2**10)


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(None, tmp_path)
    ensure_tables(database)
    try:
        yield database
    finally:
        database.dispose()


# ---------------------------------------------------------------- passwords and users


def test_passwords_are_salted_scrypt_hashes() -> None:
    a, b = users.hash_password(PASSWORD), users.hash_password(PASSWORD)
    assert a != b and a.startswith("scrypt$") and PASSWORD not in a
    assert users.check_password(a, PASSWORD) and not users.check_password(a, PASSWORD + "!")
    assert not users.check_password("md5$nonsense", PASSWORD)


def test_users_are_created_verified_and_deleted(db: Database) -> None:
    users.create_user(db, "olivia", PASSWORD, Role.READ, created_by="admin")
    assert users.verify_user(db, "olivia", PASSWORD)["role"] == "read"
    with pytest.raises(AuthError, match="wrong user name or password"):
        users.verify_user(db, "olivia", "wrong password here")
    with pytest.raises(AuthError, match="wrong user name or password"):  # same message: no user enumeration
        users.verify_user(db, "nobody", PASSWORD)
    with pytest.raises(ConflictError):
        users.create_user(db, "olivia", PASSWORD, Role.ADMIN)
    with pytest.raises(ConfigError, match="12 to 1024"):
        users.create_user(db, "short", "tiny", Role.READ)
    with pytest.raises(ConfigError, match="invalid user name"):
        users.create_user(db, "bad/name", PASSWORD, Role.READ)
    assert [u["name"] for u in users.list_users(db)] == ["olivia"]
    assert "password" not in users.list_users(db)[0]
    users.delete_user(db, "olivia")
    assert users.list_users(db) == []


# ---------------------------------------------------------------- session lifetimes


def test_a_session_ends_at_its_absolute_expiry(db: Database) -> None:
    clock = FakeClock()
    users.create_user(db, "olivia", PASSWORD, Role.ADMIN)
    policy = SessionPolicy(ttl_s=3600, idle_s=1800)
    cookie, s = sessions.login_password(db, "olivia", PASSWORD, policy, clock=clock)
    assert s.role is Role.ADMIN and s.expires_at == clock() + 3600
    for _ in range(4):  # active all along: the idle timeout never hits, the absolute one does
        clock.advance(899)
        assert sessions.find_session(db, cookie, clock) is not None
    clock.advance(5)
    assert sessions.find_session(db, cookie, clock) is None
    clock.t -= 100
    assert sessions.find_session(db, cookie, clock) is None  # ended sessions are deleted, not revived


def test_an_idle_session_ends_and_the_live_stream_does_not_keep_it_alive(db: Database) -> None:
    clock = FakeClock()
    admin = auth.create_token(db, "admin", Role.ADMIN)["token"]
    cookie, _ = sessions.login_token(db, admin, SessionPolicy(ttl_s=7200, idle_s=600), clock=clock)
    clock.advance(599)
    assert sessions.find_session(db, cookie, clock, touch=False) is not None
    clock.advance(2)
    assert sessions.find_session(db, cookie, clock, touch=False) is None


def test_revoking_the_token_or_deleting_the_user_ends_the_session_and_roles_apply_at_once(db: Database) -> None:
    token = auth.create_token(db, "ci", Role.ADMIN)
    cookie, s = sessions.login_token(db, token["token"])
    assert s.name == "token ci" and s.role is Role.ADMIN
    auth.revoke_token(db, token["id"])
    assert sessions.find_session(db, cookie) is None

    users.create_user(db, "olivia", PASSWORD, Role.ADMIN)
    cookie, _ = sessions.login_password(db, "olivia", PASSWORD)
    with db.write() as conn:  # demoted while logged in
        conn.execute(users.users_t.update().values(role="read"))
    assert sessions.find_session(db, cookie).role is Role.READ  # type: ignore[union-attr]
    users.set_password(db, "olivia", PASSWORD + " v2")
    assert sessions.find_session(db, cookie) is None
    cookie, _ = sessions.login_password(db, "olivia", PASSWORD + " v2")
    users.delete_user(db, "olivia")
    assert sessions.find_session(db, cookie) is None


def test_only_the_hash_of_the_cookie_is_stored(db: Database) -> None:
    admin = auth.create_token(db, "admin", Role.ADMIN)["token"]
    cookie, s = sessions.login_token(db, admin)
    with db.read() as conn:
        stored = conn.execute(sessions.sessions_t.select()).mappings().one()
    assert stored["id"] == s.id != cookie and cookie not in str(dict(stored))


def test_csrf_check_applies_to_mutations_only() -> None:
    s = sessions.Session("id", "the-csrf", "user", "o", "o", Role.ADMIN, 0, 1, 1, 0)
    sessions.check_csrf("GET", {}, s)
    sessions.check_csrf("POST", {"x-csrf-token": "the-csrf", "origin": "http://ctl:8700", "host": "ctl:8700"}, s)
    for headers in ({}, {"x-csrf-token": "wrong"},
                    {"x-csrf-token": "the-csrf", "origin": "http://evil.example", "host": "ctl:8700"},
                    {"x-csrf-token": "the-csrf", "sec-fetch-site": "cross-site"},
                    {"x-csrf-token": "the-csrf", "origin": "null"}):
        with pytest.raises(ForbiddenError):
            sessions.check_csrf("DELETE", headers, s)


def test_cookie_flags() -> None:
    header = sessions.cookie_header("v", SessionPolicy(), secure=True)
    assert header.startswith("edge_session=v;")
    assert {"HttpOnly", "SameSite=Strict", "Secure", "Path=/", "Max-Age=28800"} <= set(header.split("; "))
    assert "Secure" not in sessions.cookie_header("v", SessionPolicy(), secure=False)
    assert "Max-Age=0" in sessions.clearing_cookie_header(False)


def test_login_throttle_counts_failures_per_key_in_a_window() -> None:
    clock = FakeClock()
    throttle = sessions.LoginThrottle(max_failures=3, window_s=60, clock=clock)
    for _ in range(3):
        assert throttle.wait_s("user:o") == 0
        throttle.failed("user:o", "address:1")
    assert throttle.wait_s("user:o") == pytest.approx(60)
    assert throttle.wait_s("user:someone-else") == 0
    clock.advance(61)
    assert throttle.wait_s("user:o") == 0
    throttle.failed("user:o")
    throttle.succeeded("user:o")
    assert throttle.wait_s("user:o") == 0


# ---------------------------------------------------------------- over HTTP


def test_login_logout_and_the_session_endpoint(served: Served) -> None:
    c = served.client()
    assert c.get("/dashboard/session").status_code == 401
    bad = c.post("/dashboard/login", json={"token": "edge_not-a-token"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "unauthorized"
    r = c.post("/dashboard/login", json={"token": served.admin})
    assert r.status_code == 200 and r.json()["role"] == "admin" and r.json()["csrf"]
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert c.get("/dashboard/session").json()["csrf"] == r.json()["csrf"]
    assert c.post("/dashboard/logout").status_code == 403  # logout is a mutation too
    assert c.post("/dashboard/logout", headers={"x-csrf-token": r.json()["csrf"]}).status_code == 204
    assert c.get("/dashboard/session").status_code == 401
    assert c.get("/api/v1/devices").status_code == 401


def test_cookie_requests_need_the_csrf_token_and_bearer_requests_do_not(served: Served) -> None:
    from tests.fleet.helpers import Devices, ingest
    from edge.fleet.ingest import Ingestor
    from edge.protocol.topics import Topics

    ingest(Ingestor(served.db, Topics()), Devices(Topics(), lambda: 1_767_225_600.0).birth("d1", 1))
    c, csrf = served.browser_client()
    assert c.get("/api/v1/devices").json()["total"] == 1  # reads need no token
    body = {"command": "ping"}
    url = "/api/v1/devices/d1/commands"
    no_token = c.post(url, json=body)
    assert no_token.status_code == 403 and "CSRF" in no_token.json()["error"]["message"]
    assert c.post(url, json=body, headers={"x-csrf-token": "guess"}).status_code == 403
    assert c.post(url, json=body, headers={"x-csrf-token": csrf, "origin": "http://evil.example"}).status_code == 403
    assert c.post(url, json=body, headers={"x-csrf-token": csrf, "sec-fetch-site": "cross-site"}).status_code == 403
    assert c.post(url, json=body, headers={"x-csrf-token": csrf}).status_code == 202
    with served.client(served.admin) as bearer:  # API tokens stay as they were: no cookie, no CSRF
        assert bearer.post(url, json=body).status_code == 202
    # Another site cannot log a browser in either (login CSRF).
    assert served.client().post("/dashboard/login", json={"token": served.admin},
                                headers={"origin": "http://evil.example"}).status_code == 403


def test_read_only_sessions_read_but_cannot_change_anything(served: Served) -> None:
    users.create_user(served.db, "olivia", PASSWORD, Role.READ)
    c = served.client()
    r = c.post("/dashboard/login", json={"username": "olivia", "password": PASSWORD})
    assert r.status_code == 200 and r.json()["role"] == "read"
    csrf = r.json()["csrf"]
    assert c.get("/dashboard/overview").status_code == 200
    for method, url, body in (("POST", "/api/v1/rollouts", {"model": "tiny", "version": "1.0.0"}),
                              ("POST", "/api/v1/tokens", {"name": "x"}),
                              ("POST", "/dashboard/users", {"name": "eve", "password": PASSWORD}),
                              ("GET", "/dashboard/users", None)):
        out = c.request(method, url, json=body, headers={"x-csrf-token": csrf})
        assert out.status_code == 403 and out.json()["error"]["code"] == "forbidden", (url, out.text)


def test_failed_logins_are_throttled(served: Served) -> None:
    users.create_user(served.db, "olivia", PASSWORD, Role.ADMIN)
    c = served.client()
    for _ in range(sessions.MAX_FAILURES):
        assert c.post("/dashboard/login", json={"username": "olivia", "password": "wrong password!!"}).status_code == 401
    r = c.post("/dashboard/login", json={"username": "olivia", "password": PASSWORD})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
