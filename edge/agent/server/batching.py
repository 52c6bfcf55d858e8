"""Dynamic batching of encoder requests: concurrent requests share one model call.

Requests queue their items (texts); one worker task takes what is queued, waits at most
``max_wait_s`` for more while fewer than ``max_batch`` items are there, runs the model once in a
worker thread and hands each request its rows. While the model runs, new requests gather, so
under load batches fill without waiting; an idle server answers a lone request after at most
``max_wait_s``. The queue is bounded: past ``max_queue`` items a request is refused (429).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from edge.errors import ResourceError, UnavailableError

log = logging.getLogger(__name__)

# Items per model call: 32 keeps MiniLM's activations under ~50 MB at 128 tokens and is where
# ORT's per-item time stops improving on 2-4 cores.
DEFAULT_MAX_BATCH = 32
# Longest extra wait for a batch to fill when the model is idle: 2 ms is under 1% of a
# 32-item MiniLM call and below what a client can notice.
DEFAULT_MAX_WAIT_S = 0.002
# Items queued before requests are refused: about 30 full batches, a few seconds of work.
DEFAULT_MAX_QUEUE = 1024


@dataclass
class _Pending:
    items: Sequence[Any]
    future: asyncio.Future
    taken: bool = field(default=False)


class DynamicBatcher:
    """Batch calls of ``run(items) -> rows`` across concurrent requests (one per model)."""

    def __init__(self, run: Callable[[list[Any]], Any], max_batch: int = DEFAULT_MAX_BATCH,
                 max_wait_s: float = DEFAULT_MAX_WAIT_S, max_queue: int = DEFAULT_MAX_QUEUE,
                 on_batch: Callable[[int], None] | None = None,
                 on_depth: Callable[[int], None] | None = None, name: str = "model") -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.on_depth = on_depth
        self.name = name
        self._queue: deque[_Pending] = deque()
        self._queued_items = 0
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        # One thread per model: ORT already spreads one call over every core.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"edge-batch-{name}")
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def depth(self) -> int:
        """Return the number of items waiting."""
        return self._queued_items

    async def submit(self, items: Sequence[Any]) -> Any:
        """Queue ``items`` and return their rows of the model output, in order."""
        if self._closed:
            raise UnavailableError(f"model {self.name} is being unloaded")
        if not items:
            raise ValueError("submit needs at least one item")
        if self._queued_items + len(items) > self.max_queue and self._queued_items:
            raise ResourceError(f"model {self.name} has {self._queued_items} items queued, the limit is "
                                f"{self.max_queue}", hint="retry after a moment")
        loop = self._loop = asyncio.get_running_loop()
        pending = _Pending(items, loop.create_future())
        self._queue.append(pending)
        self._queued_items += len(items)
        self._report_depth()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work(), name=f"edge-batcher-{self.name}")
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            if not pending.taken:  # the client left before its batch ran: drop its items
                self._drop(pending)
            raise

    def _drop(self, pending: _Pending) -> None:
        try:
            self._queue.remove(pending)
        except ValueError:
            return
        self._queued_items -= len(pending.items)
        self._report_depth()

    def _report_depth(self) -> None:
        if self.on_depth is not None:
            self.on_depth(self._queued_items)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self._queue:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=30)
                except asyncio.TimeoutError:
                    if not self._queue:
                        return  # idle: the next submit starts a new worker
                continue
            if self._queued_items < self.max_batch and self.max_wait_s > 0:
                deadline = loop.time() + self.max_wait_s
                while self._queued_items < self.max_batch and (left := deadline - loop.time()) > 0:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), timeout=left)
                    except asyncio.TimeoutError:
                        break
            batch = self._take()
            if not batch:
                continue
            items = [item for p in batch for item in p.items]
            if self.on_batch is not None:
                self.on_batch(len(items))
            try:
                rows = await loop.run_in_executor(self._executor, self.run, items)
            except Exception as exc:  # hand the failure to every request of the batch
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            start = 0
            for p in batch:
                end = start + len(p.items)
                if not p.future.done():
                    p.future.set_result(rows[start:end])
                start = end

    def _take(self) -> list[_Pending]:
        """Pop whole requests up to max_batch items (a larger request goes alone)."""
        batch: list[_Pending] = []
        count = 0
        while self._queue:
            p = self._queue[0]
            if batch and count + len(p.items) > self.max_batch:
                break
            self._queue.popleft()
            p.taken = True
            batch.append(p)
            count += len(p.items)
        self._queued_items -= count
        self._report_depth()
        return batch

    def close(self) -> None:
        """Refuse new work and fail what is still queued (callable from any thread)."""
        self._closed = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._fail_queued)
            except RuntimeError:  # the loop stopped in between
                pass
        self._executor.shutdown(wait=False)

    def _fail_queued(self) -> None:
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(UnavailableError(f"model {self.name} was unloaded"))
        self._queued_items = 0
        self._report_depth()
        self._wakeup.set()
