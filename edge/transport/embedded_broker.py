"""A zero-setup MQTT 3.1.1 broker (amqtt) in a background thread, for `edge fleet serve` and tests.

amqtt speaks MQTT 3.1.1 only and keeps everything in memory. Retained messages (desired state,
device status) survive :meth:`EmbeddedBroker.stop` / :meth:`EmbeddedBroker.start` of the same
object, and a restart of the process too when ``state_file`` is given; queued session messages
do not. Production fleets should run mosquitto, EMQX or another real broker.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

from edge.errors import TransportError

log = logging.getLogger(__name__)

# Seconds to wait for the broker to bind or shut down: amqtt starts in well under a second.
START_TIMEOUT_S = 15.0


_PATCHED = False


def _refuse_mqtt5_cleanly() -> None:
    """Make amqtt answer an MQTT 5 CONNECT with "unsupported protocol version", as the spec says.

    amqtt parses the payload before it checks the protocol level, so an MQTT 5 CONNECT with
    properties (session expiry, which a persistent client sends) is misread as a client id of
    bogus length and the connection hangs instead of being refused; clients then cannot fall back
    to 3.1.1. For level 5 we skip the payload (amqtt refuses the CONNECT right after reading it).
    """
    global _PATCHED
    if _PATCHED:
        return
    from amqtt.mqtt.connect import ConnectPayload

    original = ConnectPayload.from_stream.__func__  # type: ignore[attr-defined]

    async def from_stream(cls, reader, fixed_header, variable_header):  # type: ignore[no-untyped-def]
        if variable_header is not None and variable_header.proto_level == 5:
            payload = cls(client_id="mqtt5-client")
            if variable_header.will_flag:  # amqtt checks these before the protocol level
                payload.will_topic, payload.will_message = "will", b""
            return payload
        return await original(cls, reader, fixed_header, variable_header)

    ConnectPayload.from_stream = classmethod(from_stream)  # type: ignore[method-assign]
    _PATCHED = True


class _QuietRefusals(logging.Filter):
    """Drop amqtt's warnings about refused MQTT 5 CONNECTs: every client probes with one first."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith(("Invalid connection from", "Failed to initialize client session: Invalid protocol")))


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """An amqtt broker listening on ``host:port`` (anonymous access), run in its own thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, *, state_file: Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.state_file = Path(state_file) if state_file else None
        self._retained: dict[str, tuple[bytes, int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        self._lock = threading.Lock()
        if self.state_file and self.state_file.exists():
            self._retained = _load_retained(self.state_file)

    @property
    def url(self) -> str:
        """Return ``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Return whether the broker thread is serving."""
        return self._thread is not None and self._thread.is_alive()

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # Only anonymous auth: the logging and $SYS plugins cost throughput and add noise.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    def start(self) -> "EmbeddedBroker":
        """Start serving; return when the port is bound, or raise TransportError."""
        with self._lock:
            if self.running:
                return self
            try:
                from amqtt.broker import Broker
            except ImportError as exc:  # the device install does not carry amqtt
                raise TransportError("the embedded broker needs amqtt", hint="pip install amqtt") from exc
            _refuse_mqtt5_cleanly()
            amqtt_log = logging.getLogger("amqtt.broker")
            if not any(isinstance(f, _QuietRefusals) for f in amqtt_log.filters):
                amqtt_log.addFilter(_QuietRefusals())
            ready = threading.Event()
            failure: list[BaseException] = []
            loop = asyncio.new_event_loop()

            async def boot() -> None:
                self._broker = Broker(self._config(), loop=loop)
                await self._broker.start()
                for topic, (data, qos) in self._retained.items():
                    await self._broker.retain_message(None, topic, data, qos)

            def main() -> None:
                asyncio.set_event_loop(loop)
                try:
                    loop.run_until_complete(boot())
                except BaseException as exc:  # reported to start() below
                    failure.append(exc)
                    ready.set()
                    loop.close()
                    return
                ready.set()
                try:
                    loop.run_forever()
                finally:
                    loop.close()

            self._loop = loop
            self._thread = threading.Thread(target=main, name=f"edge-broker-{self.port}", daemon=True)
            self._thread.start()
            if not ready.wait(START_TIMEOUT_S) or failure:
                self._thread.join(1)
                self._thread = None
                cause = failure[0] if failure else None
                raise TransportError(
                    f"embedded MQTT broker cannot listen on {self.host}:{self.port}: {cause or 'timed out'}",
                    hint="is another broker on that port? choose another with --port",
                ) from cause
            log.info("embedded MQTT broker listening on %s", self.url)
            return self

    def stop(self) -> None:
        """Stop serving, keeping retained messages for the next start()."""
        with self._lock:
            if not self.running or self._loop is None:
                return
            loop, broker = self._loop, self._broker

            async def halt() -> None:
                self._retained = {
                    t: (bytes(m.data), int(m.qos or 0)) for t, m in broker.retained_messages.items() if m.data
                }
                await broker.shutdown()

            try:
                asyncio.run_coroutine_threadsafe(halt(), loop).result(START_TIMEOUT_S)
            except Exception as exc:  # shutting down must not raise; log what was lost
                log.warning("embedded broker shutdown was not clean: %s", exc)
            loop.call_soon_threadsafe(loop.stop)
            assert self._thread is not None
            self._thread.join(START_TIMEOUT_S)
            self._thread = None
            self._loop = None
            self._broker = None
            if self.state_file:
                _save_retained(self.state_file, self._retained)

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _load_retained(path: Path) -> dict[str, tuple[bytes, int]]:
    try:
        raw = json.loads(path.read_text())
        return {t: (base64.b64decode(v["data"]), int(v["qos"])) for t, v in raw.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TransportError(f"broker state file {path} is unreadable: {exc}", hint="delete it to start empty") from exc


def _save_retained(path: Path, retained: dict[str, tuple[bytes, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = {t: {"data": base64.b64encode(d).decode(), "qos": q} for t, (d, q) in retained.items()}
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
