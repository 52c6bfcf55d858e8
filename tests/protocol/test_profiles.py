"""Device profiles: every built-in one loads; invalid ones fail naming file, key and choices."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from edge.errors import NotFoundError, ProfileError
from edge.protocol.catalog import builtin_profile_dir, load_catalog
from edge.protocol.enums import Accelerator, ExecutionProvider, Precision
from edge.protocol.profile import load_profile_file, parse_profile
from edge.runtime.detect import MachineFacts, detect_profile, judge

REQUIRED = {"jetson-orin-nano", "jetson-agx-orin", "raspberry-pi-5", "x86-avx2", "x86-avx512-vnni", "generic-cpu"}


def _base() -> dict:
    return yaml.safe_load((builtin_profile_dir() / "x86-avx2.yaml").read_text())


def test_builtin_profiles_cover_the_design(catalog) -> None:
    assert REQUIRED <= set(catalog.names())
    for name in catalog.names():
        p = catalog.get(name)
        assert p.provider_names()[-1] == "CPUExecutionProvider"
        assert p.max_bundle_mb <= p.disk_mb


def test_gpu_profiles_use_tensorrt_cuda_fp16(catalog) -> None:
    for name in ("jetson-orin-nano", "jetson-agx-orin"):
        p = catalog.get(name)
        assert p.accelerator is Accelerator.CUDA
        assert p.provider_names()[:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        assert p.models.encoder.precision is Precision.FP16 and p.models.llm.precision is Precision.FP16
        trt = dict(p.providers())["TensorrtExecutionProvider"]
        assert trt["trt_fp16_enable"] == "true"  # ORT's option key, verbatim


def test_cpu_profiles_quantize_encoders_int8_and_llms_int4(catalog) -> None:
    for name in ("x86-avx2", "x86-avx512-vnni", "raspberry-pi-5", "generic-cpu"):
        p = catalog.get(name)
        assert p.models.encoder.precision is Precision.INT8
        assert p.models.llm.precision is Precision.INT4
        assert p.models.llm.int4_settings().accuracy_level == 4
        assert p.models.llm.int4_settings().quantize_lm_head


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.update(thredas=1), ["thredas", "unknown key", "threads"]),
        (lambda d: d["threads"].update(intra=2), ["threads.intra", "intra_op"]),
        (lambda d: d["models"]["llm"].update(precision="int3"), ["models.llm", "int3", "fp32, fp16, int8, int4"]),
        (lambda d: d.update(memory_mb="lots"), ["memory_mb"]),
        (lambda d: d.update(architecture="mips"), ["architecture", "mips", "x86_64, aarch64"]),
        (lambda d: d["execution_providers"].insert(0, {"name": "CUDAExecutionProvider"}), ["needs accelerator: cuda"]),
        (lambda d: d["execution_providers"].insert(0, {"name": "MagicEP"}), ["MagicEP", "CUDAExecutionProvider"]),
        (lambda d: d["execution_providers"][0].update(options={"device": 1}), ["device", "CPUExecutionProvider"]),
        (lambda d: d["models"]["encoder"].update(precision="fp16", fallback=["fp32"], int8=None), ["fp16 needs a GPU"]),
        (lambda d: d["models"]["llm"].update(fallback=["int4"]), ["repeats"]),
        (lambda d: d.update(max_bundle_mb=10**7), ["max_bundle_mb", "disk_mb"]),
        (lambda d: d.update(opset=9), ["opset"]),
        (lambda d: d["models"]["llm"]["int4"].update(block_size=48), ["block_size"]),
    ],
)
def test_invalid_profiles_name_file_key_and_choices(mutate, expected) -> None:
    data = copy.deepcopy(_base())
    mutate(data)
    with pytest.raises(ProfileError) as err:
        parse_profile(data, "my-board.yaml")
    message = str(err.value)
    assert message.startswith("my-board.yaml: ")
    for fragment in expected:
        assert fragment in message


def test_tensorrt_needs_cuda_after_it() -> None:
    data = yaml.safe_load((builtin_profile_dir() / "jetson-orin-nano.yaml").read_text())
    data["execution_providers"] = [data["execution_providers"][0], data["execution_providers"][2]]
    with pytest.raises(ProfileError, match="TensorrtExecutionProvider needs CUDAExecutionProvider"):
        parse_profile(data, "x.yaml")


def test_file_name_must_match_and_yaml_must_parse(tmp_path: Path) -> None:
    bad = tmp_path / "other-name.yaml"
    bad.write_text((builtin_profile_dir() / "x86-avx2.yaml").read_text())
    with pytest.raises(ProfileError, match="does not match the file name"):
        load_profile_file(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile_file(broken)
    listy = tmp_path / "listy.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ProfileError, match="must be a YAML mapping"):
        load_profile_file(listy)


def test_user_profiles_override_and_unknown_names_suggest(tmp_path: Path) -> None:
    data = _base()
    data["name"] = "my-box"
    data["memory_mb"] = 1234
    (tmp_path / "my-box.yaml").write_text(yaml.safe_dump(data))
    cat = load_catalog((tmp_path,))
    assert cat.get("my-box").memory_mb == 1234
    with pytest.raises(NotFoundError, match="did you mean 'my-box'"):
        cat.get("my-bx")


def _facts(machine: str, flags: set[str], board: str = "", providers=("CPUExecutionProvider",)) -> MachineFacts:
    return MachineFacts(machine, frozenset(flags), board, tuple(providers))


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (_facts("x86_64", {"avx2", "fma"}), "x86-avx2"),
        (_facts("x86_64", {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}), "x86-avx512-vnni"),
        (_facts("x86_64", {"sse4_2"}), "generic-cpu"),
        (_facts("aarch64", {"asimd"}, "Raspberry Pi 5 Model B Rev 1.0"), "raspberry-pi-5"),
        (_facts("aarch64", {"asimd"}, "Raspberry Pi 4 Model B"), "generic-cpu"),
        (
            _facts("aarch64", {"asimd"}, "NVIDIA Jetson Orin Nano Developer Kit",
                   ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")),
            "jetson-orin-nano",
        ),
        (
            _facts("aarch64", {"asimd"}, "NVIDIA Jetson AGX Orin Developer Kit",
                   ("CUDAExecutionProvider", "CPUExecutionProvider")),
            "jetson-agx-orin",
        ),
        # A Jetson whose onnxruntime lacks CUDA cannot use the GPU profile: say so, fall back.
        (_facts("aarch64", {"asimd"}, "NVIDIA Jetson AGX Orin Developer Kit"), "generic-cpu"),
    ],
)
def test_detect_picks_the_most_specific_fitting_profile(catalog, facts, expected) -> None:
    chosen, verdicts = detect_profile(catalog, facts)
    assert chosen.name == expected
    assert all(v.reasons or v.profile == "generic-cpu" for v in verdicts)


def test_detect_explains_rejections(catalog) -> None:
    v = judge(catalog.get("jetson-agx-orin"), _facts("aarch64", {"asimd"}, "NVIDIA Jetson AGX Orin"))
    assert not v.fits and any("onnxruntime offers none of" in r for r in v.reasons)
    v = judge(catalog.get("x86-avx512-vnni"), _facts("x86_64", {"avx2", "fma"}))
    assert not v.fits and any("avx512_vnni" in r for r in v.reasons)


def test_provider_enum_matches_onnxruntime_spelling() -> None:
    import onnxruntime as ort

    assert ExecutionProvider.CPU.value in ort.get_available_providers()
