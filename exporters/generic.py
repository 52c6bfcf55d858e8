"""Bring-your-own ONNX models (vision and others): copy, check, quantize, measure.

The source is an untrusted file: its external-data paths must stay beside it (no ``..``, no
absolute paths, no symlinks), and it is first opened by onnxruntime in a child process, so a
crafted model that crashes onnxruntime fails the export instead of killing it. The reference
is the source file itself run in fp32 by onnxruntime, on the user's ``.npz`` samples or on
seeded random inputs shaped from the graph.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generator

import numpy as np
import onnx

from edge.errors import ConfigError, ExportError, ModelSourceError, UnsafePathError, UnsupportedModelError
from edge.protocol.enums import ModelKind, Precision
from edge.protocol.manifest import Manifest, TensorSpec
from edge.protocol.profile import MAX_OPSET, DeviceProfile, PrecisionPlan
from edge.runtime.model import NUMPY_DTYPES, LoadedModel, load_model
from edge.runtime.session import open_session
from edge.settings import environ_for_child

from exporters.encoder import build_threads
from exporters.fidelity import cosine_stats, cosines, flatten_outputs
from exporters.handler import Candidate, Exported, Feedback
from exporters.onnx_io import external_data_files, io_specs, load_graph_only
from exporters.quantize import (
    EXTERNAL_DATA_THRESHOLD, MODEL_NAME, convert_fp16, model_bytes, quantize_int8_dynamic, quantize_int8_static,
)
from exporters.samples import read_array_samples
from exporters.sensitivity import SensitivityProbe, can_probe, int8_search, probe_nodes, structural_order
from exporters.sources import Source

log = logging.getLogger(__name__)

# Random samples when the user gives none: enough for stable cosine statistics on a small model.
RANDOM_SAMPLES = 16
RANDOM_SEED = 0
# Symbolic dims of random inputs: the leading one is the batch; the others (sequence length,
# image height/width) get a size small enough to be fast and large enough for a few
# stride-2 stages.
BATCH_DIM, OTHER_DIM = 1, 32
# Integer inputs are usually indices (token ids, classes): keep them inside any table.
RANDOM_INT_HIGH = 8
# A model that takes longer than this just to load in the child process is treated as hostile.
VALIDATE_TIMEOUT_S = 300
LATENCY_WARMUP, LATENCY_RUNS = 3, 20
# Weight ops the int8 search may keep in float.
SEARCH_OP_TYPES = ("MatMul", "Conv", "Gemm")
# Ops whose presence makes static (calibrated QDQ) int8 worth trying after dynamic int8.
CONV_OPS = ("Conv", "ConvTranspose")


@dataclass
class GenericReference:
    """The source model's fp32 outputs on the sample inputs."""

    inputs: list[dict[str, np.ndarray]]
    outputs: list[list[np.ndarray]]
    output_names: list[str]
    per_sample_loss: dict[int, float] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Return the number of samples."""
        return len(self.inputs)


def _validate_in_child(model: Path) -> None:
    """Open the model with onnxruntime in a child process; refuse it if that fails or crashes."""
    code = "import sys, onnxruntime as ort; ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])"
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True,
                              timeout=VALIDATE_TIMEOUT_S, env=environ_for_child())
    except subprocess.TimeoutExpired as exc:
        raise ModelSourceError(f"{model} took over {VALIDATE_TIMEOUT_S} s to load; refusing it") from exc
    if proc.returncode < 0:
        raise ModelSourceError(f"{model} crashed onnxruntime (signal {-proc.returncode}) while loading; refusing it")
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise ModelSourceError(f"onnxruntime cannot load {model}: {detail[:500]}")


def _copy_source(src: Path, dest_dir: Path) -> Path:
    """Copy a model and its external data, refusing paths or links that leave its folder."""
    names = external_data_files(src)  # refuses absolute and '..' paths
    root = src.parent.resolve()
    dest_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = src.parent / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise ModelSourceError(f"{src} references external data {name!r}, which does not exist") from None
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{src}: external data {name!r} is a link or not a regular file")
        if root not in path.resolve().parents:
            raise UnsafePathError(f"{src}: external data {name!r} resolves outside {root}")
        (dest_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest_dir / name)
    out = dest_dir / MODEL_NAME
    shutil.copyfile(src, out)
    return out


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def random_inputs(specs: tuple[TensorSpec, ...], count: int = RANDOM_SAMPLES, seed: int = RANDOM_SEED) -> list[dict[str, np.ndarray]]:
    """Return ``count`` seeded random input sets shaped from the graph's declared inputs."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        feed = {}
        for spec in specs:
            shape = [d if isinstance(d, int) and d > 0 else (BATCH_DIM if i == 0 else OTHER_DIM)
                     for i, d in enumerate(spec.shape)]
            dtype = NUMPY_DTYPES.get(spec.dtype)
            if dtype is None:
                raise UnsupportedModelError(f"input {spec.name} has type {spec.dtype}; random samples cannot be made",
                                            hint="pass --samples inputs.npz")
            if np.issubdtype(dtype, np.floating):
                feed[spec.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype is np.bool_:
                feed[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
            else:
                feed[spec.name] = rng.integers(0, RANDOM_INT_HIGH, shape).astype(dtype)
        samples.append(feed)
    return samples


class GenericHandler:
    """Export, quantize and measure a bring-your-own ONNX model."""

    kind = ModelKind.GENERIC

    def __init__(self) -> None:
        self._checked_copy: Path | None = None  # the validated copy the reference runs, not the user's file
        self._latency_feed: dict[str, np.ndarray] | None = None

    def export(self, source: Source, profile: DeviceProfile, work: Path) -> Exported:
        """Copy and check the model, then apply portable graph optimizations for quantization."""
        graph = load_graph_only(source.path)
        opset = _opset(graph)
        if opset > MAX_OPSET:
            raise UnsupportedModelError(f"{source.path} uses ONNX opset {opset}; devices run opset {MAX_OPSET} at most",
                                        hint="re-export the model with a lower opset")
        if opset > profile.opset:
            log.warning("%s uses opset %d, newer than profile %s's %d", source.path, opset, profile.name, profile.opset)
        copied = _copy_source(source.path, work / "source")
        _validate_in_child(copied)
        self._checked_copy = copied
        out = work / "fp32" / MODEL_NAME
        out.parent.mkdir(parents=True)
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            # Shape inference plus onnxruntime's basic, provider-independent optimizations
            # (constant folding, Conv+BatchNorm fusion): what quantization wants to see.
            large = model_bytes(copied) > EXTERNAL_DATA_THRESHOLD
            quant_pre_process(str(copied), str(out), save_as_external_data=large, all_tensors_to_one_file=True,
                              external_data_location=f"{MODEL_NAME}.data" if large else None)
        except Exception as exc:  # the pre-processor fails on exotic graphs: ship the model as given
            log.warning("graph pre-processing of %s failed (%s); using it as given", source.path, exc)
            shutil.rmtree(out.parent)
            shutil.copytree(copied.parent, out.parent)
        return Exported(model=out)

    def reference(self, source: Source, exported: Exported, samples: Path | None) -> GenericReference:
        """Run the source model in fp32 onnxruntime on the samples."""
        specs, out_specs = io_specs(exported.model)
        if samples is not None:
            inputs = read_array_samples(samples)
            names = {s.name for s in specs}
            given = set(inputs[0])
            if given != names:
                raise ConfigError(
                    f"sample file {samples} has arrays {sorted(given)}, the model takes {sorted(names)}",
                    hint="save one array per model input, named after it",
                )
            want = {s.name: NUMPY_DTYPES.get(s.dtype) for s in specs}
            inputs = [{k: v.astype(want[k]) if want[k] is not None else v for k, v in feed.items()} for feed in inputs]
        else:
            inputs = random_inputs(specs)
        session = open_session(self._checked_copy or source.path)
        names = [o.name for o in out_specs]
        outputs = []
        for i, feed in enumerate(inputs):
            try:
                outputs.append(session.run(names, feed))
            except Exception as exc:  # ORT's errors are untyped
                where = f"sample {i} of {samples}" if samples else "random inputs"
                raise ExportError(f"the source model fails on {where}: {exc}",
                                  hint="pass real inputs with --samples inputs.npz (one array per input)") from exc
        self._latency_feed = inputs[0]
        return GenericReference(inputs, outputs, names)

    def candidates(
        self, exported: Exported, precision: Precision, plan: PrecisionPlan, profile: DeviceProfile,
        work: Path, reference: GenericReference,
    ) -> Generator[Candidate, Feedback, None]:
        """Yield fp32 as optimized, fp16, or the int8 search (dynamic, then calibrated static for conv nets)."""
        if precision is Precision.FP32:
            yield Candidate(exported.model.parent, Precision.FP32, {"method": "none"})
        elif precision is Precision.FP16:
            s = plan.fp16_settings()
            folder = convert_fp16(exported.model, work / "fp16", keep_io_types=s.keep_io_types, op_block_list=s.op_block_list)
            yield Candidate(folder.parent, Precision.FP16, {
                "method": "fp16", "keep_io_types": s.keep_io_types, "op_block_list": list(s.op_block_list),
                "measured": "on the build machine's CPUExecutionProvider (fp16 storage, fp32 arithmetic)",
            })
        elif precision is Precision.INT8:
            yield from self._int8(exported, plan, profile, work, reference)
        else:
            log.info("generic models have no %s path; skipping it", precision.value)

    def _int8(self, exported: Exported, plan: PrecisionPlan, profile: DeviceProfile, work: Path,
              reference: GenericReference) -> Generator[Candidate, Feedback, None]:
        settings = plan.int8_settings()
        graph = load_graph_only(exported.model)
        has_conv = any(n.op_type in CONV_OPS for n in graph.graph.node)
        methods = ("dynamic", "static") if has_conv else ("dynamic",)
        nodes = probe_nodes(exported.model, SEARCH_OP_TYPES)
        counter = iter(range(1, 1000))

        def build(step) -> Candidate:
            folder = work / f"int8-{next(counter)}"
            common = dict(per_channel=step.per_channel, reduce_range=step.reduce_range,
                          exclude_op_types=step.exclude_op_types, exclude_nodes=step.excluded_nodes)
            if step.method == "static":
                quantize_int8_static(exported.model, folder, reference.inputs, **common)
            else:
                quantize_int8_dynamic(exported.model, folder, **common)
            settings_out = step.record()
            if step.method == "static":
                settings_out.update(calibration="minmax", calibration_samples=reference.count)
            return Candidate(folder, Precision.INT8, settings_out)

        def rank(step) -> list[tuple[str, float]]:
            if not can_probe(exported.model):
                return structural_order(nodes)
            return self._rank_nodes(exported, nodes, step, profile, reference)

        yield from int8_search(settings, self.thresholds(None, profile), build, rank,  # type: ignore[arg-type]
                               methods=methods, candidate_nodes=nodes)

    @staticmethod
    def _rank_nodes(exported: Exported, nodes: list[str], step, profile: DeviceProfile,
                    reference: GenericReference) -> list[tuple[str, float]]:
        started = time.perf_counter()
        probe = SensitivityProbe(exported.model, nodes, per_channel=step.per_channel, reduce_range=step.reduce_range,
                                 threads=build_threads(profile))
        losses = reference.per_sample_loss
        picked = sorted(losses, key=lambda i: -losses[i])[:16] if losses else list(range(min(reference.count, 16)))
        feeds = [reference.inputs[i] for i in picked]
        order = [probe.output_names.index(n) for n in reference.output_names]
        refs = [flatten_outputs(reference.outputs[i])[None, :] for i in picked]

        def loss(j: int, outputs: list[np.ndarray]) -> float:
            vec = flatten_outputs([outputs[k] for k in order])[None, :]
            return float(1.0 - cosines(refs[j], vec)[0])

        ranking = probe.rank(feeds, loss)
        log.info("probed %d nodes on %d samples in %.1f s", len(nodes), len(feeds), time.perf_counter() - started)
        return ranking

    def measure(self, folder: Path, manifest: Manifest, reference: GenericReference,
                profile: DeviceProfile) -> dict[str, float]:
        """Run the payload through the device runtime; cosine of all outputs, flattened, per sample."""
        model = load_model(folder, manifest, profile, threads=build_threads(profile))
        names = reference.output_names
        refs = np.stack([flatten_outputs(ref) for ref in reference.outputs])
        single = np.stack([flatten_outputs([got[n] for n in names])
                           for got in (model.infer(inputs, names) for inputs in reference.inputs)])
        cos = cosines(refs, single)
        reference.per_sample_loss = {i: float(1.0 - c) for i, c in enumerate(cos)}
        metrics = {}
        batched = self._batched_cosines(model, reference, refs)
        if batched is not None:  # dynamic int8 depends on the batch: gate on the worse of the two
            metrics["cosine_mean_batch1"] = float(cos.mean())
            metrics["cosine_mean_batched"] = float(batched.mean())
            cos = np.minimum(cos, batched)
        return {**cosine_stats(cos), **metrics}

    @staticmethod
    def _batched_cosines(model: LoadedModel, reference: GenericReference, refs: np.ndarray) -> np.ndarray | None:
        """Run every sample in one batch when the inputs allow it; return per-sample cosines."""
        specs = model.manifest.inputs
        if reference.count < 2 or not all(s.shape and not isinstance(s.shape[0], int) for s in specs):
            return None
        if any(v.shape[0] != 1 for feed in reference.inputs for v in feed.values()):
            return None
        try:
            feed = {k: np.concatenate([f[k] for f in reference.inputs]) for k in reference.inputs[0]}
        except ValueError:  # samples of different shapes cannot share a batch
            return None
        got = model.infer(feed, reference.output_names)
        if any(got[n].shape[:1] != (reference.count,) for n in reference.output_names):
            return None  # an output without a batch axis: nothing to split per sample
        rows = np.stack([flatten_outputs([got[n][i] for n in reference.output_names]) for i in range(reference.count)])
        return cosines(refs, rows)

    def thresholds(self, manifest: Manifest | None, profile: DeviceProfile) -> dict[str, tuple[str, float]]:
        """Return the profile's generic cosine bounds."""
        g = profile.fidelity.generic
        return {"cosine_mean": (">=", g.cosine_mean_min), "cosine_p5": (">=", g.cosine_p5_min)}

    def latency(self, folder: Path, manifest: Manifest, profile: DeviceProfile) -> dict[str, float]:
        """Return the median ms of batch 1 (and batch 8 when the leading dim is free) on random inputs."""
        model = load_model(folder, manifest, profile, threads=build_threads(profile))
        base = self._latency_feed if self._latency_feed is not None else random_inputs(manifest.inputs, count=1)[0]
        feeds = {1: base}
        if all(s.shape and not isinstance(s.shape[0], int) for s in manifest.inputs):
            feeds[8] = {k: np.concatenate([v] * 8) for k, v in base.items()}
        out = {}
        for size, feed in feeds.items():
            for _ in range(LATENCY_WARMUP):
                model.infer(feed)
            times = []
            for _ in range(LATENCY_RUNS):
                t0 = time.perf_counter()
                model.infer(feed)
                times.append((time.perf_counter() - t0) * 1000)
            out[f"batch{size}_p50"] = round(float(np.median(times)), 3)
        return out
