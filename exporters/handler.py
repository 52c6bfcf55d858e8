"""The contract each model kind (encoder, LLM, generic ONNX) implements for the pipeline.

The pipeline drives a handler through: export an fp32 ONNX model, compute reference outputs of
the source model once, then for each precision the profile allows, a sequence of quantized
candidates; each candidate is measured against the reference and the first that passes the
profile's thresholds is packed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator, Protocol

from edge.errors import ConfigError, ExportError
from edge.protocol.enums import ModelKind, Precision
from edge.protocol.manifest import Manifest
from edge.protocol.profile import DeviceProfile, PrecisionPlan

from exporters.sources import Source


@dataclass
class Exported:
    """An fp32 ONNX export plus the files and specs the device needs beside it."""

    model: Path  # fp32 model.onnx in the work folder (external data beside it, if any)
    extras: dict[str, tuple[Path, str]] = field(default_factory=dict)  # payload name -> (file, role)
    specs: dict[str, Any] = field(default_factory=dict)  # manifest fields: pooling, llm, classifier
    fp32_metrics: dict[str, float] = field(default_factory=dict)  # fidelity of the fp32 export


@dataclass
class Candidate:
    """One quantized (or converted) model to try: a folder holding model.onnx [+ data]."""

    folder: Path
    precision: Precision
    settings: dict[str, Any]
    specs: dict[str, Any] = field(default_factory=dict)  # manifest fields overriding Exported.specs


# What a candidate generator receives back: the metrics and whether the gate passed.
Feedback = tuple[dict[str, float], bool]


class Handler(Protocol):
    """Export, quantize and measure one model kind."""

    kind: ModelKind

    def export(self, source: Source, profile: DeviceProfile, work: Path) -> Exported:
        """Export the source to an fp32 ONNX model under ``work``."""

    def reference(self, source: Source, exported: Exported, samples: Path | None) -> Any:
        """Run the source model on the sample set once and keep what ``measure`` compares to."""

    def candidates(
        self, exported: Exported, precision: Precision, plan: PrecisionPlan, profile: DeviceProfile,
        work: Path, reference: Any,
    ) -> Generator[Candidate, Feedback, None]:
        """Yield candidates for one precision; each receives the previous one's feedback."""

    def measure(self, folder: Path, manifest: Manifest, reference: Any, profile: DeviceProfile) -> dict[str, float]:
        """Run the payload folder with the device runtime and return fidelity metrics."""

    def thresholds(self, manifest: Manifest, profile: DeviceProfile) -> dict[str, tuple[str, float]]:
        """Return metric -> (">=" or "<=", bound) from the profile."""

    def latency(self, folder: Path, manifest: Manifest, profile: DeviceProfile) -> dict[str, float]:
        """Measure latency on the build machine with the device runtime."""


# Registered handler classes per kind: module path and class name, imported lazily.
_HANDLERS: dict[ModelKind, str] = {
    ModelKind.ENCODER: "exporters.encoder:EncoderHandler",
    ModelKind.LLM: "exporters.llm:LLMHandler",
    ModelKind.GENERIC: "exporters.generic:GenericHandler",
}


def handler_for(kind: ModelKind) -> Handler:
    """Return a new handler for a model kind."""
    try:
        target = _HANDLERS[kind]
    except KeyError:
        raise ExportError(f"no exporter for model kind {kind.value}", hint=f"known: {', '.join(k.value for k in _HANDLERS)}") from None
    module, cls = target.split(":")
    try:
        return getattr(importlib.import_module(module), cls)()
    except ImportError as exc:
        raise ConfigError(
            f"exporting {kind.value} models needs {exc.name or 'a missing library'}, which is not installed",
            hint="install the build-machine extra: pip install 'edge-fleet[export]'",
        ) from exc


def gate(metrics: dict[str, float], thresholds: dict[str, tuple[str, float]]) -> list[str]:
    """Return the failures of ``metrics`` against ``thresholds`` (empty when it passes)."""
    failures = []
    for name, (op, bound) in thresholds.items():
        value = metrics.get(name)
        if value is None:
            failures.append(f"{name} was not measured")
        elif op == ">=" and not value >= bound:
            failures.append(f"{name} {value:.4f} < {bound} (short by {bound - value:.4f})")
        elif op == "<=" and not value <= bound:
            failures.append(f"{name} {value:.4f} > {bound} (over by {value - bound:.4f})")
    return failures
