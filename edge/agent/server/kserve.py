"""Open Inference Protocol (KServe v2) routes, as Triton serves them over HTTP.

Health, server and model metadata, model readiness, ``infer`` (JSON and binary tensors) and the
model repository extension (index, load, unload). Errors answer ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge import __version__
from edge.agent.server.context import Context, parse_json, read_body
from edge.agent.server.registry import ServedModel
from edge.errors import RequestError, ResourceError, UnavailableError

# Extensions of the protocol this server implements, spelled as Triton spells them.
EXTENSIONS = ("binary_tensor_data", "model_repository")
# The "platform" Triton reports for ONNX Runtime models.
PLATFORM = "onnxruntime_onnx"
JSON_TYPE = "application/json"


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), status, media_type=JSON_TYPE)


# A model whose recent small calls took less than this runs on the event loop itself: handing
# a call to a worker thread and back costs 50-700 µs (GIL hand-over, two wake-ups), more than
# the whole run of a tiny model, while blocking the loop for < 1 ms delays nobody noticeably.
INLINE_MAX_S = 0.001
# Only requests up to this size may run inline; a big batch of a fast model goes to a thread.
INLINE_MAX_BYTES = 64 * 1024
# Weight of the newest sample in the moving average of run times.
EWMA_ALPHA = 0.2
# One sample counts as at most this: a single slow call (the process was preempted, a garbage
# collection ran) must not send a fast model's calls through a thread for the next dozen
# requests; a model that is really slow still crosses INLINE_MAX_S within four calls.
SAMPLE_CAP_S = 2 * INLINE_MAX_S


class InferLimiter:
    """Run raw-tensor calls of one model, refusing work past a bounded queue.

    Calls go to a few worker threads, except small calls of a model that has been fast: those
    run inline on the event loop (see :data:`INLINE_MAX_S`).
    """

    def __init__(self, name: str, concurrency: int, queue: int,
                 on_depth: Callable[[int], None] | None = None) -> None:
        self.name = name
        self.concurrency = concurrency
        self.queue = queue
        self.on_depth = on_depth
        self.inflight = 0
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"edge-infer-{name}")
        self.closed = False
        self.small_call_s: float | None = None  # moving average of small calls' run time

    async def run(self, fn: Callable[..., Any], *args: Any, nbytes: int = 0) -> Any:
        """Run ``fn(*args)`` inline or on a worker thread; ``nbytes`` is the request's input size."""
        if self.closed:
            raise UnavailableError(f"model {self.name} is being unloaded")
        small = nbytes <= INLINE_MAX_BYTES
        if small and self.small_call_s is not None and self.small_call_s < INLINE_MAX_S and self.inflight == 0:
            return self._timed(small, fn, *args)
        if self.inflight >= self.concurrency + self.queue:
            raise ResourceError(f"model {self.name} has {self.inflight} requests in flight, the limit is "
                                f"{self.concurrency + self.queue}", hint="retry after a moment")
        self.inflight += 1
        self._report()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, self._timed, small, fn, *args)
        finally:
            self.inflight -= 1
            self._report()

    def _timed(self, small: bool, fn: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        result = fn(*args)
        if small:
            took = min(time.perf_counter() - started, SAMPLE_CAP_S)
            avg = self.small_call_s
            self.small_call_s = took if avg is None else avg + EWMA_ALPHA * (took - avg)
        return result

    def _report(self) -> None:
        if self.on_depth is not None:
            self.on_depth(max(0, self.inflight - self.concurrency))

    def close(self) -> None:
        """Refuse new calls; running ones finish."""
        self.closed = True
        self.executor.shutdown(wait=False)


def _codec() -> Any:
    # The tensor codec imports numpy: loaded with the first infer request, not at start.
    from edge.agent.server import tensors

    return tensors


def _limiter(ctx: Context, served: ServedModel) -> InferLimiter:
    if served.limiter is None:
        gauge = ctx.metrics.queue_depth.labels(served.name, served.version)
        served.limiter = InferLimiter(served.name, ctx.config.infer_concurrency, ctx.config.infer_queue, gauge.set)
    return served.limiter


def _tensor_meta(specs: Any) -> list[dict[str, Any]]:
    from edge.agent.server.tensors import MANIFEST_DATATYPES

    return [
        {"name": s.name, "datatype": MANIFEST_DATATYPES.get(s.dtype, s.dtype.upper()),
         "shape": [d if isinstance(d, int) and d >= 0 else -1 for d in s.shape]}
        for s in specs
    ]


def _config_tensor(t: dict[str, Any]) -> dict[str, Any]:
    # Triton's model config spells BYTES as TYPE_STRING.
    dtype = "STRING" if t["datatype"] == "BYTES" else t["datatype"]
    return {"name": t["name"], "data_type": f"TYPE_{dtype}", "dims": t["shape"]}


def routes(ctx: Context) -> list[Route]:
    """Return the KServe v2 routes bound to one server context."""
    registry, metrics, config = ctx.registry, ctx.metrics, ctx.config

    async def server_metadata(request: Request) -> Response:
        return _json({"name": config.server_name, "version": __version__, "extensions": list(EXTENSIONS)})

    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def ready(request: Request) -> Response:
        ok, reason = registry.readiness()
        if ok:
            return Response(status_code=200)
        return _json({"error": reason}, 503)

    async def model_metadata(request: Request) -> Response:
        p = request.path_params
        served = registry.resolve(p["name"], p.get("version"))
        versions = sorted(s.version for s in registry.served() if s.name == served.name)
        m = served.manifest
        return _json({
            "name": served.name, "versions": versions, "platform": PLATFORM,
            "inputs": _tensor_meta(m.inputs), "outputs": _tensor_meta(m.outputs),
            "parameters": {"task": m.task.value, "precision": m.precision.value, "profile": m.profile,
                           "execution_provider": served.provider},
        })

    async def model_config(request: Request) -> Response:
        p = request.path_params
        served = registry.resolve(p["name"], p.get("version"))
        m = served.manifest
        return _json({
            "name": served.name, "platform": PLATFORM, "backend": "onnxruntime", "max_batch_size": 0,
            "input": [_config_tensor(t) for t in _tensor_meta(m.inputs)],
            "output": [_config_tensor(t) for t in _tensor_meta(m.outputs)],
        })

    async def model_ready(request: Request) -> Response:
        p = request.path_params
        try:
            registry.resolve(p["name"], p.get("version"))
        except UnavailableError as exc:
            return _json({"error": str(exc)}, 503)
        return Response(status_code=200)

    async def infer(request: Request) -> Response:
        started = time.perf_counter()
        p = request.path_params
        name = p["name"]
        served = None
        try:
            served = registry.resolve(name, p.get("version"))
            body = await read_body(request, config.max_body_bytes)
            codec = _codec()
            req = codec.parse_infer_request(body, request.headers.get(codec.HEADER_LENGTH))
            names = None
            if req.outputs is not None:
                known = {o.name for o in served.manifest.outputs}
                unknown = [o.name for o in req.outputs if o.name not in known]
                if unknown:
                    raise RequestError(f"unknown output(s) {', '.join(unknown)}; the model has {', '.join(sorted(known))}")
                names = [o.name for o in req.outputs]
            nbytes = sum(a.nbytes for a in req.inputs.values())
            results = await _limiter(ctx, served).run(served.model.infer, req.inputs, names, nbytes=nbytes)
            payload, headers = codec.encode_infer_response(served.name, served.version, req, results)
        except BaseException as exc:
            if isinstance(exc, Exception):
                ctx.fail("infer", name, served, exc)
            raise
        metrics.observe_success(metrics.timer(served.name, served.version, "infer"), time.perf_counter() - started)
        return Response(payload, 200, headers)

    async def repository_index(request: Request) -> Response:
        body = await read_body(request, config.max_body_bytes)
        if body.strip():
            req = parse_json(body, "repository index request")
            if not isinstance(req, dict):
                raise RequestError("repository index request must be a JSON object")
            ready_only = bool(req.get("ready", False))
        else:
            ready_only = False
        rows = await asyncio.to_thread(registry.index)
        if ready_only:
            rows = [r for r in rows if r["state"] == "READY"]
        return _json(rows)

    async def repository_load(request: Request) -> Response:
        body = await read_body(request, config.max_body_bytes)
        if body.strip():
            req = parse_json(body, "load request")
            params = req.get("parameters") if isinstance(req, dict) else None
            if params and any(k == "config" or k.startswith("file:") for k in params):
                raise RequestError("loading a model from a config or files in the request is not supported",
                                   hint="install a signed bundle into the store instead")
        await asyncio.to_thread(registry.load, request.path_params["name"])
        return Response(status_code=200)

    async def repository_unload(request: Request) -> Response:
        await read_body(request, config.max_body_bytes)
        await asyncio.to_thread(registry.unload, request.path_params["name"])
        return Response(status_code=200)

    return [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}", model_metadata, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}", model_metadata, methods=["GET"]),
        Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/config", model_config, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/config", model_config, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", repository_unload, methods=["POST"]),
    ]

