"""Open Inference Protocol tensor codec: JSON and Triton binary tensors, and what it refuses."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from edge.agent.server.tensors import HEADER_LENGTH, encode_infer_response, parse_infer_request
from edge.errors import RequestError


def _binary_body(inputs: list[tuple[str, str, np.ndarray]], **extra: object) -> tuple[bytes, str]:
    head = {"inputs": [{"name": n, "datatype": d, "shape": list(a.shape),
                        "parameters": {"binary_data_size": a.nbytes}} for n, d, a in inputs], **extra}
    raw = json.dumps(head).encode()
    return raw + b"".join(a.tobytes() for _, _, a in inputs), str(len(raw))


def test_json_inputs_are_decoded_with_shape_and_dtype() -> None:
    body = json.dumps({"id": "7", "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]},
        {"name": "m", "datatype": "INT64", "shape": [1, 2], "data": [[5, 6]]},
        {"name": "s", "datatype": "BYTES", "shape": [2], "data": ["a", "é"]},
    ]}).encode()
    req = parse_infer_request(body, None)
    assert req.id == "7" and not req.binary_output and req.outputs is None
    assert req.inputs["x"].dtype == np.float32 and req.inputs["x"].tolist() == [[1, 2], [3, 4]]
    assert req.inputs["m"].dtype == np.int64 and req.inputs["m"].shape == (1, 2)
    assert req.inputs["s"].tolist() == ["a", "é"]


def test_binary_inputs_are_decoded_in_order() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[1, 0]], dtype=np.bool_)
    body, split = _binary_body([("a", "FP32", a), ("b", "BOOL", b)], parameters={"binary_data_output": True})
    req = parse_infer_request(body, split)
    assert np.array_equal(req.inputs["a"], a) and np.array_equal(req.inputs["b"], b)
    assert req.binary_output


def test_binary_bytes_elements_are_length_prefixed() -> None:
    payload = b"".join(struct.pack("<I", len(s)) + s for s in (b"hi", "ü".encode()))
    head = json.dumps({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2],
                                   "parameters": {"binary_data_size": len(payload)}}]}).encode()
    req = parse_infer_request(head + payload, str(len(head)))
    assert req.inputs["s"].tolist() == ["hi", "ü"]


@pytest.mark.parametrize(
    ("body", "split", "message"),
    [
        (b"{", None, "not valid JSON"),
        (b"[]", None, "JSON object"),
        (b'{"inputs": []}', None, "non-empty 'inputs'"),
        (b'{"inputs": [{"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}]}', None, "FP99"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}]}', None, "needs 4 values"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]}', None, "non-negative"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": ["a", "b"]}]}', None, "FP32 values"),
        (b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [300]}]}', None, "UINT8 values"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [[1], [2, 3]]}]}', None, "FP32 values"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}', None, "neither 'data'"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},'
         b' {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}', None, "given twice"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}', "999", "body has"),
        (b'{"inputs": [{"name": "x", "datatype": [], "shape": [1], "data": [1]}]}', None, "not supported"),
        (b'{"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "data": ["\\ud800"]}]}', None, "Unicode"),
        (b"1" * 5000, None, "not usable JSON"),
        (b"[" * 100_000, None, "nested too deeply"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}', "abc", "not a number"),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(body: bytes, split: str | None, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        parse_infer_request(body, split)


def test_binary_size_must_match_shape_and_body() -> None:
    a = np.zeros((2, 2), dtype=np.float32)
    body, split = _binary_body([("a", "FP32", a)])
    wrong_shape = body.replace(b"[2, 2]", b"[2, 3]")
    with pytest.raises(RequestError, match="needs 24 bytes"):
        parse_infer_request(wrong_shape, str(int(split)))
    with pytest.raises(RequestError, match="runs past the end"):
        parse_infer_request(body[:-4], split)
    with pytest.raises(RequestError, match="belong to none"):
        parse_infer_request(body + b"xxxx", split)


def test_response_is_json_or_binary_as_asked() -> None:
    y = np.array([[1.5, -2.0]], dtype=np.float32)
    req = parse_infer_request(json.dumps({"id": "r1", "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1], "data": [0]}]}).encode(), None)
    body, headers = encode_infer_response("m", "1.0.0", req, {"y": y})
    assert HEADER_LENGTH not in headers
    out = json.loads(body)
    assert out["id"] == "r1" and out["outputs"][0] == {"name": "y", "datatype": "FP32", "shape": [1, 2],
                                                       "data": [1.5, -2.0]}
    req_bin = parse_infer_request(json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0]}],
                                              "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode(), None)
    body, headers = encode_infer_response("m", "1.0.0", req_bin, {"y": y})
    split = int(headers[HEADER_LENGTH])
    head = json.loads(body[:split])
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert np.array_equal(np.frombuffer(body[split:], dtype=np.float32).reshape(1, 2), y)
