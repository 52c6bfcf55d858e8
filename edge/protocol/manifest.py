"""The bundle manifest: what a bundle holds, for which device, and how it was made and verified."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge.errors import BundleError
from edge.protocol.enums import Architecture, ModelKind, Precision, Task

MANIFEST_SCHEMA_VERSION = 1
# Model names travel in MQTT topics, URLs and folder names: keep them to a safe alphabet.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
VERSION_PATTERN = r"^(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})(-[0-9A-Za-z.-]{1,32})?$"
# ONNX tensor element types the manifest may declare.
DTYPES = (
    "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
    "uint8", "uint16", "uint32", "uint64", "bool", "string",
)  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One model input or output: name, element type and shape (symbolic dims as names)."""

    name: str = Field(min_length=1, max_length=256)
    dtype: Literal[DTYPES]  # type: ignore[valid-type]
    shape: tuple[int | str, ...]


class FileEntry(_Strict):
    """One payload file with its size and SHA-256."""

    path: str = Field(min_length=1, max_length=255)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    role: Literal[
        "model", "external_data", "tokenizer", "tokenizer_config", "chat_template",
        "generation_config", "pooling_config", "config", "labels", "other",
    ]  # fmt: skip


class Pooling(_Strict):
    """Sentence-transformers pooling of token embeddings."""

    mode: Literal["mean", "cls", "max", "lasttoken"] = "mean"
    normalize: bool = True
    output: str = "last_hidden_state"  # the model output pooled


class LLMSpec(_Strict):
    """What the on-device generator needs to drive a decoder with a KV cache."""

    num_layers: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    max_context: int = Field(gt=0)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    kv_dtype: Literal["float32", "float16"] = "float32"
    past_key_name: str = "past_key_values.{layer}.key"
    past_value_name: str = "past_key_values.{layer}.value"
    present_key_name: str = "present.{layer}.key"
    present_value_name: str = "present.{layer}.value"
    uses_position_ids: bool = True
    # How past KV travels between runs: "concat" (optimum's export: present = past + new, a new
    # tensor each step, with attention_mask/position_ids inputs) or "shared-buffer" (Edge's fused
    # graph: one [batch, kv_heads, capacity, head_dim] buffer per layer bound as past and present,
    # appended in place by GroupQueryAttention, located by seqlens_k/total_sequence_length).
    kv_layout: Literal["concat", "shared-buffer"] = "concat"
    input_ids_name: str = "input_ids"
    logits_name: str = "logits"
    attention_mask_name: str = "attention_mask"
    position_ids_name: str = "position_ids"
    seqlens_k_name: str | None = None
    total_sequence_length_name: str | None = None
    # int64 input choosing the positions whose logits are computed (None: every position).
    logits_index_name: str | None = None


class ClassifierSpec(_Strict):
    """Labels of a text classifier, index order."""

    labels: tuple[str, ...]
    problem_type: Literal["single_label_classification", "multi_label_classification"] = (
        "single_label_classification"
    )


class Provenance(_Strict):
    """How the bundle was made."""

    source: str
    source_format: Literal["hf-folder", "gguf", "onnx", "hub"]
    exporter_version: str
    tools: dict[str, str] = Field(default_factory=dict)
    quantization: dict[str, Any] = Field(default_factory=dict)
    created_at: str


class FidelityReport(_Strict):
    """Outcome of the fidelity gate for the packed model."""

    passed: bool
    metrics: dict[str, float]
    thresholds: dict[str, float]
    samples: int = Field(ge=0)
    attempts: tuple[dict[str, Any], ...] = ()


class Manifest(_Strict):
    """A bundle's manifest. Its exact bytes are what the signature covers."""

    schema_version: Literal[1] = MANIFEST_SCHEMA_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    task: Task
    profile: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    architecture: Architecture
    precision: Precision
    required_providers: tuple[str, ...] = Field(min_length=1)
    min_ram_mb: int = Field(ge=0)
    model_file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: tuple[FileEntry, ...] = Field(min_length=1)
    pooling: Pooling | None = None
    llm: LLMSpec | None = None
    classifier: ClassifierSpec | None = None
    provenance: Provenance
    fidelity: FidelityReport
    latency_ms: dict[str, float] = Field(default_factory=dict)
    # Signed validity window (ISO 8601 UTC); an agent refuses a bundle past expires_at.
    created_at: str
    expires_at: str | None = None
    # A bundle older than the installed version is refused unless it says so, signed.
    allow_downgrade: bool = False

    @field_validator("files")
    @classmethod
    def _unique_paths(cls, files: tuple[FileEntry, ...]) -> tuple[FileEntry, ...]:
        seen: set[str] = set()
        for f in files:
            key = f.path.casefold()
            if key in seen:
                raise ValueError(f"payload file {f.path!r} listed twice")
            seen.add(key)
        return files

    @property
    def kind(self) -> ModelKind:
        """Return the model kind (encoder, llm, generic)."""
        return self.task.kind

    @property
    def ref(self) -> str:
        """Return ``name@version``."""
        return f"{self.name}@{self.version}"

    def file(self, path: str) -> FileEntry:
        """Return the entry for one payload path."""
        for f in self.files:
            if f.path == path:
                return f
        raise BundleError(f"manifest lists no payload file {path!r}")

    def payload_size(self) -> int:
        """Return the total payload size in bytes."""
        return sum(f.size for f in self.files)

    def to_bytes(self) -> bytes:
        """Serialize canonically (sorted keys, no spaces): these are the signed bytes."""
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode()


def version_key(version: str) -> tuple[int, int, int, int, str]:
    """Order versions: numeric parts, then a release after any pre-release of it."""
    m = re.match(VERSION_PATTERN, version)
    if not m:
        raise BundleError(f"invalid version {version!r}", hint="use MAJOR.MINOR.PATCH[-pre]")
    major, minor, patch, pre = m.groups()
    return (int(major), int(minor), int(patch), 0 if pre else 1, pre or "")


# A manifest larger than this is refused before parsing: real ones are a few KiB.
MAX_MANIFEST_BYTES = 1 << 20


def parse_manifest(raw: bytes) -> Manifest:
    """Parse and strictly validate manifest bytes."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"manifest is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, Python's int digit limit, deep nesting
        raise BundleError(f"manifest is not valid JSON: {exc}") from exc
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise BundleError(f"manifest is invalid: {details}") from exc
