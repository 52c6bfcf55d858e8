"""`edge demo`: Edge's main job end to end on the embedded defaults, on this one machine."""

from __future__ import annotations

import shutil
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
    ) -> None:
        """Export real models for this machine's profile, verify the bundles and run them."""
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
        from edge.runtime.model import load_model

        out = stdout()
        cat = catalog()
        chosen = detect_profile(cat)[0] if profile == "auto" else cat.get(profile)
        out.print(f"[1/4] device profile: {chosen.name} ({chosen.description})")
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

        out.print("[2/4] exporting all-MiniLM-L6-v2 and SmolLM2-135M (GGUF) for this profile")
        emb_bundle = export(str(minilm_dir()), "minilm")
        llm_bundle = export(str(smollm2_gguf()), "smollm2")

        out.print("[3/4] verifying signatures and every payload byte")
        with tempfile.TemporaryDirectory(prefix="edge-demo-") as tmp:
            folders = {}
            for b in (emb_bundle, llm_bundle):
                with BundleReader(b) as reader:
                    verified = reader.extract(Path(tmp) / reader.manifest.name, trust)
                folders[verified.manifest.name] = (Path(tmp) / verified.manifest.name, verified.manifest)
                out.print(f"  OK {verified.manifest.ref} signed by {verified.key_id}, "
                          f"{b.stat().st_size / 1e6:.1f} MB")

            out.print("[4/4] running inference from the bundles (onnxruntime only)")
            emb = load_model(*folders["minilm"], chosen)
            sentences = ["A fleet of edge devices runs models offline.",
                         "Small computers serve AI without the cloud.",
                         "The recipe needs two cups of flour."]
            vectors = emb.embed(sentences)
            out.print(f"  embeddings {vectors.shape}: similarity(1,2)={float(vectors[0] @ vectors[1]):.3f}, "
                      f"similarity(1,3)={float(vectors[0] @ vectors[2]):.3f}")
            from edge.runtime.generator import GenerationParams

            llm = load_model(*folders["smollm2"], chosen)
            question = "What is the capital of France?"
            prompt = llm.render_chat([{"role": "user", "content": question}])
            answer = "".join(e.text for e in llm.generate(llm.encode(prompt), GenerationParams(max_tokens=24)))
            out.print(f"  {question} -> {answer.strip()}")
        out.print(f"bundles are in {bundles}; flash one to a device with `edge flash BUNDLE --data DIR`")
