"""Fault injection: the store kills its own process at a named step, so tests can crash it there.

Set ``EDGE_FAULT_POINT`` to one of :data:`FAULT_POINTS`; the first time the store reaches that
step the process receives SIGKILL, exactly what ``kill -9`` or a power cut does to it (no
``finally`` blocks, no flushing). Unset, each step costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

from edge import settings
from edge.errors import ConfigError

# Every named step, in the order an install, an activation and a removal reach them.
FAULT_POINTS: tuple[str, ...] = (
    "after-journal",  # install: journal entry RECEIVED written, nothing else
    "after-verify",  # install: signature, compatibility and budgets checked (VERIFIED)
    "after-extract",  # install: payload, manifest and signature in staging, fsynced
    "after-validate",  # install: child process loaded the model (VALIDATED written)
    "before-rename",  # install: under the store lock, staging about to move into models/
    "after-rename",  # install: version folder in place, journal still says VALIDATED
    "after-installed",  # install: journal says INSTALLED, activation not started
    "before-state-write",  # activation, rollback, removal: state.json about to be replaced
    "mid-state-write",  # a temporary state file written, not yet renamed over state.json
    "after-state-write",  # state.json replaced and fsynced
    "before-trash",  # removal: state.json no longer names the version, folder still in place
    "after-trash",  # removal: version folder moved to trash/, not yet deleted
    "validate-child",  # the validation child sends itself SIGSEGV (a crafted model crashing ORT)
)


def check_setting() -> str:
    """Return the configured fault point ("" for none); refuse an unknown name."""
    point = settings.fault_point()
    if point and point not in FAULT_POINTS:
        raise ConfigError(
            f"EDGE_FAULT_POINT={point!r} is not a store step", hint=f"valid: {', '.join(FAULT_POINTS)}"
        )
    return point


def reach(point: str, sig: signal.Signals = signal.SIGKILL) -> None:
    """Kill this process with ``sig`` (SIGKILL) when ``point`` is the configured fault point."""
    if point not in FAULT_POINTS:  # a typo in the store's own code must not pass silently
        raise ValueError(f"unknown fault point {point!r}")
    if settings.fault_point() == point:
        os.kill(os.getpid(), sig)
