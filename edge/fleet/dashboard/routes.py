"""The dashboard's HTTP side: pages, static assets, login, read models and the live stream.

========================================  =====  =====================================================
``/`` and ``/ui/...``                     GET    the page shell (every page is the same HTML)
``/ui/static/...``                        GET    JavaScript, CSS, vendored uPlot (package data)
``/dashboard/login`` / ``logout``         POST   password or API token -> session cookie; end it
``/dashboard/session``                    GET    who is logged in, and the CSRF token
``/dashboard/overview``                   GET    health counts, versions per profile, rollouts, failures
``/dashboard/facets``                     GET    values of the device filters
``/dashboard/devices``                    GET    the device list of the REST API, with each device's health
``/dashboard/devices/{id}/series``        GET    a device's telemetry as chart columns
``/dashboard/bundles`` / ``{sha256}``     GET    bundles with their use; one with manifest and signature
``/dashboard/events``                     GET    server-sent events (:mod:`.events`)
``/dashboard/users``                      *      users with passwords (admin)
========================================  =====  =====================================================

Everything but the shell, the assets and the login needs a session or an API token, checked
by :func:`edge.fleet.api.guarded` exactly as the REST API checks it (so the CSRF check of
cookie requests applies to both). Mutations of devices, bundles and rollouts go through the
REST API itself; only user accounts are managed here.
"""

from __future__ import annotations

import threading
import time
from importlib import resources
from typing import Any, AsyncIterator, Callable

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from edge.errors import AuthError, ConfigError, EdgeError
from edge.fleet import auth, registry
from edge.fleet.api import error_response, guarded
from edge.fleet.auth import Principal, Role
from edge.fleet.bodies import read_json
from edge.fleet.dashboard import queries, sessions, users
from edge.fleet.dashboard.events import Watcher, frame
from edge.fleet.dashboard.sessions import SessionPolicy
from edge.fleet.dashboard.tables import ensure_tables
from edge.fleet.db import Clock, Database, now
from edge.fleet.states import FINAL
from edge.protocol.topics import check_id

# Seconds between two database polls of one live stream: "live" to a person, cheap to the DB.
POLL_S = 1.0
# The stream checks for shutdown and disconnects this often.
TICK_S = 0.25
# A comment line this often keeps proxies from closing a quiet stream.
HEARTBEAT_S = 15.0
# How often a stream re-checks that its session or token is still valid.
REAUTH_S = 30.0
# What the browser waits before reconnecting a dropped stream (EventSource's retry).
RETRY_MS = 2000
# Login bodies are a name and a password.
MAX_LOGIN_BYTES = 8192
# Finished rollouts stay on the overview this long.
RECENT_ROLLOUT_S = 3600.0
# Scripts only from this origin; inline styles are allowed since uPlot sizes its canvas with them.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
}


class _Assets(StaticFiles):
    """Package static files, revalidated on every load so an upgrade shows at once."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["cache-control"] = "no-cache"
        response.headers["x-content-type-options"] = "nosniff"
        return response


def _ctx(request: Request) -> Any:
    return request.app.state.ctx


def _secure(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"


async def _small_json(request: Request, limit: int = MAX_LOGIN_BYTES) -> dict[str, Any]:
    return await read_json(request, limit)


def _float(request: Request, name: str, default: float) -> float:
    raw = request.query_params.get(name)
    try:
        return default if raw in (None, "") else float(raw)  # type: ignore[arg-type]
    except ValueError:
        raise ConfigError(f"query parameter {name}={raw!r} is not a number") from None


# ---------------------------------------------------------------------- read models

@guarded(Role.READ)
async def _overview(request: Request, _: Principal) -> dict[str, Any]:
    ctx = _ctx(request)

    def read() -> dict[str, Any]:
        t = time.time()
        with ctx.db.read() as conn:
            out = queries.overview(conn, t)
        rollouts = ctx.engine.list(limit=50)
        out["rollouts"] = [r for r in rollouts if r["state"] not in {s.value for s in FINAL}
                           or (r["finished_at"] or 0) > t - RECENT_ROLLOUT_S]
        return out
    return await run_in_threadpool(read)

@guarded(Role.READ)
async def _facets(request: Request, _: Principal) -> dict[str, Any]:
    ctx = _ctx(request)

    def read() -> dict[str, Any]:
        with ctx.db.read() as conn:
            return queries.facets(conn)
    return await run_in_threadpool(read)

@guarded(Role.READ)
async def _devices(request: Request, _: Principal) -> dict[str, Any]:
    ctx, q = _ctx(request), request.query_params
    try:
        limit = int(q.get("limit") or 50)
    except ValueError:
        raise ConfigError(f"query parameter limit={q.get('limit')!r} is not an integer") from None
    query = registry.DeviceQuery(
        search=q.get("search") or None, tag=q.get("tag") or None, group=q.get("group") or None,
        profile=q.get("profile") or None, status=q.get("status") or None, model=q.get("model") or None,
        version=q.get("version") or None, limit=limit, after=q.get("after") or None)

    def read() -> dict[str, Any]:
        t = time.time()
        with ctx.db.read() as conn:
            out = registry.list_devices(conn, query)
        for item in out["items"]:
            item["health"] = queries.health_of(item, t)
        return out
    return await run_in_threadpool(read)

@guarded(Role.READ)
async def _series(request: Request, _: Principal) -> dict[str, Any]:
    ctx, device_id = _ctx(request), request.path_params["device_id"]
    until = _float(request, "until", time.time())
    since = _float(request, "since", until - 3600)

    def read() -> dict[str, Any]:
        with ctx.db.read() as conn:
            registry.get_device(conn, device_id)
            return queries.series(conn, device_id, since, until)
    return await run_in_threadpool(read)

@guarded(Role.READ)
async def _bundles(request: Request, _: Principal) -> dict[str, Any]:
    ctx = _ctx(request)

    def read() -> dict[str, Any]:
        with ctx.db.read() as conn:
            items = ctx.store.list(conn)
            usage = queries.bundle_usage(conn)
        trusted = set(ctx.store.trust.ids())
        for b in items:
            b["usage"] = usage.get(b["sha256"], {"desired": 0, "running": 0})
            b["key_trusted_now"] = b["key_id"] in trusted
        return {"items": items}
    return await run_in_threadpool(read)

@guarded(Role.READ)
async def _bundle(request: Request, _: Principal) -> dict[str, Any]:
    ctx, sha = _ctx(request), request.path_params["sha256"]

    def read() -> dict[str, Any]:
        with ctx.db.read() as conn:
            return queries.bundle_view(conn, sha, ctx.store.trust.ids())
    return await run_in_threadpool(read)

# ---------------------------------------------------------------------- users (admin)

@guarded(Role.ADMIN)
async def _list_users(request: Request, _: Principal) -> dict[str, Any]:
    return {"items": await run_in_threadpool(users.list_users, _ctx(request).db)}

@guarded(Role.ADMIN)
async def _create_user(request: Request, who: Principal) -> Response:
    body = await _small_json(request)
    unknown = sorted(set(body) - {"name", "password", "role"})
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}", hint="use name, password, role")
    try:
        role = Role(body.get("role", "read"))
    except ValueError:
        raise ConfigError(f"unknown role {body.get('role')!r}", hint="use read or admin") from None
    out = await run_in_threadpool(users.create_user, _ctx(request).db, body.get("name"), body.get("password"),
                                  role, who.name)
    return JSONResponse(out, status_code=201)

@guarded(Role.ADMIN)
async def _delete_user(request: Request, _: Principal) -> Response:
    await run_in_threadpool(users.delete_user, _ctx(request).db, request.path_params["name"])
    return Response(status_code=204)

@guarded(Role.ADMIN)
async def _set_password(request: Request, _: Principal) -> Response:
    body = await _small_json(request)
    await run_in_threadpool(users.set_password, _ctx(request).db, request.path_params["name"],
                            body.get("password"))
    return Response(status_code=204)


class Dashboard:
    """The dashboard of one controller: its tables, routes and live streams."""

    def __init__(self, db: Database, policy: SessionPolicy = SessionPolicy(), poll_s: float = POLL_S,
                 clock: Clock = now) -> None:
        ensure_tables(db)
        self.db, self.policy, self.poll_s, self.clock = db, policy, poll_s, clock
        self.throttle = sessions.LoginThrottle()
        self._closing = threading.Event()

    def close(self) -> None:
        """End every live stream (the HTTP server waits for open responses when it stops)."""
        self._closing.set()

    def routes(self) -> list[BaseRoute]:
        """Return the routes to mount beside the REST API."""
        shell = self._shell
        return [
            Route("/", lambda request: RedirectResponse("/ui/", status_code=307)),
            Mount("/ui/static", app=_Assets(packages=[("edge.fleet.dashboard", "static")]), name="dashboard-static"),
            Route("/ui", shell),
            Route("/ui/{path:path}", shell),
            Route("/dashboard/login", self._login, methods=["POST"]),
            Route("/dashboard/logout", self._logout, methods=["POST"]),
            Route("/dashboard/session", self._session),
            Route("/dashboard/overview", _overview),
            Route("/dashboard/facets", _facets),
            Route("/dashboard/devices", _devices),
            Route("/dashboard/devices/{device_id}/series", _series),
            Route("/dashboard/bundles", _bundles),
            Route("/dashboard/bundles/{sha256}", _bundle),
            Route("/dashboard/events", self._events),
            Route("/dashboard/users", _list_users, methods=["GET"]),
            Route("/dashboard/users", _create_user, methods=["POST"]),
            Route("/dashboard/users/{name}", _delete_user, methods=["DELETE"]),
            Route("/dashboard/users/{name}/password", _set_password, methods=["POST"]),
        ]

    # ------------------------------------------------------------------ shell and login

    async def _shell(self, request: Request) -> Response:
        html = resources.files("edge.fleet.dashboard").joinpath("static/index.html").read_bytes()
        return Response(html, media_type="text/html; charset=utf-8",
                        headers={**SECURITY_HEADERS, "cache-control": "no-cache"})

    async def _login(self, request: Request) -> Response:
        address = request.client.host if request.client else ""
        try:
            sessions.check_origin(request.headers)
            body = await _small_json(request)
            token, name = body.get("token"), body.get("username")
            # Per address, and per user name for passwords (a token names nobody before it is checked).
            keys = [f"address:{address}"] + ([f"user:{name}"] if token is None else [])
            wait = self.throttle.wait_s(*keys)
            if wait > 0:
                return JSONResponse({"error": {"code": "unauthorized", "message": "too many failed logins",
                                               "hint": f"try again in {int(wait) + 1} s"}},
                                    status_code=429, headers={"retry-after": str(int(wait) + 1)})
            try:
                if token is not None:
                    value, session = await run_in_threadpool(sessions.login_token, self.db, token, self.policy,
                                                             address, self.clock)
                else:
                    value, session = await run_in_threadpool(sessions.login_password, self.db, name,
                                                             body.get("password"), self.policy, address, self.clock)
            except AuthError:
                self.throttle.failed(*keys)
                raise
            self.throttle.succeeded(*keys)
        except EdgeError as exc:
            return error_response(exc)
        response = JSONResponse(session.to_public())
        response.headers.append("set-cookie", sessions.cookie_header(value, self.policy, _secure(request)))
        response.headers["cache-control"] = "no-store"
        return response

    async def _logout(self, request: Request) -> Response:
        value = request.cookies.get(sessions.SESSION_COOKIE)
        try:
            if value:
                session = await run_in_threadpool(sessions.find_session, self.db, value, self.clock)
                if session is not None:
                    sessions.check_csrf(request.method, request.headers, session)
                    await run_in_threadpool(sessions.close_session, self.db, value)
        except EdgeError as exc:
            return error_response(exc)
        response = Response(status_code=204)
        response.headers.append("set-cookie", sessions.clearing_cookie_header(_secure(request)))
        return response

    async def _session(self, request: Request) -> Response:
        value = request.cookies.get(sessions.SESSION_COOKIE)
        session = await run_in_threadpool(sessions.find_session, self.db, value, self.clock) if value else None
        if session is None:
            return error_response(AuthError("not logged in", hint="log in with a password or an API token"))
        return JSONResponse(session.to_public(), headers={"cache-control": "no-store"})

    # ------------------------------------------------------------------ live stream

    async def _events(self, request: Request) -> Response:
        ctx = _ctx(request)
        try:
            principal = await run_in_threadpool(auth.authenticate_request, ctx.db, request)
            principal.require(Role.READ)
            device = request.query_params.get("device") or None
            if device:
                check_id(device)
        except EdgeError as exc:
            return error_response(exc)
        watcher = Watcher(device)
        still_allowed = self._checker(request)
        return StreamingResponse(self._stream(watcher, still_allowed), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    def _checker(self, request: Request) -> Callable[[], bool]:
        cookie, header = request.cookies.get(sessions.SESSION_COOKIE), request.headers.get("authorization")

        def check() -> bool:
            try:
                if header:
                    auth.authenticate(self.db, header)
                    return True
                return cookie is not None and sessions.find_session(self.db, cookie, self.clock, touch=False) is not None
            except AuthError:
                return False
        return check

    def _read(self, fn: Callable[[Any, float], Any]) -> Any:
        with self.db.read() as conn:
            return fn(conn, self.clock())

    async def _stream(self, watcher: Watcher, still_allowed: Callable[[], bool]) -> AsyncIterator[str]:
        yield f"retry: {RETRY_MS}\n\n"
        seq = 0
        for name, data in await run_in_threadpool(self._read, watcher.start):
            seq += 1
            yield frame(name, data, seq)
        last_poll = last_auth = last_sent = time.monotonic()
        while not self._closing.is_set():
            await anyio.sleep(TICK_S)
            t = time.monotonic()
            if t - last_auth >= REAUTH_S:
                last_auth = t
                if not await run_in_threadpool(still_allowed):
                    yield frame("logout", {"reason": "the session ended"})
                    return
            if t - last_poll >= self.poll_s:
                last_poll = t
                try:
                    events = await run_in_threadpool(self._read, watcher.poll)
                except EdgeError as exc:  # the database is briefly unavailable: say so, keep the stream
                    events = [("error", exc.to_dict())]
                for name, data in events:
                    seq += 1
                    last_sent = t
                    yield frame(name, data, seq)
            if t - last_sent >= HEARTBEAT_S:
                last_sent = t
                yield ": ping\n\n"
