"""Fault injection: the agent kills its own process at a named step, so tests can crash it there.

Set ``EDGE_FAULT_POINT`` to one of :data:`FAULT_POINTS`; the first time the agent reaches that
step the process receives SIGKILL, exactly what ``kill -9`` or a power cut does to it (no
``finally`` blocks, no flushing). Unset, each step costs one environment lookup.

One tuple per area, in the order a run reaches them: the model store (:data:`STORE_POINTS`),
the durable outbox (:data:`OUTBOX_POINTS`: around each SQLite commit) and the deployment state
machine (:data:`DEPLOYMENT_POINTS`: around the write of each persisted state).
"""

from __future__ import annotations

import os
import signal

from edge import settings
from edge.errors import ConfigError

# Every named step of the store, in the order an install, an activation and a removal reach them.
STORE_POINTS: tuple[str, ...] = (
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

# The outbox's transactions: each name is reached just before its COMMIT ("before") and just
# after it returned ("after"); "put" is Outbox.put (its retained replacement and drops by the
# limits commit with it), "delete" forgets acknowledged messages, "drop" a refused one.
OUTBOX_POINTS: tuple[str, ...] = (
    "outbox-before-put-commit",
    "outbox-after-put-commit",
    "outbox-before-delete-commit",
    "outbox-after-delete-commit",
    "outbox-before-drop-commit",
    "outbox-after-drop-commit",
)

# The deployment record (fleet/deployments/<name>.json): "before" the write of a record in
# that state, "after" it was renamed into place and fsynced (the first write in each state),
# and "deploy-mid-write": a temporary record written, not yet renamed over the old one.
DEPLOYMENT_POINTS: tuple[str, ...] = (
    "deploy-mid-write",
    "deploy-before-pending", "deploy-after-pending",
    "deploy-before-downloading", "deploy-after-downloading",
    "deploy-before-verifying", "deploy-after-verifying",
    "deploy-before-installing", "deploy-after-installing",
    "deploy-before-waiting", "deploy-after-waiting",
    "deploy-before-activating", "deploy-after-activating",
    "deploy-before-health_check", "deploy-after-health_check",
    "deploy-before-committed", "deploy-after-committed",
    "deploy-before-rolling_back", "deploy-after-rolling_back",
    "deploy-before-rolled_back", "deploy-after-rolled_back",
    "deploy-before-failed", "deploy-after-failed",
    "deploy-before-cancelled", "deploy-after-cancelled",
)  # fmt: skip

FAULT_POINTS: tuple[str, ...] = STORE_POINTS + OUTBOX_POINTS + DEPLOYMENT_POINTS
_KNOWN = frozenset(FAULT_POINTS)


def check_setting() -> str:
    """Return the configured fault point ("" for none); refuse an unknown name."""
    point = settings.fault_point()
    if point and point not in _KNOWN:
        raise ConfigError(
            f"EDGE_FAULT_POINT={point!r} is not a known agent step", hint=f"valid: {', '.join(FAULT_POINTS)}"
        )
    return point


def reach(point: str, sig: signal.Signals = signal.SIGKILL) -> None:
    """Kill this process with ``sig`` (SIGKILL) when ``point`` is the configured fault point."""
    if point not in _KNOWN:  # a typo in the agent's own code must not pass silently
        raise ValueError(f"unknown fault point {point!r}")
    if settings.fault_point() == point:
        os.kill(os.getpid(), sig)
