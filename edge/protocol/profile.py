"""Device profiles: typed, strictly validated descriptions of a class of device.

A profile is YAML on disk (``device_profiles/*.yaml`` ships with the package); it is parsed once,
here, into a frozen :class:`DeviceProfile`. Unknown keys, wrong types and impossible combinations
are errors naming the file, the key and the valid choices.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge.errors import ProfileError
from edge.protocol.enums import (
    PROVIDER_OPTION_KEYS,
    Accelerator,
    Architecture,
    ExecutionProvider,
    ModelKind,
    Precision,
)

# ONNX opsets the exporter can target: 14 is the first with the attention-friendly Trilu/Softmax
# semantics optimum relies on; 21 is the newest ONNX Runtime 1.20+ executes on every provider.
MIN_OPSET, MAX_OPSET = 14, 21


# Bounded repr for values quoted in errors: YAML aliases can make a 300-byte file a structure
# whose full repr is hundreds of megabytes (the "billion laughs").
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80


def _short(value: Any) -> str:
    return _REPR.repr(value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_enum_values=False)


class ProviderSpec(_Strict):
    """One execution provider with its ONNX Runtime options (keys verbatim)."""

    name: ExecutionProvider
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _coerce_enum(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            data = dict(data)
            try:
                data["name"] = ExecutionProvider(data["name"])
            except ValueError:
                valid = ", ".join(p.value for p in ExecutionProvider)
                raise ValueError(f"unknown execution provider {data['name']!r}; valid: {valid}")
        return data

    @model_validator(mode="after")
    def _check_options(self) -> "ProviderSpec":
        known = PROVIDER_OPTION_KEYS[self.name]
        unknown = sorted(set(self.options) - known)
        if unknown:
            valid = ", ".join(sorted(known)) or "(none)"
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for {self.name.value}; valid: {valid}"
            )
        return self

    def ort_options(self) -> dict[str, str]:
        """Return the options as ONNX Runtime wants them (strings)."""
        return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in self.options.items()}


class Int8Settings(_Strict):
    """Dynamic int8 quantization settings (weights int8, activations quantized at run time)."""

    per_channel: bool = True
    reduce_range: bool = False
    # Op types kept in float; e.g. Gather keeps word embeddings exact.
    exclude_op_types: tuple[str, ...] = ()
    # Extra automatic search: exclude the most sensitive MatMul nodes until the gate passes.
    search_excluded_nodes: bool = True


class Int4Settings(_Strict):
    """Weight-only int4 (MatMulNBits) settings."""

    block_size: Literal[16, 32, 64, 128] = 32
    # 4 selects the int8 dot-product compute path of MatMulNBits (fastest on AVX2/VNNI/NEON).
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    symmetric: bool = True
    quantize_lm_head: bool = True


class Fp16Settings(_Strict):
    """fp32 to fp16 conversion settings for GPU profiles."""

    keep_io_types: bool = True
    op_block_list: tuple[str, ...] = ()


class PrecisionPlan(_Strict):
    """Precision for one model kind, with the fallbacks tried when the fidelity gate fails."""

    precision: Precision
    fallback: tuple[Precision, ...] = ()
    int8: Int8Settings | None = None
    int4: Int4Settings | None = None
    fp16: Fp16Settings | None = None

    @model_validator(mode="before")
    @classmethod
    def _coerce(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        valid = ", ".join(p.value for p in Precision)
        for key in ("precision",):
            if isinstance(data.get(key), str):
                try:
                    data[key] = Precision(data[key])
                except ValueError:
                    raise ValueError(f"unknown precision {data[key]!r}; valid: {valid}")
        if isinstance(data.get("fallback"), (list, tuple)):
            out = []
            for item in data["fallback"]:
                try:
                    if not isinstance(item, str):  # Enum's own error would repr any object in full
                        raise ValueError(item)
                    out.append(Precision(item))
                except ValueError:
                    raise ValueError(f"unknown fallback precision {_short(item)}; valid: {valid}")
            data["fallback"] = tuple(out)
        for key in ("int8", "int4", "fp16"):
            if isinstance(data.get(key), dict):
                for list_key in ("exclude_op_types", "op_block_list"):
                    if isinstance(data[key].get(list_key), list):
                        data[key] = {**data[key], list_key: tuple(data[key][list_key])}
        return data

    @model_validator(mode="after")
    def _check(self) -> "PrecisionPlan":
        order = (self.precision, *self.fallback)
        if len(set(order)) != len(order):
            raise ValueError("fallback repeats a precision already tried")
        for prec, settings in (
            (Precision.INT8, self.int8),
            (Precision.INT4, self.int4),
            (Precision.FP16, self.fp16),
        ):
            if settings is not None and prec not in order:
                raise ValueError(
                    f"{prec.value} settings are given but {prec.value} is neither the precision "
                    f"nor a fallback"
                )
        return self

    def attempts(self) -> tuple[Precision, ...]:
        """Return the precisions to try, in order."""
        return (self.precision, *self.fallback)

    def int8_settings(self) -> Int8Settings:
        """Return the int8 settings, defaults when the profile gives none."""
        return self.int8 or Int8Settings()

    def int4_settings(self) -> Int4Settings:
        """Return the int4 settings, defaults when the profile gives none."""
        return self.int4 or Int4Settings()

    def fp16_settings(self) -> Fp16Settings:
        """Return the fp16 settings, defaults when the profile gives none."""
        return self.fp16 or Fp16Settings()


class PrecisionPlans(_Strict):
    """One precision plan per model kind."""

    encoder: PrecisionPlan
    llm: PrecisionPlan
    generic: PrecisionPlan

    def for_kind(self, kind: ModelKind) -> PrecisionPlan:
        """Return the plan for a model kind."""
        return getattr(self, kind.value)


class Threads(_Strict):
    """ONNX Runtime thread pools; 0 intra-op threads means one per physical core."""

    intra_op: int = Field(0, ge=0, le=256)
    inter_op: int = Field(1, ge=1, le=64)


class EncoderThresholds(_Strict):
    """Fidelity of pooled embeddings, cosine to the source model."""

    cosine_mean_min: float = Field(0.995, gt=0, le=1)
    cosine_p5_min: float = Field(0.985, gt=0, le=1)
    # The single worst sample: mean and p5 over ~50 samples let one lone outlier through (one
    # sentence at 0.963 among 47 at 0.999 passes both), and that sentence is a wrong search hit.
    cosine_min_min: float = Field(0.97, gt=0, le=1)


class ClassifierThresholds(_Strict):
    """Fidelity of a classifier: share of inputs whose top-1 class matches the source."""

    top1_agreement_min: float = Field(0.95, gt=0, le=1)


class LLMThresholds(_Strict):
    """Fidelity of an LLM: teacher-forced greedy-token agreement and log-prob drift."""

    token_agreement_min: float = Field(0.9, gt=0, le=1)
    logprob_drift_max: float = Field(0.5, ge=0)


class GenericThresholds(_Strict):
    """Fidelity of a bring-your-own ONNX model: cosine of every output to the fp32 model."""

    cosine_mean_min: float = Field(0.995, gt=0, le=1)
    cosine_p5_min: float = Field(0.98, gt=0, le=1)


class FidelityThresholds(_Strict):
    """Thresholds of the fidelity gate, per metric family."""

    encoder: EncoderThresholds = EncoderThresholds()
    classifier: ClassifierThresholds = ClassifierThresholds()
    llm: LLMThresholds = LLMThresholds()
    generic: GenericThresholds = GenericThresholds()


class Detection(_Strict):
    """How `edge profiles detect` recognises a machine this profile fits."""

    cpu_flags: tuple[str, ...] = ()  # every flag must appear in /proc/cpuinfo
    board_model: tuple[str, ...] = ()  # any substring of /proc/device-tree/model
    priority: int = 0  # among fitting profiles the highest wins

    @model_validator(mode="before")
    @classmethod
    def _tuples(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return data


class DeviceProfile(_Strict):
    """A validated device profile."""

    schema_version: Literal[1] = 1
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    description: str
    architecture: Architecture
    accelerator: Accelerator = Accelerator.NONE
    execution_providers: tuple[ProviderSpec, ...] = Field(min_length=1)
    models: PrecisionPlans
    threads: Threads = Threads()
    memory_mb: int = Field(gt=0)
    disk_mb: int = Field(gt=0)
    max_bundle_mb: int = Field(gt=0)
    opset: int = Field(ge=MIN_OPSET, le=MAX_OPSET)
    fidelity: FidelityThresholds = FidelityThresholds()
    detect: Detection = Detection()

    @model_validator(mode="before")
    @classmethod
    def _coerce(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key, enum in (("architecture", Architecture), ("accelerator", Accelerator)):
            if isinstance(data.get(key), str):
                try:
                    data[key] = enum(data[key])
                except ValueError:
                    valid = ", ".join(e.value for e in enum)
                    raise ValueError(f"{key}: unknown value {data[key]!r}; valid: {valid}")
        if isinstance(data.get("execution_providers"), list):
            data["execution_providers"] = tuple(data["execution_providers"])
        return data

    @model_validator(mode="after")
    def _check(self) -> "DeviceProfile":
        names = [p.name for p in self.execution_providers]
        if len(set(names)) != len(names):
            raise ValueError("execution_providers: a provider is listed twice")
        gpu = [n for n in names if n.needs_gpu]
        if gpu and self.accelerator is not Accelerator.CUDA:
            raise ValueError(
                f"execution_providers: {gpu[0].value} needs accelerator: cuda "
                f"(this profile says accelerator: {self.accelerator.value})"
            )
        if self.accelerator is Accelerator.CUDA and not gpu:
            raise ValueError(
                "accelerator: cuda needs CUDAExecutionProvider or TensorrtExecutionProvider "
                "in execution_providers"
            )
        if ExecutionProvider.TENSORRT in names:
            if ExecutionProvider.CUDA not in names or names.index(ExecutionProvider.CUDA) < names.index(
                ExecutionProvider.TENSORRT
            ):
                raise ValueError(
                    "execution_providers: TensorrtExecutionProvider needs CUDAExecutionProvider "
                    "after it, for the nodes TensorRT cannot take"
                )
        if names[-1] is not ExecutionProvider.CPU:
            raise ValueError(
                "execution_providers: the last provider must be CPUExecutionProvider, "
                "the fallback every other provider relies on"
            )
        for kind in ModelKind:
            plan = self.models.for_kind(kind)
            if Precision.FP16 in plan.attempts() and not gpu:
                raise ValueError(
                    f"models.{kind.value}: fp16 needs a GPU execution provider; CPU profiles "
                    f"use int8, int4 or fp32"
                )
        if self.architecture is Architecture.AARCH64 and any(
            f.startswith(("avx", "sse")) for f in self.detect.cpu_flags
        ):
            raise ValueError("detect.cpu_flags: x86 flags on an aarch64 profile")
        if self.max_bundle_mb > self.disk_mb:
            raise ValueError(
                f"max_bundle_mb ({self.max_bundle_mb}) is larger than disk_mb ({self.disk_mb})"
            )
        return self

    def providers(self) -> list[tuple[str, dict[str, str]]]:
        """Return (provider, options) pairs in fallback order, as ORT takes them."""
        return [(p.name.value, p.ort_options()) for p in self.execution_providers]

    def provider_names(self) -> list[str]:
        """Return the provider names in fallback order."""
        return [p.name.value for p in self.execution_providers]

    def to_dict(self) -> dict[str, Any]:
        """Return the profile as plain JSON-able data."""
        return self.model_dump(mode="json")


def _format_validation(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent = _model_at(err["loc"][:-1])
            valid = ", ".join(parent.model_fields) if parent else "see the docs"
            msg = f"unknown key; valid keys here: {valid}"
        elif err["type"] in ("enum", "literal_error") and "expected" in err.get("ctx", {}):
            msg = f"invalid value {_short(err.get('input'))}; valid: {err['ctx']['expected']}"
        lines.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(lines)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = DeviceProfile
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None if not isinstance(part, int) else model
        ann = model.model_fields[part].annotation
        model = _first_model(ann)
    return model


def _first_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _first_model(arg)
        if found:
            return found
    return None


def parse_profile(data: Any, source: str = "<profile>") -> DeviceProfile:
    """Validate already-loaded YAML data into a profile, naming ``source`` in errors."""
    if not isinstance(data, dict):
        raise ProfileError(
            f"{source}: a profile must be a YAML mapping, got {type(data).__name__}",
            hint="see device_profiles/generic-cpu.yaml for the layout",
        )
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(
            _format_validation(source, exc), hint="fix the key named above and run `edge profiles check FILE`"
        ) from exc


# A profile is a few KiB of YAML; anything far larger is a mistake or an attack.
MAX_PROFILE_BYTES = 256 * 1024
# Real profiles nest flow collections ([...], {...}) two levels deep. PyYAML's pure-Python scanner
# is quadratic in flow depth (5,000 '[' take seconds, 60,000 hang) before it recurses too deep.
MAX_FLOW_DEPTH = 32


def _flow_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}" and depth:
            depth -= 1
    return deepest


def load_profile_file(path: Path) -> DeviceProfile:
    """Load and validate one profile YAML file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read profile: {exc}") from exc
    if len(text) > MAX_PROFILE_BYTES:
        raise ProfileError(f"{path}: profile is {len(text)} characters, over the {MAX_PROFILE_BYTES} limit")
    if _flow_depth(text) > MAX_FLOW_DEPTH:
        raise ProfileError(f"{path}: brackets nest deeper than {MAX_FLOW_DEPTH} levels",
                           hint="write nested settings as indented YAML blocks")
    try:
        data = yaml.safe_load(text)
    # Besides YAMLError, PyYAML raises ValueError for impossible dates ("2020-99-99") and
    # RecursionError for deep nesting.
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from exc
    profile = parse_profile(data, str(path))
    if path.stem != profile.name:
        raise ProfileError(
            f"{path}: name {profile.name!r} does not match the file name {path.stem!r}",
            hint="name the file after the profile",
        )
    return profile


