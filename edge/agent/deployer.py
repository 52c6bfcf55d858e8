"""Follow the desired state: download, verify, install, activate, health-check, commit or roll back.

One worker thread runs one deployment at a time through the state machine of
:mod:`edge.agent.deployment`, persisting every state before its work, and reports each step
as an :class:`~edge.protocol.messages.Event`. The desired state is level-triggered: every
retained desired message is compared with what the store runs, so a device that was offline
for days converges when it returns, and one that already runs the desired versions does
nothing. A newer target for a model interrupts a deployment of it that has not switched yet.
A model the desired state stops naming is removed (the policy is in :mod:`edge.agent.removal`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

from edge.agent.deploy_steps import DeploySteps
from edge.agent.deployment import INTERRUPTIBLE, Deployment, DeploymentJournal, DeployState
from edge.agent.health import HealthCheck
from edge.agent.removal import Removals, removal_events, uninstall
from edge.errors import EdgeError
from edge.protocol.manifest import NAME_PATTERN
from edge.protocol.messages import Desired, DesiredModel, Event, EventKind, ModelReport
from edge.transport import Backoff

log = logging.getLogger(__name__)

S = DeployState
# Download attempts before a deployment fails (transient errors only; a wrong checksum or a
# bad signature fails at once). With the default backoff they span about ten minutes.
MAX_ATTEMPTS = 6
DOWNLOAD_BACKOFF = Backoff(initial=5.0, maximum=300.0)
# Seconds between looks at deployments waiting for their activation time or window.
WAIT_POLL_S = 5.0
# The event that tells the controller how a deployment ended: the rollout waits for it, so one
# lost to a crash between the final state's write and its queueing is sent again at start.
FINAL_EVENTS = {S.COMMITTED: EventKind.COMMITTED, S.ROLLED_BACK: EventKind.ROLLED_BACK, S.FAILED: EventKind.FAILED}


class Deployer(DeploySteps):
    """Drive deployments for one store; thread-safe."""

    def __init__(
        self,
        store: Any,
        folder: Path,
        health: HealthCheck,
        *,
        emit: Callable[[Event], None],
        on_change: Callable[[], None] = lambda: None,
        rate: float | None = None,
        headers: dict[str, str] | None = None,
        base_url: str | None = None,
        backoff: Backoff = DOWNLOAD_BACKOFF,
        max_attempts: int = MAX_ATTEMPTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.health = health
        self.journal = DeploymentJournal(Path(folder))
        self.downloads = Path(folder) / "downloads"
        self.downloads.mkdir(parents=True, exist_ok=True)
        self._emit_event = emit
        self._on_change = on_change
        self.rate = rate
        self.headers = dict(headers or {})
        self.base_url = base_url
        self.backoff = backoff
        self.max_attempts = max_attempts
        self._clock = clock
        self._lock = threading.RLock()  # guards _jobs and _failed; held while switching versions
        self._jobs: dict[str, Deployment] = self.journal.load()
        self._failed: dict[str, str] = self.journal.failures()
        self.removals = Removals(self.journal)
        self._cancel: dict[str, threading.Event] = {}
        self._desired: Desired | None = None
        self._requests: list[tuple[str, DesiredModel, bool]] = []
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.generation: int | None = None
        self.providers: dict[str, str] = {}  # model -> provider seen by the last health check

    # ------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Resume unfinished deployments and start the worker."""
        with self._lock:
            for job in self._jobs.values():
                if not job.done:
                    log.warning("resuming the deployment of %s in state %s", job.ref, job.state.value)
            unsent = [j for j in self._jobs.values() if j.state in FINAL_EVENTS and not j.announced]
        for job in unsent:
            log.warning("sending the %s event of %s again (the agent stopped before queueing it)",
                        job.state.value, job.ref)
            detail = f"{job.error or job.state.value} (after a restart)"
            self._emit(Event(kind=FINAL_EVENTS[job.state], model=job.name, version=job.version,
                             deployment_id=job.deployment_id, detail=detail, error_code=job.error_code))
            self._announced(job)
        self._thread = threading.Thread(target=self._run, name="edge-deployer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; an interrupted download resumes at the next start."""
        self._stopping.set()
        with self._lock:
            for ev in self._cancel.values():
                ev.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------------- inputs
    def desire(self, desired: Desired) -> None:
        """Take a desired state (level-triggered); never blocks (called from the network thread).

        A running download of a model the new state names differently is cancelled at once; the
        worker compares the state with the store and starts what differs.
        """
        with self._lock:
            self._desired = desired
            for name, model in desired.models.items():
                job, cancel = self._jobs.get(name), self._cancel.get(name)
                if job is not None and cancel is not None and job.state in INTERRUPTIBLE and not job.same_target(model):
                    cancel.set()
            for name in self.removals.left_out(desired):  # being removed: stop downloading it
                job, cancel = self._jobs.get(name), self._cancel.get(name)
                if job is not None and cancel is not None and job.state in INTERRUPTIBLE:
                    cancel.set()
        self._wake.set()

    def deploy(self, name: str, model: DesiredModel, force: bool = False) -> None:
        """Deploy one version on request (a ``deploy`` command); ``force`` forgets a past failure."""
        with self._lock:
            self._requests.append((name, model, force))
            job, cancel = self._jobs.get(name), self._cancel.get(name)
            if job is not None and cancel is not None and job.state in INTERRUPTIBLE and not job.same_target(model):
                cancel.set()
        self._wake.set()

    def _absorb(self) -> None:
        """Turn a new desired state and deploy requests into deployments (worker thread)."""
        with self._lock:
            desired, self._desired = self._desired, None
            requests, self._requests = self._requests, []
        if desired is None and not requests:
            return
        active = self._active_versions()
        with self._lock:
            if desired is not None:
                self.generation = desired.generation
                self.removals.follow(desired)
                for name, model in sorted(desired.models.items()):
                    self._target(name, model, desired.generation, force=False, active=active.get(name))
            for name, model, force in requests:
                self.removals.adopt(name)
                self._target(name, model, self.generation, force=force, active=active.get(name))
        if desired is not None:
            self._on_change()  # the reported state names the generation seen, even when nothing changes

    def rollback(self, name: str, reason: str = "requested by the controller") -> str:
        """Switch ``name`` back to its previous version now; return the version now active."""
        with self._lock:
            job = self._jobs.get(name)
            if job is not None and job.state in INTERRUPTIBLE:
                self._interrupt(job, "a rollback was requested")
            inst = self.store.rollback(name)
        self.health.restore(name)
        self._emit(Event(kind=EventKind.ROLLED_BACK, model=name, version=inst.version, detail=reason))
        self._on_change()
        return inst.version

    # ------------------------------------------------------------------------- removal
    def _remove_gone(self) -> None:
        """Uninstall the managed models the desired state no longer names (worker thread)."""
        with self._lock:
            names = sorted(self.removals.pending)
        for name in names:
            with self._lock:
                job = self._jobs.get(name)
                if name not in self.removals.pending:
                    continue  # named again meanwhile
                if job is not None and not job.done:
                    if job.state not in INTERRUPTIBLE:
                        continue  # switching: it finishes first, the removal follows at the next turn
                    self._interrupt(job, "removed from the desired state")
                    self._cleanup(job)  # a partial download too: freeing the disk is the point
            try:
                active, removed = uninstall(self.store, self.health, name)
            except EdgeError as exc:
                log.error("cannot remove %s: %s", name, exc)
                with self._lock:
                    self.removals.later(name)
                self._emit(Event(kind=EventKind.FAILED, model=name, detail=f"removal failed: {exc}",
                                 error_code=exc.code))
                continue
            with self._lock:
                self.removals.done(name)
                # Forgotten, or the same target named again later would count as already committed.
                self._jobs.pop(name, None)
                self.journal.forget(name)
                self.providers.pop(name, None)
            for event in removal_events(name, active, removed):
                self._emit(event)
            log.info("%s removed from the store: %s", name, ", ".join(removed) or "nothing was installed")
            self._on_change()

    # ------------------------------------------------------------------------- reports
    def report(self) -> tuple[ModelReport, ...]:
        """Return what runs and where each deployment stands (the reported state)."""
        out = []
        try:
            statuses = self.store.list()
        except EdgeError as exc:
            log.error("cannot read the model store for the report: %s", exc)
            statuses = []
        for st in statuses:
            if st.active:
                out.append(ModelReport(name=st.name, version=st.active, state="active", previous=st.previous,
                                       provider=self.providers.get(st.name)))
        with self._lock:
            for job in self._jobs.values():
                active = next((st.active for st in statuses if st.name == job.name), None)
                if job.state is S.COMMITTED and active == job.version:
                    continue
                out.append(ModelReport(name=job.name, version=job.version, state=job.state.value,
                                       previous=job.previous, error=job.error))
        return tuple(out)

    def deployments(self) -> dict[str, Deployment]:
        """Return a snapshot of the last deployment of every model."""
        with self._lock:
            return {k: Deployment(**{**v.__dict__}) for k, v in self._jobs.items()}

    # ------------------------------------------------------------------------- targeting
    def _active_versions(self) -> dict[str, str]:
        try:
            return {m.name: m.version for m in self.store.active()}
        except EdgeError as exc:
            log.error("cannot read the model store: %s", exc)
            return {}

    def _target(self, name: str, model: DesiredModel, generation: int | None, *, force: bool,
                active: str | None) -> None:
        if not re.match(NAME_PATTERN, name):
            self._emit(Event(kind=EventKind.FAILED, model=None, version=model.version, deployment_id=model.deployment_id,
                             detail=f"invalid model name {name!r} in the desired state", error_code="config_invalid"))
            return
        job = self._jobs.get(name)
        if job is not None and job.same_target(model) and not force:
            if not job.done or job.state is S.COMMITTED or job.key in self._failed:
                return  # in progress, done, or failed before: never loop on a bad version
        if active == model.version and not force and (job is None or job.done):
            if model.deployment_id and (job is None or job.deployment_id != model.deployment_id):
                self._acknowledge(name, model, generation)
            return  # already serving it (installed by hand, or before this journal existed)
        try:
            new = Deployment.for_target(name, model, generation, force)
        except EdgeError as exc:
            self._emit(Event(kind=EventKind.FAILED, model=name, version=model.version,
                             deployment_id=model.deployment_id, detail=str(exc), error_code=exc.code))
            return
        if new.key in self._failed:
            if not force:
                return
            del self._failed[new.key]
            self.journal.save_failures(self._failed)
        if job is not None and not job.done:
            if job.state not in INTERRUPTIBLE:
                # Mid-switch: let it finish; the desired state is level-triggered and comes back.
                log.info("%s is switching; %s@%s waits for it", job.ref, name, model.version)
                return
            self._interrupt(job, f"superseded by {name}@{model.version}")
        self._jobs[name] = new
        self.journal.save(new)
        log.info("deploying %s (deployment %s)", new.ref, new.deployment_id or "-")
        self._on_change()

    def _acknowledge(self, name: str, model: DesiredModel, generation: int | None) -> None:
        """Report a rollout's version that already serves here as committed (lock held).

        Without the event the rollout would wait for this device until its timeout and then
        count it as failed: the controller names a device's current version when it did not
        know it (a version flashed by hand, or a report listing a later failed deployment).
        """
        try:
            done = Deployment.for_target(name, model, generation, False)
        except EdgeError:
            return
        done.state = S.COMMITTED
        self._jobs[name] = done
        self._emit(Event(kind=EventKind.COMMITTED, model=name, version=model.version,
                         deployment_id=model.deployment_id, detail="already serving this version"))
        self._announced(done)  # persists the record too
        self._on_change()

    def _interrupt(self, job: Deployment, why: str) -> None:
        cancel = self._cancel.get(job.name)
        if cancel is not None:
            cancel.set()  # the worker notices and drops it
        job.move(S.CANCELLED, why)
        # Persisted, or a restart would resume (and activate) the deployment it cancelled.
        self.journal.save(job)
        self._emit(Event(kind=EventKind.FAILED, model=job.name, version=job.version, deployment_id=job.deployment_id,
                         detail=f"cancelled: {why}", error_code="cancelled"))

    # ------------------------------------------------------------------------- worker
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._absorb()
                self._remove_gone()
            except Exception:  # a store hiccup: try again at the next wake
                log.exception("cannot apply the desired state")
            job = self._pick()
            if job is None:
                self._wake.wait(WAIT_POLL_S)
                self._wake.clear()
                continue
            cancel = threading.Event()
            with self._lock:
                self._cancel[job.name] = cancel
            try:
                self._drive(job, cancel)
            except Exception as exc:  # a bug must not end the worker; the deployment fails visibly
                log.exception("deployment of %s failed unexpectedly", job.ref)
                self._fail(job, f"{type(exc).__name__}: {exc}", getattr(exc, "code", "edge_error"))
            finally:
                with self._lock:
                    self._cancel.pop(job.name, None)

    def _pick(self) -> Deployment | None:
        now = self._clock()
        with self._lock:
            ready = [j for j in self._jobs.values()
                     if not j.done and (j.state is not S.WAITING or j.may_activate(now))]
            return min(ready, key=lambda j: j.updated) if ready else None

    def _current(self, job: Deployment) -> bool:
        with self._lock:
            return self._jobs.get(job.name) is job and job.state is not S.CANCELLED

    def _drive(self, job: Deployment, cancel: threading.Event) -> None:
        steps = self.steps()
        while not job.done and not self._stopping.is_set() and self._current(job):
            before = job.state
            if not steps[job.state](job, cancel):
                return  # waiting (activation time, retry backoff): the worker looks again later
            if job.state is before and not job.done:
                return

    def _move(self, job: Deployment, to: DeployState, event: EventKind | None = None, detail: str = "",
              error: str | None = None, code: str | None = None) -> None:
        with self._lock:
            if not self._current(job):
                return
            job.move(to, error, code)
            self.journal.save(job)
        if event is not None:
            self._emit(Event(kind=event, model=job.name, version=job.version, deployment_id=job.deployment_id,
                             detail=detail, error_code=code))
            if job.state in FINAL_EVENTS:
                self._announced(job)
        self._on_change()

    def _announced(self, job: Deployment) -> None:
        """Persist that the final event of ``job`` is queued (unless a newer deployment replaced it)."""
        with self._lock:
            if self._jobs.get(job.name) is job:
                job.announced = True
                self.journal.save(job)

    def _fail(self, job: Deployment, reason: str, code: str | None) -> None:
        if job.done or not self._current(job):
            return
        log.error("deployment of %s failed: %s", job.ref, reason)
        with self._lock:
            self._failed[job.key] = reason
            self.journal.save_failures(self._failed)
        self._move(job, S.FAILED, EventKind.FAILED, reason, error=reason, code=code)
        self._cleanup(job)

    def _bundle_path(self, job: Deployment) -> Path:
        return self.downloads / f"{job.name}-{job.version}-{job.sha256[:12]}.edgebundle"

    def _cleanup(self, job: Deployment) -> None:
        path = self._bundle_path(job)
        for p in (path, path.with_name(path.name + ".part")):
            p.unlink(missing_ok=True)

    def _emit(self, event: Event) -> None:
        try:
            self._emit_event(event)
        except Exception:  # reporting must never break a deployment
            log.exception("cannot queue event %s", event.kind.value)

