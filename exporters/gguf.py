"""Turn a GGUF file into a Hugging Face folder (dequantized weights, tokenizer, chat template).

transformers reads GGUF itself (``from_pretrained(folder, gguf_file=...)``, needing ``gguf`` and
``accelerate``); the weights come out dequantized to float32. Its GGUF tokenizer conversion sets
both ``bos_token`` and ``eos_token`` to the BOS text (transformers 4.57), so the special tokens are
set again here from the ids the GGUF metadata gives, before anything is saved.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edge.errors import ModelSourceError, UnsupportedModelError

log = logging.getLogger(__name__)


def _fix_special_tokens(tokenizer: Any, config: Any) -> None:
    for attr in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{attr}_token_id", None)
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        if token_id is None or not 0 <= token_id < len(tokenizer):
            continue
        text = tokenizer.convert_ids_to_tokens(int(token_id))
        if getattr(tokenizer, f"{attr}_token") != text:
            log.info("GGUF tokenizer: %s_token %r -> %r (id %d)", attr, getattr(tokenizer, f"{attr}_token"), text, token_id)
            setattr(tokenizer, f"{attr}_token", text)


def load_gguf(folder: Path, filename: str) -> tuple[Any, Any]:
    """Load (model, tokenizer) from ``folder/filename``, refusing corrupt or unsupported files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = folder / filename
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename)
    except ValueError as exc:
        if "not supported" in str(exc):
            raise UnsupportedModelError(f"{path}: {exc}", hint="export the original Hugging Face folder instead") from exc
        raise ModelSourceError(f"{path} is not a readable GGUF model: {exc}") from exc
    except (OSError, KeyError, IndexError, TypeError, AttributeError, EOFError, MemoryError) as exc:
        raise ModelSourceError(f"{path} is not a readable GGUF model: {exc}") from exc
    except Exception as exc:  # gguf's reader raises bare errors (struct, numpy) on truncated files
        raise ModelSourceError(f"{path} is not a readable GGUF model: {type(exc).__name__}: {exc}") from exc
    _fix_special_tokens(tokenizer, model.config)
    return model.eval(), tokenizer


def gguf_to_folder(folder: Path, filename: str, dest: Path) -> Path:
    """Save the GGUF model as a Hugging Face folder under ``dest`` and return it."""
    model, tokenizer = load_gguf(folder, filename)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    if not (dest / "tokenizer.json").is_file():
        raise ModelSourceError(f"{folder / filename}: its tokenizer could not be converted to tokenizer.json")
    return dest
