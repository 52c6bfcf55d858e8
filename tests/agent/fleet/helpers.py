"""A real artifact server (HTTP with Range) and a controller-side MQTT probe for fleet link tests."""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from edge.protocol.messages import (
    CommandMessage, Desired, DesiredModel, Envelope, Event, Reported, Response, Status, Telemetry, decode, encode,
    new_id, wrap,
)  # fmt: skip
from edge.protocol.topics import Channel, Command, Topics
from edge.transport import Backoff, MqttClient
from tests.transport.helpers import WAIT_S, unique

FAST = Backoff(initial=0.05, maximum=0.5)


@dataclass
class Cut:
    """Serve only ``after`` bytes of ``path`` once, then drop the connection (a flaky link)."""

    path: str
    after: int
    used: bool = False


class ArtifactServer:
    """Serve files from a folder over HTTP on a free loopback port, honouring Range requests."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.requests: list[dict[str, str]] = []
        self.cuts: list[Cut] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                server.requests.append({"path": self.path, "range": self.headers.get("Range", "")})
                target = server.root / self.path.lstrip("/")
                if not target.is_file():
                    self.send_error(404)
                    return
                data = target.read_bytes()
                start, status = 0, 200
                m = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
                if m:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                cut = next((c for c in server.cuts if not c.used and c.path == self.path), None)
                if cut is not None:
                    cut.used = True
                    self.wfile.write(body[: cut.after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        """Return the base URL."""
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def publish(self, bundle: Path) -> DesiredModel:
        """Place ``bundle`` in the served folder; return a desired model pointing at it."""
        target = self.root / bundle.name
        if bundle.resolve() != target.resolve():
            target.write_bytes(bundle.read_bytes())
        data = target.read_bytes()
        return DesiredModel(version=_version_of(bundle), bundle_url=f"{self.url}/{bundle.name}",
                            sha256=hashlib.sha256(data).hexdigest(), size=len(data))

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()


def _version_of(bundle: Path) -> str:
    from edge.protocol.bundle import BundleReader

    with BundleReader(bundle) as r:
        return r.manifest.version


class Controller:
    """What the fleet controller sees of one device, and how it talks to it (a real MQTT client)."""

    def __init__(self, url: str, topics: Topics, device_id: str) -> None:
        self.topics, self.device_id = topics, device_id
        self.envelopes: list[tuple[str, Envelope, bool]] = []
        self._cond = threading.Condition()
        self.client = MqttClient(url, unique("controller"), backoff=FAST).start()
        assert self.client.wait_connected(WAIT_S), self.client.last_error
        assert self.client.subscribe(topics.device_filter(device_id), self._on_message).wait(WAIT_S)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if not payload or "/cmd/" in topic or topic.endswith("/desired"):
            return
        env = decode(payload)
        with self._cond:
            self.envelopes.append((topic, env, retained))
            self._cond.notify_all()

    def bodies(self, kind: type) -> list[Any]:
        """Return every body of one message type received, in order."""
        with self._cond:
            return [e.body for _, e, _ in self.envelopes if isinstance(e.body, kind)]

    def wait_for(self, predicate: Callable[["Controller"], bool], timeout: float = WAIT_S) -> bool:
        """Wait until ``predicate(self)`` holds."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def events(self) -> list[Event]:
        """Return the events received."""
        return self.bodies(Event)

    def kinds(self, version: str | None = None) -> list[str]:
        """Return the kinds of the events received (of one version, if given)."""
        return [e.kind.value for e in self.events() if version is None or e.version == version]

    def statuses(self) -> list[Status]:
        """Return the statuses received."""
        return self.bodies(Status)

    def reported(self) -> list[Reported]:
        """Return the reported states received."""
        return self.bodies(Reported)

    def telemetry(self) -> list[Telemetry]:
        """Return the telemetry received."""
        return self.bodies(Telemetry)

    def responses(self) -> list[Response]:
        """Return the command responses received."""
        return self.bodies(Response)

    def desire(self, generation: int, models: dict[str, DesiredModel]) -> None:
        """Publish the retained desired state of the device."""
        env = wrap(self.device_id, Desired(generation=generation, models=models))
        topic = self.topics.device(self.device_id, Channel.DESIRED)
        assert self.client.publish(topic, encode(env), qos=1, retain=True).wait(WAIT_S)

    def command(self, command: Command, args: dict[str, Any] | None = None, command_id: str | None = None,
                expires_at: float | None = None) -> str:
        """Send a command; return its id."""
        command_id = command_id or new_id()
        env = wrap(self.device_id, CommandMessage(command=command.value, args=args or {}, expires_at=expires_at),
                   message_id=command_id)
        topic = self.topics.device(self.device_id, Channel.CMD, command)
        assert self.client.publish(topic, encode(env), qos=1).wait(WAIT_S)
        return command_id

    def response(self, command_id: str, timeout: float = WAIT_S) -> Response:
        """Wait for the answer to a command."""
        assert self.wait_for(lambda c: any(r.command_id == command_id for r in c.responses()), timeout), command_id
        return next(r for r in self.responses() if r.command_id == command_id)

    def stop(self) -> None:
        """Disconnect."""
        self.client.stop()


@dataclass
class FakeAgent:
    """What FleetLink reads from the runner's Agent, without the HTTP server."""

    device_id: str
    data_dir: Path
    store: Any
    profile: Any = None
    registry: Any = None
    metrics: Any = None
    address: tuple[str, int] | None = None
    stopped: list[bool] = field(default_factory=list)

    @property
    def options(self) -> SimpleNamespace:
        return SimpleNamespace(data_dir=self.data_dir)

    def stop(self) -> None:
        self.stopped.append(True)
