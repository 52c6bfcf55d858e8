"""The rollout state machine: states, events and the transition table.

A rollout's state and every transition it took are stored in the database (``rollouts.state``,
``rollout_transitions``), so a controller that restarts resumes exactly where it stopped::

    pending ──start──▶ deploying ──wave_done──▶ soaking ──soak_passed──▶ deploying (next wave)
                          │    ▲                  │  └──────finished──────▶ completed
                          │    └──── resume ──┐   │
                        pause ─────▶ paused ◀─┴─ pause
    deploying/soaking ──auto_revert──▶ reverting ──revert_done──▶ reverted
    deploying/soaking ──halt──▶ halted (a gate failed and auto_revert is off)
    any active state ──abort──▶ aborted;  any but reverting/reverted ──rollback──▶ reverting

Each device in a rollout has its own small lifecycle (:class:`DeviceState`), advanced by the
events it reports and never moved backwards by a late or repeated event.
"""

from __future__ import annotations

from enum import Enum

from edge.errors import ConflictError
from edge.protocol.messages import EventKind


class RolloutState(str, Enum):
    """Where a rollout stands."""

    PENDING = "pending"  # created; the ticker starts it
    DEPLOYING = "deploying"  # the current wave's devices were told the new version
    SOAKING = "soaking"  # the current wave finished; watching its health before widening
    PAUSED = "paused"  # stopped by the user; resume returns to the state it left
    HALTED = "halted"  # stopped by a failed gate (auto_revert off): rollback or abort
    REVERTING = "reverting"  # devices are being told their previous version
    COMPLETED = "completed"  # every wave passed; devices joining the target still get it
    ABORTED = "aborted"  # stopped by the user; devices keep what they have
    REVERTED = "reverted"  # every device was told its previous version


class RolloutEvent(str, Enum):
    """What moves a rollout."""

    START = "start"
    WAVE_DONE = "wave_done"
    SOAK_PASSED = "soak_passed"
    FINISHED = "finished"
    HALT = "halt"
    AUTO_REVERT = "auto_revert"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    ROLLBACK = "rollback"
    REVERT_DONE = "revert_done"


S, E = RolloutState, RolloutEvent
# RESUME's target is the state the rollout was paused from (stored in rollouts.paused_from).
BACK = "back"
TRANSITIONS: dict[tuple[RolloutState, RolloutEvent], RolloutState | str] = {
    (S.PENDING, E.START): S.DEPLOYING,
    (S.DEPLOYING, E.WAVE_DONE): S.SOAKING,
    (S.SOAKING, E.SOAK_PASSED): S.DEPLOYING,
    (S.SOAKING, E.FINISHED): S.COMPLETED,
    (S.DEPLOYING, E.HALT): S.HALTED,
    (S.SOAKING, E.HALT): S.HALTED,
    (S.DEPLOYING, E.AUTO_REVERT): S.REVERTING,
    (S.SOAKING, E.AUTO_REVERT): S.REVERTING,
    (S.PENDING, E.PAUSE): S.PAUSED,
    (S.DEPLOYING, E.PAUSE): S.PAUSED,
    (S.SOAKING, E.PAUSE): S.PAUSED,
    (S.PAUSED, E.RESUME): BACK,
    (S.PENDING, E.ABORT): S.ABORTED,
    (S.DEPLOYING, E.ABORT): S.ABORTED,
    (S.SOAKING, E.ABORT): S.ABORTED,
    (S.PAUSED, E.ABORT): S.ABORTED,
    (S.HALTED, E.ABORT): S.ABORTED,
    (S.PENDING, E.ROLLBACK): S.REVERTING,
    (S.DEPLOYING, E.ROLLBACK): S.REVERTING,
    (S.SOAKING, E.ROLLBACK): S.REVERTING,
    (S.PAUSED, E.ROLLBACK): S.REVERTING,
    (S.HALTED, E.ROLLBACK): S.REVERTING,
    (S.COMPLETED, E.ROLLBACK): S.REVERTING,
    (S.ABORTED, E.ROLLBACK): S.REVERTING,
    (S.REVERTING, E.REVERT_DONE): S.REVERTED,
}
# States that hold a model's single active-rollout slot.
ACTIVE = frozenset({S.PENDING, S.DEPLOYING, S.SOAKING, S.PAUSED, S.HALTED})
FINAL = frozenset({S.COMPLETED, S.ABORTED, S.REVERTED})


def next_state(state: RolloutState, event: RolloutEvent, paused_from: str | None = None) -> RolloutState:
    """Return the state ``event`` leads to from ``state``, or raise ConflictError."""
    target = TRANSITIONS.get((state, event))
    if target is None:
        allowed = sorted(e.value for (s, e) in TRANSITIONS if s is state)
        raise ConflictError(f"cannot {event.value} a rollout that is {state.value}",
                            hint=f"from {state.value} it can: {', '.join(allowed) or 'nothing (it is final)'}")
    if target == BACK:
        return RolloutState(paused_from or S.DEPLOYING.value)
    return target  # type: ignore[return-value]


class DeviceState(str, Enum):
    """One device's part in a rollout."""

    QUEUED = "queued"  # in the target, waiting for its wave
    REFUSED = "refused"  # no variant fits its profile; re-checked if its profile changes
    NOTIFIED = "notified"  # its desired state names the new version
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"  # verified and installed beside the running one; may wait for its window
    ACTIVATED = "activated"
    COMMITTED = "committed"  # running the new version, healthy
    FAILED = "failed"  # failed, rolled itself back, or timed out
    REVERTED = "reverted"  # told its previous version again
    SKIPPED = "skipped"  # left the target, or the rollout ended before its wave


D = DeviceState
IN_PROGRESS = frozenset({D.NOTIFIED, D.DOWNLOADING, D.DOWNLOADED, D.ACTIVATED})
ASSIGNED = IN_PROGRESS | {D.COMMITTED, D.FAILED}
FINISHED = frozenset({D.COMMITTED, D.FAILED})
# What each reported step moves a device to.
EVENT_STATES: dict[EventKind, DeviceState] = {
    EventKind.DOWNLOAD_STARTED: D.DOWNLOADING,
    EventKind.DOWNLOADED: D.DOWNLOADED,
    EventKind.VERIFIED: D.DOWNLOADED,
    EventKind.INSTALLED: D.DOWNLOADED,
    EventKind.ACTIVATED: D.ACTIVATED,
    EventKind.HEALTH_OK: D.ACTIVATED,
    EventKind.COMMITTED: D.COMMITTED,
    EventKind.HEALTH_FAILED: D.FAILED,
    EventKind.FAILED: D.FAILED,
    EventKind.ROLLED_BACK: D.FAILED,
}
# The states each device state may be reached from: forward only, so late or repeated events
# change nothing. A committed device that later fails its health check or rolls back is failed.
ADVANCE_FROM: dict[DeviceState, frozenset[DeviceState]] = {
    D.DOWNLOADING: frozenset({D.NOTIFIED}),
    D.DOWNLOADED: frozenset({D.NOTIFIED, D.DOWNLOADING}),
    D.ACTIVATED: frozenset({D.NOTIFIED, D.DOWNLOADING, D.DOWNLOADED}),
    D.COMMITTED: frozenset({D.NOTIFIED, D.DOWNLOADING, D.DOWNLOADED, D.ACTIVATED}),
    D.FAILED: frozenset({D.NOTIFIED, D.DOWNLOADING, D.DOWNLOADED, D.ACTIVATED, D.COMMITTED}),
}
