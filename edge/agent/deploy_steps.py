"""The steps of a deployment, one method per state of :mod:`edge.agent.deployment`.

Each step does its state's work and moves the deployment on (or fails it); it returns False
when the worker should look again later (waiting for an activation time, a retry backoff, a
cancellation). :class:`~edge.agent.deployer.Deployer` provides the state moves, the journal,
the store and the health check these steps use, and picks which deployment runs next.
"""

from __future__ import annotations

import logging
import threading
from urllib.parse import urljoin

from edge.agent.deployment import Deployment, DeployState
from edge.agent.downloader import Cancelled, download
from edge.errors import DownloadError, EdgeError, IntegrityError
from edge.protocol.bundle import BundleReader
from edge.protocol.messages import Event, EventKind

log = logging.getLogger("edge.agent.deployer")

S = DeployState
# Health checks started before a deployment is rolled back without another try: the agent
# dying during two checks in a row suggests the model is what kills it.
MAX_HEALTH_ATTEMPTS = 2


class DeploySteps:
    """The per-state work of :class:`~edge.agent.deployer.Deployer` (a mixin: it owns no state)."""

    def steps(self) -> dict:
        """Return the step method of every state the worker drives."""
        return {
            S.PENDING: self._start, S.DOWNLOADING: self._download, S.VERIFYING: self._verify,
            S.INSTALLING: self._install, S.WAITING: self._wait, S.ACTIVATING: self._activate,
            S.HEALTH_CHECK: self._health_check, S.ROLLING_BACK: self._roll_back,
        }  # fmt: skip

    def _start(self, job: Deployment, cancel: threading.Event) -> bool:
        self._move(job, S.DOWNLOADING, EventKind.DOWNLOAD_STARTED, f"{job.size} bytes from {job.bundle_url}")
        return True

    def _download(self, job: Deployment, cancel: threading.Event) -> bool:
        url = urljoin(self.base_url, job.bundle_url) if self.base_url else job.bundle_url
        try:
            download(url, self._bundle_path(job), sha256=job.sha256, size=job.size, rate=self.rate,
                     headers=self.headers, cancel=cancel)
        except Cancelled:
            return False  # superseded (already CANCELLED) or stopping (resumes at the next start)
        except DownloadError as exc:
            if not exc.transient or job.attempts + 1 >= self.max_attempts:
                self._fail(job, f"download failed after {job.attempts + 1} attempt(s): {exc}", exc.code)
                return True
            with self._lock:
                job.attempts += 1
                self.journal.save(job)
            delay = self.backoff.delay(job.attempts)
            log.warning("download of %s failed (%s); retry %d in %.0f s", job.ref, exc, job.attempts, delay)
            if cancel.wait(delay):
                return False
            return True
        except EdgeError as exc:  # checksum mismatch, disk full: a retry would not help
            self._fail(job, str(exc), exc.code)
            return True
        self._move(job, S.VERIFYING, EventKind.DOWNLOADED, f"{job.size} bytes, SHA-256 matches")
        return True

    def _verify(self, job: Deployment, cancel: threading.Event) -> bool:
        path = self._bundle_path(job)
        if not path.exists():  # a restart after the file was cleaned up: fetch it again
            self._move(job, S.DOWNLOADING)
            return True
        try:
            with BundleReader(path) as reader:
                m = reader.manifest
                if (m.name, m.version) != (job.name, job.version):
                    raise IntegrityError(f"the bundle holds {m.ref}, the desired state names {job.ref}")
                key = reader.check_signature(self.store.trust)
        except EdgeError as exc:
            self._fail(job, str(exc), exc.code)
            return True
        self._move(job, S.INSTALLING, EventKind.VERIFIED, f"signed by key {key}")
        return True

    def _install(self, job: Deployment, cancel: threading.Event) -> bool:
        path = self._bundle_path(job)
        if not path.exists():
            self._move(job, S.DOWNLOADING)
            return True
        try:
            self.store.install(path, activate=False)
        except EdgeError as exc:
            self._fail(job, str(exc), exc.code)
            return True
        if cancel.is_set():
            return False
        wait = not job.may_activate(self._clock())
        detail = "installed beside the active version" + ("; activation scheduled" if wait else "")
        self._move(job, S.WAITING if wait else S.ACTIVATING, EventKind.INSTALLED, detail)
        self._cleanup(job)
        return True

    def _wait(self, job: Deployment, cancel: threading.Event) -> bool:
        if not job.may_activate(self._clock()):
            return False
        self._move(job, S.ACTIVATING)
        return True

    def _activate(self, job: Deployment, cancel: threading.Event) -> bool:
        with self._lock:
            active = self._active_versions().get(job.name)
            if job.previous is None and active != job.version:
                job.previous = active
                self.journal.save(job)
            try:
                self.store.activate(job.name, job.version, force=job.force)
            except EdgeError as exc:
                self._fail(job, str(exc), exc.code)
                return True
        self._move(job, S.HEALTH_CHECK, EventKind.ACTIVATED,
                   f"was {job.previous}" if job.previous else "first version of this model")
        return True

    def _health_check(self, job: Deployment, cancel: threading.Event) -> bool:
        with self._lock:
            if job.health_attempts >= MAX_HEALTH_ATTEMPTS:
                reason = f"the agent stopped during {job.health_attempts} health checks of {job.ref}"
                job.error, job.error_code = reason, "inference_failed"
                self._move(job, S.ROLLING_BACK, EventKind.HEALTH_FAILED, reason, error=reason, code="inference_failed")
                return True
            job.health_attempts += 1
            self.journal.save(job)
        try:
            installed = self.store.get(job.name, job.version)
            provider = self.health.check(installed)
        except EdgeError as exc:
            self._move(job, S.ROLLING_BACK, EventKind.HEALTH_FAILED, str(exc), error=str(exc), code=exc.code)
            return True
        self.providers[job.name] = provider
        try:
            self.store.mark_healthy(job.name, job.version)
        except EdgeError as exc:  # the version serves; only its record failed to update
            log.error("cannot record %s as healthy: %s", job.ref, exc)
        self._emit(Event(kind=EventKind.HEALTH_OK, model=job.name, version=job.version,
                         deployment_id=job.deployment_id, detail=f"real inference on {provider}"))
        self._move(job, S.COMMITTED, EventKind.COMMITTED, "the new version serves")
        return True

    def _roll_back(self, job: Deployment, cancel: threading.Event) -> bool:
        reason = job.error or "health check failed"
        with self._lock:
            try:
                self.store.mark_unhealthy(job.name, job.version, reason)
            except EdgeError as exc:
                log.error("cannot record %s as unhealthy: %s", job.ref, exc)
            active = self._active_versions().get(job.name)
            self._failed[job.key] = reason
            self.journal.save_failures(self._failed)
        if active is not None and active != job.version:
            self.health.restore(job.name)
            self._move(job, S.ROLLED_BACK, EventKind.ROLLED_BACK, f"back to {active}: {reason}",
                       code=job.error_code)
        else:
            self._move(job, S.FAILED, EventKind.FAILED, f"{reason}; no sound previous version to roll back to",
                       code=job.error_code)
        return True

