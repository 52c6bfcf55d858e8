"""Weight-only int4 quantization of a decoder: every constant-weight MatMul becomes MatMulNBits.

Uses ONNX Runtime's ``MatMulNBitsQuantizer`` (round-to-nearest, block-wise along the input
dimension). Two settings decide the speed of the result on a CPU, so both are checked here rather
than trusted: ``accuracy_level`` 4 selects the int8 dot-product kernels, and the LM head must be
quantized too (on a 135M model an fp32 head is as many bytes per token as the whole int4 body).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnx

from edge.errors import ExportError
from edge.protocol.profile import Int4Settings

log = logging.getLogger(__name__)

# Past this many bytes of weights the quantized model is saved with external data, so that no
# protobuf message nears its 2 GiB limit (the fp32 export uses the same bound).
EXTERNAL_DATA_BYTES = int(1.5 * (1 << 30))


def quantize_int4(src: Path, dest: Path, settings: Int4Settings, lm_head_node: str | None) -> dict[str, Any]:
    """Quantize ``src`` into ``dest/model.onnx`` with MatMulNBits and return what was done.

    ``lm_head_node`` names the LM head MatMul: it is quantized when the settings say so (and this
    is verified), and kept in float otherwise.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    model = onnx.load(str(src), load_external_data=True)
    exclude = [lm_head_node] if lm_head_node and not settings.quantize_lm_head else []
    config = DefaultWeightOnlyQuantConfig(
        block_size=settings.block_size, is_symmetric=settings.symmetric, accuracy_level=settings.accuracy_level,
        quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",), bits=4,
    )
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=settings.block_size, is_symmetric=settings.symmetric,
        accuracy_level=settings.accuracy_level, nodes_to_exclude=exclude, algo_config=config,
        op_types_to_quantize=("MatMul",),
    )
    try:
        quantizer.process()
    except Exception as exc:  # the quantizer raises bare Exceptions and asserts
        raise ExportError(f"int4 quantization of {src} failed: {exc}") from exc
    out = quantizer.model.model
    counts = _count_ops(out)
    if counts.get("MatMulNBits", 0) == 0:
        raise ExportError(f"int4 quantization of {src} converted no MatMul", hint="the model has no constant-weight MatMul")
    head_quantized = _is_quantized(out, lm_head_node) if lm_head_node else None
    if lm_head_node and settings.quantize_lm_head and not head_quantized:
        raise ExportError(f"int4 quantization left the LM head {lm_head_node} in float",
                          hint="the head's weight must be a constant initializer")
    save_model(out, dest / "model.onnx")
    return {
        "method": "MatMulNBits RTN",
        "block_size": settings.block_size,
        "accuracy_level": settings.accuracy_level,
        "symmetric": settings.symmetric,
        "lm_head_quantized": bool(head_quantized),
        "matmul_nbits": counts.get("MatMulNBits", 0),
        "matmul_float": counts.get("MatMul", 0),
    }


def _count_ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _is_quantized(model: onnx.ModelProto, node_name: str) -> bool:
    # The quantizer names the replacement "<name>_Q4" and drops the original.
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.name.startswith(node_name):
            return True
        if node.name == node_name and node.op_type == "MatMul":
            return False
    return False


def weight_bytes(model: onnx.ModelProto) -> int:
    """Return the bytes held by the model's initializers (inline or loaded external data)."""
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save a model, with its weights in ``model.onnx.data`` beside it when it is large."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if weight_bytes(model) > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
