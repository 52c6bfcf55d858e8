"""Build a fused ONNX decoder (GroupQueryAttention over a shared KV buffer) from a Llama-family model.

Why our own graph rather than optimum's export: optimum's decoder concatenates the past KV cache
with the new token on every step (a copy of the whole cache per layer per token) and spells
attention, RMSNorm and rotary embedding as dozens of small ops; at batch 1 on a CPU the per-op
overhead alone costs more than the 8 ms a token may take to match llama.cpp. This graph is the one
onnxruntime-genai's builder makes, written from the weights directly:

* ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (RMSNorm fused with the
  residual add),
* one fused QKV ``MatMul`` feeding ``com.microsoft.GroupQueryAttention`` with rotary embedding
  done inside the op from cos/sin caches,
* one fused gate+up ``MatMul``, SiLU, down ``MatMul``,
* the LM head only on the positions the caller asks for (``logits_index``): generation asks for
  the last one, teacher-forced scoring for all.

The KV cache is one buffer per layer of shape ``[batch, kv_heads, capacity, head_dim]``; when the
caller binds the same buffer as ``past_key_values.N.key`` and ``present.N.key`` the op appends in
place (no copy). ``seqlens_k`` (tokens in the cache after this step, minus one) and
``total_sequence_length`` tell it where.

Every ``MatMul`` has a constant weight, so the int4 (MatMulNBits) and int8 quantizers apply to it
unchanged. Architectures whose blocks differ (extra norms, multipliers, partial rotary) are not
built here; the handler exports those with optimum instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge.errors import UnsupportedModelError

# Model types whose decoder block is exactly: RMSNorm, attention (q/k/v/o, optional q/k/v bias,
# rotary on the full head), RMSNorm, SiLU-gated MLP.
FUSED_MODEL_TYPES = frozenset({"llama", "qwen2", "mistral"})
# Rope variants whose cos/sin depend only on the position (so they can be a constant table);
# "dynamic" rescales with the running length and is refused.
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn", "longrope"})
# Initializers at or above this size go to external data when the model is large, so that no
# single protobuf message nears the 2 GiB limit.
EXTERNAL_MIN_BYTES = 1024
MS_DOMAIN = "com.microsoft"

INPUT_IDS = "input_ids"
LOGITS_INDEX = "logits_index"
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
LOGITS = "logits"
PAST_KEY = "past_key_values.{layer}.key"
PAST_VALUE = "past_key_values.{layer}.value"
PRESENT_KEY = "present.{layer}.key"
PRESENT_VALUE = "present.{layer}.value"
LM_HEAD_NODE = "lm_head/MatMul"


@dataclass(frozen=True)
class DecoderShape:
    """Sizes of a decoder that the graph and the device generator need."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_context: int
    rms_norm_eps: float


def check_fusable(config: Any) -> str | None:
    """Return why this model cannot be built as a fused graph, or None when it can."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FUSED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(sorted(FUSED_MODEL_TYPES))}"
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        return f"activation {config.hidden_act!r} is not SiLU"
    rope = getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope scaling {rope_type!r} depends on the sequence length"
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary embedding"
    if getattr(config, "mlp_bias", False):
        return "MLP biases"
    return None


def decoder_shape(config: Any, max_context: int) -> DecoderShape:
    """Read the sizes from a transformers config."""
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    return DecoderShape(
        num_layers=int(config.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
        hidden_size=hidden,
        intermediate_size=int(config.intermediate_size),
        vocab_size=int(config.vocab_size),
        max_context=int(max_context),
        rms_norm_eps=float(config.rms_norm_eps),
    )


def _rotary_tables(model: Any, shape: DecoderShape) -> tuple[np.ndarray, np.ndarray]:
    """Return cos and sin caches [max_context, head_dim / 2] from the model's own rotary module."""
    import torch

    rotary = model.model.rotary_emb
    positions = torch.arange(shape.max_context, dtype=torch.int64)[None, :]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    half = shape.head_dim // 2
    # HF builds cos as cat(freqs, freqs) (rotate_half layout); GQA wants the first half only.
    return (cos[0, :, :half].float().numpy().copy(), sin[0, :, :half].float().numpy().copy())


class _Graph:
    """Collect nodes and initializers, naming values after the module that makes them."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.weights: dict[str, np.ndarray] = {}

    def weight(self, name: str, array: np.ndarray) -> str:
        self.weights[name] = np.ascontiguousarray(array)
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs: Any) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs


def _np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _linear_t(module: Any) -> np.ndarray:
    """Return a Linear's weight transposed to [in, out] for ``MatMul(x, W)``."""
    return _np(module.weight).T


def build_decoder_graph(model: Any, shape: DecoderShape) -> tuple[onnx.GraphProto, dict[str, np.ndarray]]:
    """Return the fused decoder graph (without initializers) and its fp32 weights."""
    cfg = model.config
    g = _Graph()
    s = shape
    eps = s.rms_norm_eps
    cos, sin = _rotary_tables(model, s)
    g.weight("rotary/cos_cache", cos)
    g.weight("rotary/sin_cache", sin)
    embed = g.weight("model.embed_tokens.weight", _np(model.model.embed_tokens.weight))
    (hidden,) = g.node("Gather", [embed, INPUT_IDS], ["embed/out"], "embed/Gather")
    split_sizes = g.weight("mlp/split_sizes", np.array([s.intermediate_size] * 2, dtype=np.int64))
    seqlens, total = SEQLENS_K, TOTAL_SEQUENCE_LENGTH

    residual = hidden
    block_out: str | None = None
    outputs_kv: list[str] = []
    for i, layer in enumerate(model.model.layers):
        p = f"layers.{i}"
        attn = layer.self_attn
        ln_in = g.weight(f"{p}.input_layernorm.weight", _np(layer.input_layernorm.weight))
        if block_out is None:
            (x,) = g.node("SimplifiedLayerNormalization", [residual, ln_in], [f"{p}/ln_in/out"], f"{p}/ln_in",
                          axis=-1, epsilon=eps, stash_type=1)
        else:
            x, _, _, residual = g.node(
                "SkipSimplifiedLayerNormalization", [block_out, residual, ln_in],
                [f"{p}/ln_in/out", "", "", f"{p}/ln_in/residual"], f"{p}/ln_in", domain=MS_DOMAIN, epsilon=eps)
        wqkv = np.concatenate([_linear_t(attn.q_proj), _linear_t(attn.k_proj), _linear_t(attn.v_proj)], axis=1)
        (qkv,) = g.node("MatMul", [x, g.weight(f"{p}.attn.qkv_proj.weight", wqkv)], [f"{p}/qkv/out"], f"{p}/qkv/MatMul")
        if attn.q_proj.bias is not None:
            bias = np.concatenate([_np(attn.q_proj.bias), _np(attn.k_proj.bias), _np(attn.v_proj.bias)])
            (qkv,) = g.node("Add", [qkv, g.weight(f"{p}.attn.qkv_proj.bias", bias)], [f"{p}/qkv/bias_out"], f"{p}/qkv/Add")
        pk, pv = PAST_KEY.format(layer=i), PAST_VALUE.format(layer=i)
        ok, ov = PRESENT_KEY.format(layer=i), PRESENT_VALUE.format(layer=i)
        outputs_kv += [ok, ov]
        att, _, _ = g.node(
            "GroupQueryAttention", [qkv, "", "", pk, pv, seqlens, total, "rotary/cos_cache", "rotary/sin_cache"],
            [f"{p}/attn/out", ok, ov], f"{p}/attn/GroupQueryAttention", domain=MS_DOMAIN,
            num_heads=s.num_heads, kv_num_heads=s.num_kv_heads, do_rotary=1, rotary_interleaved=0,
            scale=float(s.head_dim ** -0.5),
        )
        (o,) = g.node("MatMul", [att, g.weight(f"{p}.attn.o_proj.weight", _linear_t(attn.o_proj))], [f"{p}/o_proj/out"], f"{p}/o_proj/MatMul")
        if attn.o_proj.bias is not None:
            (o,) = g.node("Add", [o, g.weight(f"{p}.attn.o_proj.bias", _np(attn.o_proj.bias))], [f"{p}/o_proj/bias_out"], f"{p}/o_proj/Add")
        ln_post = g.weight(f"{p}.post_attention_layernorm.weight", _np(layer.post_attention_layernorm.weight))
        x, _, _, residual = g.node(
            "SkipSimplifiedLayerNormalization", [o, residual, ln_post],
            [f"{p}/ln_post/out", "", "", f"{p}/ln_post/residual"], f"{p}/ln_post", domain=MS_DOMAIN, epsilon=eps)
        mlp = layer.mlp
        wgu = np.concatenate([_linear_t(mlp.gate_proj), _linear_t(mlp.up_proj)], axis=1)
        (gu,) = g.node("MatMul", [x, g.weight(f"{p}.mlp.gate_up_proj.weight", wgu)], [f"{p}/gate_up/out"], f"{p}/gate_up/MatMul")
        gate, up = g.node("Split", [gu, split_sizes], [f"{p}/gate", f"{p}/up"], f"{p}/gate_up/Split", axis=-1)
        (sig,) = g.node("Sigmoid", [gate], [f"{p}/act/sigmoid"], f"{p}/act/Sigmoid")
        (act,) = g.node("Mul", [gate, sig], [f"{p}/act/out"], f"{p}/act/Mul")
        (prod,) = g.node("Mul", [act, up], [f"{p}/gated/out"], f"{p}/gated/Mul")
        (block_out,) = g.node("MatMul", [prod, g.weight(f"{p}.mlp.down_proj.weight", _linear_t(mlp.down_proj))],
                              [f"{p}/down/out"], f"{p}/down/MatMul")

    norm = g.weight("model.norm.weight", _np(model.model.norm.weight))
    (final,) = g.node("SkipSimplifiedLayerNormalization", [block_out, residual, norm],
                      ["final_norm/out"], "final_norm", domain=MS_DOMAIN, epsilon=eps)
    (picked,) = g.node("Gather", [final, LOGITS_INDEX], ["lm_head/in"], "lm_head/Gather", axis=1)
    head = _np(model.lm_head.weight).T  # a separate copy even when tied: int4 quantizes it on its own
    g.node("MatMul", [picked, g.weight("lm_head.weight", head)], [LOGITS], LM_HEAD_NODE)
    if getattr(model.lm_head, "bias", None) is not None:
        raise UnsupportedModelError("an LM head with a bias is not supported by the fused graph")

    batch, seq, cap = "batch_size", "sequence_length", "past_sequence_length"
    inputs = [
        helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, [batch, seq]),
        helper.make_tensor_value_info(LOGITS_INDEX, TensorProto.INT64, ["num_logits"]),
        helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, [batch]),
        helper.make_tensor_value_info(TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []),
    ]
    kv_shape = [batch, s.num_kv_heads, cap, s.head_dim]
    present_shape = [batch, s.num_kv_heads, "total_sequence_length", s.head_dim]
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [batch, "num_logits", s.vocab_size])]
    for i in range(s.num_layers):
        inputs += [helper.make_tensor_value_info(PAST_KEY.format(layer=i), TensorProto.FLOAT, kv_shape),
                   helper.make_tensor_value_info(PAST_VALUE.format(layer=i), TensorProto.FLOAT, kv_shape)]
        outputs += [helper.make_tensor_value_info(PRESENT_KEY.format(layer=i), TensorProto.FLOAT, present_shape),
                    helper.make_tensor_value_info(PRESENT_VALUE.format(layer=i), TensorProto.FLOAT, present_shape)]
    graph = helper.make_graph(g.nodes, f"{cfg.model_type}-decoder", inputs, outputs)
    return graph, g.weights


def save_decoder(graph: onnx.GraphProto, weights: dict[str, np.ndarray], path: Path, opset: int,
                 external: bool, producer: str) -> None:
    """Write the model to ``path``, streaming large weights into ``<name>.data`` when ``external``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    inits: list[TensorProto] = []
    if external:
        with open(path.parent / data_name, "wb") as fh:
            for name, arr in weights.items():
                if arr.nbytes < EXTERNAL_MIN_BYTES:
                    inits.append(numpy_helper.from_array(arr, name))
                    continue
                offset = fh.tell()
                pad = (-offset) % 64  # align each tensor for memory mapping
                fh.write(b"\0" * pad)
                offset += pad
                fh.write(arr.tobytes())
                t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape)
                t.data_location = TensorProto.EXTERNAL
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(arr.nbytes))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
                inits.append(t)
    else:
        inits = [numpy_helper.from_array(arr, name) for name, arr in weights.items()]
    graph.initializer.extend(inits)
    model = helper.make_model(
        graph, producer_name=producer,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
    )
    model.ir_version = min(model.ir_version, 10)  # readable by ONNX Runtime 1.20+ on devices
    onnx.save(model, str(path))
