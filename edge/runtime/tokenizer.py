"""Text tokenization on the device: Hugging Face ``tokenizer.json`` through the `tokenizers` library.

No transformers here: the device reads the same files transformers would (``tokenizer.json``,
``tokenizer_config.json``, ``config.json`` and sentence-transformers' ``sentence_bert_config.json``)
and resolves the maximum length the way sentence-transformers does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from edge.errors import BundleError, RequestError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MODEL_CONFIG_FILE = "config.json"
ST_CONFIG_FILE = "sentence_bert_config.json"
# transformers writes this sentinel (int(1e30)) when a tokenizer declares no model_max_length.
_NO_LIMIT = int(1e29)
# RoBERTa-style models number positions from pad_token_id + 1, so max_position_embeddings
# includes slots no token can use.
_OFFSET_POSITION_TYPES = frozenset({"roberta", "xlm-roberta", "camembert", "longformer"})
# Without any declared limit, fall back to BERT's: larger inputs rarely fit an edge device anyway.
DEFAULT_MAX_LENGTH = 512


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from a payload file; a missing file reads as empty."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path.name} in {path.parent} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path.name} in {path.parent} is not a JSON object")
    return data


def resolve_max_length(folder: Path) -> int:
    """Return the token limit sentence-transformers would apply to a model folder.

    sentence_bert_config.json's ``max_seq_length`` wins; otherwise the tokenizer's
    ``model_max_length`` capped by the positions the model has.
    """
    model_cfg = read_json(folder / MODEL_CONFIG_FILE)
    positions = model_cfg.get("max_position_embeddings")
    if isinstance(positions, int) and model_cfg.get("model_type") in _OFFSET_POSITION_TYPES:
        positions -= int(model_cfg.get("pad_token_id") or 0) + 1
    limits = [positions] if isinstance(positions, int) and positions > 0 else []
    st_len = read_json(folder / ST_CONFIG_FILE).get("max_seq_length")
    if isinstance(st_len, int) and st_len > 0:
        return min([st_len, *limits])
    tok_len = read_json(folder / TOKENIZER_CONFIG_FILE).get("model_max_length")
    if isinstance(tok_len, (int, float)) and 0 < tok_len < _NO_LIMIT:
        limits.append(int(tok_len))
    return min(limits) if limits else DEFAULT_MAX_LENGTH


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]  # transformers' AddedToken serialization
    return None


@dataclass(frozen=True)
class Batch:
    """Token ids of a padded batch; ``token_type_ids`` only when the model takes them."""

    input_ids: np.ndarray  # int64 [n, seq]
    attention_mask: np.ndarray  # int64 [n, seq]
    token_type_ids: np.ndarray | None


class TextTokenizer:
    """A `tokenizers.Tokenizer` configured once: truncation at ``max_length``, padding to the longest.

    The configuration is never changed after construction, so one instance can serve threads.
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int, lowercase: bool = False,
                 pad_token: str | None = None) -> None:
        self.max_length = max_length
        self.lowercase = lowercase
        self._tok = tokenizer
        pad_id = None
        if pad_token is not None:
            pad_id = tokenizer.token_to_id(pad_token)
        padding = tokenizer.padding
        if pad_id is None and padding:
            pad_id, pad_token = padding["pad_id"], padding["pad_token"]
        if pad_id is None:  # no pad token at all: the attention mask hides whatever fills the gap
            pad_id, pad_token = 0, tokenizer.id_to_token(0) or "[PAD]"
        self.pad_id = int(pad_id)
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(pad_id=self.pad_id, pad_token=pad_token or "", direction="right")
        # A second, unpadded and untruncated view for counting (shares nothing mutable).
        self._counter = Tokenizer.from_str(tokenizer.to_str())
        self._counter.no_padding()
        self._counter.no_truncation()

    @classmethod
    def from_folder(cls, folder: Path, max_length: int | None = None) -> "TextTokenizer":
        """Load ``tokenizer.json`` from a payload folder and its limits from the configs beside it."""
        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise BundleError(f"{folder} has no {TOKENIZER_FILE}", hint="re-export the model with `edge export`")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises plain Exception on a bad file
            raise BundleError(f"{path} is not a valid tokenizers file: {exc}") from exc
        cfg = read_json(folder / TOKENIZER_CONFIG_FILE)
        st_cfg = read_json(folder / ST_CONFIG_FILE)
        return cls(
            tok,
            max_length or resolve_max_length(folder),
            lowercase=bool(st_cfg.get("do_lower_case", False)),
            pad_token=_token_text(cfg.get("pad_token")),
        )

    def _prepare(self, texts: list[str]) -> list[str]:
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise RequestError("texts must be a list of strings")
        return [t.lower() for t in texts] if self.lowercase else list(texts)

    def encode(self, texts: list[str], token_types: bool = True) -> Batch:
        """Tokenize a batch: truncated at ``max_length``, right-padded to the longest text."""
        encs = self._tok.encode_batch(self._prepare(texts), add_special_tokens=True)
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        types = np.array([e.type_ids for e in encs], dtype=np.int64) if token_types else None
        return Batch(ids, mask, types)

    def count(self, texts: list[str]) -> list[int]:
        """Return each text's token count with special tokens, before truncation."""
        return [len(e.ids) for e in self._counter.encode_batch(self._prepare(texts), add_special_tokens=True)]
