"""Where raw-tensor calls run: inline on the event loop for a fast model, on a worker thread otherwise."""

from __future__ import annotations

import asyncio
import threading
import time

from edge.agent.server.kserve import INLINE_MAX_S, InferLimiter


def test_one_slow_call_keeps_a_fast_model_inline_and_a_slow_model_leaves() -> None:
    async def scenario() -> None:
        limiter = InferLimiter("m", concurrency=2, queue=4)
        loop_thread = threading.get_ident()

        def where(sleep_s: float = 0.0) -> int:
            if sleep_s:
                time.sleep(sleep_s)
            return threading.get_ident()

        try:
            assert await limiter.run(where) != loop_thread  # nothing measured yet: a worker thread
            assert await limiter.run(where) == loop_thread  # fast: inline from now on
            # A hiccup (here 20 calls' worth of a slow model) counts as a capped sample only.
            assert await limiter.run(where, 20 * INLINE_MAX_S) == loop_thread
            assert await limiter.run(where) == loop_thread
            # A model whose calls are really slow moves to the worker thread within a few calls.
            ran = [await limiter.run(where, 3 * INLINE_MAX_S) for _ in range(6)]
            assert ran[-1] != loop_thread
            # Large requests never run inline, however fast the model.
            limiter.small_call_s = 0.0
            assert await limiter.run(where, nbytes=10 * 1024 * 1024) != loop_thread
        finally:
            limiter.close()

    asyncio.run(scenario())
