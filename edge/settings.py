"""Every ``EDGE_*`` environment variable, declared once; nothing else reads ``os.environ``.

Values are read lazily (on call), never at import time, so tests can set them per process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge.errors import ConfigError


@dataclass(frozen=True)
class EnvVar:
    """One environment variable Edge understands."""

    name: str
    meaning: str
    default: str | None
    parse: Callable[[str], object]


def _path(raw: str) -> Path:
    return Path(raw).expanduser()


def _paths(raw: str) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser() for p in raw.split(os.pathsep) if p)


def _level(raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
    return level


VARIABLES: dict[str, EnvVar] = {
    v.name: v
    for v in (
        EnvVar("EDGE_HOME", "Folder for keys and caches of this user.", "~/.edge", _path),
        EnvVar(
            "EDGE_PROFILE_PATH",
            "Extra folders of device profile YAML files, searched before the built-in ones.",
            "",
            _paths,
        ),
        EnvVar(
            "EDGE_SIGNING_KEY",
            "Private key used by `edge export` and `edge bundle sign` when --key is not given.",
            None,
            _path,
        ),
        EnvVar("EDGE_LOG_LEVEL", "Log level of the CLI and the agent.", "WARNING", _level),
    )
}


def get(name: str) -> object:
    """Return the parsed value of one declared variable (its default when unset)."""
    var = VARIABLES[name]
    raw = os.environ.get(name, var.default)
    if raw is None:
        return None
    try:
        return var.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is invalid: {exc}", hint=var.meaning) from exc


def edge_home() -> Path:
    """Return the per-user Edge folder."""
    return get("EDGE_HOME")  # type: ignore[return-value]


def profile_path() -> tuple[Path, ...]:
    """Return extra profile folders from the environment."""
    return get("EDGE_PROFILE_PATH")  # type: ignore[return-value]


def signing_key() -> Path | None:
    """Return the default signing key path, if one is configured."""
    return get("EDGE_SIGNING_KEY")  # type: ignore[return-value]


def log_level() -> str:
    """Return the configured log level."""
    return get("EDGE_LOG_LEVEL")  # type: ignore[return-value]


def environ_for_child(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return a copy of this process's environment for a child process."""
    env = dict(os.environ)
    env.update(extra or {})
    return env
