"""The LLM handler: decoder-only models (HF folder, GGUF file or Hub id) to a KV-cache ONNX bundle.

* export: Llama-family decoders (llama, qwen2, mistral) are written as Edge's fused graph
  (:mod:`exporters.decoder_graph`, GroupQueryAttention over a shared KV buffer); other decoders go
  through optimum's ``text-generation-with-past`` export (concat KV layout). The manifest's
  ``llm`` section tells the device which layout and tensor names it got.
* reference: the torch model greedily answers the prompt set (:mod:`exporters.fidelity_llm`).
* candidates: int4 MatMulNBits for CPU profiles, int8 dynamic, fp16 for GPU profiles, fp32.
* measure / latency: through the device runtime (:class:`edge.runtime.generator.LLMModel`).
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any, Generator

from edge.errors import ExportError, ModelSourceError, UnsupportedModelError
from edge.protocol.enums import ModelKind, Precision
from edge.protocol.manifest import LLMSpec, Manifest
from edge.protocol.profile import DeviceProfile, PrecisionPlan

from exporters import decoder_graph as dg
from exporters.fidelity_llm import LLMReference, compute_reference, llm_metrics
from exporters.handler import Candidate, Exported, Feedback
from exporters.prompts import PROMPTS, load_prompts
from exporters.quantize_int4 import EXTERNAL_DATA_BYTES, quantize_int4, save_model
from exporters.sources import Source

log = logging.getLogger(__name__)

# Longest context a bundle supports, whatever the model was trained for: the device preallocates
# KV for it (min_ram_mb counts it) and 4096 tokens of Qwen2-1.5B KV are ~0.2 GB, of a 7B ~0.5 GB.
MAX_CONTEXT = 4096
# Tokens generated when measuring latency: enough for a stable per-token time.
LATENCY_TOKENS = 32
LATENCY_RUNS = 3  # median of three: one slow run on a busy build machine does not skew it
TOKENIZER_FILES = {
    "tokenizer.json": "tokenizer",
    "tokenizer_config.json": "tokenizer_config",
    "chat_template.jinja": "chat_template",
    "generation_config.json": "generation_config",
    "config.json": "config",
}


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    found: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in found:
                found.append(v)
    if not found and tokenizer.eos_token_id is not None:
        found.append(int(tokenizer.eos_token_id))
    return tuple(found)


def _max_context(config: Any) -> int:
    limits = [MAX_CONTEXT, int(getattr(config, "max_position_embeddings", 0) or MAX_CONTEXT)]
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        limits.append(int(window))  # past the window the model attends differently; we do not
    return min(limits)


class LLMHandler:
    """Export, quantize and measure decoder-only LLMs."""

    kind = ModelKind.LLM

    def __init__(self) -> None:
        self._model: Any = None
        self._tokenizer: Any = None
        self._lm_head: str | None = None

    # -- source -----------------------------------------------------------------------------
    def _load(self, source: Source) -> None:
        """Load the torch model and tokenizer of the source."""
        if source.format == "gguf" or source.gguf_file:
            from exporters.gguf import load_gguf

            self._model, self._tokenizer = load_gguf(source.path, source.gguf_file or "")
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(source.path))
            self._model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32).eval()
        except ValueError as exc:
            if "Unrecognized" in str(exc) or "not supported" in str(exc):
                raise UnsupportedModelError(f"{source.spec}: {exc}") from exc
            raise ModelSourceError(f"cannot load {source.spec}: {exc}") from exc
        except (OSError, KeyError, RuntimeError) as exc:
            raise ModelSourceError(f"cannot load {source.spec}: {exc}") from exc

    def _hf_folder(self, source: Source, work: Path) -> Path:
        """Return a Hugging Face folder of the source (a GGUF is saved under ``work`` first)."""
        if source.format != "gguf" and not source.gguf_file:
            return source.path
        folder = work / "hf"
        self._model.save_pretrained(folder)
        self._tokenizer.save_pretrained(folder)
        return folder

    def _save_extras(self, dest: Path) -> dict[str, tuple[Path, str]]:
        dest.mkdir(parents=True, exist_ok=True)
        if not getattr(self._tokenizer, "is_fast", False):
            raise ModelSourceError("the model's tokenizer has no fast (tokenizer.json) form", hint="the device reads tokenizer.json")
        self._tokenizer.save_pretrained(dest)
        self._model.config.save_pretrained(dest)
        self._model.generation_config.save_pretrained(dest)
        if getattr(self._tokenizer, "chat_template", None) and not (dest / "chat_template.jinja").exists():
            (dest / "chat_template.jinja").write_text(self._tokenizer.chat_template, encoding="utf-8")
        return {name: (dest / name, role) for name, role in TOKENIZER_FILES.items() if (dest / name).is_file()}

    # -- Handler ------------------------------------------------------------------------------
    def export(self, source: Source, profile: DeviceProfile, work: Path) -> Exported:
        """Export the source decoder to an fp32 ONNX model with a KV cache under ``work``."""
        work.mkdir(parents=True, exist_ok=True)
        self._load(source)
        config = self._model.config
        max_context = _max_context(config)
        shape = dg.decoder_shape(config, max_context)
        why_not = dg.check_fusable(config)
        model_dir = work / "model"
        if why_not is None:
            graph, weights = dg.build_decoder_graph(self._model, shape)
            external = sum(w.nbytes for w in weights.values()) > EXTERNAL_DATA_BYTES
            dg.save_decoder(graph, weights, model_dir / "model.onnx", profile.opset, external, "edge")
            self._lm_head = dg.LM_HEAD_NODE
            layout = dict(kv_layout="shared-buffer", seqlens_k_name=dg.SEQLENS_K,
                          total_sequence_length_name=dg.TOTAL_SEQUENCE_LENGTH, logits_index_name=dg.LOGITS_INDEX)
        else:
            log.info("exporting with optimum: no fused graph for this model (%s)", why_not)
            inputs = self._export_optimum(self._hf_folder(source, work), model_dir, profile.opset)
            layout = dict(kv_layout="concat", uses_position_ids="position_ids" in inputs)
        spec = LLMSpec(
            num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
            vocab_size=shape.vocab_size, max_context=max_context, eos_token_ids=_eos_ids(self._model, self._tokenizer),
            bos_token_id=self._tokenizer.bos_token_id, pad_token_id=self._tokenizer.pad_token_id, **layout,
        )
        extras = self._save_extras(work / "files")
        return Exported(model=model_dir / "model.onnx", extras=extras, specs={"llm": spec})

    def _export_optimum(self, hf_folder: Path, out: Path, opset: int) -> list[str]:
        import onnx
        from optimum.exporters.onnx import main_export

        try:
            main_export(str(hf_folder), output=str(out), task="text-generation-with-past", opset=opset,
                        device="cpu", do_validation=False, no_post_process=False, library_name="transformers")
        except (ValueError, KeyError, NotImplementedError) as exc:
            raise UnsupportedModelError(f"optimum cannot export this decoder: {exc}") from exc
        except Exception as exc:  # torch.onnx raises many types
            raise ExportError(f"ONNX export failed: {exc}") from exc
        model = onnx.load(str(out / "model.onnx"), load_external_data=True)
        lm_heads = [n for n in model.graph.node if n.op_type == "MatMul" and "lm_head" in n.name]
        self._lm_head = lm_heads[-1].name if lm_heads else None
        if lm_heads and _untie(model, lm_heads[-1]):
            for f in out.glob("model.onnx*"):
                f.unlink()
            save_model(model, out / "model.onnx")
        return [i.name for i in model.graph.input]

    def reference(self, source: Source, exported: Exported, samples: Path | None) -> LLMReference:
        """Greedily continue the prompt set with the source model and keep its log-probs."""
        spec: LLMSpec = exported.specs["llm"]
        return compute_reference(self._model, self._tokenizer, load_prompts(samples), spec.eos_token_ids,
                                 spec.max_context)

    def candidates(self, exported: Exported, precision: Precision, plan: PrecisionPlan, profile: DeviceProfile,
                   work: Path, reference: Any) -> Generator[Candidate, Feedback, None]:
        """Yield one candidate for ``precision``; a failed gate moves on to the plan's next precision."""
        if precision is Precision.FP32:
            yield Candidate(exported.model.parent, Precision.FP32, {})
        elif precision is Precision.INT4:
            info = quantize_int4(exported.model, work, plan.int4_settings(), self._lm_head)
            yield Candidate(work, Precision.INT4, info)
        elif precision is Precision.INT8:
            yield Candidate(work, Precision.INT8, self._quantize_int8(exported.model, work, plan))
        elif precision is Precision.FP16:
            info = self._convert_fp16(exported, work, plan)
            spec: LLMSpec = exported.specs["llm"]
            yield Candidate(work, Precision.FP16, info, specs={"llm": spec.model_copy(update={"kv_dtype": "float16"})})

    def _quantize_int8(self, src: Path, work: Path, plan: PrecisionPlan) -> dict[str, Any]:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        s = plan.int8_settings()
        work.mkdir(parents=True, exist_ok=True)
        large = src.with_name(src.name + ".data").exists()
        try:
            quantize_dynamic(str(src), str(work / "model.onnx"), weight_type=QuantType.QInt8, per_channel=s.per_channel,
                             reduce_range=s.reduce_range, op_types_to_quantize=["MatMul"],
                             use_external_data_format=large,
                             # shape inference cannot see through the contrib ops; everything is float
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        except Exception as exc:  # the quantizer raises bare Exceptions
            raise ExportError(f"int8 quantization failed: {exc}") from exc
        return {"method": "dynamic", "weight_type": "QInt8", "per_channel": s.per_channel,
                "reduce_range": s.reduce_range, "op_types": ["MatMul"]}

    def _convert_fp16(self, exported: Exported, work: Path, plan: PrecisionPlan) -> dict[str, Any]:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        spec: LLMSpec = exported.specs["llm"]
        s = plan.fp16_settings()
        model = onnx.load(str(exported.model), load_external_data=True)
        # The KV cache is state, not I/O the caller reads: it goes fp16 with the weights (half the
        # memory, and the shared buffer cannot sit behind a Cast). Only the logits stay fp32.
        keep = [spec.logits_name] if s.keep_io_types else False
        try:
            model = convert_float_to_float16(model, keep_io_types=keep, op_block_list=list(s.op_block_list) or None,
                                             disable_shape_infer=True)
        except Exception as exc:  # the converter raises bare Exceptions
            raise ExportError(f"fp16 conversion failed: {exc}") from exc
        save_model(model, work / "model.onnx")
        return {"method": "fp16 conversion", "keep_io_types": [spec.logits_name] if s.keep_io_types else []}

    def measure(self, folder: Path, manifest: Manifest, reference: LLMReference, profile: DeviceProfile) -> dict[str, float]:
        """Score the reference sequences with the device runtime and compare to the source."""
        model = _load_llm(folder, manifest, profile)
        for i, (messages, ids) in enumerate(zip(reference.messages, reference.prompt_ids)):
            if model.chat_template is None:
                break
            device_ids = model.encode(model.render_chat(messages))
            if device_ids[-len(ids):] != ids:
                raise ExportError(
                    f"the device tokenizer or chat template encodes prompt {i + 1} differently from the source "
                    f"({len(device_ids)} vs {len(ids)} tokens)",
                    hint="the bundle's tokenizer.json or chat template does not match the model's")
        return llm_metrics(reference, model.score)

    def thresholds(self, manifest: Manifest, profile: DeviceProfile) -> dict[str, tuple[str, float]]:
        """Return the profile's LLM gate."""
        t = profile.fidelity.llm
        return {"token_agreement": (">=", t.token_agreement_min), "logprob_drift": ("<=", t.logprob_drift_max)}

    def latency(self, folder: Path, manifest: Manifest, profile: DeviceProfile) -> dict[str, float]:
        """Measure time to first token and decode speed with the device runtime."""
        return measure_generation(_load_llm(folder, manifest, profile))


def _untie(model: Any, matmul: Any) -> bool:
    """Give a MatMul fed by Transpose(initializer) its own transposed initializer; return if changed.

    optimum ties the LM head to the embeddings through a Transpose node; the int4 quantizer only
    converts MatMuls whose weight is an initializer, and the head must be quantized.
    """
    from onnx import numpy_helper

    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(matmul.input[1])
    inits = {t.name: t for t in model.graph.initializer}
    if node is None or node.op_type != "Transpose" or node.input[0] not in inits:
        return False
    perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
    if perm and perm[0] != [1, 0]:
        return False
    name = f"{matmul.name.strip('/').replace('/', '.')}.weight"
    weight = numpy_helper.to_array(inits[node.input[0]]).T.copy()
    model.graph.initializer.append(numpy_helper.from_array(weight, name))
    matmul.input[1] = name
    if not any(node.output[0] in n.input for n in model.graph.node):
        model.graph.node.remove(node)
    return True


def _load_llm(folder: Path, manifest: Manifest, profile: DeviceProfile) -> Any:
    from edge.runtime.model import load_model

    return load_model(folder, manifest, profile)


def measure_generation(model: Any, prompt: str = PROMPTS[0], tokens: int = LATENCY_TOKENS,
                       runs: int = LATENCY_RUNS) -> dict[str, float]:
    """Return median time to first token (ms), per-token decode time (ms) and decode tokens/s."""
    from edge.runtime.generator import GenerationParams

    if model.chat_template is not None:
        ids = model.encode(model.render_chat([{"role": "user", "content": prompt}]))
    else:
        ids = model.encode(prompt)
    tokens = max(2, min(tokens, model.max_context - len(ids)))
    params = GenerationParams(max_tokens=tokens, ignore_eos=True)
    for _ in model.generate(ids, GenerationParams(max_tokens=2, ignore_eos=True)):  # warm-up
        pass
    ttfts, per_token = [], []
    for _ in range(runs):
        start = time.perf_counter()
        first = None
        n = 0
        for _event in model.generate(ids, params):
            n += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        ttfts.append((first - start) * 1000)
        per_token.append((end - first) * 1000 / max(n - 1, 1))
    ms = statistics.median(per_token)
    return {"ttft_ms": round(statistics.median(ttfts), 2), "decode_ms_per_token": round(ms, 3),
            "decode_tok_s": round(1000 / ms, 2), "prompt_tokens": float(len(ids))}
