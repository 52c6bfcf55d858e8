"""Dynamic batcher: concurrent requests share model calls, bounded in size and queue."""

from __future__ import annotations

import asyncio
import threading

import pytest

from edge.agent.server.batching import DynamicBatcher
from edge.errors import ResourceError, UnavailableError


class Recorder:
    """A fake model: returns each item doubled and records the batches it got."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate

    def __call__(self, items: list[int]) -> list[int]:
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append(list(items))
        return [2 * i for i in items]


def test_concurrent_requests_are_batched_and_answered_in_order() -> None:
    async def main() -> tuple[list, Recorder]:
        gate = threading.Event()
        model = Recorder(gate)
        batcher = DynamicBatcher(model, max_batch=8, max_wait_s=0.0)
        first = asyncio.ensure_future(batcher.submit([100]))  # occupies the model while the rest queue
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher.submit([i, i + 1000])) for i in range(6)]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(first, *rest)
        batcher.close()
        return results, model

    results, model = asyncio.run(main())
    assert results[0] == [200]
    assert results[1:] == [[2 * i, 2 * (i + 1000)] for i in range(6)]
    # 12 queued items under max_batch=8: whole requests only, so 4 requests (8 items) then 2.
    assert [len(b) for b in model.batches] == [1, 8, 4]


def test_a_lone_request_waits_at_most_max_wait() -> None:
    async def main() -> list:
        batcher = DynamicBatcher(Recorder(), max_batch=64, max_wait_s=0.01)
        out = await asyncio.wait_for(batcher.submit([1, 2, 3]), timeout=5)
        batcher.close()
        return out

    assert asyncio.run(main()) == [2, 4, 6]


def test_full_queue_is_refused_and_errors_reach_every_request() -> None:
    async def main() -> None:
        gate = threading.Event()
        batcher = DynamicBatcher(Recorder(gate), max_batch=4, max_wait_s=0.0, max_queue=4)
        running = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit([1, 2, 3, 4]))
        await asyncio.sleep(0.01)
        with pytest.raises(ResourceError, match="queued"):
            await batcher.submit([5])
        gate.set()
        assert await running == [2] and await queued == [2, 4, 6, 8]

        def broken(items: list[int]) -> list[int]:
            raise ValueError("model exploded")

        failing = DynamicBatcher(broken, max_batch=4, max_wait_s=0.005)
        results = await asyncio.gather(failing.submit([1]), failing.submit([2]), return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)
        failing.close()
        with pytest.raises(UnavailableError):
            await failing.submit([1])
        batcher.close()

    asyncio.run(main())


def test_a_cancelled_request_leaves_the_queue() -> None:
    async def main() -> Recorder:
        gate = threading.Event()
        model = Recorder(gate)
        batcher = DynamicBatcher(model, max_batch=8, max_wait_s=0.0)
        busy = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher.submit([7, 7]))
        kept = asyncio.ensure_future(batcher.submit([3]))
        await asyncio.sleep(0.01)
        assert batcher.depth == 3
        gone.cancel()
        await asyncio.sleep(0.01)
        assert batcher.depth == 1
        gate.set()
        assert await busy == [2] and await kept == [6]
        batcher.close()
        return model

    model = asyncio.run(main())
    assert [7, 7] not in model.batches and 7 not in sum(model.batches, [])
