"""LLM scheduler: round-robin fairness, bounded queue, cancellation, failures."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

from edge.agent.server.scheduler import Scheduler
from edge.errors import ResourceError, UnavailableError


@dataclass
class Event:
    token_id: int | None
    text: str
    finish_reason: str | None = None


class FakeLLM:
    """Yields ``params`` tokens for a prompt, recording which request each step served."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.closed: list[int] = []
        self.lock = threading.Lock()

    def generate(self, prompt_ids: list[int], params: int, should_stop: Callable[[], bool]) -> Iterator[Event]:
        rid = prompt_ids[0]
        try:
            for i in range(params):
                if should_stop():
                    yield Event(None, "", "cancelled")
                    return
                with self.lock:
                    self.steps.append(rid)
                yield Event(i, f"{rid}.{i} ", "length" if i == params - 1 else None)
        finally:
            self.closed.append(rid)


async def _collect(ticket) -> list[Event]:
    out = []
    while (ev := await ticket.next_event()) is not None:
        out.append(ev)
    return out


def test_concurrent_generations_take_turns() -> None:
    llm = FakeLLM()
    gate = threading.Event()

    def gated(prompt_ids: list[int], params: int, should_stop: Callable[[], bool]) -> Iterator[Event]:
        if prompt_ids[0] == 1:
            gate.wait(10)  # hold the thread inside request 1's first step until all three queued
        yield from llm.generate(prompt_ids, params, should_stop)

    async def main() -> list[list[Event]]:
        sched = Scheduler(gated, max_active=3, max_queue=8)
        tickets = [sched.submit([1], 4)]
        await asyncio.sleep(0.05)
        tickets += [sched.submit([rid], 4) for rid in (2, 3)]
        gate.set()
        results = await asyncio.gather(*(_collect(t) for t in tickets))
        sched.close()
        return results

    results = asyncio.run(main())
    assert [[e.text for e in r] for r in results] == [[f"{rid}.{i} " for i in range(4)] for rid in (1, 2, 3)]
    assert all(r[-1].finish_reason == "length" for r in results)
    # One token each in turn once all are admitted: no request runs ahead of the others.
    assert llm.steps == [1, 1, 2, 3, 1, 2, 3, 1, 2, 3, 2, 3]


def test_queue_is_bounded_and_waiting_requests_run_in_order() -> None:
    llm = FakeLLM()

    async def main() -> None:
        gate = threading.Event()

        def slow(prompt_ids: list[int], params: int, should_stop: Callable[[], bool]) -> Iterator[Event]:
            gate.wait(10)
            yield from llm.generate(prompt_ids, params, should_stop)

        sched = Scheduler(slow, max_active=1, max_queue=2)
        first = sched.submit([1], 2)
        second, third = sched.submit([2], 2), sched.submit([3], 2)
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceError, match="busy"):
            sched.submit([4], 2)
        gate.set()
        for t in (first, second, third):
            assert len(await _collect(t)) == 2
        sched.close()

    asyncio.run(main())
    assert llm.steps == [1, 1, 2, 2, 3, 3]


def test_cancel_stops_the_generation_and_closes_its_generator() -> None:
    llm = FakeLLM()

    async def main() -> list[Event]:
        sched = Scheduler(llm.generate, max_active=2, max_queue=2)
        long = sched.submit([9], 100_000)
        first = await long.next_event()
        assert first.text == "9.0 "
        long.cancel()
        rest = await _collect(long)
        sched.close()
        return rest

    rest = asyncio.run(main())
    assert len(llm.steps) < 100_000
    assert 9 in llm.closed
    assert not rest or rest[-1].finish_reason in (None, "cancelled", "length")


def test_a_failing_generation_fails_only_its_request_and_close_ends_the_rest() -> None:
    llm = FakeLLM()

    def flaky(prompt_ids: list[int], params: int, should_stop: Callable[[], bool]) -> Iterator[Event]:
        if prompt_ids[0] == 13:
            raise ValueError("bad prompt")
        return llm.generate(prompt_ids, params, should_stop)

    async def main() -> None:
        sched = Scheduler(flaky, max_active=2, max_queue=2)
        bad, good = sched.submit([13], 3), sched.submit([1], 3)
        with pytest.raises(ValueError, match="bad prompt"):
            await _collect(bad)
        assert len(await _collect(good)) == 3
        endless = sched.submit([2], 10**9)
        await endless.next_event()
        await asyncio.to_thread(sched.close)
        with pytest.raises(UnavailableError, match="unloaded"):
            await _collect(endless)
        with pytest.raises(UnavailableError):
            sched.submit([3], 1)

    asyncio.run(main())
