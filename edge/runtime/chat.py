"""Render chat messages with a model's Jinja chat template, as transformers' apply_chat_template does.

The template comes from the bundle (``chat_template.jinja``, else ``tokenizer_config.json``'s
``chat_template``) and runs in Jinja's immutable sandbox with the same settings and helpers
transformers gives it (``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, a ``tojson``
that keeps non-ASCII, ``strftime_now``, loop controls, ``{% generation %}`` blocks), so a prompt
rendered on the device is the prompt the model was measured with on the build machine.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge.errors import InferenceError, RequestError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Special-token names transformers passes to every template.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
ROLES = ("system", "user", "assistant", "tool", "developer")


class _GenerationBlock(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (assistant-mask markers) and render the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json spells special tokens as a string or an AddedToken dict.
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class ChatTemplate:
    """A compiled chat template plus the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str | None] | None = None) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise InferenceError(f"the chat template does not compile: {exc}") from exc
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render ``messages`` (dicts with role and content) to the prompt text."""
        _check_messages(messages)
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                **{k: v for k, v in self.special_tokens.items() if v is not None}, **extra,
            )
        except jinja2.TemplateError as exc:  # raise_exception() in the template lands here
            raise RequestError(f"the chat template refused the messages: {exc}") from exc
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise RequestError(f"the chat template failed on the messages: {exc}") from exc


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"message {i} is {type(m).__name__}, not an object")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise RequestError(f"message {i} has no role", hint=f"use one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise RequestError(f"message {i} content is {type(content).__name__}, not text")


def load_chat_template(folder: Path) -> ChatTemplate | None:
    """Load the chat template of a payload folder (None when the model has none)."""
    config: dict[str, Any] = {}
    cfg_path = folder / TOKENIZER_CONFIG
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InferenceError(f"{cfg_path} is corrupt: {exc}") from exc
    special = {k: _token_text(config.get(k)) for k in SPECIAL_TOKEN_KEYS}
    tpl_path = folder / TEMPLATE_FILE
    if tpl_path.is_file():
        return ChatTemplate(tpl_path.read_text(encoding="utf-8"), special)
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if isinstance(source, str) and source:
        return ChatTemplate(source, special)
    return None
