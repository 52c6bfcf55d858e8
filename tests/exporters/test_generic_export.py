"""`edge export` for bring-your-own ONNX files: every CPU profile, samples, hostile external data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from edge.cli.main import main
from edge.errors import ConfigError, UnsafePathError
from edge.protocol.bundle import BundleReader, verify_bundle
from edge.protocol.catalog import builtin_profile_dir, load_catalog
from edge.protocol.enums import Precision, Task
from edge.protocol.signing import TrustStore
from edge.runtime.model import LoadedModel, load_model
from edge.runtime.session import open_session
from tests.fixtures.tiny_encoders import build_vision_onnx

CPU_PROFILES = ("generic-cpu", "x86-avx2", "x86-avx512-vnni", "raspberry-pi-5")


@pytest.fixture(scope="module")
def vision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vision_onnx(tmp_path_factory.mktemp("vision") / "tiny-vision.onnx")


def _export(args: list[str], key: Path, capsys) -> tuple[int, dict | None, str]:
    rc = main(["export", *args, "--key", str(key), "--json"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else None), err


def _images(n: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _load(bundle: Path, trust: TrustStore, dest: Path) -> LoadedModel:
    with BundleReader(bundle) as reader:
        verified = reader.extract(dest, trust)
    return load_model(dest, verified.manifest, load_catalog().get(verified.manifest.profile), threads=1)


@pytest.mark.parametrize("profile", CPU_PROFILES)
def test_vision_model_exports_for_every_cpu_profile(profile: str, vision: Path, key_pair, trust, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    rc, result, err = _export([str(vision), "--profile", profile, "-o", str(out)], key_pair[0], capsys)
    assert rc == 0, err
    bundle = Path(result["bundle"])
    assert [p.name for p in out.iterdir()] == [bundle.name]
    m = verify_bundle(bundle, trust).manifest
    assert (m.task, m.precision, m.name) == (Task.GENERIC, Precision.INT8, "tiny-vision")
    assert [(t.name, t.shape) for t in m.inputs] == [("pixel_values", ("batch", 3, 32, 32))]
    assert m.fidelity.passed and m.fidelity.samples == 16
    assert {f.role for f in m.files} == {"model"}
    assert set(m.latency_ms) == {"batch1_p50", "batch8_p50"}

    model = _load(bundle, trust, tmp_path / "payload")
    images = _images(8)
    got = model.infer({"pixel_values": images})["logits"]
    ref = open_session(vision).run(["logits"], {"pixel_values": images})[0]
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert got.shape == (8, 10) and cos.min() > 0.99


def test_external_data_model_exports(tmp_path: Path, key_pair, trust, capsys) -> None:
    model = build_vision_onnx(tmp_path / "src" / "net.onnx", external_data=True)
    assert (tmp_path / "src" / "net.onnx.data").is_file()
    rc, result, err = _export([str(model), "--profile", "x86-avx2", "-o", str(tmp_path / "out")], key_pair[0], capsys)
    assert rc == 0, err
    loaded = _load(Path(result["bundle"]), trust, tmp_path / "payload")
    images = _images(2)
    ref = open_session(model).run(["logits"], {"pixel_values": images})[0]
    got = loaded.infer({"pixel_values": images})["logits"]
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99, cos


def _point_external_data(model: Path, location: str) -> None:
    proto = onnx.load(str(model), load_external_data=False)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(proto, str(model))


def test_external_data_outside_the_folder_is_refused(tmp_path: Path, key_pair, capsys) -> None:
    model = build_vision_onnx(tmp_path / "src" / "net.onnx", external_data=True)
    shutil.move(tmp_path / "src" / "net.onnx.data", tmp_path / "secret.data")
    _point_external_data(model, "../secret.data")
    out = tmp_path / "out"
    rc, _, err = _export([str(model), "--profile", "x86-avx2", "-o", str(out)], key_pair[0], capsys)
    assert rc == UnsafePathError.exit_code, err
    assert "outside the model folder" in err
    assert not out.exists() or not any(out.iterdir())


def test_symlinked_external_data_is_refused(tmp_path: Path, key_pair, capsys) -> None:
    model = build_vision_onnx(tmp_path / "src" / "net.onnx", external_data=True)
    shutil.move(tmp_path / "src" / "net.onnx.data", tmp_path / "elsewhere.data")
    os.symlink(tmp_path / "elsewhere.data", tmp_path / "src" / "net.onnx.data")
    out = tmp_path / "out"
    rc, _, err = _export([str(model), "--profile", "x86-avx2", "-o", str(out)], key_pair[0], capsys)
    assert rc == UnsafePathError.exit_code, err
    assert "link" in err
    assert not any(out.iterdir())


def test_npz_samples_drive_the_gate(vision: Path, key_pair, tmp_path: Path, capsys) -> None:
    np.savez(tmp_path / "inputs.npz", pixel_values=_images(5))
    rc, result, err = _export([str(vision), "--profile", "x86-avx2", "-o", str(tmp_path / "out"),
                               "--samples", str(tmp_path / "inputs.npz")], key_pair[0], capsys)
    assert rc == 0, err
    with BundleReader(Path(result["bundle"])) as reader:
        assert reader.manifest.fidelity.samples == 5


def test_npz_with_wrong_names_is_a_config_error(vision: Path, key_pair, tmp_path: Path, capsys) -> None:
    np.savez(tmp_path / "inputs.npz", images=_images(2))
    out = tmp_path / "out"
    rc, _, err = _export([str(vision), "--profile", "x86-avx2", "-o", str(out), "--samples", str(tmp_path / "inputs.npz")],
                         key_pair[0], capsys)
    assert rc == ConfigError.exit_code and "pixel_values" in err
    assert not any(out.iterdir())


def test_corrupt_onnx_fails_cleanly(tmp_path: Path, key_pair, capsys) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf model" * 10)
    out = tmp_path / "out"
    rc, _, err = _export([str(bad), "--profile", "x86-avx2", "-o", str(out)], key_pair[0], capsys)
    assert rc != 0 and err.startswith("Error: ")
    assert not out.exists() or not any(out.iterdir())


def test_strict_gate_tries_static_int8_then_falls_back_to_fp32(vision: Path, signing_key, tmp_path: Path) -> None:
    from exporters.pipeline import ExportRequest, run_export

    data = yaml.safe_load((builtin_profile_dir() / "x86-avx2.yaml").read_text())
    data["name"] = "strict-cpu"
    data["models"]["generic"] = {"precision": "int8", "fallback": ["fp32"], "int8": {"per_channel": True}}
    data["fidelity"]["generic"] = {"cosine_mean_min": 0.99999, "cosine_p5_min": 0.99999}
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "strict-cpu.yaml").write_text(yaml.safe_dump(data))
    profile = load_catalog((tmp_path / "profiles",)).get("strict-cpu")
    result = run_export(ExportRequest(source=str(vision), profile=profile, signing_key=signing_key, out_dir=tmp_path / "out"))
    methods = [a["settings"].get("method") for a in result.attempts]
    assert methods[:2] == ["dynamic", "static"]  # a conv net gets calibrated QDQ after dynamic int8
    assert result.attempts[1]["settings"]["calibration_samples"] == 16
    assert all(not a["passed"] for a in result.attempts[:-1])
    assert result.manifest.precision is Precision.FP32 and result.attempts[-1]["passed"]
