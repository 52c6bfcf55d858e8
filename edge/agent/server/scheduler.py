"""Fair sharing of one LLM between concurrent requests, with cancellation.

One scheduler thread per model drives up to ``max_active`` generations, advancing each by one
token in turn (round robin), so a long answer cannot starve a short one and each client sees
tokens as they come. Requests beyond that wait in a bounded FIFO; past ``max_queue`` waiting a
request is refused (429). Each generation keeps its own KV cache inside its generator.

A :class:`Ticket` carries one request: the thread pushes its events onto an asyncio queue of the
request's event loop. Cancelling a ticket (the client went away) stops its generation at the
next token, or before prefill when it has not started.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator

from edge.errors import ResourceError, UnavailableError

log = logging.getLogger(__name__)

# Generations advanced together: each holds a KV cache (SmolLM2-135M at 2k context is ~90 MB
# fp32), and on a 2-4 core board more than 4 streams only slows every one of them down.
DEFAULT_MAX_ACTIVE = 4
# Requests waiting for a slot before new ones are refused: a few minutes of work at most.
DEFAULT_MAX_QUEUE = 64

Generate = Callable[[list[int], Any, Callable[[], bool]], Iterator[Any]]
# What a ticket's queue carries after the last event.
END = None


class Ticket:
    """One generation request; read its events with :meth:`next_event`."""

    def __init__(self, prompt_ids: list[int], params: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self._cancelled = threading.Event()
        self.finished = False

    def cancel(self) -> None:
        """Stop this generation (callable from any thread, any number of times)."""
        self._cancelled.set()

    def is_cancelled(self) -> bool:
        """Return whether the request was cancelled; generators poll this."""
        return self._cancelled.is_set()

    def push(self, item: Any) -> None:
        """Hand an event, an exception or END to the request's event loop."""
        if item is END:
            self.finished = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def next_event(self) -> Any:
        """Return the next event, END when done; raise what the generation raised."""
        item = await self.events.get()
        if isinstance(item, BaseException):
            raise item
        return item


class _Slot:
    __slots__ = ("ticket", "events")

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket
        self.events: Iterator[Any] | None = None


class Scheduler:
    """Round-robin token scheduler over ``generate(prompt_ids, params, should_stop)``."""

    def __init__(self, generate: Generate, max_active: int = DEFAULT_MAX_ACTIVE,
                 max_queue: int = DEFAULT_MAX_QUEUE, name: str = "model",
                 on_depth: Callable[[int], None] | None = None,
                 on_active: Callable[[int], None] | None = None) -> None:
        if max_active < 1 or max_queue < 0:
            raise ValueError("max_active must be at least 1 and max_queue at least 0")
        self.generate = generate
        self.max_active = max_active
        self.max_queue = max_queue
        self.name = name
        self.on_depth = on_depth
        self.on_active = on_active
        self._waiting: deque[Ticket] = deque()
        self._active: list[_Slot] = []  # touched by the scheduler thread only
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        """Return the number of requests waiting for a slot."""
        return len(self._waiting)

    def submit(self, prompt_ids: list[int], params: Any, loop: asyncio.AbstractEventLoop | None = None) -> Ticket:
        """Queue a generation; raise ResourceError (429) when the queue is full."""
        ticket = Ticket(prompt_ids, params, loop or asyncio.get_running_loop())
        with self._cond:
            if self._closed:
                raise UnavailableError(f"model {self.name} is being unloaded")
            busy = len(self._active) >= self.max_active
            if busy and len(self._waiting) >= self.max_queue:
                raise ResourceError(
                    f"model {self.name} is busy: {len(self._waiting)} requests waiting, the limit is {self.max_queue}",
                    hint="retry after a moment")
            self._waiting.append(ticket)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"edge-llm-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify()
        self._report()
        return ticket

    def close(self) -> None:
        """Stop the thread; running and waiting requests end with 503."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _report(self) -> None:
        if self.on_depth is not None:
            self.on_depth(len(self._waiting))
        if self.on_active is not None:
            self.on_active(len(self._active))

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and not self._active:
                        self._cond.wait()
                    if self._closed:
                        break
                    admitted = False
                    while self._waiting and len(self._active) < self.max_active:
                        self._active.append(_Slot(self._waiting.popleft()))
                        admitted = True
                if admitted:
                    self._report()
                for slot in list(self._active):
                    self._step(slot)
        finally:
            self._fail_all()

    def _step(self, slot: _Slot) -> None:
        ticket = slot.ticket
        if ticket.is_cancelled():
            self._finish(slot, None)
            return
        try:
            if slot.events is None:
                ticket.started = time.perf_counter()
                slot.events = iter(self.generate(ticket.prompt_ids, ticket.params, ticket.is_cancelled))
            event = next(slot.events)
        except StopIteration:
            self._finish(slot, None)
            return
        except Exception as exc:  # a generation bug ends that request only, never the thread
            log.warning("generation on %s failed: %s", self.name, exc, exc_info=not hasattr(exc, "code"))
            self._finish(slot, exc)
            return
        ticket.push(event)
        if getattr(event, "finish_reason", None):
            self._finish(slot, None)

    def _finish(self, slot: _Slot, error: BaseException | None) -> None:
        if slot.events is not None:
            close = getattr(slot.events, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # a generator's cleanup failing must not stop the others
                    log.exception("closing a generation of %s failed", self.name)
        if error is not None:
            slot.ticket.push(error)
        slot.ticket.push(END)
        self._active.remove(slot)
        self._report()

    def _fail_all(self) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for slot in list(self._active):
            self._finish(slot, UnavailableError(f"model {self.name} was unloaded"))
        for ticket in waiting:
            ticket.push(UnavailableError(f"model {self.name} was unloaded"))
            ticket.push(END)
