"""`edge demo`: Edge's main job end to end on the embedded defaults, on this one machine."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import typer

from edge.cli.output import info, stdout
from edge.errors import ConfigError

DEMO_DIR = Path(".edge-demo")


def register(app: typer.Typer) -> None:
    """Add the `demo` command to the CLI."""

    @app.command("demo")
    def demo(
        workdir: Path = typer.Option(DEMO_DIR, "--dir", help="Folder for the demo's keys, bundles and device data."),
        profile: str = typer.Option("auto", "--profile", "-p", help="Device profile, or 'auto' to detect."),
        fresh: bool = typer.Option(False, "--fresh", help="Re-export bundles even if they already exist."),
        devices: int = typer.Option(3, "--devices", min=1, max=16, help="Local agents to start."),
        keep: bool = typer.Option(None, "--keep/--no-keep",
                                  help="Keep the fleet running for the dashboard until Ctrl-C (default: when run in a terminal)."),
    ) -> None:
        """Export real models for this machine, verify them, and roll them out to a local fleet.

        Starts a controller (embedded broker, SQLite) and local agents as subprocesses, publishes
        the bundles, rolls them out in waves and asks a device to answer.
        """
        try:
            from exporters.pipeline import ExportRequest, run_export
            from exporters.real_models import minilm_dir, smollm2_gguf
        except ImportError as exc:
            raise ConfigError(f"the demo needs the exporter ({exc.name} is missing)",
                              hint="run scripts/demo.sh, or pip install 'edge-fleet[export]'") from exc
        from edge.cli.profiles import catalog
        from edge.protocol.bundle import BundleReader
        from edge.protocol.signing import TrustStore, generate_keypair, load_signing_key
        from edge.runtime.detect import detect_profile

        out = stdout()
        cat = catalog()
        chosen = detect_profile(cat)[0] if profile == "auto" else cat.get(profile)
        out.print(f"[1/5] device profile: {chosen.name} ({chosen.description})")
        keys = workdir / "keys"
        if not (keys / "demo.key").exists():
            generate_keypair(keys, "demo")
        key = load_signing_key(keys / "demo.key")
        trust = TrustStore.from_files([keys / "demo.pub"])
        bundles = workdir / "bundles"
        if fresh and bundles.exists():
            shutil.rmtree(bundles)

        def export(source: str, name: str) -> Path:
            existing = bundles / f"{name}-1.0.0-{chosen.name}.edgebundle"
            if existing.exists():
                info(f"reusing {existing}")
                return existing
            t0 = time.perf_counter()
            result = run_export(ExportRequest(source=source, profile=chosen, signing_key=key, out_dir=bundles,
                                              name=name, progress=lambda m: info(f"  {m}")))
            m = result.manifest
            info(f"  exported in {time.perf_counter() - t0:.0f} s: {m.precision.value}, "
                 f"fidelity {', '.join(f'{k} {v:.4f}' for k, v in m.fidelity.metrics.items())}")
            return result.bundle

        out.print("[2/5] exporting all-MiniLM-L6-v2 and SmolLM2-135M (GGUF) for this profile")
        emb_bundle = export(str(minilm_dir()), "minilm")
        llm_bundle = export(str(smollm2_gguf()), "smollm2")

        out.print("[3/5] verifying signatures and every payload byte")
        with tempfile.TemporaryDirectory(prefix="edge-demo-") as tmp:
            for b in (emb_bundle, llm_bundle):
                with BundleReader(b) as reader:
                    verified = reader.extract(Path(tmp) / reader.manifest.name, trust)
                out.print(f"  OK {verified.manifest.ref} signed by {verified.key_id}, {b.stat().st_size / 1e6:.1f} MB")

        from edge.cli.demo_fleet import DemoFleet

        fleet_dir = workdir / "fleet"
        if fleet_dir.exists():
            shutil.rmtree(fleet_dir)
        fleet = DemoFleet(fleet_dir, chosen, keys / "demo.pub", devices=devices)
        out.print(f"[4/5] starting a fleet controller (embedded MQTT broker, SQLite) and {devices} local agents")
        try:
            fleet.start()
            online = fleet.wait_online()
            out.print(f"  controller {fleet.url}, broker {fleet.broker}; online: "
                      f"{', '.join(sorted(d['id'] for d in online))}")
            for b in (emb_bundle, llm_bundle):
                stored = fleet.publish(b)
                out.print(f"  published {stored['name']}@{stored['version']} ({stored['size'] / 1e6:.1f} MB)")
            out.print("  rolling out in waves: one canary device, soak, then every device")
            fleet.roll_out("minilm", "1.0.0", out.print)
            fleet.roll_out("smollm2", "1.0.0", out.print)

            out.print("[5/5] asking a device to answer (OpenAI-compatible API on the agent)")
            import httpx

            with fleet.api() as c:
                device = c.get("/api/v1/devices/demo-1").json()
            base = device["http_url"]
            emb = httpx.post(f"{base}/v1/embeddings", json={"model": "minilm", "input": [
                "A fleet of edge devices runs models offline.", "Small computers serve AI without the cloud.",
                "The recipe needs two cups of flour."]}, timeout=120).json()
            import numpy as np

            v = np.array([d["embedding"] for d in emb["data"]], dtype=np.float32)
            out.print(f"  demo-1 embeddings {v.shape}: similarity(1,2)={float(v[0] @ v[1]):.3f}, "
                      f"similarity(1,3)={float(v[0] @ v[2]):.3f}")
            question = "What is the capital of France?"
            chat = httpx.post(f"{base}/v1/chat/completions", json={
                "model": "smollm2", "messages": [{"role": "user", "content": question}], "max_tokens": 24,
                "temperature": 0}, timeout=300).json()
            out.print(f"  demo-1: {question} -> {chat['choices'][0]['message']['content'].strip()}")
            out.print(f"dashboard: {fleet.url}/  (admin token {fleet.token})")
            if keep is None:
                keep = sys.stdin.isatty() and sys.stdout.isatty()
            if keep:
                out.print("the fleet keeps running; press Ctrl-C to stop it")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
        finally:
            fleet.stop()
        out.print(f"bundles are in {bundles}; flash one to a device with `edge flash BUNDLE --data DIR`")
