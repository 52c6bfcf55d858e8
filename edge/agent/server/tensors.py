"""Open Inference Protocol tensors: JSON and Triton's binary tensor extension, both ways.

A binary request is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the
raw bytes of every input whose ``parameters.binary_data_size`` is set, in input order
(little-endian, row-major; BYTES elements as a 4-byte length then the bytes). Responses use the
same layout for outputs asked for in binary (``binary_data`` per output, or
``binary_data_output`` for the whole request, which ``tritonclient`` sets by default).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.agent.server.context import parse_json
from edge.errors import RequestError

# Open Inference Protocol datatype -> numpy dtype (little-endian, as the binary format is).
NUMPY_OF: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}  # fmt: skip
# numpy dtype kind+size -> datatype, for outputs.
DATATYPE_OF: dict[str, str] = {np.dtype(v).str.lstrip("<|="): k for k, v in NUMPY_OF.items() if k != "BYTES"}
# Manifest dtype names -> datatype, for metadata.
MANIFEST_DATATYPES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16",
    "float32": "FP32", "float64": "FP64", "string": "BYTES", "bfloat16": "BF16",
}  # fmt: skip
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class RequestedOutput:
    """One output the client asked for, and whether it wants it in binary."""

    name: str
    binary: bool | None


@dataclass(frozen=True)
class InferRequest:
    """A decoded infer request."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[RequestedOutput, ...] | None
    binary_output: bool


def datatype_of(arr: np.ndarray) -> str:
    """Return the Open Inference Protocol datatype of an array."""
    if arr.dtype.kind in ("O", "U", "S"):
        return "BYTES"
    try:
        return DATATYPE_OF[arr.dtype.str.lstrip("<|=>")]
    except KeyError:
        raise RequestError(f"output dtype {arr.dtype} has no Open Inference Protocol datatype") from None


def _shape(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise RequestError(f"input {name}: shape must be a list of non-negative integers, got {raw!r}")
    return tuple(raw)


def _params(obj: dict, where: str) -> dict:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(f"{where}: parameters must be an object")
    return params


def _decode_bytes_elements(buf: memoryview, count: int, name: str) -> np.ndarray:
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(buf):
            raise RequestError(f"input {name}: BYTES data ends inside element {i} of {count}")
        (length,) = struct.unpack_from("<I", buf, offset)
        offset += 4
        if offset + length > len(buf):
            raise RequestError(f"input {name}: BYTES element {i} claims {length} bytes past the end")
        out[i] = _text(bytes(buf[offset:offset + length]))
        offset += length
    if offset != len(buf):
        raise RequestError(f"input {name}: {len(buf) - offset} bytes left after {count} BYTES elements")
    return out


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:  # ORT string tensors are UTF-8 text
        raise RequestError(f"BYTES element is not UTF-8 text: {exc}") from None


def _json_input(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    count = math.prod(shape)
    if not isinstance(data, list):
        raise RequestError(f"input {name}: data must be a list, got {type(data).__name__}")
    try:
        if datatype == "BYTES":
            flat = np.asarray(data, dtype=object).ravel()
            arr = np.array([_utf8(name, v) if isinstance(v, str) else _bad_bytes(name, v) for v in flat], dtype=object)
        else:
            arr = np.asarray(data, dtype=NUMPY_OF[datatype])
    except RequestError:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise RequestError(f"input {name}: data is not a (nested) list of {datatype} values: {exc}") from None
    if arr.size != count:
        raise RequestError(f"input {name}: shape {list(shape)} needs {count} values, data has {arr.size}")
    return arr.reshape(shape)


def _bad_bytes(name: str, value: Any) -> str:
    raise RequestError(f"input {name}: BYTES data in JSON must be strings, got {type(value).__name__}")


def _utf8(name: str, value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape: ORT string tensors are UTF-8
        raise RequestError(f"input {name}: BYTES element is not valid Unicode text") from None
    return value


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """Decode an infer request body (JSON, or JSON plus binary tensors)."""
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise RequestError(f"{HEADER_LENGTH} {header_length!r} is not a number") from None
        if not 0 < split <= len(body):
            raise RequestError(f"{HEADER_LENGTH} is {split} but the body has {len(body)} bytes")
        head, blob = body[:split], memoryview(body)[split:]
    else:
        head, blob = body, memoryview(b"")
    req = parse_json(head, "infer request")
    if not isinstance(req, dict):
        raise RequestError("infer request must be a JSON object with an 'inputs' list")
    raw_inputs = req.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise RequestError("infer request needs a non-empty 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RequestError(f"inputs[{i}] must be an object with a 'name'")
        name = item["name"]
        if name in inputs:
            raise RequestError(f"input {name} is given twice")
        datatype = item.get("datatype")
        if not isinstance(datatype, str) or datatype not in NUMPY_OF:
            valid = ", ".join(NUMPY_OF)
            raise RequestError(f"input {name}: datatype {datatype!r} is not supported; valid: {valid}")
        shape = _shape(item.get("shape"), name)
        size = _params(item, f"input {name}").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise RequestError(f"input {name}: binary_data_size must be a non-negative integer")
            if "data" in item:
                raise RequestError(f"input {name} has both 'data' and binary_data_size")
            if offset + size > len(blob):
                raise RequestError(f"input {name}: binary_data_size {size} runs past the end of the body "
                                   f"({len(blob) - offset} bytes left)")
            chunk = blob[offset:offset + size]
            offset += size
            count = math.prod(shape)
            if datatype == "BYTES":
                arr = _decode_bytes_elements(chunk, count, name).reshape(shape)
            else:
                dt = NUMPY_OF[datatype]
                if size != count * dt.itemsize:
                    raise RequestError(f"input {name}: shape {list(shape)} of {datatype} needs "
                                       f"{count * dt.itemsize} bytes, binary_data_size is {size}")
                arr = np.frombuffer(chunk, dtype=dt).reshape(shape)
        else:
            if "data" not in item:
                raise RequestError(f"input {name} has neither 'data' nor parameters.binary_data_size")
            arr = _json_input(name, datatype, shape, item["data"])
        inputs[name] = arr
    if offset != len(blob):
        raise RequestError(f"{len(blob) - offset} bytes of binary data follow the inputs and belong to none")
    params = _params(req, "infer request")
    binary_output = bool(params.get("binary_data_output", False))
    outputs = None
    raw_outputs = req.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise RequestError("'outputs' must be a list")
        outs = []
        for i, o in enumerate(raw_outputs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise RequestError(f"outputs[{i}] must be an object with a 'name'")
            b = _params(o, f"output {o['name']}").get("binary_data")
            outs.append(RequestedOutput(o["name"], None if b is None else bool(b)))
        outputs = tuple(outs)
    rid = req.get("id")
    return InferRequest(None if rid is None else str(rid), inputs, outputs, binary_output)


def _bytes_payload(arr: np.ndarray) -> bytes:
    parts = []
    for v in arr.ravel():
        raw = v.encode("utf-8") if isinstance(v, str) else bytes(v)
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _json_data(arr: np.ndarray) -> list:
    if arr.dtype.kind in ("O", "S", "U"):
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.ravel()]
    return arr.ravel().tolist()


def encode_infer_response(model: str, version: str, request: InferRequest,
                          results: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """Encode outputs as JSON, with binary tensors where asked; return (body, headers)."""
    wants = {o.name: o.binary for o in request.outputs} if request.outputs is not None else {}
    head_outputs = []
    blobs: list[bytes] = []
    for name, arr in results.items():
        arr = np.asarray(arr)
        binary = wants.get(name)
        if binary is None:
            binary = request.binary_output
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(arr), "shape": list(arr.shape)}
        if binary:
            raw = _bytes_payload(arr) if entry["datatype"] == "BYTES" else np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_data(arr)
        head_outputs.append(entry)
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": head_outputs}
    if request.id is not None:
        head["id"] = request.id
    header = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }
