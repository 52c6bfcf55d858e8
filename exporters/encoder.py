"""Encoders (BERT family): sentence embeddings and text classification.

Export goes through optimum's ``main_export`` with the plain transformers head (token embeddings
or logits); pooling and normalization run on the device in numpy, from ``manifest.pooling``,
so one ONNX graph serves every sentence-transformers pooling mode. The reference is the source
model in torch with its transformers tokenizer, pooled as sentence-transformers pools; the
candidate is measured through the device runtime (``tokenizers`` + onnxruntime + numpy), so a
tokenizer or pooling mismatch shows up in the gate as well as quantization error.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator

import numpy as np

from edge.errors import ExportError, ModelSourceError, UnsupportedModelError
from edge.protocol.enums import ModelKind, Precision, Task
from edge.protocol.manifest import Manifest, Pooling
from edge.protocol.profile import DeviceProfile, PrecisionPlan
from edge.runtime.encoder import EncoderModel, pool
from edge.runtime.model import load_model
from edge.runtime.session import physical_cores
from edge.runtime.tokenizer import TextTokenizer

from exporters.fidelity import cosine_stats, cosines, top1_agreement
from exporters.handler import Candidate, Exported, Feedback
from exporters.quantize import convert_fp16, quantize_int8_dynamic
from exporters.samples import read_text_samples, sample_texts
from exporters.sensitivity import SensitivityProbe, can_probe, int8_search, probe_nodes, structural_order
from exporters.sources import Source
from exporters.st_layout import check_weights, read_classifier, read_json, read_pooling, st_max_length, st_pool

log = logging.getLogger(__name__)

# Texts per torch forward pass for the reference: sorted by length, so padding stays small.
REFERENCE_BATCH = 16
# Samples the sensitivity probe runs per node: the ones the failed candidate got most wrong.
PROBE_SAMPLES = 16
# Latency: warm-up runs, then timed runs whose median is reported.
LATENCY_WARMUP, LATENCY_RUNS = 3, 20
# Ops kept in fp32 by the second fp16 attempt: reductions and normalizations lose the most in fp16.
FP16_SENSITIVE_OPS = ("LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Softmax", "Erf")
# Extras shipped beside the model: payload name -> role.
_EXTRA_ROLES = {
    "tokenizer.json": "tokenizer", "tokenizer_config.json": "tokenizer_config", "config.json": "config",
    "special_tokens_map.json": "other", "modules.json": "config", "sentence_bert_config.json": "config",
    "1_Pooling/config.json": "pooling_config",
}  # fmt: skip


@dataclass
class EncoderReference:
    """What the source model produced on the sample set."""

    texts: list[str]
    outputs: np.ndarray  # pooled embeddings [n, dim] or logits [n, labels], float32
    task: Task
    per_sample_loss: dict[int, float] = field(default_factory=dict)  # of the last measured candidate

    @property
    def count(self) -> int:
        """Return the number of samples."""
        return len(self.texts)


def build_threads(profile: DeviceProfile) -> int:
    """Return the threads to measure with here: the profile's, capped at this machine's cores."""
    cores = physical_cores()
    return min(profile.threads.intra_op, cores) if profile.threads.intra_op else cores


class EncoderHandler:
    """Export, quantize and measure BERT-family encoders."""

    kind = ModelKind.ENCODER

    # --- export -----------------------------------------------------------------------------
    def export(self, source: Source, profile: DeviceProfile, work: Path) -> Exported:
        """Export the source to fp32 ONNX with optimum and gather what the device needs beside it."""
        folder = source.path
        config = read_json(folder / "config.json")
        check_weights(folder)
        specs: dict[str, Any] = {}
        extra_files: dict[str, Path] = {}
        if source.task is Task.FEATURE_EXTRACTION:
            pooling, pooling_files = read_pooling(folder)
            specs["pooling"] = pooling
            extra_files.update(pooling_files)
        else:
            specs["classifier"] = read_classifier(config)
        onnx_dir = work / "onnx"
        self._main_export(source, profile, onnx_dir)
        model = onnx_dir / "model.onnx"
        if not model.is_file():
            raise ExportError(f"optimum wrote no model.onnx for {folder}")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
            # The source's own files are the ones the user tested; optimum's re-saved copies
            # stand in only when the source lacks them (e.g. a vocab.txt-only BERT folder).
            for candidate in (folder / name, onnx_dir / name):
                if candidate.is_file():
                    extra_files[name] = candidate
                    break
        if "tokenizer.json" not in extra_files:
            raise ModelSourceError(
                f"{folder} has no fast tokenizer (tokenizer.json) and none could be converted",
                hint="save the tokenizer with a transformers fast tokenizer, which writes tokenizer.json",
            )
        # Lay the extras out as they will be in the payload, so the device tokenizer can read them
        # here too (the sensitivity probe tokenizes with it).
        device_dir = work / "device"
        extras: dict[str, tuple[Path, str]] = {}
        for name, src in extra_files.items():
            dest = device_dir / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            extras[name] = (dest, _EXTRA_ROLES.get(name, "other"))
        try:
            TextTokenizer.from_folder(device_dir)
        except Exception as exc:
            raise ModelSourceError(f"{folder}/tokenizer.json cannot be loaded by the tokenizers library: {exc}") from exc
        self._check_inputs(model)
        return Exported(model=model, extras=extras, specs=specs)

    @staticmethod
    def _main_export(source: Source, profile: DeviceProfile, out: Path) -> None:
        try:
            from optimum.exporters.onnx import main_export
        except ImportError as exc:  # pragma: no cover - the export extra installs it
            raise ExportError("optimum-onnx is not installed", hint="pip install 'edge-fleet[export]'") from exc
        task = "feature-extraction" if source.task is Task.FEATURE_EXTRACTION else "text-classification"
        try:
            main_export(
                str(source.path), out, task=task, opset=profile.opset, device="cpu", local_files_only=True,
                # The plain transformers head: pooling runs on the device from manifest.pooling.
                library_name="transformers",
                # The fidelity gate compares against the source on real text; optimum's own check
                # on random inputs would only repeat it, slower.
                do_validation=False,
            )
        except (OSError, EnvironmentError) as exc:
            raise ModelSourceError(f"cannot load {source.path}: {exc}") from exc
        except (KeyError, ValueError) as exc:
            if "not supported" in str(exc) or "Unrecognized" in str(exc):
                raise UnsupportedModelError(f"optimum cannot export {source.path} for {task}: {exc}") from exc
            raise ExportError(f"ONNX export of {source.path} failed: {exc}") from exc
        except Exception as exc:  # torch.onnx and optimum raise many unrelated types
            raise ExportError(f"ONNX export of {source.path} failed: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _check_inputs(model: Path) -> None:
        from exporters.onnx_io import io_specs

        inputs, _ = io_specs(model)
        names = {i.name for i in inputs}
        if not {"input_ids", "attention_mask"} <= names:
            raise ExportError(f"exported encoder has inputs {sorted(names)}; expected input_ids and attention_mask")

    # --- reference --------------------------------------------------------------------------
    def reference(self, source: Source, exported: Exported, samples: Path | None) -> EncoderReference:
        """Run the source model in torch on the samples, pooled exactly as sentence-transformers does."""
        import torch
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        texts = read_text_samples(samples) if samples else sample_texts()
        folder = source.path
        loader = AutoModel if source.task is Task.FEATURE_EXTRACTION else AutoModelForSequenceClassification
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model = loader.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32).eval()
        except Exception as exc:  # transformers raises OSError, ValueError and its own types
            raise ModelSourceError(f"transformers cannot load {folder}: {exc}") from exc
        max_length, lowercase = st_max_length(folder, model.config, tokenizer)
        accepted = set(inspect.signature(model.forward).parameters)  # DistilBERT takes no token_type_ids
        pooling: Pooling | None = exported.specs.get("pooling")
        out: list[np.ndarray | None] = [None] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), REFERENCE_BATCH):
                idx = order[start : start + REFERENCE_BATCH]
                batch = [texts[i].lower() if lowercase else texts[i] for i in idx]
                enc = tokenizer(batch, padding=True, truncation="longest_first", max_length=max_length,
                                return_tensors="pt")
                result = model(**{k: v for k, v in enc.items() if k in accepted})
                if pooling is not None:
                    vecs = st_pool(result.last_hidden_state, enc["attention_mask"], pooling)
                else:
                    vecs = result.logits
                for i, v in zip(idx, vecs.float().numpy()):
                    out[i] = v
        del model
        return EncoderReference(texts, np.stack(out).astype(np.float32), source.task)  # type: ignore[arg-type]

    # --- candidates -------------------------------------------------------------------------
    def candidates(
        self, exported: Exported, precision: Precision, plan: PrecisionPlan, profile: DeviceProfile,
        work: Path, reference: EncoderReference,
    ) -> Generator[Candidate, Feedback, None]:
        """Yield fp32 as exported, fp16 (two block lists), or the int8 search."""
        if precision is Precision.FP32:
            yield Candidate(exported.model.parent, Precision.FP32, {"method": "none"})
        elif precision is Precision.FP16:
            yield from self._fp16(exported, plan, work)
        elif precision is Precision.INT8:
            yield from self._int8(exported, plan, profile, work, reference)
        else:
            log.info("encoders have no %s path; skipping it", precision.value)

    @staticmethod
    def _fp16(exported: Exported, plan: PrecisionPlan, work: Path) -> Generator[Candidate, Feedback, None]:
        s = plan.fp16_settings()
        # On a CPU build machine onnxruntime runs fp16 nodes through inserted casts: fp16 weights and
        # fp16-rounded activations between ops, fp32 arithmetic inside them. TensorRT may accumulate
        # in fp16 too, so the device's own health check has the last word.
        note = "measured on the build machine's CPUExecutionProvider (fp16 storage, fp32 arithmetic)"
        for i, blocked in enumerate((tuple(s.op_block_list), tuple(s.op_block_list) + FP16_SENSITIVE_OPS)):
            folder = convert_fp16(exported.model, work / f"fp16-{i}", keep_io_types=s.keep_io_types,
                                  op_block_list=blocked)
            yield Candidate(folder.parent, Precision.FP16, {
                "method": "fp16", "keep_io_types": s.keep_io_types, "op_block_list": list(blocked), "measured": note,
            })

    def _int8(self, exported: Exported, plan: PrecisionPlan, profile: DeviceProfile, work: Path,
              reference: EncoderReference) -> Generator[Candidate, Feedback, None]:
        settings = plan.int8_settings()
        nodes = probe_nodes(exported.model, ("MatMul",))
        counter = iter(range(1, 1000))

        def build(step) -> Candidate:
            folder = work / f"int8-{next(counter)}"
            quantize_int8_dynamic(exported.model, folder, per_channel=step.per_channel, reduce_range=step.reduce_range,
                                  exclude_op_types=step.exclude_op_types, exclude_nodes=step.excluded_nodes)
            return Candidate(folder, Precision.INT8, step.record())

        def rank(step) -> list[tuple[str, float]]:
            if not can_probe(exported.model):
                return structural_order(nodes)
            return self._rank_nodes(exported, nodes, step, profile, reference)

        yield from int8_search(settings, self.thresholds_for(reference.task, profile), build, rank,
                               candidate_nodes=nodes)

    @staticmethod
    def _rank_nodes(exported: Exported, nodes: list[str], step, profile: DeviceProfile,
                    reference: EncoderReference) -> list[tuple[str, float]]:
        """Measure each MatMul's own effect on the pooled output, on the worst samples so far."""
        started = time.perf_counter()
        probe = SensitivityProbe(exported.model, nodes, per_channel=step.per_channel, reduce_range=step.reduce_range,
                                 threads=build_threads(profile))
        device_dir = next(iter(exported.extras.values()))[0].parent
        tokenizer = TextTokenizer.from_folder(device_dir)
        wants_types = "token_type_ids" in {i.name for i in probe.session.get_inputs()}
        losses = reference.per_sample_loss
        if losses:
            picked = sorted(losses, key=lambda i: -losses[i])[:PROBE_SAMPLES]
        else:
            picked = list(range(min(reference.count, PROBE_SAMPLES)))
        feeds, masks = [], []
        for i in picked:
            batch = tokenizer.encode([reference.texts[i]], token_types=wants_types)
            feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            if batch.token_type_ids is not None:
                feed["token_type_ids"] = batch.token_type_ids
            feeds.append(feed)
            masks.append(batch.attention_mask)
        pooling: Pooling | None = exported.specs.get("pooling")
        out_index = probe.output_names.index(pooling.output if pooling else "logits")
        refs = reference.outputs[picked]

        def loss(j: int, outputs: list[np.ndarray]) -> float:
            if pooling is not None:
                vec = pool(outputs[out_index], masks[j], pooling)
                return float(1.0 - cosines(refs[j : j + 1], vec)[0])
            return _tv_distance(refs[j], outputs[out_index][0])

        ranking = probe.rank(feeds, loss)
        log.info("probed %d nodes on %d samples in %.1f s", len(nodes), len(feeds), time.perf_counter() - started)
        return ranking

    # --- measure ----------------------------------------------------------------------------
    def measure(self, folder: Path, manifest: Manifest, reference: EncoderReference,
                profile: DeviceProfile) -> dict[str, float]:
        """Run the payload through the device runtime and compare with the torch reference."""
        model = load_model(folder, manifest, profile, threads=build_threads(profile))
        if not isinstance(model, EncoderModel):  # pragma: no cover - load_model picks by task
            raise ExportError(f"device runtime loaded {type(model).__name__}, expected EncoderModel")
        # Dynamic int8 quantizes activations per run, so a text's result depends on what it is
        # batched with (the padded batch sets the range). Measure one text per run and the
        # runtime's default batching, and gate on the worse of the two for every sample.
        if reference.task is Task.FEATURE_EXTRACTION:
            single = cosines(reference.outputs, model.embed(reference.texts, batch_size=1))
            batched = cosines(reference.outputs, model.embed(reference.texts))
            worst = np.minimum(single, batched)
            reference.per_sample_loss = {i: float(1.0 - c) for i, c in enumerate(single)}
            return {**cosine_stats(worst), "cosine_mean_batch1": float(single.mean()),
                    "cosine_mean_batched": float(batched.mean())}
        single = model.classify(reference.texts, batch_size=1)
        batched = model.classify(reference.texts)
        agree = min(top1_agreement(reference.outputs, single), top1_agreement(reference.outputs, batched))
        tv = [max(_tv_distance(r, a), _tv_distance(r, b)) for r, a, b in zip(reference.outputs, single, batched)]
        reference.per_sample_loss = {i: _tv_distance(r, a) for i, (r, a) in enumerate(zip(reference.outputs, single))}
        return {"top1_agreement": agree, "logits_cosine_mean": float(cosines(reference.outputs, single).mean()),
                "prob_tv_max": float(max(tv))}

    def thresholds(self, manifest: Manifest, profile: DeviceProfile) -> dict[str, tuple[str, float]]:
        """Return the profile's bounds for this encoder's task."""
        return self.thresholds_for(manifest.task, profile)

    @staticmethod
    def thresholds_for(task: Task, profile: DeviceProfile) -> dict[str, tuple[str, float]]:
        """Return the bounds for a task: cosine for embeddings, top-1 agreement for classifiers."""
        if task is Task.FEATURE_EXTRACTION:
            enc = profile.fidelity.encoder
            return {"cosine_mean": (">=", enc.cosine_mean_min), "cosine_p5": (">=", enc.cosine_p5_min),
                    "cosine_min": (">=", enc.cosine_min_min)}
        return {"top1_agreement": (">=", profile.fidelity.classifier.top1_agreement_min)}

    # --- latency ----------------------------------------------------------------------------
    def latency(self, folder: Path, manifest: Manifest, profile: DeviceProfile) -> dict[str, float]:
        """Return the median ms of batch 1 and batch 8 through the device runtime, on this machine."""
        model = load_model(folder, manifest, profile, threads=build_threads(profile))
        run = model.embed if manifest.task is Task.FEATURE_EXTRACTION else model.classify  # type: ignore[attr-defined]
        texts = sample_texts()[:8]
        out = {}
        for size in (1, 8):
            batch = texts[:size]
            for _ in range(LATENCY_WARMUP):
                run(batch, batch_size=size)
            times = []
            for _ in range(LATENCY_RUNS):
                t0 = time.perf_counter()
                run(batch, batch_size=size)
                times.append((time.perf_counter() - t0) * 1000)
            out[f"batch{size}_p50"] = round(float(np.median(times)), 3)
        return out


def _tv_distance(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Return the total-variation distance between two softmax distributions (0 = identical)."""
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max())
        return e / e.sum()

    return float(0.5 * np.abs(softmax(np.asarray(ref_logits, np.float64)) - softmax(np.asarray(logits, np.float64))).sum())
