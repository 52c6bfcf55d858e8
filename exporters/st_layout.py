"""The sentence-transformers folder layout, read the way sentence-transformers reads it.

What the encoder exporter needs from a model folder beyond the transformer itself: the pooling
(modules.json, 1_Pooling/config.json, a Normalize module), the token limit and lowercasing
(sentence_bert_config.json), classifier labels (config.json), and a check that the weights are
readable. ``st_pool`` is sentence-transformers' own pooling in torch, for the reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edge.errors import ModelSourceError, UnsupportedModelError
from edge.protocol.manifest import ClassifierSpec, Pooling

# sentence-transformers module types Edge reproduces on the device; anything else (Dense,
# LayerNorm, WordEmbeddings...) changes the embedding in a way the device would not.
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"
_ST_KNOWN = {ST_TRANSFORMER, ST_POOLING, ST_NORMALIZE}
# Legacy boolean pooling keys of 1_Pooling/config.json, and the mode each selects.
_LEGACY_MODES = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
}  # fmt: skip
_DEVICE_MODES = ("mean", "cls", "max", "lasttoken")
# Model types whose positions start after pad_token_id (RoBERTa numbering).
_OFFSET_POSITION_TYPES = ("roberta", "xlm-roberta", "camembert", "longformer")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON file of the model folder, refusing a corrupt one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"{path} is corrupt: {exc}") from exc
    if not isinstance(data, (dict, list)):
        raise ModelSourceError(f"{path} is not a JSON object")
    return data  # type: ignore[return-value]


def read_pooling(folder: Path) -> tuple[Pooling, dict[str, Path]]:
    """Return the sentence-transformers pooling of a model folder and the files that declare it.

    Without modules.json the model is a plain transformers encoder: mean pooling, normalized
    (what sentence-transformers itself does when it wraps such a model, plus the normalization
    every cosine-similarity consumer expects).
    """
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return Pooling(mode="mean", normalize=True), {}
    modules = read_json(modules_path)
    if not isinstance(modules, list):
        raise ModelSourceError(f"{modules_path} is not a list of modules")
    files = {"modules.json": modules_path}
    types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
    unknown = [t for t in types if t not in _ST_KNOWN]
    if unknown:
        raise UnsupportedModelError(
            f"{folder}: sentence-transformers module(s) {', '.join(unknown)} are not supported on devices",
            hint="supported modules: Transformer, Pooling, Normalize",
        )
    mode = "mean"
    for m in modules:
        if isinstance(m, dict) and m.get("type") == ST_POOLING:
            cfg_path = folder / str(m.get("path", "")) / "config.json"
            if not cfg_path.is_file():
                raise ModelSourceError(f"{folder}: pooling module has no {cfg_path.relative_to(folder)}")
            mode = _pooling_mode(read_json(cfg_path), cfg_path)
            files["1_Pooling/config.json"] = cfg_path
    st_cfg = folder / "sentence_bert_config.json"
    if st_cfg.is_file():
        files["sentence_bert_config.json"] = st_cfg
    return Pooling(mode=mode, normalize=ST_NORMALIZE in types), files  # type: ignore[arg-type]


def _pooling_mode(cfg: dict[str, Any], path: Path) -> str:
    raw = cfg.get("pooling_mode")
    if raw is None:  # legacy boolean keys
        modes = [mode for key, mode in _LEGACY_MODES.items() if cfg.get(key)]
        modes = modes or ["mean"]
    else:
        modes = [raw] if isinstance(raw, str) else list(raw)
    if cfg.get("include_prompt") is False:
        raise UnsupportedModelError(f"{path}: pooling that excludes the prompt is not supported on devices")
    if len(modes) != 1 or modes[0] not in _DEVICE_MODES:
        raise UnsupportedModelError(
            f"{path}: pooling {'+'.join(map(str, modes))} is not supported on devices",
            hint=f"supported: {', '.join(_DEVICE_MODES)}",
        )
    return modes[0]


def read_classifier(config: dict[str, Any]) -> ClassifierSpec:
    """Return the labels of a sequence classifier from its config.json, in logit order."""
    id2label = config.get("id2label") or {}
    try:
        pairs = sorted((int(k), str(v)) for k, v in id2label.items())
    except (TypeError, ValueError) as exc:
        raise ModelSourceError(f"config.json id2label is malformed: {exc}") from exc
    if not pairs or [k for k, _ in pairs] != list(range(len(pairs))):
        n = int(config.get("num_labels") or 0)
        if n < 1:
            raise ModelSourceError("config.json declares no labels (id2label or num_labels)")
        pairs = [(i, f"LABEL_{i}") for i in range(n)]
    problem = config.get("problem_type") or "single_label_classification"
    if problem not in ("single_label_classification", "multi_label_classification"):
        raise UnsupportedModelError(f"classifier problem_type {problem!r} is not supported",
                                    hint="supported: single_label_classification, multi_label_classification")
    return ClassifierSpec(labels=tuple(v for _, v in pairs), problem_type=problem)


def check_weights(folder: Path) -> None:
    """Refuse a folder whose weights are missing or whose safetensors headers are corrupt."""
    st_files = sorted(folder.glob("*.safetensors"))
    if not st_files and not list(folder.glob("pytorch_model*.bin")):
        raise ModelSourceError(f"{folder} holds no weights (*.safetensors or pytorch_model.bin)")
    from safetensors import safe_open

    for path in st_files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                names = list(fh.keys())
                if names:  # touch one tensor: a truncated file fails here, not in the middle of export
                    fh.get_slice(names[-1])
        except Exception as exc:  # safetensors raises its own SafetensorError and OSError
            raise ModelSourceError(f"{path} is corrupt: {exc}", hint="re-save the model with save_pretrained") from exc


def st_max_length(folder: Path, config: Any, tokenizer: Any) -> tuple[int, bool]:
    """Return (max_seq_length, do_lower_case) as sentence-transformers resolves them."""
    st_cfg = folder / "sentence_bert_config.json"
    data = read_json(st_cfg) if st_cfg.is_file() else {}
    lowercase = bool(data.get("do_lower_case", False))
    positions = getattr(config, "max_position_embeddings", None)
    if positions and getattr(config, "model_type", "") in _OFFSET_POSITION_TYPES:
        positions -= int(getattr(config, "pad_token_id", 0) or 0) + 1
    limits = [p for p in (positions,) if p]
    if isinstance(data.get("max_seq_length"), int):
        return min([data["max_seq_length"], *limits]), lowercase
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max and model_max < int(1e29):
        limits.append(int(model_max))
    return (min(limits) if limits else 512), lowercase


def st_pool(hidden: Any, mask: Any, spec: Pooling) -> Any:
    """Pool token embeddings in torch, as sentence-transformers' Pooling and Normalize modules do."""
    import torch

    if spec.mode == "mean":
        m = mask.unsqueeze(-1).expand(hidden.size()).to(hidden.dtype)
        vec = (hidden * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
    elif spec.mode == "cls":
        first = mask.to(torch.int).argmax(dim=1)
        vec = hidden[torch.arange(hidden.shape[0]), first]
    elif spec.mode == "max":
        m = mask.unsqueeze(-1).expand(hidden.size()).to(hidden.dtype)
        vec = hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
    else:  # lasttoken
        seq = hidden.shape[1]
        values, idx = mask.flip(1).max(1)
        idx = torch.where(values == 0, seq - 1, idx)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        vec = (hidden * m)[torch.arange(hidden.shape[0]), seq - idx - 1]
    if spec.normalize:
        vec = torch.nn.functional.normalize(vec, p=2, dim=1)
    return vec
