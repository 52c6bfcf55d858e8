"""Which device profile a store folder belongs to (``device.json``, written at first open).

A store is bound to one profile for life: an SD card flashed for a Raspberry Pi must not be
filled later with bundles for a Jetson. ``--profile auto`` means "the store's own profile",
and only for a new folder "detect this machine".
"""

from __future__ import annotations

from pathlib import Path

from edge.agent.files import dump_json, read_json, write_atomic
from edge.agent.journal import now_iso
from edge.errors import ConfigError, StoreError
from edge.protocol.catalog import Catalog
from edge.protocol.profile import DeviceProfile

DEVICE_FILE = "device.json"


def stored_profile_name(data_dir: Path) -> str | None:
    """Return the profile a store folder was created for, or None for a new folder."""
    path = Path(data_dir) / DEVICE_FILE
    try:
        data = read_json(path)
    except FileNotFoundError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("profile"), str):
        raise StoreError(f"{path} is corrupt: it names no profile")
    return data["profile"]


def bind_profile(data_dir: Path, profile: DeviceProfile) -> None:
    """Record ``profile`` for a new store; refuse a store created for another profile."""
    name = stored_profile_name(data_dir)
    if name is None:
        write_atomic(Path(data_dir) / DEVICE_FILE, dump_json({"profile": profile.name, "created_at": now_iso()}))
    elif name != profile.name:
        raise ConfigError(
            f"the store in {data_dir} belongs to profile {name}, not {profile.name}",
            hint=f"use --profile {name} (or auto), or another --data folder",
        )


def resolve_profile(data_dir: Path, requested: str | None, catalog: Catalog) -> DeviceProfile:
    """Return the profile for a store: its recorded one, else ``requested``, else detected.

    ``requested`` is a profile name, ``"auto"`` or None (same as auto). A name that differs
    from the recorded one is refused.
    """
    stored = stored_profile_name(data_dir)
    if requested not in (None, "auto"):
        profile = catalog.get(requested)  # type: ignore[arg-type]
        if stored is not None and stored != profile.name:
            raise ConfigError(
                f"the store in {data_dir} belongs to profile {stored}, not {profile.name}",
                hint=f"use --profile {stored} (or auto), or another --data folder",
            )
        return profile
    if stored is not None:
        return catalog.get(stored)
    from edge.runtime.detect import detect_profile

    profile, _ = detect_profile(catalog)
    return profile
