"""Benchmark SmolLM2-135M: export time and size, then TTFT and decode speed side by side.

Compares, in one run and at the same thread count:

* transformers (PyTorch fp32, the GGUF dequantized), greedy ``generate``;
* the int4 bundle (x86-avx2 profile: MatMulNBits, block 32, accuracy level 4, LM head int4)
  through the device runtime (``LLMModel.generate``);
* the fp32 bundle through the same runtime;
* llama.cpp's ``llama-bench`` on the same GGUF file, when ``--llama-bench PATH`` names a built
  binary (build it from the llama.cpp source vendored in PyPI's ``llama-cpp-python`` sdist).

The runtimes are measured in interleaved rounds so a change in machine load hits all of them alike.
Prints a markdown table with the tool versions and the command line. Usage::

    python tools/bench_llm.py [--threads 2] [--tokens 64] [--work DIR] [--reuse] [--llama-bench PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Reported for comparison; measured on this project's build machines (docs: REFERENCE.md).
REFERENCE_FIGURES = "llama.cpp Q4_1 decode 118 tok/s, onnxruntime-genai int4 ~100 tok/s (REFERENCE.md, 2 threads)"
PROMPT = "What is the capital of France?"
# llama-bench's prompt-processing test length; our chat prompt is about 35 tokens.
LLAMA_PROMPT = 64


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


def _transformers_runner(threads: int, tokens: int):
    """Load SmolLM2 in transformers fp32; return a function that measures one greedy run."""
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

    def one() -> dict[str, float]:
        ttft = timed(1)
        total = timed(tokens)
        return {"ttft_ms": ttft * 1000, "decode_tok_s": (tokens - 1) / (total - ttft)}

    return one


def _bundle_runner(model, tokens: int):
    """Return a function that measures one generation of the bundle's model."""
    from exporters.llm import measure_generation

    return lambda: measure_generation(model, PROMPT, tokens=tokens, runs=1)


def _llama_cpp_runner(binary: Path, threads: int, tokens: int, info: dict[str, str]):
    """Return a function that runs llama-bench once on the packaged GGUF (prompt 64, decode `tokens`)."""
    from exporters.real_models import smollm2_gguf

    cmd = [str(binary), "-m", str(smollm2_gguf()), "-t", str(threads), "-p", str(LLAMA_PROMPT), "-n", str(tokens),
           "-r", "1", "-o", "json"]

    def one() -> dict[str, float]:
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
        results = json.loads(done.stdout)
        decode = next(r for r in results if r["n_gen"] > 0)
        prompt = next(r for r in results if r["n_prompt"] > 0)
        info["build"] = f"build {decode.get('build_commit', '?')} ({decode.get('build_number', '?')}), " \
                        f"{decode.get('model_type', '?')}"
        # TTFT here is the time to process a LLAMA_PROMPT-token prompt (llama-bench's pp test).
        return {"ttft_ms": 1000 * LLAMA_PROMPT / prompt["avg_ts"], "decode_tok_s": decode["avg_ts"]}

    return one


def _summary(runs: list[dict[str, float]]) -> tuple[float, float, float]:
    """Return median TTFT, median decode tok/s and best decode tok/s."""
    return (statistics.median(r["ttft_ms"] for r in runs), statistics.median(r["decode_tok_s"] for r in runs),
            max(r["decode_tok_s"] for r in runs))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per run")
    parser.add_argument("--runs", type=int, default=5, help="interleaved rounds (median and best)")
    parser.add_argument("--work", type=Path, default=Path(".bench-llm"), help="folder for bundles and payloads")
    parser.add_argument("--reuse", action="store_true", help="reuse bundles already in --work")
    parser.add_argument("--precisions", default="int4,fp32", help="bundle precisions to build and measure")
    parser.add_argument("--llama-bench", type=Path, default=None, help="llama-bench binary to run side by side")
    parser.add_argument("--no-transformers", action="store_true", help="leave out the PyTorch baseline")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)

    from edge.runtime.generator import GenerationParams
    from exporters.versions import tool_versions

    runners: dict[str, object] = {}
    meta: dict[str, tuple] = {}
    models = []
    for precision in args.precisions.split(","):
        bundle, export_s = _export(precision, args.work, args.reuse)
        model = _open(bundle, args.work, args.threads)
        prompt = model.encode(model.render_chat([{"role": "user", "content": PROMPT}]))
        text = "".join(e.text for e in model.generate(prompt, GenerationParams(max_tokens=16)))
        name = f"Edge bundle {precision} (LLMModel, ORT)"
        runners[name] = _bundle_runner(model, args.tokens)
        meta[name] = (bundle.stat().st_size / 1e6, export_s, model.manifest.fidelity.metrics, text)
        models.append(model)
    llama_info: dict[str, str] = {}
    if args.llama_bench is not None:
        name = f"llama.cpp llama-bench (GGUF as packaged; TTFT = {LLAMA_PROMPT}-token prompt)"
        runners[name] = _llama_cpp_runner(args.llama_bench, args.threads, args.tokens, llama_info)
        meta[name] = (None, None, {}, "")
    if not args.no_transformers:
        name = "transformers PyTorch fp32 (generate)"
        runners[name] = _transformers_runner(args.threads, args.tokens)
        meta[name] = (None, None, {}, "")

    load_before = os.getloadavg()[0]
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    for round_no in range(args.runs):
        for name, one in runners.items():
            results[name].append(one())
            print(f"  round {round_no + 1}: {name}: {results[name][-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr)
    load_after = os.getloadavg()[0]

    v = tool_versions()
    print(f"## SmolLM2-135M-Instruct decode, {args.threads} threads, {args.tokens} tokens, {args.runs} "
          "interleaved rounds\n")
    print(f"`{' '.join(shlex.quote(a) for a in [sys.executable.split('/')[-1], *sys.argv])}`\n")
    print(f"CPU: {_cpu_name()} ({os.cpu_count()} cores, 1-min load average {load_before:.1f} before, "
          f"{load_after:.1f} after); python {v.get('python')}, onnxruntime {v.get('onnxruntime')}, "
          f"torch {v.get('torch')}, transformers {v.get('transformers')}, optimum-onnx {v.get('optimum-onnx', '-')}"
          + (f"; llama.cpp {llama_info.get('build', '?')}" if llama_info else "") + "\n")
    base_name = next((n for n in runners if n.startswith("llama.cpp")), None)
    print("| runtime | bundle MB | export s | TTFT ms (median) | decode tok/s (median) | decode tok/s (best) "
          "| vs transformers | vs llama.cpp | fidelity | greedy answer |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    summaries = {name: _summary(runs) for name, runs in results.items()}
    tf = next((s for n, s in summaries.items() if n.startswith("transformers")), None)
    for name, (ttft, tps, best) in summaries.items():
        size, export_s, fidelity, text = meta[name]
        fid = ", ".join(f"{k} {val:.3f}" for k, val in fidelity.items()) or "-"
        vs_tf = f"{tps / tf[1]:.2f}x" if tf else "-"
        vs_ll = f"{tps / summaries[base_name][1]:.2f}x" if base_name else "-"
        print(f"| {name} | {'-' if size is None else f'{size:.1f}'} | "
              f"{'-' if export_s is None else f'{export_s:.0f}'} | {ttft:.1f} | {tps:.1f} | {best:.1f} | "
              f"{vs_tf} | {vs_ll} | {fid} | {text.strip()[:40]!r} |")
    print(f"\nFor comparison: {REFERENCE_FIGURES}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
