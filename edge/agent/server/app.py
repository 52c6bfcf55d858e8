"""Build the Starlette app of the inference server."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable, Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.agent.server import kserve, openai_api
from edge.agent.server.context import Context, ServerConfig
from edge.agent.server.errors import exception_handlers
from edge.agent.server.metrics import Metrics
from edge.agent.server.registry import Registry

log = logging.getLogger(__name__)

Hook = Callable[[], None]


def create_app(registry: Registry, metrics: Metrics | None = None, config: ServerConfig | None = None,
               on_startup: Sequence[Hook] = (), on_shutdown: Sequence[Hook] = ()) -> Starlette:
    """Return the app; models start loading (in a thread) when the server starts."""
    metrics = metrics or registry.metrics or Metrics()
    registry.metrics = metrics
    ctx = Context(config or ServerConfig(), registry, metrics)

    async def prometheus(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        registry.start()
        for hook in on_startup:
            hook()
        try:
            yield
        finally:
            for hook in on_shutdown:
                try:
                    hook()
                except Exception:  # one failing hook must not keep the others from running
                    log.exception("shutdown hook %r failed", hook)
            registry.close()

    routes = [*kserve.routes(ctx), *openai_api.routes(ctx), Route("/metrics", prometheus, methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers=exception_handlers(), lifespan=lifespan)
    app.state.context = ctx
    return app
