"""Resolve what the user passed to `edge export` into a local model and its task."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from edge.errors import ModelSourceError, UnsupportedModelError
from edge.protocol.enums import Task

# Hugging Face architectures, by the task Edge exports them for. Decoders need a KV-cache export
# optimum supports; encoders need a pooled or classification head.
DECODER_TYPES = frozenset({
    "llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "granite", "smollm3", "olmo",
})  # fmt: skip
ENCODER_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "deberta", "deberta-v2",
    "albert", "camembert", "modernbert", "nomic_bert",
})  # fmt: skip
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class Source:
    """A model ready to export: a local Hugging Face folder or an ONNX file."""

    spec: str  # what the user passed
    format: str  # hf-folder | gguf | onnx | hub
    path: Path  # HF folder, or the .onnx file
    task: Task
    name: str  # default bundle name
    gguf_file: str | None = None  # for format gguf: the file inside ``path``


def _bundle_name(raw: str) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", raw.lower()).strip("-._")[:64]
    return name or "model"


def read_hf_config(folder: Path) -> dict:
    """Read a Hugging Face folder's config.json."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelSourceError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder",
            hint="pass a folder saved with save_pretrained, a .gguf file or a .onnx file",
        )
    try:
        data = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"{cfg} is corrupt: {exc}") from exc
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelSourceError(f"{cfg} has no model_type")
    return data


def infer_task(config: dict, folder: Path, requested: str | None) -> Task:
    """Pick the task from --task or the model's config, refusing what Edge cannot export."""
    model_type = str(config.get("model_type"))
    archs = [str(a) for a in config.get("architectures") or []]
    if requested:
        try:
            task = Task(requested)
        except ValueError:
            raise ModelSourceError(
                f"unknown task {requested!r}", hint=f"valid: {', '.join(t.value for t in Task)}"
            ) from None
    elif model_type in DECODER_TYPES:
        task = Task.TEXT_GENERATION
    elif any(a.endswith("ForSequenceClassification") for a in archs):
        task = Task.TEXT_CLASSIFICATION
    elif model_type in ENCODER_TYPES:
        task = Task.FEATURE_EXTRACTION
    else:
        raise UnsupportedModelError(
            f"model type {model_type!r} ({', '.join(archs) or 'no architectures'}) is not supported",
            hint=f"supported decoders: {', '.join(sorted(DECODER_TYPES))}; encoders: {', '.join(sorted(ENCODER_TYPES))}",
        )
    if task is Task.TEXT_GENERATION and model_type not in DECODER_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not a supported decoder for text-generation",
            hint=f"supported: {', '.join(sorted(DECODER_TYPES))}",
        )
    if task in (Task.FEATURE_EXTRACTION, Task.TEXT_CLASSIFICATION) and model_type not in ENCODER_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not a supported encoder for {task.value}",
            hint=f"supported: {', '.join(sorted(ENCODER_TYPES))}",
        )
    if task is Task.GENERIC:
        raise ModelSourceError("task generic is for .onnx files", hint="pass a .onnx file")
    return task


def resolve_source(spec: str, task: str | None, gguf_file: str | None = None) -> Source:
    """Turn the MODEL argument into a :class:`Source`."""
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".onnx":
            if task not in (None, Task.GENERIC.value):
                raise ModelSourceError(f"an .onnx file exports with task generic, not {task}")
            return Source(spec, "onnx", path, Task.GENERIC, _bundle_name(path.stem))
        if path.is_file() and path.suffix == ".gguf":
            return _gguf_source(spec, path.parent, path.name, task)
        if path.is_dir():
            if gguf_file or (not (path / "config.json").exists() and list(path.glob("*.gguf"))):
                ggufs = sorted(p.name for p in path.glob("*.gguf"))
                chosen = gguf_file or (ggufs[0] if len(ggufs) == 1 else None)
                if chosen is None:
                    raise ModelSourceError(f"{path} holds several GGUF files: {', '.join(ggufs)}", hint="pass --gguf-file NAME")
                return _gguf_source(spec, path, chosen, task)
            config = read_hf_config(path)
            return Source(spec, "hf-folder", path, infer_task(config, path, task), _bundle_name(path.name))
        raise ModelSourceError(
            f"{path} is neither a model folder, a .gguf file nor a .onnx file",
            hint="pass a Hugging Face folder, a .gguf file, a .onnx file or a Hub id",
        )
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _hub_source(spec, task, gguf_file)
    raise ModelSourceError(f"{spec} does not exist", hint="check the path, or pass a Hub id like org/model")


def _gguf_source(spec: str, folder: Path, filename: str, task: str | None) -> Source:
    if task not in (None, Task.TEXT_GENERATION.value):
        raise UnsupportedModelError(f"GGUF files export as text-generation, not {task}")
    with open(folder / filename, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ModelSourceError(f"{folder / filename} is not a GGUF file (bad magic)")
    return Source(spec, "gguf", folder, Task.TEXT_GENERATION, _bundle_name(Path(filename).stem), gguf_file=filename)


def _hub_source(spec: str, task: str | None, gguf_file: str | None) -> Source:
    """Download (or find in the local cache when offline) a Hub repository."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - comes with transformers
        raise ModelSourceError("huggingface_hub is not installed") from exc
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py"]
    if gguf_file:
        patterns = ["*.json", "*.txt", "*.jinja", gguf_file]
    try:
        folder = Path(snapshot_download(spec, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        raise ModelSourceError(
            f"{spec} is not in the local Hugging Face cache and the Hub cannot be reached",
            hint="connect the build machine to the internet once, or pass a local folder",
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot fetch {spec} from the Hub: {exc}") from exc
    name = _bundle_name(spec.split("/")[-1])
    if gguf_file:
        src = _gguf_source(spec, folder, gguf_file, task)
        return Source(spec, "hub", folder, src.task, name, gguf_file=gguf_file)
    config = read_hf_config(folder)
    return Source(spec, "hub", folder, infer_task(config, folder, task), name)
