"""Precision conversions of an fp32 ONNX model, one function per method.

Each function reads ``model`` (an fp32 ``model.onnx``, external data beside it) and writes
``out_dir/model.onnx`` (+ ``model.onnx.data`` for large models), returning that path:

* :func:`quantize_int8_dynamic`: int8 weights, activations quantized at run time (CPU encoders).
* :func:`quantize_int8_static`: QDQ int8 with activation ranges calibrated on sample inputs
  (conv nets, where dynamic ConvInteger is slow and coarse).
* :func:`convert_fp16`: fp16 weights and activations for GPU profiles, fp32 inputs and outputs.

The int8 search that picks which nodes stay in float lives in ``exporters.sensitivity``.
Errors from onnxruntime's tools are translated into :class:`ExportError` here, once.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import onnx

from edge.errors import ExportError

log = logging.getLogger(__name__)

MODEL_NAME = "model.onnx"
# Protobuf cannot serialize a model past 2 GiB; stay well under it and move weights out beyond this.
EXTERNAL_DATA_THRESHOLD = 1 << 30
# Op types dynamic int8 quantization handles (onnxruntime's IntegerOpsRegistry, spelled out so a
# profile's exclude_op_types is checked against a stable list).
DYNAMIC_OP_TYPES = ("MatMul", "Conv", "Attention", "LSTM", "Gather", "EmbedLayerNormalization")
# Op types static QDQ quantization handles on the CPU provider's QLinear kernels.
STATIC_OP_TYPES = (
    "Conv", "MatMul", "Gemm", "Add", "Mul", "Relu", "Clip", "MaxPool", "AveragePool",
    "GlobalAveragePool", "Concat", "Resize", "Sigmoid", "Softmax", "LeakyRelu", "Transpose",
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Gather", "Split",
)  # fmt: skip
# Ops that carry a constant weight whose precision dominates the quantization error.
WEIGHT_OP_TYPES = ("MatMul", "Gemm", "Conv")


def model_bytes(model: Path) -> int:
    """Return the size of a model file plus the external data files beside it."""
    from exporters.onnx_io import external_data_files

    model = Path(model)
    return model.stat().st_size + sum((model.parent / n).stat().st_size for n in external_data_files(model))


def _needs_external(model: Path) -> bool:
    return model_bytes(model) > EXTERNAL_DATA_THRESHOLD


def _out_path(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / MODEL_NAME


def op_types_for(candidates: Iterable[str], exclude_op_types: Iterable[str]) -> list[str]:
    """Return the op types to quantize: ``candidates`` minus the excluded ones."""
    excluded = set(exclude_op_types)
    return [op for op in candidates if op not in excluded]


def weight_nodes(model: Path | onnx.ModelProto, op_types: Iterable[str] = WEIGHT_OP_TYPES) -> list[str]:
    """Return the names of nodes of ``op_types`` whose weight input is a constant, in graph order."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    wanted = set(op_types)
    return [n.name for n in proto.graph.node if n.op_type in wanted and len(n.input) > 1 and n.input[1] in inits]


class _DropPreprocessHint(logging.Filter):
    """Drop onnxruntime's 'consider pre-processing' hint, logged on the root logger each call.

    The encoder path quantizes optimum's graph as exported on purpose (the sensitivity probe and
    the exclusion list name its nodes); the hint would print on every candidate.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _quiet_quantizer():
    root, hint = logging.getLogger(), _DropPreprocessHint()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)


def quantize_int8_dynamic(
    model: Path, out_dir: Path, *, per_channel: bool, reduce_range: bool,
    exclude_op_types: Iterable[str] = (), exclude_nodes: Iterable[str] = (),
) -> Path:
    """Quantize weights to int8 (QInt8), activations dynamically (uint8), into ``out_dir``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = _out_path(out_dir)
    ops = op_types_for(DYNAMIC_OP_TYPES, exclude_op_types)
    try:
        with _quiet_quantizer():
            quantize_dynamic(
                Path(model), out, op_types_to_quantize=ops, per_channel=per_channel, reduce_range=reduce_range,
                weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude_nodes),
                use_external_data_format=_needs_external(model),
                # Only MatMuls with a constant weight: activation x activation products (attention
                # scores) lose accuracy under int8 and gain little on CPU.
                extra_options={"MatMulConstBOnly": True},
            )
    except Exception as exc:  # onnxruntime's quantizer raises bare RuntimeError/ValueError
        raise ExportError(f"int8 dynamic quantization of {model} failed: {exc}") from exc
    return out


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a list of input dicts."""

    def __init__(self, samples: list[dict[str, np.ndarray]]) -> None:
        self._samples = samples
        self._it: Iterator[dict[str, np.ndarray]] = iter(samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._samples)


def quantize_int8_static(
    model: Path, out_dir: Path, samples: list[dict[str, np.ndarray]], *, per_channel: bool,
    reduce_range: bool, exclude_op_types: Iterable[str] = (), exclude_nodes: Iterable[str] = (),
) -> Path:
    """Quantize to QDQ int8 (uint8 activations, int8 weights) calibrated (min/max) on ``samples``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not samples:
        raise ExportError("static int8 quantization needs calibration samples")
    out = _out_path(out_dir)
    try:
        quantize_static(
            Path(model), out, _Calibration(samples), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types_for(STATIC_OP_TYPES, exclude_op_types),
            per_channel=per_channel, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude_nodes),
            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=_needs_external(model),
        )
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"int8 static quantization of {model} failed: {exc}") from exc
    return out


def convert_fp16(model: Path, out_dir: Path, *, keep_io_types: bool = True, op_block_list: Iterable[str] = ()) -> Path:
    """Convert weights and activations to fp16, keeping fp32 inputs/outputs when asked."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    out = _out_path(out_dir)
    try:
        proto = onnx.load(str(model))
        converted = convert_float_to_float16(
            proto, keep_io_types=keep_io_types, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *op_block_list],
            # Shape inference on a >2 GiB proto fails; the converter works without it.
            disable_shape_infer=_needs_external(model),
        )
        save_model(converted, out)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"fp16 conversion of {model} failed: {exc}") from exc
    return out


def save_model(proto: onnx.ModelProto, out: Path) -> Path:
    """Save a model, moving weights to ``<name>.data`` beside it when it is too large for protobuf."""
    out = Path(out)
    if proto.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{out.name}.data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(out))
    return out


def settings_record(method: str, **values: Any) -> dict[str, Any]:
    """Return a JSON-able record of quantization settings for the manifest's provenance."""
    out: dict[str, Any] = {"method": method}
    for key, value in values.items():
        out[key] = list(value) if isinstance(value, (tuple, list, set, frozenset)) else value
    return out
