"""A real uvicorn for the tests of edge.web."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

from edge.web import HttpLimits, guard_app, uvicorn_options
from edge.web.connections import guarded_protocol


class Served:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app: Any, limits: HttpLimits, base: type | None = None) -> None:
        options = uvicorn_options(limits)
        if base is not None:
            options["http"] = guarded_protocol(limits, base)
        config = uvicorn.Config(guard_app(app, limits), host="127.0.0.1", port=0, log_level="warning",
                                lifespan="off", ws="none", **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
