"""`edge export` for encoders: sentence embeddings and classifiers, every CPU profile, the gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from edge.cli.main import main
from edge.errors import FidelityError
from edge.protocol.bundle import BundleReader, verify_bundle
from edge.protocol.catalog import builtin_profile_dir, load_catalog
from edge.protocol.enums import Precision, Task
from edge.protocol.signing import TrustStore
from edge.runtime.encoder import EncoderModel
from edge.runtime.model import load_model
from exporters.samples import sample_texts
from tests.fixtures.offline import _offline, _one_torch_thread  # noqa: F401  (autouse fixtures)
from tests.fixtures.tiny_encoders import (
    LABELS, OUTLIER_NODE, ST_MAX_SEQ_LENGTH, TinyEncoders, shared_bundle, shared_tiny_encoders, torch_embeddings,
)

CPU_PROFILES = ("generic-cpu", "x86-avx2", "x86-avx512-vnni", "raspberry-pi-5")


@pytest.fixture(scope="session")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session")
def tiny(base: Path) -> TinyEncoders:
    return shared_tiny_encoders(base)


def _open(bundle: Path, trust: TrustStore, dest: Path) -> EncoderModel:
    with BundleReader(bundle) as reader:
        verified = reader.extract(dest, trust)
    model = load_model(dest, verified.manifest, load_catalog().get(verified.manifest.profile), threads=1)
    assert isinstance(model, EncoderModel)
    return model


def _cli_export(args: list[str], key: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict | None, str]:
    rc = main(["export", *args, "--key", str(key), "--json"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else None), err


@pytest.mark.parametrize("profile", CPU_PROFILES)
def test_sentence_embedder_exports_for_every_cpu_profile(
    profile: str, tiny: TinyEncoders, key_pair, trust: TrustStore, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    rc, result, err = _cli_export([str(tiny.embedder), "--profile", profile, "-o", str(out), "--name", "tiny-st"],
                                  key_pair[0], capsys)
    assert rc == 0, err
    bundle = Path(result["bundle"])
    assert [p.name for p in out.iterdir()] == [bundle.name]  # no work folder left behind
    verified = verify_bundle(bundle, trust)
    m = verified.manifest
    assert (m.task, m.profile, m.precision) == (Task.FEATURE_EXTRACTION, profile, Precision.INT8)
    assert (m.pooling.mode, m.pooling.normalize) == ("mean", True)
    roles = {f.path: f.role for f in m.files}
    assert roles["model.onnx"] == "model" and roles["tokenizer.json"] == "tokenizer"
    assert roles["tokenizer_config.json"] == "tokenizer_config" and roles["1_Pooling/config.json"] == "pooling_config"
    assert m.fidelity.passed and m.fidelity.samples == len(sample_texts())
    assert m.fidelity.metrics["cosine_mean"] >= m.fidelity.thresholds["cosine_mean"]
    assert m.provenance.quantization["method"] == "dynamic"
    assert m.provenance.quantization["exclude_op_types"] == ["Gather"]
    assert set(m.latency_ms) == {"batch1_p50", "batch8_p50"}

    model = _open(bundle, trust, tmp_path / "payload")
    texts = sample_texts()
    emb = model.embed(texts)
    assert emb.shape == (len(texts), 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    expected = torch_embeddings(tiny.embedder, texts)
    cos = (emb * expected).sum(axis=1)
    assert cos.min() > 0.99, cos.min()
    assert model.max_length == ST_MAX_SEQ_LENGTH


def test_int8_search_keeps_the_sensitive_node_in_float(tiny: TinyEncoders, signing_key, tmp_path: Path) -> None:
    from exporters.pipeline import ExportRequest, run_export

    result = run_export(ExportRequest(source=str(tiny.outlier), profile=load_catalog().get("x86-avx2"),
                                      signing_key=signing_key, out_dir=tmp_path))
    first, last = result.attempts[0], result.attempts[-1]
    assert not first["passed"] and any("cosine_mean" in f for f in first["failures"])
    assert first["settings"]["excluded_nodes"] == []
    assert last["passed"] and last["settings"]["excluded_nodes"] == [OUTLIER_NODE]
    assert result.manifest.precision is Precision.INT8
    assert result.manifest.provenance.quantization["excluded_nodes"] == [OUTLIER_NODE]
    assert len(result.manifest.fidelity.attempts) == len(result.attempts)


def test_classifier_exports_labels_and_agrees_with_torch(tiny: TinyEncoders, base: Path, signing_key, trust, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    bundle = shared_bundle(base, tiny.classifier, "x86-avx2", signing_key)
    model = _open(bundle, trust, tmp_path / "payload")
    m = model.manifest
    assert m.task is Task.TEXT_CLASSIFICATION and m.pooling is None
    assert model.labels == LABELS and m.classifier.labels == LABELS
    assert m.fidelity.metrics["top1_agreement"] >= 0.95
    texts = sample_texts()
    logits = model.classify(texts)
    assert logits.shape == (len(texts), len(LABELS))
    tok = AutoTokenizer.from_pretrained(str(tiny.classifier))
    ref_model = AutoModelForSequenceClassification.from_pretrained(str(tiny.classifier)).eval()
    with torch.inference_mode():
        ref = np.concatenate([ref_model(**tok([t], truncation=True, max_length=128, return_tensors="pt")).logits.numpy() for t in texts])
    assert (ref.argmax(1) == logits.argmax(1)).mean() >= 0.95
    with pytest.raises(Exception, match="use classify"):
        model.embed(["x"])


def test_distilbert_without_token_types_and_cls_pooling(tiny: TinyEncoders, base: Path, signing_key, trust, tmp_path: Path) -> None:
    bundle = shared_bundle(base, tiny.distilbert, "generic-cpu", signing_key)
    model = _open(bundle, trust, tmp_path / "payload")
    assert {i.name for i in model.manifest.inputs} == {"input_ids", "attention_mask"}
    assert (model.manifest.pooling.mode, model.manifest.pooling.normalize) == ("cls", False)
    assert model.max_length == 64  # tokenizer_config's model_max_length, below the 128 positions
    texts = sample_texts()[:12]
    emb = model.embed(texts)
    ref = torch_embeddings(tiny.distilbert, texts, mode="cls", normalize=False, max_length=64)
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99


def test_fp16_profile_is_gated_on_this_cpu(tiny: TinyEncoders, signing_key, trust, tmp_path: Path) -> None:
    from exporters.pipeline import ExportRequest, run_export

    result = run_export(ExportRequest(source=str(tiny.embedder), profile=load_catalog().get("jetson-orin-nano"),
                                      signing_key=signing_key, out_dir=tmp_path / "out"))
    m = result.manifest
    assert m.precision is Precision.FP16 and m.fidelity.passed
    assert m.provenance.quantization["keep_io_types"] is True
    assert "CPUExecutionProvider" in m.provenance.quantization["measured"]
    assert m.outputs[0].dtype == "float32"  # keep_io_types: the device sees fp32 in and out
    import onnx

    with BundleReader(result.bundle) as reader:
        reader.extract(tmp_path / "payload", trust)
    graph = onnx.load(str(tmp_path / "payload" / "model.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.graph.initializer)


def test_user_sample_file_drives_the_gate(tiny: TinyEncoders, key_pair, tmp_path: Path, capsys) -> None:
    samples = tmp_path / "samples.txt"
    samples.write_text("first sample\n\n  second sample  \nthird one, with 3 numbers: 1 2 3\n")
    rc, result, err = _cli_export([str(tiny.embedder), "--profile", "x86-avx2", "-o", str(tmp_path / "out"),
                                   "--samples", str(samples)], key_pair[0], capsys)
    assert rc == 0, err
    with BundleReader(Path(result["bundle"])) as reader:
        assert reader.manifest.fidelity.samples == 3


def _impossible_profile(folder: Path) -> None:
    data = yaml.safe_load((builtin_profile_dir() / "x86-avx2.yaml").read_text())
    data["name"] = "impossible-cpu"
    data["models"]["encoder"] = {"precision": "int8", "int8": {"search_excluded_nodes": False}}
    data["fidelity"]["encoder"] = {"cosine_mean_min": 1.0, "cosine_p5_min": 1.0}
    folder.mkdir()
    (folder / "impossible-cpu.yaml").write_text(yaml.safe_dump(data))


def test_gate_failure_names_the_metric_and_leaves_nothing(
    tiny: TinyEncoders, key_pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _impossible_profile(tmp_path / "profiles")
    monkeypatch.setenv("EDGE_PROFILE_PATH", str(tmp_path / "profiles"))
    out = tmp_path / "out"
    rc, _, err = _cli_export([str(tiny.embedder), "--profile", "impossible-cpu", "-o", str(out)], key_pair[0], capsys)
    assert rc == FidelityError.exit_code
    assert "fidelity gate" in err and "cosine_mean" in err and "short by" in err
    assert not any(out.iterdir())  # no bundle, no .edge-export-* work folder


def test_gate_failure_raises_fidelity_error(tiny: TinyEncoders, signing_key, tmp_path: Path) -> None:
    from exporters.pipeline import ExportRequest, run_export

    _impossible_profile(tmp_path / "profiles")
    profile = load_catalog((tmp_path / "profiles",)).get("impossible-cpu")
    with pytest.raises(FidelityError, match=r"cosine_p5 \d\.\d+ < 1\.0 \(short by"):
        run_export(ExportRequest(source=str(tiny.embedder), profile=profile, signing_key=signing_key,
                                 out_dir=tmp_path / "out"))
    assert not any((tmp_path / "out").iterdir())


def test_gate_catches_one_lone_bad_sentence() -> None:
    """Mean and p5 over 48 samples let a single 0.963 through; the worst-sample bound does not."""
    from exporters.encoder import EncoderHandler
    from exporters.fidelity import cosine_stats
    from exporters.handler import gate

    thresholds = EncoderHandler.thresholds_for(Task.FEATURE_EXTRACTION, load_catalog().get("x86-avx512-vnni"))
    failures = gate(cosine_stats(np.array([0.999] * 47 + [0.963])), thresholds)
    assert len(failures) == 1 and failures[0].startswith("cosine_min 0.9630 < 0.97")
    assert gate(cosine_stats(np.array([0.999] * 47 + [0.975])), thresholds) == []


def _missing_config(src: Path, dest: Path) -> list[str]:
    shutil.copytree(src, dest)
    (dest / "config.json").unlink()
    return [str(dest)]


def _corrupt_weights(src: Path, dest: Path) -> list[str]:
    shutil.copytree(src, dest)
    (dest / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"\x00" * 64)
    return [str(dest)]


def _truncated_weights(src: Path, dest: Path) -> list[str]:
    shutil.copytree(src, dest)
    data = (dest / "model.safetensors").read_bytes()
    (dest / "model.safetensors").write_bytes(data[: len(data) // 2])
    return [str(dest)]


def _unsupported_type(src: Path, dest: Path) -> list[str]:
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2Model"])
    (dest / "config.json").write_text(json.dumps(cfg))
    return [str(dest)]


def _unknown_task(src: Path, dest: Path) -> list[str]:
    return [str(src), "--task", "summarization"]


def _unsupported_pooling(src: Path, dest: Path) -> list[str]:
    shutil.copytree(src, dest)
    (dest / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": ["mean", "max"]}))
    return [str(dest)]


@pytest.mark.parametrize(("make", "code", "words"), [
    (_missing_config, 3, "no config.json"),
    (_corrupt_weights, 3, "corrupt"),
    (_truncated_weights, 3, "corrupt"),
    (_unsupported_type, 3, "'gpt2'"),
    (_unknown_task, 3, "unknown task 'summarization'"),
    (_unsupported_pooling, 3, "pooling mean+max is not supported"),
])
def test_bad_sources_fail_clearly_and_leave_nothing(
    make, code: int, words: str, tiny: TinyEncoders, key_pair, tmp_path: Path, capsys
) -> None:
    args = make(tiny.embedder, tmp_path / "model")
    out = tmp_path / "out"
    rc, _, err = _cli_export([*args, "--profile", "x86-avx2", "-o", str(out)], key_pair[0], capsys)
    assert rc == code, err
    assert err.startswith("Error: ") and words in err
    assert not out.exists() or not any(out.iterdir())


def _minilm_dir() -> Path:
    from exporters.real_models import minilm_dir

    try:
        return minilm_dir()
    except Exception as exc:  # NotFoundError when the package is absent
        pytest.skip(str(exc))


@pytest.mark.slow
def test_minilm_int8_passes_only_with_the_search(signing_key, trust, tmp_path: Path) -> None:
    """Plain dynamic int8 of all-MiniLM-L6-v2 fails the gate; the searched int8 passes it."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from exporters.pipeline import ExportRequest, run_export

    folder = _minilm_dir()
    profile = load_catalog().get("x86-avx512-vnni")
    result = run_export(ExportRequest(source=str(folder), profile=profile, signing_key=signing_key,
                                      out_dir=tmp_path / "out", name="minilm"))
    m = result.manifest
    assert m.precision is Precision.INT8 and m.fidelity.passed
    assert m.fidelity.metrics["cosine_mean"] >= 0.995 and m.fidelity.metrics["cosine_p5"] >= 0.985
    assert m.provenance.quantization["excluded_nodes"]  # the search had to keep nodes in float
    assert result.bundle.stat().st_size < 0.85 * 90_000_000  # still well under the fp32 model

    # The same gate on plain dynamic int8 (per-tensor, nothing excluded): it must fail.
    data = yaml.safe_load((builtin_profile_dir() / "x86-avx512-vnni.yaml").read_text())
    data["name"] = "plain-int8"
    data["models"]["encoder"] = {"precision": "int8", "int8": {
        "per_channel": False, "reduce_range": False, "exclude_op_types": [], "search_excluded_nodes": False}}
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "plain-int8.yaml").write_text(yaml.safe_dump(data))
    plain = load_catalog((tmp_path / "profiles",)).get("plain-int8")
    with pytest.raises(FidelityError) as info:
        run_export(ExportRequest(source=str(folder), profile=plain, signing_key=signing_key,
                                 out_dir=tmp_path / "plain", name="minilm"))
    assert "cosine_mean" in str(info.value)
    assert not any((tmp_path / "plain").iterdir())

    # The device runtime matches sentence-transformers' pooling of the torch model.
    model = _open(result.bundle, trust, tmp_path / "payload")
    texts = sample_texts()
    emb = model.embed(texts)
    tok = AutoTokenizer.from_pretrained(str(folder))
    ref_model = AutoModel.from_pretrained(str(folder)).eval()
    with torch.inference_mode():
        enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = ref_model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=1).numpy()
    cos = (emb * ref).sum(1)
    assert cos.mean() >= 0.995 and np.percentile(cos, 5) >= 0.985
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return
    st = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(st, ref, atol=2e-5)  # our torch reference is sentence-transformers'
