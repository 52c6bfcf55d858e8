"""Read what an ONNX file declares (inputs, outputs, external data) without loading weights."""

from __future__ import annotations

from pathlib import Path

import onnx

from edge.errors import ExportError, UnsafePathError
from edge.protocol.bundle import check_payload_name
from edge.protocol.manifest import TensorSpec

_DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.UINT16: "uint16",
    onnx.TensorProto.UINT32: "uint32", onnx.TensorProto.UINT64: "uint64", onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.STRING: "string",
}  # fmt: skip


def load_graph_only(path: Path) -> onnx.ModelProto:
    """Load an ONNX model's graph without its external weights."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ExportError(f"{path} is not a readable ONNX model: {exc}") from exc


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    ttype = value.type.tensor_type
    dtype = _DTYPES.get(ttype.elem_type)
    if dtype is None:
        raise ExportError(f"tensor {value.name} has unsupported element type {ttype.elem_type}")
    shape: list[int | str] = []
    for i, d in enumerate(ttype.shape.dim):
        if d.HasField("dim_value"):
            shape.append(int(d.dim_value))
        else:
            shape.append(d.dim_param or f"d{i}")
    return TensorSpec(name=value.name, dtype=dtype, shape=tuple(shape))


def io_specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Return the model's graph inputs (not initializers) and outputs."""
    model = load_graph_only(path)
    inits = {i.name for i in model.graph.initializer}
    inputs = tuple(_spec(v) for v in model.graph.input if v.name not in inits)
    outputs = tuple(_spec(v) for v in model.graph.output)
    return inputs, outputs


def external_data_files(path: Path) -> list[str]:
    """Return the external-data file names an ONNX model references, refusing unsafe ones."""
    model = load_graph_only(path)
    names: set[str] = set()
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location":
                    try:
                        check_payload_name(entry.value)
                    except UnsafePathError as exc:
                        raise UnsafePathError(f"{path}: external data of {t.name} points to {entry.value!r}, outside the model folder") from exc
                    names.add(entry.value)
    return sorted(names)
