"""Capped exponential backoff with jitter, for reconnects and download retries."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delays ``initial * factor**(attempt-1)`` capped at ``maximum``, each jittered into [d/2, d].

    The jitter spreads a fleet that lost its broker at the same instant over time, so the broker
    does not face every device reconnecting in the same second ("equal jitter": never below
    half the nominal delay, so a broken broker is not hammered either).
    """

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum) or self.factor < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and factor >= 1")

    def ceiling(self, attempt: int) -> float:
        """Return the nominal (un-jittered) delay before retry number ``attempt`` (1-based)."""
        exponent = min(max(attempt, 1) - 1, 64)  # bounded so the power never overflows
        return min(self.maximum, self.initial * self.factor**exponent)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Return the jittered delay before retry number ``attempt`` (1-based)."""
        top = self.ceiling(attempt)
        return (rng or random).uniform(top / 2, top)
