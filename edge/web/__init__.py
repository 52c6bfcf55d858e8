"""HTTP serving guards shared by the agent's inference server and the controller's API.

* :mod:`.limits`: :class:`HttpLimits` and :class:`Rate`, the typed, validated knobs.
* :mod:`.connections`: a uvicorn protocol with deadlines on every request's headers and body
  (slow clients, "slowloris"), and the uvicorn options that cap open connections.
* :mod:`.guard`: ASGI middleware answering floods with 429 and ``Retry-After``: a token bucket
  per client address and a cap on requests in flight.

Neither process imports the other; both import this.
"""

from edge.web.connections import uvicorn_options
from edge.web.guard import RequestGuard, guard_app
from edge.web.limits import HttpLimits, Rate

__all__ = ["HttpLimits", "Rate", "RequestGuard", "guard_app", "uvicorn_options"]
