"""Open Inference Protocol over real HTTP, driven by the official tritonclient."""

from __future__ import annotations

import gzip
import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.agent.server.conftest import AgentProcess
from tests.fixtures.bundles import expected_output


@pytest.fixture(scope="module")
def client(agent: AgentProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(agent.url.removeprefix("http://"))


def _input(x: np.ndarray, binary: bool = True, datatype: str = "FP32", name: str = "x") -> triton.InferInput:
    inp = triton.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "edge" and "binary_tensor_data" in meta["extensions"]
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1.0.0")
    assert not client.is_model_ready("tiny", "1.1.0")  # not installed
    model = client.get_model_metadata("tiny")
    assert model["versions"] == ["1.0.0"]
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert model["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]
    assert model["parameters"]["execution_provider"] == "CPUExecutionProvider"


def test_infer_binary_and_json(client: triton.InferenceServerClient) -> None:
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    want = expected_output("1.0.0", x)
    binary = client.infer("tiny", [_input(x)])  # tritonclient's default: binary in and out
    np.testing.assert_allclose(binary.as_numpy("y"), want, rtol=1e-6)
    as_json = client.infer("tiny", [_input(x, binary=False)],
                           outputs=[triton.InferRequestedOutput("y", binary_data=False)], request_id="r-1")
    np.testing.assert_allclose(as_json.as_numpy("y"), want, rtol=1e-6)
    assert as_json.get_response()["id"] == "r-1"
    versioned = client.infer("tiny", [_input(x)], model_version="1.0.0")
    assert versioned.get_response()["model_version"] == "1.0.0"
    for algorithm in ("gzip", "deflate"):
        packed = client.infer("tiny", [_input(x)], request_compression_algorithm=algorithm)
        np.testing.assert_allclose(packed.as_numpy("y"), want, rtol=1e-6)


def test_bad_requests_get_4xx_with_a_reason(client: triton.InferenceServerClient, agent: AgentProcess) -> None:
    x = np.ones((2, 4), np.float32)
    cases = [
        (lambda: client.infer("tiny", [_input(np.ones((2, 3), np.float32))]), "400", "shape"),
        (lambda: client.infer("tiny", [_input(x.astype(np.float64), datatype="FP64")]), "400", "dtype float64"),
        (lambda: client.infer("tiny", [_input(x, name="z")]), "400", "unknown input"),
        (lambda: client.infer("nope", [_input(x)]), "404", "unknown model 'nope'"),
        (lambda: client.infer("tiny", [_input(x)], model_version="9.9.9"), "404", "no loaded version"),
        (lambda: client.infer("tiny", [_input(x)], model_version="1.1.0"), "404", "no loaded version"),
        (lambda: client.infer("tiny", [_input(x)], outputs=[triton.InferRequestedOutput("w")]), "400", "unknown output"),
    ]
    for call, status, message in cases:
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == status, err.value
        assert message in err.value.message(), err.value.message()

    url = agent.url
    raw = [
        (b"{not json", {}, 400, "not valid JSON"),
        (b"", {}, 400, "empty"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2]}]}', {}, 400, "needs 4 values"),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, 400, "body has"),
        (b"x" * (2 * 1024 * 1024), {}, 413, "limit"),
    ]
    for body, headers, status, message in raw:
        r = httpx.post(f"{url}/v2/models/tiny/infer", content=body, headers=headers, timeout=30)
        assert r.status_code == status, r.text
        assert message in r.json()["error"]
    r = httpx.get(f"{url}/v2/models/tiny/infer")
    assert r.status_code == 405 and "not allowed" in r.json()["error"]
    bomb = gzip.compress(b" " * (4 * 1024 * 1024))  # 4 KiB that inflate past the 1 MiB limit
    r = httpx.post(f"{url}/v2/models/tiny/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "inflated" in r.json()["error"]
    r = httpx.post(f"{url}/v2/models/tiny/infer", content=b"{}", headers={"Content-Encoding": "br"})
    assert r.status_code == 415
    assert client.is_server_live()  # nothing above took the agent down


def test_repository_index_load_and_unload(client: triton.InferenceServerClient, agent: AgentProcess) -> None:
    index = {(m["name"], m["version"]): m["state"] for m in client.get_model_repository_index()}
    assert index == {("tiny", "1.0.0"): "READY", ("embedder", "1.0.0"): "READY", ("chat", "1.0.0"): "READY"}
    x = np.ones((1, 4), np.float32)
    client.unload_model("tiny")
    try:
        assert not client.is_model_ready("tiny")
        with pytest.raises(InferenceServerException) as err:
            client.infer("tiny", [_input(x)])
        assert err.value.status() == "503"
        r = httpx.post(f"{agent.url}/v2/models/tiny/infer", json={"inputs": []})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "UNLOADED" in r.json()["error"]
        states = {m["version"]: m["state"] for m in client.get_model_repository_index()}
        assert states["1.0.0"] == "UNAVAILABLE"
        assert client.is_server_ready()  # an explicit unload is not a failure
    finally:
        client.load_model("tiny")
    assert client.is_model_ready("tiny")
    np.testing.assert_allclose(client.infer("tiny", [_input(x)]).as_numpy("y"), expected_output("1.0.0", x))
    with pytest.raises(InferenceServerException) as err:
        client.load_model("missing")
    assert err.value.status() == "404" and "not installed" in err.value.message()
    r = httpx.post(f"{agent.url}/v2/repository/index", json={"ready": True})
    assert [(m["name"], m["version"]) for m in r.json()] == [("chat", "1.0.0"), ("embedder", "1.0.0"), ("tiny", "1.0.0")]


def test_metrics_count_requests_errors_and_provider(client: triton.InferenceServerClient,
                                                   agent: AgentProcess) -> None:
    x = np.ones((1, 4), np.float32)
    client.infer("tiny", [_input(x)])
    with pytest.raises(InferenceServerException):
        client.infer("tiny", [_input(np.ones((1, 5), np.float32))])
    text = httpx.get(f"{agent.url}/metrics").text
    assert 'edge_inference_request_success_total{endpoint="infer",model="tiny",version="1.0.0"}' in text
    assert 'edge_inference_request_failure_total{code="request_invalid",endpoint="infer",model="tiny",version="1.0.0"}' in text
    assert 'edge_model_info{model="tiny",provider="CPUExecutionProvider",task="generic",version="1.0.0"} 1.0' in text
    assert "edge_inference_request_duration_seconds_bucket" in text
    assert "process_resident_memory_bytes" in text
    assert 'edge_http_errors_total{status="400"}' in text


def test_json_body_of_an_error_is_kserve_shaped(agent: AgentProcess) -> None:
    r = httpx.get(f"{agent.url}/v2/models/nope")
    assert r.status_code == 404
    assert set(json.loads(r.text)) == {"error"}
