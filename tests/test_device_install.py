"""The device install (`pip install edge-fleet`, no extras) pulls no torch, transformers or optimum,
and runs a bundle."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.protocol.test_bundle import make_manifest

ROOT = Path(__file__).resolve().parents[1]


def _tiny_onnx(path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(4, 2), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.slow
def test_device_install_has_no_export_libraries_and_runs_a_bundle(tmp_path: Path, signing_key, key_pair) -> None:
    env_dir = tmp_path / "device-venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not names & {"torch", "transformers", "optimum", "optimum-onnx", "accelerate"}, names
    assert {"onnxruntime", "tokenizers", "paho-mqtt"} <= names

    from edge.protocol.bundle import write_bundle

    payload = tmp_path / "payload"
    payload.mkdir()
    _tiny_onnx(payload / "model.onnx")
    bundle = write_bundle(tmp_path / "tiny.edgebundle", make_manifest(payload), payload, signing_key)
    edge = env_dir / "bin" / "edge"
    detect = subprocess.run([str(edge), "profiles", "detect", "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert detect.returncode == 0, detect.stderr
    verify = subprocess.run([str(edge), "bundle", "verify", str(bundle), "--trusted-key", str(key_pair[1])],
                            capture_output=True, text=True, cwd=tmp_path)
    assert verify.returncode == 0, verify.stderr
    script = f"""
import numpy as np
from pathlib import Path
from edge.protocol.bundle import BundleReader
from edge.protocol.signing import TrustStore
from edge.runtime.model import load_model
with BundleReader(Path({str(bundle)!r})) as r:
    v = r.extract(Path({str(tmp_path / 'x')!r}), TrustStore.from_files([Path({str(key_pair[1])!r})]))
m = load_model(Path({str(tmp_path / 'x')!r}), v.manifest)
print(m.infer({{'x': np.ones((1, 4), np.float32)}})['y'].tolist())
"""
    run = subprocess.run([str(py), "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[[12.0, 16.0]]"
