"""`edge export`: source -> fp32 ONNX -> quantized candidates -> fidelity gate -> signed bundle."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from edge import __version__
from edge.errors import EdgeError, ExportError, FidelityError, ResourceError
from edge.protocol.bundle import BUNDLE_SUFFIX, describe_payload, write_bundle
from edge.protocol.manifest import FidelityReport, Manifest, Provenance
from edge.protocol.profile import DeviceProfile
from edge.protocol.signing import SigningKey

from exporters.handler import Candidate, Exported, Handler, gate, handler_for
from exporters.onnx_io import external_data_files, io_specs
from exporters.sources import Source, resolve_source
from exporters.versions import tool_versions

log = logging.getLogger(__name__)

# RAM a model needs beyond its weights: ORT arena, tokenizer, Python; measured ~60 MB for MiniLM.
RUNTIME_OVERHEAD_MB = 96


@dataclass
class ExportRequest:
    """Everything `edge export` needs."""

    source: str
    profile: DeviceProfile
    signing_key: SigningKey
    out_dir: Path = Path("bundles")
    task: str | None = None
    name: str | None = None
    version: str = "1.0.0"
    samples: Path | None = None
    gguf_file: str | None = None
    progress: Callable[[str], None] = field(default=lambda msg: log.info(msg))


@dataclass
class ExportResult:
    """What was packed."""

    bundle: Path
    manifest: Manifest
    attempts: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """Summarize for the CLI."""
        m = self.manifest
        return {
            "bundle": str(self.bundle),
            "name": m.name,
            "version": m.version,
            "profile": m.profile,
            "precision": m.precision.value,
            "size_mb": self.bundle.stat().st_size / 1e6,
            "fidelity": {k: round(v, 5) for k, v in m.fidelity.metrics.items()},
            "latency_ms": m.latency_ms,
            "attempts": self.attempts,
        }


def _assemble(candidate: Candidate, exported: Exported, target: Path) -> dict[str, str]:
    """Lay out a payload folder: the candidate's model files plus the extras; return roles."""
    target.mkdir(parents=True)
    roles: dict[str, str] = {}
    model = candidate.folder / "model.onnx"
    for name in ["model.onnx", *external_data_files(model)]:
        src = candidate.folder / name
        _link_or_copy(src, target / name)
        roles[name] = "model" if name == "model.onnx" else "external_data"
    for name, (src, role) in exported.extras.items():
        _link_or_copy(src, target / name)
        roles[name] = role
    return roles


def _link_or_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _draft_manifest(req: "ExportRequest", source: Source, exported: Exported, candidate: Candidate,
                    payload: Path, roles: dict[str, str]) -> Manifest:
    inputs, outputs = io_specs(payload / "model.onnx")
    files = describe_payload(payload, roles)
    model_bytes = sum(f.size for f in files if f.role in ("model", "external_data"))
    min_ram = model_bytes // (1 << 20) + RUNTIME_OVERHEAD_MB
    specs = {**exported.specs, **candidate.specs}
    llm = specs.get("llm")
    if llm is not None:  # a full-length KV cache: 2 (K,V) x layers x kv heads x head dim x context
        bytes_per = 2 if llm.kv_dtype == "float16" else 4
        min_ram += (2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * llm.max_context * bytes_per) >> 20
    now = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    return Manifest(
        name=req.name or source.name,
        version=req.version,
        task=source.task,
        profile=req.profile.name,
        architecture=req.profile.architecture,
        precision=candidate.precision,
        required_providers=tuple(req.profile.provider_names()),
        min_ram_mb=int(min_ram),
        model_file="model.onnx",
        inputs=inputs,
        outputs=outputs,
        files=tuple(files),
        provenance=Provenance(
            source=source.spec, source_format=source.format, exporter_version=__version__,
            tools=tool_versions(), quantization={"precision": candidate.precision.value, **candidate.settings},
            created_at=now,
        ),
        fidelity=FidelityReport(passed=False, metrics={}, thresholds={}, samples=0),
        created_at=now,
        **specs,
    )




def run_export(req: ExportRequest) -> ExportResult:
    """Export, quantize, gate and pack; nothing is left behind when it fails."""
    source = resolve_source(req.source, req.task, req.gguf_file)
    handler: Handler = handler_for(source.task.kind)
    plan = req.profile.models.for_kind(source.task.kind)
    req.out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".edge-export-", dir=req.out_dir))
    try:
        return _run(req, source, handler, plan, work)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ResourceError(f"disk full while exporting into {req.out_dir}", hint="free space or pass another -o") from exc
        raise ExportError(f"export failed: {exc}") from exc
    except EdgeError:
        raise
    except MemoryError as exc:
        raise ResourceError("out of memory while exporting", hint="use a machine with more RAM") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(req: ExportRequest, source: Source, handler: Handler, plan, work: Path) -> ExportResult:
    req.progress(f"exporting {source.spec} ({source.format}, {source.task.value}) for {req.profile.name}")
    exported = handler.export(source, req.profile, work / "fp32")
    req.progress("running the source model on the sample set")
    reference = handler.reference(source, exported, req.samples)
    attempts: list[dict[str, Any]] = []
    n = 0
    for precision in plan.attempts():
        gen = handler.candidates(exported, precision, plan, req.profile, work / f"q-{precision.value}", reference)
        try:
            candidate = next(gen)
        except StopIteration:
            continue
        while True:
            n += 1
            payload = work / f"payload-{n}"
            roles = _assemble(candidate, exported, payload)
            draft = _draft_manifest(req, source, exported, candidate, payload, roles)
            req.progress(f"checking fidelity of {precision.value} {candidate.settings}")
            metrics = handler.measure(payload, draft, reference, req.profile)
            thresholds = handler.thresholds(draft, req.profile)
            failures = gate(metrics, thresholds)
            attempts.append({
                "precision": precision.value, "settings": candidate.settings,
                "metrics": {k: round(float(v), 6) for k, v in metrics.items()},
                "passed": not failures, "failures": failures,
            })
            if not failures:
                return _pack(req, handler, draft, payload, metrics, thresholds, attempts, reference)
            req.progress(f"fidelity gate failed: {'; '.join(failures)}")
            try:
                candidate = gen.send((metrics, False))
            except StopIteration:
                break
            shutil.rmtree(payload, ignore_errors=True)
    summary = " | ".join(f"{a['precision']} {a['settings']}: {'; '.join(a['failures'])}" for a in attempts)
    raise FidelityError(
        f"no precision of profile {req.profile.name} passed the fidelity gate: {summary}",
        hint="the bundle was not packed; relax the profile's fidelity thresholds or add an fp32 fallback",
    )


def _pack(req: ExportRequest, handler: Handler, draft: Manifest, payload: Path, metrics: dict[str, float],
          thresholds: dict[str, tuple[str, float]], attempts: list[dict[str, Any]], reference: Any) -> ExportResult:
    req.progress("measuring latency on this machine")
    latency = handler.latency(payload, draft, req.profile)
    samples = getattr(reference, "count", 0)
    manifest = draft.model_copy(update={
        "fidelity": FidelityReport(
            passed=True, metrics={k: float(v) for k, v in metrics.items()},
            thresholds={k: float(b) for k, (_, b) in thresholds.items()}, samples=int(samples),
            attempts=tuple(attempts),
        ),
        "latency_ms": latency,
    })
    manifest = Manifest.model_validate(manifest.model_dump())  # re-validate the final document
    size_mb = manifest.payload_size() / (1 << 20)
    if size_mb > req.profile.max_bundle_mb:
        raise ExportError(
            f"bundle payload is {size_mb:.0f} MB, over profile {req.profile.name}'s max_bundle_mb {req.profile.max_bundle_mb}",
            hint="choose a smaller model or a profile with more room",
        )
    out = req.out_dir / f"{manifest.name}-{manifest.version}-{manifest.profile}{BUNDLE_SUFFIX}"
    req.progress(f"packing and signing {out}")
    write_bundle(out, manifest, payload, req.signing_key)
    return ExportResult(out, manifest, attempts)
