"""Wire the agent process: open the store, serve its active models over HTTP, stop on SIGTERM.

The fleet connection plugs in later through :class:`Connector`: the runner starts it once the
server listens and stops it before the server shuts down. Without one, the agent serves
offline, forever, from what the store holds.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from edge.agent.server.context import ServerConfig
from edge.errors import ConfigError
from edge.protocol.topics import check_id
from edge.web.limits import HttpLimits

if TYPE_CHECKING:
    from edge.agent.server.metrics import Metrics
    from edge.agent.server.registry import Registry
    from edge.protocol.profile import DeviceProfile
    from edge.protocol.signing import TrustStore

log = logging.getLogger(__name__)

# Seconds uvicorn waits for open requests (a streaming answer) before closing them at shutdown:
# long enough for a short generation to finish, short enough for a service manager's stop timeout.
GRACEFUL_SHUTDOWN_S = 5
# Connections the kernel queues while the server starts or is busy (uvicorn's default).
LISTEN_BACKLOG = 2048


class Connector(Protocol):
    """The fleet connection (MQTT), started after the server listens and stopped before it ends."""

    def start(self, agent: "Agent") -> None:
        """Connect and begin reporting; must not block."""

    def stop(self) -> None:
        """Disconnect cleanly (publish the offline status)."""


@dataclass(frozen=True)
class AgentOptions:
    """Everything `edge agent run` was told, validated once."""

    device_id: str
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    profile: str = "auto"
    trusted_keys: tuple[Path, ...] = ()
    revoked_keys: tuple[str, ...] = ()  # key ids or key files (--revoked-key), resolved at open
    threads: int | None = None
    server: ServerConfig = field(default_factory=ServerConfig)
    http: HttpLimits = field(default_factory=HttpLimits)  # slow clients and open connections

    def __post_init__(self) -> None:
        check_id(self.device_id)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is out of range", hint="use 0-65535 (0 picks a free port)")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")


def parse_http(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into host and port."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--http {value!r} is not HOST:PORT", hint="e.g. 127.0.0.1:8080 or 0.0.0.0:0")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def resolve_profile(name: str, data_dir: Path) -> "DeviceProfile":
    """Return the store's recorded profile, else the named one, else the detected one."""
    from edge import settings
    from edge.agent.device import resolve_profile as resolve_store_profile
    from edge.protocol.catalog import load_catalog

    return resolve_store_profile(data_dir, name, load_catalog(settings.profile_path()))


def load_trust(paths: tuple[Path, ...], revoked: tuple[str, ...] = ()) -> "TrustStore":
    """Build the trust store from --trusted-key files ($EDGE_HOME/keys/edge.pub when none),
    refusing the keys of --revoked-key and $EDGE_REVOKED_KEYS."""
    from edge import settings
    from edge.protocol.signing import TrustStore, resolve_revoked

    revoked_ids = resolve_revoked([*revoked, *settings.revoked_keys()])
    if revoked_ids:
        log.info("revoked signing keys: %s", ", ".join(sorted(revoked_ids)))
    if paths:
        return TrustStore.from_files(list(paths), revoked_ids)
    default = settings.edge_home() / "keys" / "edge.pub"
    if default.exists():
        return TrustStore.from_files([default], revoked_ids)
    log.warning("no trusted key: installed models are served, new bundles will be refused "
                "(pass --trusted-key PUB)")
    return TrustStore(revoked=revoked_ids)


class Agent:
    """One agent process: store, registry, metrics, HTTP server, optional fleet connector."""

    def __init__(self, options: AgentOptions, connector: Connector | None = None,
                 store: Any = None, profile: "DeviceProfile | None" = None) -> None:
        self.options = options
        self.connector = connector
        self.profile = profile
        self.store = store
        self.registry: Registry | None = None
        self.metrics: Metrics | None = None
        self.app: Any = None
        self.address: tuple[str, int] | None = None
        self._server: Any = None
        self._owns_store = False

    @property
    def device_id(self) -> str:
        """Return this device's id."""
        return self.options.device_id

    def open(self) -> None:
        """Resolve the profile, open the store and build the app (models load once serving)."""
        from edge.agent.server.app import create_app
        from edge.agent.server.metrics import Metrics
        from edge.agent.server.registry import Registry

        if self.profile is None:
            self.profile = resolve_profile(self.options.profile, self.options.data_dir)
        if self.store is None:
            from edge.agent.store import Store

            self.options.data_dir.mkdir(parents=True, exist_ok=True)
            self.store = Store(self.options.data_dir, self.profile,
                               load_trust(self.options.trusted_keys, self.options.revoked_keys))
            self._owns_store = True
        self.metrics = Metrics()
        self.registry = Registry(self.store, self.profile, self.options.threads, self.metrics)
        self.app = create_app(self.registry, self.metrics, self.options.server,
                              on_startup=[self._start_connector], on_shutdown=[self._stop_connector])

    def _start_connector(self) -> None:
        if self.connector is not None:
            self.connector.start(self)

    def _stop_connector(self) -> None:
        if self.connector is not None:
            self.connector.stop()

    def bind(self) -> socket.socket:
        """Bind the listening socket (port 0 picks a free one) and record the address."""
        family = socket.AF_INET6 if ":" in self.options.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.options.host, self.options.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {self.options.host}:{self.options.port}: {exc.strerror}",
                              hint="choose another --http HOST:PORT") from exc
        sock.set_inheritable(True)
        # Listen at once: the URL is announced before the server's start-up finishes, and a
        # client that connects in between waits in the backlog instead of being refused.
        sock.listen(LISTEN_BACKLOG)
        self.address = sock.getsockname()[:2]
        return sock

    def serve(self, on_listening: Callable[[str], None] | None = None) -> int:
        """Serve until SIGTERM or SIGINT; return the exit code."""
        import uvicorn

        from edge.web import guard_app, uvicorn_options

        if self.app is None:
            self.open()
        sock = self.bind()
        config = uvicorn.Config(
            guard_app(self.app, self.options.http), loop="auto", ws="none", lifespan="on", log_config=None,
            access_log=False, server_header=False, proxy_headers=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, **uvicorn_options(self.options.http),
        )
        self._server = uvicorn.Server(config)
        host, port = self.address  # type: ignore[misc]
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        if on_listening is not None:
            on_listening(url)
        log.info("agent %s serving on %s", self.device_id, url)
        try:
            with _quiet_stop_signals() as received:
                self._server.run(sockets=[sock])
        finally:
            if self._owns_store:
                self.store.close()
        if received:
            log.info("agent %s stopped on %s", self.device_id, signal.Signals(received[0]).name)
        return 0 if self._server.started else 1

    def stop(self) -> None:
        """Ask the server to shut down (as SIGTERM does)."""
        if self._server is not None:
            self._server.should_exit = True


@contextmanager
def _quiet_stop_signals() -> Iterator[list[int]]:
    """Make SIGTERM/SIGINT a clean stop with exit code 0.

    uvicorn shuts down gracefully on these signals, then re-raises the signal to the handler
    that was installed before it; with the default handlers the process would then die by the
    signal. Installing recording handlers here makes that re-raise a no-op.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in handled}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
