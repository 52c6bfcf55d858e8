"""A loaded model: a bundle's payload folder opened with ONNX Runtime.

Kinds (chosen from the manifest's task):

* :class:`LoadedModel` runs raw tensors (Open Inference Protocol ``infer``); every kind has it.
* ``edge.runtime.encoder.EncoderModel`` adds ``embed(texts)`` and ``classify(texts)``.
* ``edge.runtime.generator.LLMModel`` adds chat templating and KV-cache generation.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import InferenceError, RequestError
from edge.protocol.enums import Task
from edge.protocol.manifest import Manifest, TensorSpec
from edge.protocol.profile import DeviceProfile
from edge.runtime.session import open_session

# numpy dtype for each manifest dtype name
NUMPY_DTYPES = {
    "float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
    "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16,
    "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
}  # fmt: skip


@dataclass(frozen=True)
class ModelRef:
    """Where a model was loaded from."""

    folder: Path
    manifest: Manifest


class LoadedModel:
    """A bundle's ONNX model in an ORT session, with raw-tensor inference."""

    # Whether ORT's idle pool threads busy-wait for the next op (see session_options).
    SPINNING = True

    def __init__(self, folder: Path, manifest: Manifest, profile: DeviceProfile | None = None,
                 threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.profile = profile
        self.session = open_session(self.folder / manifest.model_file, profile, threads, spinning=self.SPINNING)
        # Looked up on every raw-tensor request: built once.
        self._input_specs = {s.name: s for s in manifest.inputs}
        self._output_names = [o.name for o in manifest.outputs]
        self.provider = self.session.get_providers()[0]
        # ORT sessions are thread-safe for run(); the lock serializes callers that reuse buffers.
        self.lock = threading.Lock()

    @property
    def name(self) -> str:
        """Return the model name."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """Return the model version."""
        return self.manifest.version

    def input_specs(self) -> tuple[TensorSpec, ...]:
        """Return the declared inputs."""
        return self.manifest.inputs

    def output_specs(self) -> tuple[TensorSpec, ...]:
        """Return the declared outputs."""
        return self.manifest.outputs

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        """Refuse missing, unknown, wrongly typed or wrongly shaped inputs with a clear message."""
        specs = self._input_specs
        unknown = sorted(set(inputs) - set(specs))
        if unknown:
            raise RequestError(f"unknown input(s) {', '.join(unknown)}; expected {', '.join(specs)}")
        missing = sorted(set(specs) - set(inputs))
        if missing:
            raise RequestError(f"missing input(s) {', '.join(missing)}")
        for name, arr in inputs.items():
            spec = specs[name]
            want = NUMPY_DTYPES.get(spec.dtype)
            if want is not None and arr.dtype != want:
                raise RequestError(f"input {name} has dtype {arr.dtype}, expected {spec.dtype}")
            if len(arr.shape) != len(spec.shape):
                raise RequestError(f"input {name} has shape {list(arr.shape)}, expected rank {len(spec.shape)} {list(spec.shape)}")
            for got, dim in zip(arr.shape, spec.shape):
                if isinstance(dim, int) and dim >= 0 and got != dim:
                    raise RequestError(f"input {name} has shape {list(arr.shape)}, expected {list(spec.shape)}")

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model on raw tensors and return the named outputs."""
        self.check_inputs(inputs)
        names = outputs or self._output_names
        try:
            result = self.session.run(names, inputs)
        except Exception as exc:  # ORT's errors are untyped; translate once, here
            raise InferenceError(f"{self.manifest.ref}: inference failed: {exc}") from exc
        return dict(zip(names, result))


def load_model(folder: Path, manifest: Manifest, profile: DeviceProfile | None = None,
               threads: int | None = None) -> LoadedModel:
    """Open a bundle's payload folder as the right kind of loaded model."""
    if manifest.task in (Task.FEATURE_EXTRACTION, Task.TEXT_CLASSIFICATION):
        from edge.runtime.encoder import EncoderModel

        return EncoderModel(folder, manifest, profile, threads)
    if manifest.task is Task.TEXT_GENERATION:
        from edge.runtime.generator import LLMModel

        return LLMModel(folder, manifest, profile, threads)
    if manifest.task is Task.GENERIC:
        return LoadedModel(folder, manifest, profile, threads)
    raise InferenceError(f"no runtime for task {manifest.task.value}")
