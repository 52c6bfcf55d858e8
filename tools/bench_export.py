"""Benchmark all-MiniLM-L6-v2: export time and size, then latency and fidelity side by side.

Compares, in one run and at the same thread count (default 2), end to end from text to a
normalized embedding (tokenization and pooling included in every row):

* PyTorch fp32: transformers tokenizer + ``AutoModel`` + mean pooling + L2 normalize, as
  sentence-transformers computes it (the fidelity reference);
* the fp32 bundle (a copy of the profile with ``encoder.precision: fp32``) through the device
  runtime (``EncoderModel.embed``: ``tokenizers`` + onnxruntime + numpy pooling);
* the same fp32 graph after onnxruntime's offline transformer fusions (Attention, SkipLayerNorm,
  BiasGelu), to show whether exporting fused graphs would pay;
* the int8 bundle the profile's plan produces (the fidelity gate's searched int8).

Prints a markdown table, the machine's load average before and after (a shared machine makes
absolute figures noisy: compare ratios), the versions and the command line. Usage::

    python tools/bench_export.py [--profile x86-avx512-vnni] [--threads 2] [--runs 20] [--rounds 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_ms(fn, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{name} ({', '.join(isa)}; {os.cpu_count()} logical CPUs)"


def _export(source: Path, profile, key, out: Path):
    from exporters.pipeline import ExportRequest, run_export

    t0 = time.perf_counter()
    result = run_export(ExportRequest(source=str(source), profile=profile, signing_key=key, out_dir=out,
                                      name="minilm", progress=lambda m: print(f"  {m}", file=sys.stderr)))
    return result, time.perf_counter() - t0


def _export_or_reuse(source: Path, profile, key, out: Path, reuse: bool):
    if reuse and out.is_dir():
        from types import SimpleNamespace

        from edge.protocol.bundle import BundleReader

        for bundle in out.glob("*.edgebundle"):
            with BundleReader(bundle) as reader:
                return SimpleNamespace(bundle=bundle, manifest=reader.manifest), None
    return _export(source, profile, key, out)


def _open(bundle: Path, dest: Path, threads: int):
    import shutil

    shutil.rmtree(dest, ignore_errors=True)
    from edge.protocol.bundle import BundleReader
    from edge.runtime.model import load_model

    with BundleReader(bundle) as reader:
        reader.extract(dest, None)
        manifest = reader.manifest
    return load_model(dest, manifest, None, threads=threads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="x86-avx512-vnni")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per round at batch 1 (batch 32 gets a fifth)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure is its best round's median")
    parser.add_argument("--work", type=Path, default=None, help="folder for keys and bundles (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true", help="reuse bundles already in --work (export time not measured)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    from edge.protocol.catalog import load_catalog
    from edge.protocol.profile import parse_profile
    from edge.protocol.signing import generate_keypair, load_signing_key
    from edge.runtime.encoder import EncoderModel
    from exporters.real_models import minilm_dir
    from exporters.samples import sample_texts
    from exporters.versions import tool_versions

    load_before = os.getloadavg()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "keys" / "bench.key").exists():
        generate_keypair(work / "keys", "bench")
    key = load_signing_key(work / "keys" / "bench.key")
    source = minilm_dir()
    profile = load_catalog().get(args.profile)
    data = yaml.safe_load(profile.model_dump_json())
    data["name"] = f"{profile.name}-fp32"
    data["models"]["encoder"] = {"precision": "fp32"}
    fp32_profile = parse_profile(data, "bench fp32 profile")

    print(f"exporting {source} for {profile.name} (int8) and an fp32 copy", file=sys.stderr)
    int8, int8_s = _export_or_reuse(source, profile, key, work / "int8", args.reuse)
    fp32, fp32_s = _export_or_reuse(source, fp32_profile, key, work / "fp32", args.reuse)

    texts = sample_texts()
    batch1, batch32 = [texts[0]], texts[:32]
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(str(source))
    pt = AutoModel.from_pretrained(str(source)).eval()

    def torch_embed(batch: list[str]) -> np.ndarray:
        with torch.inference_mode():
            enc = tok(batch, padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = pt(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(vec, dim=1).numpy()

    reference = np.concatenate([torch_embed([t]) for t in texts])
    variants: list[dict] = []

    def add(name: str, embed, export_s: float | None, size: float | None) -> None:
        emb = np.concatenate([embed([t]) for t in texts])
        cos = (emb * reference).sum(1)
        variants.append({
            "name": name, "embed": embed, "export_s": export_s, "size_mb": size, "b1": [], "b32": [],
            "cos_mean": float(cos.mean()), "cos_p5": float(np.percentile(cos, 5)), "cos_min": float(cos.min()),
        })

    add("PyTorch fp32 (transformers)", torch_embed, None, sum(p.stat().st_size for p in source.glob("*.safetensors")) / 1e6)
    fp32_model = _open(fp32.bundle, work / "payload-fp32", args.threads)
    assert isinstance(fp32_model, EncoderModel)
    add("ORT fp32 bundle", lambda b: fp32_model.embed(b, batch_size=32), fp32_s, fp32.bundle.stat().st_size / 1e6)

    from onnxruntime.transformers.optimizer import optimize_model

    fused_dir = work / "payload-fused"
    fused_dir.mkdir(exist_ok=True)
    for f in (work / "payload-fp32").iterdir():
        if f.is_file() and f.name != "model.onnx":
            (fused_dir / f.name).write_bytes(f.read_bytes())
    optimize_model(str(work / "payload-fp32" / "model.onnx"), model_type="bert").save_model_to_file(
        str(fused_dir / "model.onnx"))
    fused_model = EncoderModel(fused_dir, fp32_model.manifest, None, threads=args.threads)
    add("ORT fp32, offline-fused graph", lambda b: fused_model.embed(b, batch_size=32), None, None)

    int8_model = _open(int8.bundle, work / "payload-int8", args.threads)
    assert isinstance(int8_model, EncoderModel)
    q = int8.manifest.provenance.quantization
    add(f"ORT int8 bundle ({len(q.get('excluded_nodes', []))} MatMuls kept fp32)",
        lambda b: int8_model.embed(b, batch_size=32), int8_s, int8.bundle.stat().st_size / 1e6)

    # Round-robin rounds, keeping each variant's best median: on a shared machine the load shifts
    # during a run, and interleaving exposes every variant to the same quiet and busy spells.
    for _ in range(args.rounds):
        for v in variants:
            v["b1"].append(_median_ms(lambda: v["embed"](batch1), args.runs))
            v["b32"].append(_median_ms(lambda: v["embed"](batch32), max(3, args.runs // 5)))
    rows = [{**v, "b1": min(v["b1"]), "b32": min(v["b32"])} for v in variants]

    base = rows[0]
    print(f"\n### all-MiniLM-L6-v2, {args.threads} threads, profile {profile.name} "
          f"(latency: best of {args.rounds} interleaved rounds' medians, tokenization and pooling included)\n")
    print("| | export s | bundle MB | batch 1 p50 ms | batch 32 p50 ms | speed-up b32 vs PyTorch "
          "| cosine to PyTorch mean / p5 / min |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        export_s = f"{r['export_s']:.0f}" if r["export_s"] is not None else "-"
        size = f"{r['size_mb']:.1f}" if r["size_mb"] is not None else "-"
        print(f"| {r['name']} | {export_s} | {size} | {r['b1']:.1f} | {r['b32']:.1f} | "
              f"{base['b32'] / r['b32']:.2f}x | {r['cos_mean']:.5f} / {r['cos_p5']:.5f} / {r['cos_min']:.5f} |")
    gate = int8.manifest.fidelity
    print(f"\nint8 gate (device runtime, worst of batch 1 and batched): "
          f"{', '.join(f'{k} {v:.5f}' for k, v in gate.metrics.items())}; "
          f"attempts: {len(gate.attempts)}; excluded nodes: {q.get('excluded_nodes')}")
    load_after = os.getloadavg()
    print(f"\nload average before / after: {load_before[0]:.1f} / {load_after[0]:.1f} "
          f"(on a busy shared machine compare ratios, not absolutes)")
    print(f"CPU: {_cpu()}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in tool_versions().items()))
    print(f"command: python {shlex.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
