"""`edge export MODEL --profile NAME`: compile a model into a verified, signed bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edge.cli.output import emit, stdout
from edge.errors import ConfigError


def register(app: typer.Typer) -> None:
    """Add the `export` command to the CLI."""

    @app.command("export")
    def export(
        model: str = typer.Argument(..., help="Hugging Face folder, .gguf file, .onnx file or Hub id."),
        profile: str = typer.Option("auto", "--profile", "-p", help="Device profile name, or 'auto' to detect this machine's."),
        task: Optional[str] = typer.Option(None, "--task", help="feature-extraction, text-classification, text-generation or generic (default: inferred)."),
        out: Path = typer.Option(Path("bundles"), "-o", "--out", help="Folder for the bundle."),
        name: Optional[str] = typer.Option(None, "--name", help="Model name in the bundle (default: from the source)."),
        version: str = typer.Option("1.0.0", "--version", help="Bundle version (MAJOR.MINOR.PATCH)."),
        key: Optional[Path] = typer.Option(None, "--key", help="Signing key (default $EDGE_SIGNING_KEY or $EDGE_HOME/keys/edge.key)."),
        samples: Optional[Path] = typer.Option(None, "--samples", help="File of sample inputs for the fidelity gate (one text per line, or .npz for generic ONNX)."),
        gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="GGUF file name inside a folder or Hub repo."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Export MODEL for a device profile: optimize, quantize, prove fidelity, pack and sign."""
        try:
            from exporters.pipeline import ExportRequest, run_export
        except ImportError as exc:
            raise ConfigError(
                f"the exporter is not installed ({exc.name} is missing)",
                hint="install the build-machine extra: pip install 'edge-fleet[export]'",
            ) from exc
        from edge.cli.bundle import resolve_signing_key
        from edge.cli.profiles import catalog

        cat = catalog()
        if profile == "auto":
            from edge.runtime.detect import detect_profile

            chosen, _ = detect_profile(cat)
        else:
            chosen = cat.get(profile)
        request = ExportRequest(
            source=model, profile=chosen, task=task, out_dir=out, name=name, version=version,
            signing_key=resolve_signing_key(key), samples=samples, gguf_file=gguf_file,
        )
        result = run_export(request)
        emit(result.to_dict(), as_json, lambda d: stdout().print(
            f"bundle {d['bundle']}\n  {d['name']}@{d['version']} for {d['profile']} ({d['precision']}), "
            f"{d['size_mb']:.1f} MB, fidelity {d['fidelity']}"))
