"""Trial-load a model in a child process, so a crafted model can crash only that child.

The parent (:func:`validate_in_child`) runs ``python -m edge.agent.validate_child FOLDER`` with a
timeout; the child caps its own address space, refuses external-data references that leave
the payload, opens the model with :func:`edge.runtime.session.open_session`, runs it once on
inputs synthesized from the manifest and prints one JSON line. A segfault, an abort, a memory
cap hit or a hang becomes a :class:`~edge.errors.ModelValidationError` in the parent.

The child sets its limits itself instead of in ``preexec_fn``: ``preexec_fn`` is unsafe when
the parent has threads (the agent's HTTP server does).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from edge import settings
from edge.errors import ModelValidationError, UnsafePathError
from edge.protocol.manifest import Manifest

# Output kept from a failing child: enough for ORT's message, bounded for a flood of logs.
MAX_REPORTED_OUTPUT = 2000
# Address space a child needs beyond the model itself: Python, numpy, onnx and onnxruntime
# map ~1 GiB of virtual memory before loading anything (measured on x86-64, ORT 1.32).
BASE_ADDRESS_SPACE_MB = 2048
# Linux prctl option that signals the child when its parent dies (so a SIGKILLed agent
# leaves no validation process behind).
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ValidationReport:
    """What the child saw: the provider ORT chose and the shape of every output."""

    provider: str
    outputs: dict[str, list[int]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-able data."""
        return {"provider": self.provider, "outputs": self.outputs, "seconds": round(self.seconds, 3)}


def memory_cap_mb(manifest: Manifest, providers: list[tuple[str, dict[str, str]]]) -> int | None:
    """Return the child's address-space cap, or None for GPU providers (CUDA maps huge ranges)."""
    if any(name in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for name, _ in providers):
        return None
    payload_mb = manifest.payload_size() >> 20
    return BASE_ADDRESS_SPACE_MB + max(manifest.min_ram_mb, 3 * payload_mb)


def validate_in_child(
    folder: Path,
    manifest: Manifest,
    providers: list[tuple[str, dict[str, str]]],
    timeout_s: float,
    memory_mb: int | None,
) -> ValidationReport:
    """Load and run the model under ``folder`` (manifest.json + payload/) in a child process."""
    cmd = [sys.executable, "-m", "edge.agent.validate_child", str(folder),
           "--providers", json.dumps(providers), "--parent", str(os.getpid())]
    if memory_mb is not None:
        cmd += ["--memory-mb", str(memory_mb)]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s,
                              env=settings.environ_for_child(), cwd=folder)
    except subprocess.TimeoutExpired:
        raise ModelValidationError(
            f"{manifest.ref}: the model did not load and run once within {timeout_s:g} s",
            hint="a crafted or far too large model; the install was abandoned",
        ) from None
    except OSError as exc:
        raise ModelValidationError(f"{manifest.ref}: cannot start the validation process: {exc}") from exc
    out = proc.stdout.decode(errors="replace").strip().splitlines()
    result: dict[str, Any] = {}
    if out:
        try:
            result = json.loads(out[-1])
        except json.JSONDecodeError:
            result = {}
    if proc.returncode < 0:
        signum = -proc.returncode
        name = signal.Signals(signum).name if signum in signal.valid_signals() else f"signal {signum}"
        raise ModelValidationError(
            f"{manifest.ref}: loading the model killed the validation process with {name}",
            hint="the model crashes onnxruntime (crafted or corrupt); the agent was not affected",
        )
    if proc.returncode != 0 or not result.get("ok"):
        detail = result.get("error") or proc.stderr.decode(errors="replace").strip()[-MAX_REPORTED_OUTPUT:]
        raise ModelValidationError(f"{manifest.ref}: the model failed its trial run: {detail or 'no output'}")
    return ValidationReport(str(result.get("provider")), dict(result.get("outputs", {})), time.monotonic() - started)


# ---------------------------------------------------------------------------------- the child


def _limit_self(memory_mb: int | None, parent: int | None) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash must not write a core into the store
    if memory_mb is not None:
        cap = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if parent is not None and sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)


def check_external_data(model_path: Path, manifest: Manifest) -> None:
    """Refuse external-data references outside the payload or not listed in the manifest."""
    import onnx

    from edge.protocol.bundle import check_payload_name

    model = onnx.load(str(model_path), load_external_data=False)
    listed = {f.path for f in manifest.files}
    base = PurePosixPath(manifest.model_file).parent
    for tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        try:
            check_payload_name(location)  # no absolute paths, no '..', no backslashes
        except UnsafePathError as exc:
            raise ValueError(f"tensor {tensor.name!r} reads external data outside the payload: {exc}") from None
        rel = (base / location).as_posix()
        if rel not in listed:
            raise ValueError(f"tensor {tensor.name!r} reads external data {location!r}, which the manifest does not list")


def _tensors(model: Any) -> list[Any]:
    found: list[Any] = []

    def graph(g: Any) -> None:
        found.extend(g.initializer)
        for sparse in g.sparse_initializer:
            found.extend((sparse.values, sparse.indices))
        nodes(g.node)

    def nodes(ns: Any) -> None:
        for n in ns:
            for a in n.attribute:
                if a.HasField("t"):
                    found.append(a.t)
                found.extend(a.tensors)
                if a.HasField("g"):
                    graph(a.g)
                for sub in a.graphs:
                    graph(sub)

    graph(model.graph)
    for fn in model.functions:
        nodes(fn.node)
    return found


def synthesize_inputs(manifest: Manifest, session: Any) -> dict[str, Any]:
    """Build one input per model input: symbolic dims 1, empty KV cache for text generation."""
    import numpy as np

    from edge.runtime.model import NUMPY_DTYPES

    specs = {s.name: s for s in manifest.inputs}
    model_inputs = {i.name: i for i in session.get_inputs()}
    if set(specs) != set(model_inputs):
        raise ValueError(f"the manifest declares inputs {sorted(specs)}, the model takes {sorted(model_inputs)}")
    past = set()
    if manifest.llm is not None:
        for layer in range(manifest.llm.num_layers):
            past.add(manifest.llm.past_key_name.format(layer=layer))
            past.add(manifest.llm.past_value_name.format(layer=layer))
    feeds = {}
    for name, spec in specs.items():
        if name in past:
            llm = manifest.llm
            assert llm is not None
            feeds[name] = np.zeros((1, llm.num_kv_heads, 0, llm.head_dim), NUMPY_DTYPES[llm.kv_dtype])
            continue
        shape = tuple(d if isinstance(d, int) and d >= 0 else 1 for d in spec.shape)
        if spec.dtype == "string":
            feeds[name] = np.full(shape, "", dtype=object)
        elif spec.dtype not in NUMPY_DTYPES:
            raise ValueError(f"cannot synthesize a {spec.dtype} input for {name}")
        elif "attention_mask" in name:
            feeds[name] = np.ones(shape, NUMPY_DTYPES[spec.dtype])
        else:
            feeds[name] = np.zeros(shape, NUMPY_DTYPES[spec.dtype])
    return feeds


def run_trial(folder: Path, providers: list[tuple[str, dict[str, str]]]) -> dict[str, Any]:
    """Open the model under ``folder`` and run it once; return what the parent reports."""
    from edge.protocol.manifest import parse_manifest
    from edge.runtime.session import open_session

    manifest = parse_manifest((folder / "manifest.json").read_bytes())
    model_path = folder / "payload" / manifest.model_file
    check_external_data(model_path, manifest)
    if manifest.llm is not None:
        return _trial_llm(folder / "payload", manifest)
    session = open_session(model_path, threads=1, providers=providers)
    names = [o.name for o in session.get_outputs()]
    missing = [o.name for o in manifest.outputs if o.name not in names]
    if missing:
        raise ValueError(f"the manifest declares output(s) {', '.join(missing)}, the model has {', '.join(names)}")
    results = session.run(names, synthesize_inputs(manifest, session))
    return {"provider": session.get_providers()[0],
            "outputs": {n: [int(d) for d in getattr(r, "shape", ())] for n, r in zip(names, results)}}


def exercise(model: Any) -> dict[str, Any]:
    """Run a loaded model once the way serving will: an LLM scores two tokens through its
    generator (its KV layout needs it), any other model runs on synthesized tensors."""
    if model.manifest.llm is not None:
        llm = model.manifest.llm
        first = llm.bos_token_id if llm.bos_token_id is not None else 0
        return {"logprobs": model.score([first, first])}
    return model.infer(synthesize_inputs(model.manifest, model.session))


def _trial_llm(payload: Path, manifest: Any) -> dict[str, Any]:
    """Load an LLM with the device runtime and exercise it."""
    import numpy as np

    from edge.runtime.model import load_model

    model = load_model(payload, manifest, None, threads=1)
    outputs = exercise(model)
    if not all(np.all(np.isfinite(v)) for v in outputs.values()):
        raise ValueError("the model produced non-finite outputs")
    return {"provider": model.provider, "outputs": {n: [int(d) for d in v.shape] for n, v in outputs.items()}}


def main(argv: list[str] | None = None) -> int:
    """Child entry point: print one JSON line, exit 0 when the model ran."""
    parser = argparse.ArgumentParser(prog="python -m edge.agent.validate_child")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--providers", default='[["CPUExecutionProvider", {}]]')
    parser.add_argument("--memory-mb", type=int, default=None)
    parser.add_argument("--parent", type=int, default=None)
    args = parser.parse_args(argv)
    _limit_self(args.memory_mb, args.parent)
    from edge.agent import faults

    faults.reach("validate-child", signal.SIGSEGV)  # as a crafted model crashing ORT would
    try:
        providers = [(str(p), dict(o)) for p, o in json.loads(args.providers)]
        report = run_trial(args.folder, providers)
    except MemoryError:
        print(json.dumps({"ok": False, "error": f"over the {args.memory_mb} MB memory cap"}), flush=True)
        return 1
    except Exception as exc:  # every failure of a crafted model is reported, not raised
        message = " ".join(str(exc).split()) or "(no message)"
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {message[:MAX_REPORTED_OUTPUT]}"}), flush=True)
        return 1
    print(json.dumps({"ok": True, **report}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
