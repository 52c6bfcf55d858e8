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


def _list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _url(raw: str) -> str:
    url = raw.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// URL")
    return url


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
        EnvVar(
            "EDGE_FAULT_POINT",
            "Test seam: the agent (store, outbox, deployments) kills its own process (SIGKILL) on "
            "reaching this named step (see edge.agent.faults.FAULT_POINTS); empty in production.",
            "",
            str,
        ),
        EnvVar(
            "EDGE_CONTROLLER",
            "Base URL of the fleet controller's REST API, used by `edge fleet` read/write commands.",
            "http://127.0.0.1:8700",
            _url,
        ),
        EnvVar("EDGE_FLEET_TOKEN", "API token the `edge fleet` commands send to the controller.", None, str),
        EnvVar(
            "EDGE_FLEET_ADMIN_TOKEN",
            "Admin API token of `edge fleet serve` (instead of one generated at first start).",
            None,
            str,
        ),
        EnvVar("EDGE_FLEET_DB", "Database URL of `edge fleet serve` (default: SQLite in its data folder).", None, str),
        EnvVar("EDGE_FLEET_BROKER", "MQTT broker URL of `edge fleet serve` (default: an embedded broker).", None, str),
        EnvVar("EDGE_FLEET_DATA", "Data folder of `edge fleet serve` (database, bundles).", "~/.edge/fleet", _path),
        EnvVar(
            "EDGE_REVOKED_KEYS",
            "Signing keys refused even when trusted, comma-separated key ids or public key files; "
            "added to --revoked-key of `edge agent run`, `edge flash` and `edge fleet serve`.",
            "",
            _list,
        ),
        EnvVar(
            "EDGE_BROKER_PASSWORD",
            "MQTT broker password when the broker URL names a user but no password "
            "(keeps it off command lines and process lists).",
            None,
            str,
        ),
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


def controller_url() -> str:
    """Return the fleet controller URL the CLI talks to."""
    return get("EDGE_CONTROLLER")  # type: ignore[return-value]


def fleet_token() -> str | None:
    """Return the API token the CLI sends to the controller, if set."""
    return get("EDGE_FLEET_TOKEN")  # type: ignore[return-value]


def fleet_admin_token() -> str | None:
    """Return the admin token configured for the controller, if set."""
    return get("EDGE_FLEET_ADMIN_TOKEN")  # type: ignore[return-value]


def fleet_db() -> str | None:
    """Return the controller's database URL, if set."""
    return get("EDGE_FLEET_DB")  # type: ignore[return-value]


def fleet_broker() -> str | None:
    """Return the controller's broker URL, if set."""
    return get("EDGE_FLEET_BROKER")  # type: ignore[return-value]


def fleet_data() -> Path:
    """Return the controller's data folder (under EDGE_HOME unless EDGE_FLEET_DATA is set)."""
    if "EDGE_FLEET_DATA" in os.environ:
        return get("EDGE_FLEET_DATA")  # type: ignore[return-value]
    return edge_home() / "fleet"


def fault_point() -> str:
    """Return the store step at which a crash is injected for tests ("" when none)."""
    return get("EDGE_FAULT_POINT")  # type: ignore[return-value]


def broker_password() -> str | None:
    """Return the MQTT broker password from the environment, if set."""
    return get("EDGE_BROKER_PASSWORD")  # type: ignore[return-value]


def revoked_keys() -> tuple[str, ...]:
    """Return the revoked signing keys from the environment (key ids or key files, unresolved)."""
    return get("EDGE_REVOKED_KEYS")  # type: ignore[return-value]
