"""Create ONNX Runtime sessions the way a device profile asks for them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnxruntime as ort

from edge.errors import CompatibilityError, InferenceError
from edge.protocol.profile import DeviceProfile

log = logging.getLogger(__name__)


def available_providers() -> list[str]:
    """Return the execution providers this onnxruntime build offers."""
    return list(ort.get_available_providers())


def physical_cores() -> int:
    """Return the number of cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def usable_providers(profile: DeviceProfile, strict: bool = False) -> list[tuple[str, dict[str, str]]]:
    """Return the profile's providers this build offers, in the profile's order.

    With ``strict`` every provider but the CPU fallback must be available.
    """
    offered = set(available_providers())
    chosen, missing = [], []
    for name, options in profile.providers():
        if name in offered:
            chosen.append((name, options))
        else:
            missing.append(name)
    if strict and missing:
        raise CompatibilityError(
            f"profile {profile.name} needs {', '.join(missing)}, which this onnxruntime lacks",
            hint=f"available: {', '.join(sorted(offered))}",
        )
    if not chosen:
        raise CompatibilityError(f"none of the providers of profile {profile.name} is available")
    return chosen


def session_options(threads: int | None, inter_op: int = 1, spinning: bool = True) -> ort.SessionOptions:
    """Return session options with explicit thread pools and full graph optimization.

    Without ``spinning`` idle pool threads sleep at once instead of busy-waiting for the next
    op: slower to wake, but they leave the cores to the rest of the process.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads if threads else physical_cores()
    so.inter_op_num_threads = inter_op
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def open_session(
    model: Path | bytes,
    profile: DeviceProfile | None = None,
    threads: int | None = None,
    providers: list[tuple[str, dict[str, str]]] | None = None,
    spinning: bool = True,
) -> ort.InferenceSession:
    """Open an ORT session for a model file with the profile's providers and threads."""
    if providers is None:
        providers = usable_providers(profile) if profile else [("CPUExecutionProvider", {})]
    if threads is None and profile is not None:
        threads = profile.threads.intra_op or None
    so = session_options(threads, profile.threads.inter_op if profile else 1, spinning)
    names = [p for p, _ in providers]
    opts = [o for _, o in providers]
    try:
        src = model if isinstance(model, bytes) else str(model)
        return ort.InferenceSession(src, sess_options=so, providers=names, provider_options=opts)
    except Exception as exc:  # ORT raises its own untyped errors (Fail, InvalidGraph, ...)
        where = "model bytes" if isinstance(model, bytes) else str(model)
        raise InferenceError(f"onnxruntime cannot load {where}: {exc}") from exc
