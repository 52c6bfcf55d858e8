"""Benchmark SmolLM2-135M: export time and size, then TTFT and decode speed side by side.

Compares, in one run and at the same thread count:

* transformers (PyTorch fp32, the GGUF dequantized), greedy ``generate``;
* the int4 bundle (x86-avx2 profile: MatMulNBits, block 32, accuracy level 4, LM head int4)
  through the device runtime (``LLMModel.generate``);
* the fp32 bundle through the same runtime.

Prints a markdown table with the tool versions and the command line. Usage::

    python tools/bench_llm.py [--threads 2] [--tokens 64] [--work DIR] [--reuse]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

# Reported for comparison; measured on this project's build machines (docs: REFERENCE.md).
REFERENCE_FIGURES = "llama.cpp Q4_1 decode 118 tok/s, onnxruntime-genai int4 ~100 tok/s (REFERENCE.md, 2 threads)"
PROMPT = "What is the capital of France?"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _export(precision: str, work: Path, reuse: bool) -> tuple[Path, float | None]:
    from edge.protocol.catalog import load_catalog
    from edge.protocol.profile import parse_profile
    from edge.protocol.signing import generate_keypair, load_signing_key
    from exporters.pipeline import ExportRequest, run_export
    from exporters.real_models import smollm2_gguf

    profile = load_catalog().get("x86-avx2")
    if precision != "int4":
        data = profile.to_dict()
        data["name"] = f"x86-avx2-{precision}"
        data["models"]["llm"] = {"precision": precision}
        profile = parse_profile(data)
    out = work / "bundles"
    bundle = out / f"smollm2-1.0.0-{profile.name}.edgebundle"
    if reuse and bundle.exists():
        return bundle, None
    keys = work / "keys"
    if not (keys / "bench.key").exists():
        generate_keypair(keys, "bench")
    start = time.perf_counter()
    result = run_export(ExportRequest(source=str(smollm2_gguf()), profile=profile,
                                      signing_key=load_signing_key(keys / "bench.key"), out_dir=out, name="smollm2",
                                      progress=lambda m: print(f"  [{precision}] {m}", file=sys.stderr)))
    return result.bundle, time.perf_counter() - start


def _open(bundle: Path, work: Path, threads: int):
    from edge.protocol.bundle import BundleReader
    from edge.runtime.model import load_model

    target = work / f"payload-{bundle.stem}"
    shutil.rmtree(target, ignore_errors=True)
    with BundleReader(bundle) as reader:
        verified = reader.extract(target, None)
    return load_model(target, verified.manifest, threads=threads)


def _bench_transformers(threads: int, tokens: int, runs: int) -> list[dict[str, float]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporters.real_models import smollm2_gguf

    torch.set_num_threads(threads)
    path = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt")
    mask = torch.ones_like(ids)

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=tok.eos_token_id)
        return time.perf_counter() - start

    timed(2)  # warm-up
    out = []
    for _ in range(runs):
        ttft = timed(1)
        total = timed(tokens)
        out.append({"ttft_ms": ttft * 1000, "decode_tok_s": (tokens - 1) / (total - ttft)})
    return out


def _bench_bundle(model, tokens: int, runs: int) -> list[dict[str, float]]:
    from exporters.llm import measure_generation

    return [measure_generation(model, PROMPT, tokens=tokens, runs=1) for _ in range(runs)]


def _summary(runs: list[dict[str, float]]) -> tuple[float, float, float]:
    """Return median TTFT, median decode tok/s and best decode tok/s."""
    return (statistics.median(r["ttft_ms"] for r in runs), statistics.median(r["decode_tok_s"] for r in runs),
            max(r["decode_tok_s"] for r in runs))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per run")
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (median and best)")
    parser.add_argument("--work", type=Path, default=Path(".bench-llm"), help="folder for bundles and payloads")
    parser.add_argument("--reuse", action="store_true", help="reuse bundles already in --work")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)

    from edge.runtime.generator import GenerationParams
    from exporters.versions import tool_versions

    load_before = os.getloadavg()[0]
    rows = []
    for precision in ("int4", "fp32"):
        bundle, export_s = _export(precision, args.work, args.reuse)
        model = _open(bundle, args.work, args.threads)
        figures = _summary(_bench_bundle(model, args.tokens, args.runs))
        prompt = model.encode(model.render_chat([{"role": "user", "content": PROMPT}]))
        text = "".join(e.text for e in model.generate(prompt, GenerationParams(max_tokens=16)))
        rows.append((f"Edge bundle {precision} (LLMModel, ORT)", bundle.stat().st_size / 1e6, export_s,
                     *figures, model.manifest.fidelity.metrics, text))
        del model
    tf = _summary(_bench_transformers(args.threads, args.tokens, args.runs))
    rows.insert(0, ("transformers PyTorch fp32 (generate)", None, None, *tf, {}, ""))
    load_after = os.getloadavg()[0]

    v = tool_versions()
    print(f"## SmolLM2-135M-Instruct decode, {args.threads} threads, {args.tokens} tokens, {args.runs} runs\n")
    print(f"`{' '.join(shlex.quote(a) for a in [sys.executable.split('/')[-1], *sys.argv])}`\n")
    print(f"CPU: {_cpu_name()} ({os.cpu_count()} cores, 1-min load average {load_before:.1f} before, "
          f"{load_after:.1f} after); python {v.get('python')}, onnxruntime {v.get('onnxruntime')}, "
          f"torch {v.get('torch')}, transformers {v.get('transformers')}, optimum-onnx {v.get('optimum-onnx', '-')}\n")
    print("| runtime | bundle MB | export s | TTFT ms (median) | decode tok/s (median) | decode tok/s (best) "
          "| vs transformers | fidelity | greedy answer |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    base = tf[1]
    for name, size, export_s, ttft, tps, best, fidelity, text in rows:
        fid = ", ".join(f"{k} {val:.3f}" for k, val in fidelity.items()) or "-"
        print(f"| {name} | {'-' if size is None else f'{size:.1f}'} | "
              f"{'-' if export_s is None else f'{export_s:.0f}'} | {ttft:.1f} | {tps:.1f} | {best:.1f} | "
              f"{tps / base:.2f}x | {fid} | {text.strip()[:40]!r} |")
    print(f"\nFor comparison: {REFERENCE_FIGURES}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
