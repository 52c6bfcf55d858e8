"""Commands from the controller, run one at a time off the network thread, answered once.

Each command carries an id (its envelope id). The answer is kept (``DATA/fleet/commands.json``,
the last :data:`REMEMBERED` ids), so a command delivered twice (QoS 1 redelivery, a retry by the
controller, a persistent session replayed after a restart) is answered again with the same
response and never run twice.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

from edge.agent.files import dump_json, read_json, write_atomic
from edge.errors import ConfigError, EdgeError, StoreError
from edge.protocol.messages import CommandMessage, Response

log = logging.getLogger(__name__)

# Command ids remembered for idempotency: far more than a controller has in flight.
REMEMBERED = 256

Handler = Callable[[dict[str, Any]], dict[str, Any]]
Respond = Callable[[Response], None]


class CommandLog:
    """The answers to the last commands, by id, on disk."""

    def __init__(self, path: Path, limit: int = REMEMBERED) -> None:
        self.path = Path(path)
        self.limit = limit
        self._answers: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                data = read_json(self.path)
                self._answers = {str(k): dict(v) for k, v in data}
            except (StoreError, TypeError, ValueError) as exc:
                log.error("forgetting unreadable command log %s: %s", self.path, exc)

    def get(self, command_id: str) -> Response | None:
        """Return the answer already given to ``command_id``, if any."""
        data = self._answers.get(command_id)
        return Response.model_validate(data) if data is not None else None

    def put(self, command_id: str, response: Response) -> None:
        """Remember an answer (the oldest beyond the limit are forgotten)."""
        self._answers[command_id] = json.loads(response.model_dump_json())
        items = list(self._answers.items())[-self.limit:]
        self._answers = dict(items)
        write_atomic(self.path, dump_json([[k, v] for k, v in items]))


class CommandRunner:
    """A queue and a thread that run commands in arrival order."""

    def __init__(self, handlers: dict[str, Handler], respond: Respond, log_path: Path,
                 clock: Callable[[], float] = time.time) -> None:
        self.handlers = handlers
        self.respond = respond
        self.log = CommandLog(log_path)
        self._clock = clock
        self._queue: queue.Queue[tuple[str, CommandMessage] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the command thread."""
        self._thread = threading.Thread(target=self._run, name="edge-commands", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the command at hand and stop."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, command_id: str, command: CommandMessage) -> None:
        """Queue a command (called from the network thread: never blocks)."""
        self._queue.put((command_id, command))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            command_id, command = item
            try:
                self.respond(self._answer(command_id, command))
            except Exception:  # one bad command must not stop the others
                log.exception("command %s (%s) failed", command_id, command.command)

    def _answer(self, command_id: str, command: CommandMessage) -> Response:
        earlier = self.log.get(command_id)
        if earlier is not None:
            log.info("command %s (%s) was answered before; answering again", command_id, command.command)
            return earlier
        if command.expires_at is not None and self._clock() > command.expires_at:
            response = Response(command_id=command_id, ok=False, error="the command expired before it arrived",
                                error_code="expired")
        else:
            handler = self.handlers.get(command.command)
            try:
                if handler is None:
                    raise ConfigError(f"command {command.command!r} is not supported by this agent")
                response = Response(command_id=command_id, ok=True, result=handler(dict(command.args)))
            except EdgeError as exc:
                response = Response(command_id=command_id, ok=False, error=str(exc), error_code=exc.code)
            except Exception as exc:  # a handler bug is answered, not swallowed
                log.exception("command %s (%s) raised", command_id, command.command)
                response = Response(command_id=command_id, ok=False, error=f"{type(exc).__name__}: {exc}",
                                    error_code="edge_error")
        self.log.put(command_id, response)
        return response
