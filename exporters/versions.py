"""Versions of the tools that made a bundle, for its provenance."""

from __future__ import annotations

import platform
from importlib import metadata

_TOOLS = ("onnxruntime", "onnx", "optimum-onnx", "optimum", "transformers", "torch", "tokenizers", "gguf", "onnx-ir")


def tool_versions() -> dict[str, str]:
    """Return the installed version of each export tool (absent ones are skipped)."""
    out = {"python": platform.python_version()}
    for name in _TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
