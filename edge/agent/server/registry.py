"""The models the server holds, by name and version, loaded in a background thread.

The server answers ``/v2/health/live`` at once; the active models of the store load one by one
in a thread, and ``/v2/health/ready`` turns 200 once every one of them is READY (Triton's
strict readiness: a model that failed to load keeps the agent not-ready, so the fleet sees it).

Each model version follows a small state machine (:data:`TRANSITIONS`)::

    UNLOADED -> LOADING -> READY -> UNLOADED
                       \\-> FAILED -> LOADING | UNLOADED
"""

from __future__ import annotations

import difflib
import logging
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from edge.errors import EdgeError, NotFoundError, StoreError, UnavailableError
from edge.protocol.enums import ModelKind
from edge.protocol.manifest import Manifest, version_key

if TYPE_CHECKING:  # imported lazily at run time: numpy and onnxruntime load with the first model
    from edge.agent.server.metrics import Metrics
    from edge.protocol.profile import DeviceProfile
    from edge.runtime.model import LoadedModel

log = logging.getLogger(__name__)


class ModelState(str, Enum):
    """Where one model version is in its serving lifecycle."""

    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADED = "UNLOADED"


# Allowed moves; any other is a bug and raises. READY -> LOADING is a reload of the same version.
TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    ModelState.UNLOADED: frozenset({ModelState.LOADING}),
    ModelState.LOADING: frozenset({ModelState.READY, ModelState.FAILED}),
    ModelState.READY: frozenset({ModelState.UNLOADED, ModelState.LOADING}),
    ModelState.FAILED: frozenset({ModelState.LOADING, ModelState.UNLOADED}),
}

# How the repository index names our states (Triton's spelling).
INDEX_STATE = {
    ModelState.LOADING: "LOADING",
    ModelState.READY: "READY",
    ModelState.FAILED: "UNAVAILABLE",
    ModelState.UNLOADED: "UNAVAILABLE",
}


class Installed(Protocol):
    """What the store tells about one installed model version."""

    name: str
    version: str
    folder: Path
    manifest: Manifest


class ModelSource(Protocol):
    """The part of the store the server uses."""

    def active(self) -> list[Any]:
        """Return the active version of every installed model."""

    def list(self) -> list[Any]:
        """Return every installed model version."""


Loader = Callable[[Path, Manifest, "DeviceProfile | None", "int | None"], "LoadedModel"]


class ServedModel:
    """A READY model with the helpers that serve it (limiter, batcher, scheduler), made lazily."""

    def __init__(self, installed: Any, model: "LoadedModel") -> None:
        self.name: str = installed.name
        self.version: str = installed.version
        self.manifest: Manifest = installed.manifest
        self.key_id: str | None = getattr(installed, "key_id", None)
        self.model = model
        self.kind: ModelKind = self.manifest.task.kind
        self.created = int(time.time())
        # Set by the routes on first use (they need the event loop); closed on unload.
        self.limiter: Any = None
        self.batcher: Any = None
        self.scheduler: Any = None

    @property
    def provider(self) -> str:
        """Return the execution provider ORT actually uses."""
        return getattr(self.model, "provider", "CPUExecutionProvider")

    def close(self) -> None:
        """Stop the helpers; requests still queued fail with 503."""
        for helper in (self.scheduler, self.batcher, self.limiter):
            close = getattr(helper, "close", None)
            if close is not None:
                close()


@dataclass
class Entry:
    """One model version the registry knows about."""

    name: str
    version: str
    installed: Any
    state: ModelState = ModelState.UNLOADED
    reason: str = ""
    served: ServedModel | None = None
    loaded_at: float | None = None
    history: list[tuple[float, ModelState]] = field(default_factory=list)

    def move(self, to: ModelState, reason: str = "") -> None:
        """Change state, refusing a move the transition table does not allow."""
        if to not in TRANSITIONS[self.state]:
            raise StoreError(f"model {self.name}@{self.version}: cannot go from {self.state.value} to {to.value}")
        self.state = to
        self.reason = reason
        self.history.append((time.time(), to))


def _default_loader(folder: Path, manifest: Manifest, profile: "DeviceProfile | None",
                    threads: int | None) -> "LoadedModel":
    from edge.runtime.model import load_model

    return load_model(folder, manifest, profile, threads)


class Registry:
    """Loaded models by name and version; loading happens off the event loop."""

    def __init__(self, source: ModelSource | None, profile: "DeviceProfile | None" = None,
                 threads: int | None = None, metrics: "Metrics | None" = None,
                 loader: Loader | None = None) -> None:
        self.source = source
        self.profile = profile
        self.threads = threads
        self.metrics = metrics
        self.loader = loader or _default_loader
        self._entries: dict[str, dict[str, Entry]] = {}
        # name -> version answering requests that name no version (the newest READY one).
        self._current: dict[str, ServedModel] = {}
        self._lock = threading.RLock()  # guards _entries and _current; held only for moments
        # Serializes calls into the store, which may wait on its file lock (another process
        # installing): never held by the event loop, so health checks never wait on the disk.
        self._store_lock = threading.Lock()
        self._initial = threading.Event()
        self._thread: threading.Thread | None = None
        self._startup_error = ""
        self._closed = False

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Load the store's active models in a background thread."""
        if self._thread is not None:
            return
        try:
            installed = self._source_call("active")
        except EdgeError as exc:
            self._startup_error = f"cannot read the model store: {exc}"
            log.error("%s", self._startup_error)
            installed = []
        if installed:  # an idle agent never pays for numpy and onnxruntime (~30 MB)
            import_native_runtime()
        self._thread = threading.Thread(target=self._load_initial, args=(installed,), name="edge-model-loader",
                                        daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until the initial loading pass finished; return whether it did."""
        return self._initial.wait(timeout)

    def close(self) -> None:
        """Stop every model's helpers and drop the models."""
        self._closed = True
        with self._lock:
            for versions in self._entries.values():
                for entry in versions.values():
                    if entry.served is not None:
                        entry.served.close()
                        entry.served = None
            self._current.clear()

    def _load_initial(self, installed: list) -> None:
        with self._lock:  # every model shows as LOADING from the start, so readiness waits for all
            for m in installed:
                entry = self._entry_for(m)
                if entry.state is not ModelState.LOADING:
                    entry.move(ModelState.LOADING)
        for m in installed:
            if self._closed:
                break
            try:
                self._load_name(m.name)
            except EdgeError as exc:  # logged; the model shows FAILED and the rest still load
                log.error("model %s: %s", m.name, exc)
            with self._lock:
                for e in self._entries.get(m.name, {}).values():
                    if e.state is ModelState.LOADING:  # the store offered nothing to load
                        e.move(ModelState.FAILED, "the store gave no version to load")
        self._initial.set()

    def _load_name(self, name: str) -> Entry | None:
        """Load the version the store says to load now; on failure try its rollback target."""
        inst = self._begin_load(name)
        tried: set[str] = set()
        while inst is not None and inst.version not in tried:
            tried.add(inst.version)
            with self._lock:
                entry = self._entry_for(inst)
                if entry.state is not ModelState.LOADING:
                    entry.move(ModelState.LOADING)
                for other in self._entries.get(name, {}).values():  # pre-marked, but not what loads now
                    if other is not entry and other.state is ModelState.LOADING and other.served is None:
                        other.move(ModelState.FAILED, f"the store chose {inst.version} instead")
            if self._load_entry(entry):
                self._source_notify("mark_healthy", name, inst.version)
                return entry
            inst = self._source_notify("mark_unhealthy", name, inst.version, entry.reason)
            if inst is not None:
                log.warning("model %s: the store rolled back to %s", name, inst.version)
        return None

    def _begin_load(self, name: str) -> Any:
        begin = getattr(self.source, "begin_load", None)
        if begin is not None:
            with self._store_lock:
                try:
                    return begin(name)
                except EdgeError:
                    raise
                except Exception as exc:
                    raise StoreError(f"model store begin_load({name!r}) failed: {exc}") from exc
        return next((m for m in self._source_call("active") if m.name == name), None)

    def _source_notify(self, method: str, *args: Any) -> Any:
        """Tell the store about a load outcome; a store failure here is logged, not raised."""
        fn = getattr(self.source, method, None)
        if fn is None:
            return None
        try:
            with self._store_lock:
                return fn(*args)
        except Exception as exc:  # reporting must not hide the load outcome itself
            log.warning("model store %s%s failed: %s", method, args[:2], exc)
            return None

    # ----------------------------------------------------------------- store access
    def _source_call(self, method: str) -> list[Any]:
        if self.source is None:
            return []
        with self._store_lock:
            try:
                return list(getattr(self.source, method)())
            except EdgeError:
                raise
            except Exception as exc:  # a store bug must not kill the loader thread
                raise StoreError(f"model store {method}() failed: {type(exc).__name__}: {exc}") from exc

    def _entry_for(self, installed: Any) -> Entry:
        versions = self._entries.setdefault(installed.name, {})
        entry = versions.get(installed.version)
        if entry is None:
            entry = versions[installed.version] = Entry(installed.name, installed.version, installed)
        else:
            entry.installed = installed
        return entry

    def _load_entry(self, entry: Entry) -> bool:
        """Load one entry already moved to LOADING; return whether it is READY. Never raises."""
        inst = entry.installed
        started = time.perf_counter()
        try:
            model = self.loader(Path(inst.folder), inst.manifest, self.profile, self.threads)
        except Exception as exc:  # any load failure (bad ONNX, missing runtime) marks the model FAILED
            reason = str(exc) if isinstance(exc, EdgeError) else f"{type(exc).__name__}: {exc}"
            log.error("model %s@%s failed to load: %s", entry.name, entry.version, reason)
            with self._lock:
                entry.move(ModelState.FAILED, reason)
            if self.metrics is not None:
                self.metrics.model_gone(entry.name, entry.version)
            return False
        seconds = time.perf_counter() - started
        served = ServedModel(inst, model)
        with self._lock:
            old = entry.served
            entry.served, entry.loaded_at = served, time.time()
            entry.move(ModelState.READY)
            self._promote(entry.name)
        if old is not None:
            old.close()
        log.info("model %s@%s ready in %.2f s on %s", entry.name, entry.version, seconds, served.provider)
        if self.metrics is not None:
            self.metrics.model_loaded(entry.name, entry.version, inst.manifest.task.value, served.provider, seconds)
        return True

    def _promote(self, name: str) -> None:
        ready = [e for e in self._entries.get(name, {}).values() if e.state is ModelState.READY and e.served]
        if ready:
            newest = max(ready, key=lambda e: version_key(e.version))
            self._current[name] = newest.served  # type: ignore[assignment]
        else:
            self._current.pop(name, None)

    # ----------------------------------------------------------------- health
    def live(self) -> bool:
        """Return whether the server process is up (always, while it answers)."""
        return True

    def readiness(self) -> tuple[bool, str]:
        """Return whether every model meant to serve has a READY version, and if not, why."""
        if not self._initial.is_set():
            pending = [f"{e.name}@{e.version}" for e in self._all() if e.state is ModelState.LOADING]
            return False, "models still loading: " + (", ".join(pending) or "(reading the store)")
        if self._startup_error:
            return False, self._startup_error
        problems = []
        with self._lock:
            for name, versions in self._entries.items():
                states = [e.state for e in versions.values()]
                if ModelState.READY in states or all(st is ModelState.UNLOADED for st in states):
                    continue  # serving, or unloaded on purpose
                problems += [f"{e.name}@{e.version} is {e.state.value}" + (f": {e.reason}" if e.reason else "")
                             for e in versions.values() if e.state is not ModelState.UNLOADED]
        if problems:
            return False, "; ".join(problems)
        return True, ""

    def _all(self) -> list[Entry]:
        with self._lock:
            return [e for versions in self._entries.values() for e in versions.values()]

    # ----------------------------------------------------------------- lookup (hot path)
    def resolve(self, name: str, version: str | None = None) -> ServedModel:
        """Return the served model for a request, or raise 404/503 saying why."""
        if not version:
            served = self._current.get(name)
            if served is not None:
                return served
        else:
            entry = self._entries.get(name, {}).get(version)
            if entry is not None and entry.state is ModelState.READY and entry.served is not None:
                return entry.served
        return self._explain_miss(name, version)

    def _explain_miss(self, name: str, version: str | None) -> ServedModel:
        versions = self._entries.get(name)
        if not versions:
            known = sorted(self._entries)
            close = difflib.get_close_matches(name, known, n=1)
            hint = (f"did you mean {close[0]!r}? " if close else "") + (
                f"known models: {', '.join(known)}" if known else "no models are installed"
            )
            raise NotFoundError(f"unknown model {name!r}", hint=hint)
        if version and version not in versions:
            raise NotFoundError(f"model {name!r} has no loaded version {version!r}",
                                hint=f"versions known here: {', '.join(sorted(versions, key=version_key))}; "
                                     f"activate and load another with the repository API")
        entries = [versions[version]] if version else list(versions.values())
        states = ", ".join(f"{e.version} {e.state.value}" + (f" ({e.reason})" if e.reason else "") for e in entries)
        raise UnavailableError(f"model {name!r} is not ready: {states}")

    def knows(self, name: str) -> bool:
        """Return whether any version of ``name`` was ever loaded or tried."""
        return name in self._entries

    def served(self) -> list[ServedModel]:
        """Return every READY model version."""
        return [e.served for e in self._all() if e.state is ModelState.READY and e.served is not None]

    # ----------------------------------------------------------------- repository extension
    def index(self) -> list[dict[str, str]]:
        """List installed and known model versions with their serving state (Triton's index)."""
        rows: dict[tuple[str, str], dict[str, str]] = {}
        for item in self._source_call("list"):
            # The store lists ModelStatus (a name with its versions); a plain source lists versions.
            for v in getattr(item, "versions", (item,)):
                failed = getattr(v, "failed", None) or getattr(v, "problem", None)
                active = getattr(v, "active", None)
                reason = failed or ("installed, not active" if active is False else "not loaded")
                rows[(v.name, v.version)] = {"name": v.name, "version": v.version, "state": "UNAVAILABLE",
                                             "reason": reason}
        for e in self._all():
            row = {"name": e.name, "version": e.version, "state": INDEX_STATE[e.state]}
            reason = e.reason or ("unloaded" if e.state is ModelState.UNLOADED else "")
            if reason:
                row["reason"] = reason
            rows[(e.name, e.version)] = row
        return sorted(rows.values(), key=lambda r: (r["name"], version_key(r["version"])))

    def load(self, name: str) -> Entry:
        """Load (or reload) the store's active version of ``name``; blocks until done."""
        with self._lock:
            if any(e.state is ModelState.LOADING for e in self._entries.get(name, {}).values()):
                raise UnavailableError(f"model {name} is already loading")
        if self._begin_load_peek(name) is None:
            self._raise_not_installed(name)
        entry = self._load_name(name)
        if entry is None:
            failed = [e for e in self._entries.get(name, {}).values() if e.state is ModelState.FAILED]
            reasons = "; ".join(f"{e.version}: {e.reason}" for e in failed) or "no version could be loaded"
            raise UnavailableError(f"model {name} failed to load: {reasons}")
        # The newly loaded version replaces any other loaded version of the same name.
        for other in self._all():
            if other.name == name and other is not entry and other.state is ModelState.READY:
                self._unload_entry(other)
        return entry

    def _begin_load_peek(self, name: str) -> Any:
        return next((m for m in self._source_call("active") if m.name == name), None)

    def _raise_not_installed(self, name: str) -> None:
        names = sorted({getattr(m, "name") for m in self._source_call("list")})
        if name in names:
            raise NotFoundError(f"model {name!r} has no active version", hint="activate one first")
        known = f"installed models: {', '.join(names)}" if names else "no models are installed"
        raise NotFoundError(f"model {name!r} is not installed", hint=known)

    def unload(self, name: str) -> list[str]:
        """Unload every loaded version of ``name``; return the versions unloaded."""
        versions = self._entries.get(name)
        if not versions:
            self._explain_miss(name, None)
        done = []
        for entry in list(versions.values()):  # type: ignore[union-attr]
            if entry.state in (ModelState.READY, ModelState.FAILED):
                self._unload_entry(entry)
                done.append(entry.version)
        return done

    def forget(self, name: str) -> list[str]:
        """Unload every version of ``name`` and forget the model (it left the store); return its versions.

        Afterwards requests for it answer 404 (unknown model), as if it had never been installed.
        """
        with self._lock:
            versions = self._entries.pop(name, {})
            self._current.pop(name, None)
        for entry in versions.values():
            served, entry.served = entry.served, None
            if served is not None:
                served.close()
                if self.metrics is not None:
                    self.metrics.model_gone(entry.name, entry.version)
        if versions:
            log.info("model %s forgotten (%s)", name, ", ".join(sorted(versions, key=version_key)))
        return sorted(versions, key=version_key)

    def _unload_entry(self, entry: Entry) -> None:
        with self._lock:
            served, entry.served = entry.served, None
            entry.move(ModelState.UNLOADED, "unloaded")
            self._promote(entry.name)
        if served is not None:
            served.close()
        if self.metrics is not None:
            self.metrics.model_gone(entry.name, entry.version)
        log.info("model %s@%s unloaded", entry.name, entry.version)


def import_native_runtime() -> None:
    """Import numpy and onnxruntime in this thread, before the agent starts any other.

    Two threads importing numpy for the first time at once can find it half-initialized
    ("cannot import name ... from partially initialized module"): the model loader and the fleet
    link (which lists execution providers) did, and the loader then marked a sound model
    unhealthy. Importing once here, before either thread exists, costs ~0.15 s of start-up.
    """
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401

