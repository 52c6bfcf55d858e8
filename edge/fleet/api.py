"""The controller's REST API (Starlette), under ``/api/v1``.

Every route but ``/api/v1/health`` needs a token (:mod:`edge.fleet.auth`): GET routes a read or
admin token, the others an admin token. Bundle downloads also accept the signed per-device URL
that desired state carries. Errors are ``{"error": {"code", "message", "hint"}}`` with the
status of the error class (404 not found, 409 conflict, 401/403 auth, 400/422 bad input).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from functools import wraps
from typing import Any, Awaitable, Callable, Sequence

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from edge import __version__
from edge.errors import (
    AuthError,
    BundleError,
    ConfigError,
    ConflictError,
    EdgeError,
    ForbiddenError,
    NotFoundError,
    OverloadError,
    ResourceError,
    StoreError,
)
from edge.fleet import auth, commands, registry, removal
from edge.fleet.artifacts import ArtifactStore, file_response
from edge.fleet.auth import Principal, Role
from edge.fleet.bodies import read_json
from edge.fleet.db import Clock, Database, now
from edge.fleet.desired import DesiredPublisher
from edge.fleet.plan import parse_spec
from edge.fleet.rollout import RolloutEngine
from edge.fleet.states import RolloutEvent

log = logging.getLogger(__name__)

# Bodies of JSON requests are small; refuse anything larger before parsing it.
MAX_JSON_BYTES = 1 << 20
STATUS_OF: tuple[tuple[type[EdgeError], int], ...] = (
    (NotFoundError, 404), (ConflictError, 409), (BundleError, 422), (ConfigError, 400),
    (OverloadError, 429), (ResourceError, 413), (StoreError, 503),
)


@dataclass
class ApiContext:
    """What the routes need from the controller."""

    db: Database
    store: ArtifactStore
    engine: RolloutEngine
    desired: DesiredPublisher | None  # set once the API's port (part of bundle URLs) is known
    download_secret: bytes
    clock: Clock = now
    wake: Callable[[], None] = lambda: None  # nudge the ticker after a change
    stats: Callable[[], dict[str, Any]] = lambda: {}


def error_response(exc: EdgeError) -> JSONResponse:
    """Return the JSON response of one of our errors."""
    status = 500
    if isinstance(exc, ForbiddenError):
        status = 403
    elif isinstance(exc, AuthError):
        status = 401
    else:
        for cls, code in STATUS_OF:
            if isinstance(exc, cls):
                status = code
                break
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    if isinstance(exc, OverloadError):
        headers = {"retry-after": str(exc.retry_after_s)}
    return JSONResponse({"error": exc.to_dict()}, status_code=status, headers=headers)


Handler = Callable[[Request, Principal], Any]


def guarded(role: Role | None) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """Wrap a route: authenticate (unless ``role`` is None), check the role, map our errors."""
    def decorate(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
        @wraps(fn)
        async def endpoint(request: Request) -> Response:
            ctx: ApiContext = request.app.state.ctx
            try:
                principal = Principal("", "anonymous", Role.READ)
                if role is not None:
                    principal = await run_in_threadpool(auth.authenticate_request, ctx.db, request)
                    principal.require(role)
                result = fn(request, principal)
                if hasattr(result, "__await__"):
                    result = await result
                if isinstance(result, Response):
                    return result
                return JSONResponse(result)
            except EdgeError as exc:
                return error_response(exc)
        return endpoint
    return decorate


async def _json(request: Request) -> dict[str, Any]:
    return await read_json(request, MAX_JSON_BYTES)


def _int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"query parameter {name}={raw!r} is not an integer") from None


def _ctx(request: Request) -> ApiContext:
    return request.app.state.ctx


def _sync(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    return run_in_threadpool(fn, *args)


# ---------------------------------------------------------------- devices


@guarded(None)
async def health(request: Request, _: Principal) -> dict[str, Any]:
    """GET /api/v1/health: liveness, no token needed."""
    return {"ok": True, "version": __version__}


@guarded(Role.READ)
async def stats(request: Request, _: Principal) -> dict[str, Any]:
    """GET /api/v1/stats: device counts and ingestion figures."""
    ctx = _ctx(request)

    def read() -> dict[str, Any]:
        with ctx.db.read() as conn:
            return {**registry.counts(conn), "ingest": ctx.stats()}
    return await _sync(read)


@guarded(Role.READ)
async def list_devices(request: Request, _: Principal) -> dict[str, Any]:
    """GET /api/v1/devices: a filtered page of devices (keyset paging with ``after``)."""
    ctx, q = _ctx(request), request.query_params
    query = registry.DeviceQuery(
        search=q.get("search") or None, tag=q.get("tag") or None, group=q.get("group") or None,
        profile=q.get("profile") or None, status=q.get("status") or None, model=q.get("model") or None,
        version=q.get("version") or None, limit=_int(request, "limit", 100), after=q.get("after") or None)

    def read() -> dict[str, Any]:
        with ctx.db.read() as conn:
            return registry.list_devices(conn, query)
    return await _sync(read)


@guarded(Role.READ)
async def device_detail(request: Request, _: Principal) -> dict[str, Any]:
    """GET /api/v1/devices/{id}: one device with recent telemetry, events, desired state, commands."""
    ctx, device_id = _ctx(request), request.path_params["device_id"]

    def read() -> dict[str, Any]:
        with ctx.db.read() as conn:
            out = registry.get_device(conn, device_id)
            out["telemetry_history"] = registry.telemetry_history(conn, device_id, _int(request, "telemetry", 20))
            out["events"] = registry.event_history(conn, device_id, _int(request, "events", 50))
        out["desired"] = ctx.desired.device_desired(device_id) if ctx.desired else None
        out["commands"] = commands.list_commands(ctx.db, device_id, 20)
        return out
    return await _sync(read)


@guarded(Role.READ)
async def device_telemetry(request: Request, _: Principal) -> dict[str, Any]:
    """GET /api/v1/devices/{id}/telemetry: telemetry history, newest first."""
    ctx, device_id = _ctx(request), request.path_params["device_id"]
    before = request.query_params.get("before")

    def read() -> dict[str, Any]:
        with ctx.db.read() as conn:
            registry.get_device(conn, device_id)
            items = registry.telemetry_history(conn, device_id, _int(request, "limit", 100),
                                               float(before) if before else None)
        return {"items": items}
    return await _sync(read)


@guarded(Role.READ)
async def device_events(request: Request, _: Principal) -> dict[str, Any]:
    """GET /api/v1/devices/{id}/events: deployment events, newest first."""
    ctx, device_id = _ctx(request), request.path_params["device_id"]

    def read() -> dict[str, Any]:
        with ctx.db.read() as conn:
            registry.get_device(conn, device_id)
            return {"items": registry.event_history(conn, device_id, _int(request, "limit", 100))}
    return await _sync(read)


def _labels_route(kind: str) -> Callable[[Request], Awaitable[Response]]:
    @guarded(Role.ADMIN)
    async def change(request: Request, _: Principal) -> dict[str, Any]:
        ctx, device_id, body = _ctx(request), request.path_params["device_id"], await _json(request)
        key = f"{kind}s"
        for name in (key, "add", "remove"):
            if name in body and not (isinstance(body[name], list) and all(isinstance(x, str) for x in body[name])):
                raise ConfigError(f"{name} must be a list of strings")
        unknown = sorted(set(body) - {key, "add", "remove"})
        if unknown:
            raise ConfigError(f"unknown field(s) {', '.join(unknown)}", hint=f"use {key} (replace), add, remove")

        def write() -> dict[str, Any]:
            with ctx.db.write() as conn:
                values = registry.set_labels(conn, device_id, kind, replace=body.get(key) if request.method == "PUT" else None,
                                             add=body.get("add", []), remove=body.get("remove", []))
            ctx.wake()  # a device that joined a rollout's target should hear about it soon
            return {"id": device_id, key: values}
        return await _sync(write)
    return change


@guarded(Role.ADMIN)
async def send_command(request: Request, _: Principal) -> Response:
    """POST /api/v1/devices/{id}/commands: store a command for the ticker to send."""
    ctx, device_id, body = _ctx(request), request.path_params["device_id"], await _json(request)
    unknown = sorted(set(body) - {"command", "args", "ttl_s"})
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}", hint="use command, args, ttl_s")
    if not isinstance(body.get("args", {}), dict):
        raise ConfigError("args must be an object")
    ttl = body.get("ttl_s", commands.DEFAULT_TTL_S)
    if not isinstance(ttl, (int, float)) or ttl <= 0:
        raise ConfigError("ttl_s must be a positive number")
    out = await _sync(lambda: commands.create_command(ctx.db, device_id, str(body.get("command", "")),
                                                      body.get("args"), float(ttl), ctx.clock))
    ctx.wake()
    return JSONResponse(out, status_code=202)


@guarded(Role.READ)
async def device_commands(request: Request, _: Principal) -> dict[str, Any]:
    """GET /api/v1/devices/{id}/commands: a device's commands with their answers."""
    ctx = _ctx(request)
    device_id = request.path_params["device_id"]

    def read() -> dict[str, Any]:
        with ctx.db.read() as conn:
            registry.get_device(conn, device_id)
        return {"items": commands.list_commands(ctx.db, device_id, _int(request, "limit", 50))}
    return await _sync(read)


@guarded(Role.READ)
async def command_detail(request: Request, _: Principal) -> dict[str, Any]:
    """GET /api/v1/commands/{id}: one command and its answer."""
    return await _sync(commands.get_command, _ctx(request).db, request.path_params["command_id"])


# ---------------------------------------------------------------- bundles


@guarded(Role.READ)
async def list_bundles(request: Request, _: Principal) -> dict[str, Any]:
    """GET /api/v1/bundles: stored bundles (filter by name, version)."""
    ctx, q = _ctx(request), request.query_params

    def read() -> dict[str, Any]:
        with ctx.db.read() as conn:
            return {"items": ctx.store.list(conn, q.get("name") or None, q.get("version") or None)}
    return await _sync(read)


@guarded(Role.ADMIN)
async def upload_bundle(request: Request, _: Principal) -> Response:
    """POST /api/v1/bundles: upload a signed bundle (the body), verified before it is stored."""
    ctx = _ctx(request)
    store = ctx.store
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > store.max_bytes:  # refused before a byte is spooled
        raise ResourceError(f"upload of {declared} bytes is over the {store.max_bytes}-byte limit")
    tmp = store.spool_path()
    h, size = hashlib.sha256(), 0
    try:
        async with await anyio.open_file(tmp, "xb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > store.max_bytes:
                    raise ResourceError(f"upload is over the {store.max_bytes}-byte limit")
                h.update(chunk)
                await fh.write(chunk)
            await fh.flush()
            await run_in_threadpool(os.fsync, fh.wrapped.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    record, new = await _sync(store.admit, tmp, h.hexdigest(), size)
    return JSONResponse({**record, "new": new}, status_code=201 if new else 200)


@guarded(Role.READ)
async def bundle_detail(request: Request, _: Principal) -> dict[str, Any]:
    """GET /api/v1/bundles/{sha256}: one bundle's record."""
    ctx, sha = _ctx(request), request.path_params["sha256"]

    def read() -> dict[str, Any]:
        with ctx.db.read() as conn:
            return ctx.store.get(conn, sha)
    return await _sync(read)


@guarded(Role.READ)
async def bundle_manifest(request: Request, _: Principal) -> Response:
    """GET /api/v1/bundles/{sha256}/manifest: the exact signed manifest bytes."""
    ctx, sha = _ctx(request), request.path_params["sha256"]

    def read() -> bytes:
        with ctx.db.read() as conn:
            return ctx.store.manifest_bytes(conn, sha)
    return Response(await _sync(read), media_type="application/json")


async def download_bundle(request: Request) -> Response:
    """Serve a bundle to a token holder or to the device its signed URL names."""
    ctx, sha = _ctx(request), request.path_params["sha256"]
    try:
        device, sig = request.query_params.get("device"), request.query_params.get("sig")
        if device and sig:
            if not auth.check_download(ctx.download_secret, sha, device, sig):
                raise AuthError("download signature does not match this bundle and device")
        else:
            principal = await run_in_threadpool(auth.authenticate_request, ctx.db, request)
            principal.require(Role.READ)
        await _sync(lambda: _bundle_exists(ctx, sha))
        return file_response(ctx.store, sha, request.headers.get("if-none-match"))
    except EdgeError as exc:
        return error_response(exc)


def _bundle_exists(ctx: ApiContext, sha: str) -> None:
    with ctx.db.read() as conn:
        ctx.store.get(conn, sha)


# ---------------------------------------------------------------- rollouts


@guarded(Role.READ)
async def list_rollouts(request: Request, _: Principal) -> dict[str, Any]:
    """GET /api/v1/rollouts: rollouts, newest first."""
    ctx, q = _ctx(request), request.query_params
    return {"items": await _sync(lambda: ctx.engine.list(q.get("state") or None, q.get("model") or None,
                                                         _int(request, "limit", 100)))}


@guarded(Role.ADMIN)
async def create_rollout(request: Request, _: Principal) -> Response:
    """POST /api/v1/rollouts: plan a rollout; the ticker starts it."""
    ctx = _ctx(request)
    spec = parse_spec(await _json(request))
    out = await _sync(ctx.engine.create, spec)
    ctx.wake()
    return JSONResponse(out, status_code=201)


@guarded(Role.READ)
async def rollout_detail(request: Request, _: Principal) -> dict[str, Any]:
    """GET /api/v1/rollouts/{id}: state, plan, device counts, gate verdict, transitions."""
    return await _sync(_ctx(request).engine.status, request.path_params["rollout_id"])


@guarded(Role.READ)
async def rollout_devices(request: Request, _: Principal) -> dict[str, Any]:
    """GET /api/v1/rollouts/{id}/devices: a page of the rollout's devices."""
    ctx, q = _ctx(request), request.query_params
    items = await _sync(lambda: ctx.engine.devices(request.path_params["rollout_id"], q.get("state") or None,
                                                   _int(request, "limit", 100), q.get("after") or None))
    return {"items": items}


def _action_route(event: RolloutEvent) -> Callable[[Request], Awaitable[Response]]:
    @guarded(Role.ADMIN)
    async def act(request: Request, _: Principal) -> dict[str, Any]:
        ctx, body = _ctx(request), await _json(request)
        reason = body.get("reason", "")
        if not isinstance(reason, str):
            raise ConfigError("reason must be a string")
        out = await _sync(ctx.engine.act, request.path_params["rollout_id"], event, reason[:500])
        ctx.wake()
        return out
    return act


@guarded(Role.ADMIN)
async def undeploy(request: Request, _: Principal) -> dict[str, Any]:
    """POST /api/v1/undeploy: take a model off a target or named devices (edge.fleet.removal)."""
    ctx = _ctx(request)
    spec = removal.parse_removal(await _json(request))
    out = await _sync(removal.remove_model, ctx.db, spec)
    ctx.wake()  # publish the new desired state now
    return out


# ---------------------------------------------------------------- tokens


@guarded(Role.ADMIN)
async def list_tokens(request: Request, _: Principal) -> dict[str, Any]:
    """GET /api/v1/tokens: token records (never the tokens)."""
    return {"items": await _sync(auth.list_tokens, _ctx(request).db)}


@guarded(Role.ADMIN)
async def create_token(request: Request, _: Principal) -> Response:
    """POST /api/v1/tokens: create a read or admin token, returned once."""
    ctx, body = _ctx(request), await _json(request)
    try:
        role = Role(body.get("role", "read"))
    except ValueError:
        raise ConfigError(f"unknown role {body.get('role')!r}", hint="use read or admin") from None
    out = await _sync(auth.create_token, ctx.db, str(body.get("name", "")), role, ctx.clock)
    return JSONResponse(out, status_code=201)


@guarded(Role.ADMIN)
async def revoke_token(request: Request, _: Principal) -> Response:
    """DELETE /api/v1/tokens/{id}: revoke a token."""
    await _sync(auth.revoke_token, _ctx(request).db, request.path_params["token_id"])
    return Response(status_code=204)


def create_app(ctx: ApiContext, extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
    """Return the Starlette application of the REST API (plus ``extra_routes``: the dashboard)."""
    d, b, r = "/api/v1/devices/{device_id}", "/api/v1/bundles/{sha256}", "/api/v1/rollouts/{rollout_id}"
    routes = [
        Route("/api/v1/health", health),
        Route("/api/v1/stats", stats),
        Route("/api/v1/devices", list_devices),
        Route(d, device_detail),
        Route(d + "/telemetry", device_telemetry),
        Route(d + "/events", device_events),
        Route(d + "/tags", _labels_route("tag"), methods=["PUT", "POST"]),
        Route(d + "/groups", _labels_route("group"), methods=["PUT", "POST"]),
        Route(d + "/commands", send_command, methods=["POST"]),
        Route(d + "/commands", device_commands, methods=["GET"]),
        Route("/api/v1/commands/{command_id}", command_detail),
        Route("/api/v1/bundles", list_bundles, methods=["GET"]),
        Route("/api/v1/bundles", upload_bundle, methods=["POST"]),
        Route(b, bundle_detail),
        Route(b + "/manifest", bundle_manifest),
        Route(b + "/download", download_bundle, methods=["GET", "HEAD"]),
        Route("/api/v1/rollouts", list_rollouts, methods=["GET"]),
        Route("/api/v1/rollouts", create_rollout, methods=["POST"]),
        Route(r, rollout_detail),
        Route(r + "/devices", rollout_devices),
        *(Route(f"{r}/{e.value}", _action_route(e), methods=["POST"])
          for e in (RolloutEvent.PAUSE, RolloutEvent.RESUME, RolloutEvent.ABORT, RolloutEvent.ROLLBACK)),
        Route("/api/v1/undeploy", undeploy, methods=["POST"]),
        Route("/api/v1/tokens", list_tokens, methods=["GET"]),
        Route("/api/v1/tokens", create_token, methods=["POST"]),
        Route("/api/v1/tokens/{token_id}", revoke_token, methods=["DELETE"]),
    ]
    app = Starlette(routes=[*routes, *extra_routes], exception_handlers={ClientDisconnect: _client_left})
    app.state.ctx = ctx
    return app


async def _client_left(request: Request, exc: Exception) -> Response:
    # The client went away, or edge.web cut it off as too slow, before its body was in: nobody
    # hears an answer, and it is not a server error worth a traceback.
    log.info("%s %s: the client left before its request body was complete", request.method, request.url.path)
    return Response(status_code=499)  # nginx's "client closed request"; never sent
