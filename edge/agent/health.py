"""Health checks after an activation: real inference on the new version, finite outputs.

Two ways to run it, chosen by what the agent has:

* :class:`RegistryHealthCheck` loads the new version into the serving registry (the path real
  requests take: ``registry.load`` also tells the store it is healthy or rolls it back) and
  runs one request through it.
* :class:`ChildHealthCheck` (no server in this process) loads and runs the model in a child
  process, ``python -m edge.agent.health FOLDER``, so a model that crashes ONNX Runtime takes
  down the child only.

Either way the inputs are synthesized from the manifest (as the store's trial load does) and
every floating-point output must be finite: a model that loads and runs but answers NaN is
not healthy.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edge import settings
from edge.errors import EdgeError, InferenceError

if TYPE_CHECKING:
    from edge.agent.store import InstalledModel
    from edge.protocol.profile import DeviceProfile

log = logging.getLogger(__name__)

# Seconds a health check may take before it counts as failed. A version that fails its check is
# rolled back within 60 s of its activation (the fleet's promise): a 1.5B-parameter LLM loads in
# ~20 s on a Jetson Orin, and the rest of the minute is left for the rollback itself.
HEALTH_TIMEOUT_S = 45.0
# Characters of a failing child's output kept in the reason.
MAX_REASON = 1000


class HealthCheck(Protocol):
    """Run real inference on a freshly activated version."""

    def check(self, installed: "InstalledModel") -> str:
        """Return the execution provider used; raise InferenceError saying what is wrong."""

    def restore(self, name: str) -> None:
        """Serve the store's active version of ``name`` again (after a rollback)."""

    def release(self, name: str) -> None:
        """Stop serving ``name`` (it is being removed from the store)."""


def check_outputs(ref: str, outputs: dict[str, Any]) -> None:
    """Raise InferenceError unless every floating-point output is non-empty and finite."""
    import numpy as np

    for name, value in outputs.items():
        arr = np.asarray(value)
        if arr.dtype.kind == "f":
            if arr.size == 0:
                raise InferenceError(f"{ref}: output {name} is empty")
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            if bad:
                raise InferenceError(f"{ref}: output {name} has {bad} NaN or infinite value(s) of {arr.size}")


class RegistryHealthCheck:
    """Load the version into the agent's serving registry and run one request through it."""

    def __init__(self, registry: Any, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        self.registry = registry
        self.timeout_s = timeout_s

    def check(self, installed: "InstalledModel") -> str:
        """Load, infer, check within ``timeout_s``; return the provider."""
        outcome: list[Any] = []

        def attempt() -> None:
            try:
                outcome.append(self._check(installed))
            except BaseException as exc:  # raised again in the caller's thread below
                outcome.append(exc)

        worker = threading.Thread(target=attempt, name=f"edge-health-{installed.name}", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():  # a load that hangs goes on alone; the version is rolled back now
            raise InferenceError(f"{installed.ref}: no answer within {self.timeout_s:g} s")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return str(outcome[0])

    def _check(self, installed: "InstalledModel") -> str:
        from edge.agent.validate_child import exercise

        try:
            entry = self.registry.load(installed.name)
        except EdgeError as exc:
            raise InferenceError(f"{installed.ref} failed to load: {exc}") from exc
        if entry.version != installed.version:  # the registry fell back to another version
            raise InferenceError(f"{installed.ref} failed to load: {self._reason(installed)}")
        served = entry.served
        model = served.model
        try:
            outputs = exercise(model)
        except EdgeError as exc:
            raise InferenceError(f"{installed.ref}: inference failed: {exc}") from exc
        except Exception as exc:  # ORT raises untyped errors
            raise InferenceError(f"{installed.ref}: inference failed: {type(exc).__name__}: {exc}") from exc
        check_outputs(installed.ref, outputs)
        return str(served.provider)

    def _reason(self, installed: "InstalledModel") -> str:
        for row in self.registry.index():
            if row.get("name") == installed.name and row.get("version") == installed.version:
                return row.get("reason") or row.get("state", "unknown")
        return "unknown"

    def restore(self, name: str) -> None:
        """Load the store's active version again."""
        try:
            self.registry.load(name)
        except EdgeError as exc:
            log.error("cannot serve %s again after the rollback: %s", name, exc)

    def release(self, name: str) -> None:
        """Unload every version and forget the model, so requests for it answer 404."""
        self.registry.forget(name)


class ChildHealthCheck:
    """Load and run the version in a child process."""

    def __init__(self, profile: "DeviceProfile | None", timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        self.profile = profile
        self.timeout_s = timeout_s

    def check(self, installed: "InstalledModel") -> str:
        """Run the child; return the provider it used."""
        from edge.runtime.session import usable_providers

        providers = usable_providers(self.profile) if self.profile is not None else [("CPUExecutionProvider", {})]
        cmd = [sys.executable, "-m", "edge.agent.health", str(Path(installed.folder).parent),
               "--providers", json.dumps(providers)]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=self.timeout_s,
                                  env=settings.environ_for_child())
        except subprocess.TimeoutExpired:
            raise InferenceError(f"{installed.ref}: no answer within {self.timeout_s:g} s") from None
        except OSError as exc:
            raise InferenceError(f"{installed.ref}: cannot start the health check: {exc}") from exc
        if proc.returncode < 0:
            sig = -proc.returncode
            name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
            raise InferenceError(f"{installed.ref}: inference killed the health check process with {name}")
        lines = proc.stdout.decode(errors="replace").strip().splitlines()
        try:
            result = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            result = {}
        if proc.returncode != 0 or not result.get("ok"):
            detail = result.get("error") or proc.stderr.decode(errors="replace").strip()[-MAX_REASON:]
            raise InferenceError(f"{installed.ref}: {detail or 'health check failed'}")
        return str(result.get("provider", ""))

    def restore(self, name: str) -> None:
        """Nothing is served in this process."""

    def release(self, name: str) -> None:
        """Nothing is served in this process."""


def probe(folder: Path, providers: list[tuple[str, dict[str, str]]]) -> str:
    """Load the version under ``folder`` (manifest.json + payload/), run it once, check; return the provider."""
    from edge.agent.validate_child import exercise, synthesize_inputs
    from edge.protocol.manifest import parse_manifest
    from edge.runtime.session import open_session

    manifest = parse_manifest((folder / "manifest.json").read_bytes())
    if manifest.llm is not None:
        from edge.runtime.model import load_model

        model = load_model(folder / "payload", manifest, None, threads=1)
        try:
            outputs = exercise(model)
        except Exception as exc:  # ORT raises untyped errors
            raise InferenceError(f"inference failed: {type(exc).__name__}: {exc}") from exc
        check_outputs(manifest.ref, outputs)
        return model.provider
    session = open_session(folder / "payload" / manifest.model_file, threads=1, providers=providers)
    names = [o.name for o in session.get_outputs()]
    try:
        results = session.run(names, synthesize_inputs(manifest, session))
    except Exception as exc:  # ORT raises untyped errors
        raise InferenceError(f"inference failed: {type(exc).__name__}: {exc}") from exc
    check_outputs(manifest.ref, dict(zip(names, results)))
    return session.get_providers()[0]


def main(argv: list[str] | None = None) -> int:
    """Child entry point: print one JSON line, exit 0 when the model answered sensibly."""
    parser = argparse.ArgumentParser(prog="python -m edge.agent.health")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--providers", default='[["CPUExecutionProvider", {}]]')
    args = parser.parse_args(argv)
    try:
        providers = [(str(p), dict(o)) for p, o in json.loads(args.providers)]
        provider = probe(args.folder, providers)
    except Exception as exc:  # every failure is reported as a reason, not a traceback
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(json.dumps({"ok": False, "error": message[:MAX_REASON]}), flush=True)
        return 1
    print(json.dumps({"ok": True, "provider": provider}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
