"""`edge flash BUNDLE --data DIR`: install a bundle offline into a device's model store.

The store may be the device's own (run on the device) or an SD card or USB disk mounted on a
laptop. The checks are the agent's: signature, hashes, profile, architecture, providers,
budgets and a trial load in a child process. Flashing while the agent runs on the same store
is safe (the store locks itself).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import List, Optional

import typer

from edge.cli.output import emit, info, stdout

STORE_HELP = "Data folder of the model store (the device's, or a mounted SD card)."


def open_store(data: Path, profile: str | None, trusted_keys: list[Path] | None, *, create: bool,
               revoked_keys: list[str] | None = None):
    """Open the store in ``data`` for a CLI command (the profile comes from the store)."""
    from edge import settings
    from edge.agent.compatibility import DeviceFacts
    from edge.agent.device import resolve_profile, stored_profile_name
    from edge.agent.store import Store
    from edge.cli.bundle import revoked_from, trust_from
    from edge.errors import NotFoundError
    from edge.protocol.catalog import load_catalog
    from edge.protocol.signing import TrustStore

    if not create and stored_profile_name(data) is None:
        raise NotFoundError(f"{data} holds no model store", hint="install a bundle with `edge flash BUNDLE --data DIR`")
    chosen = resolve_profile(data, profile, load_catalog(settings.profile_path()))
    facts = None
    if create:
        facts = DeviceFacts.for_profile(chosen)
        if not facts.local:
            info(f"flashing for a {chosen.architecture.value} device from {platform.machine()}: "
                 f"providers come from profile {chosen.name}, the trial load runs on this CPU")
    # Reading, activating and removing need no keys: they act on versions verified at install
    # (but a revoked key still blocks activating its versions).
    trust = trust_from(trusted_keys, revoked_keys) if create else TrustStore(revoked=revoked_from(revoked_keys))
    return Store(data, chosen, trust, device=facts)


def register(app: typer.Typer) -> None:
    """Add the `flash` command to the CLI."""

    @app.command("flash")
    def flash(
        bundle: Path = typer.Argument(..., help="Bundle file (.edgebundle)."),
        data: Path = typer.Option(..., "--data", help=STORE_HELP),
        profile: str = typer.Option(
            "auto", "--profile", help="Device profile of a new store, or 'auto' (the store's own, else detected)."),
        trusted_key: Optional[List[Path]] = typer.Option(
            None, "--trusted-key", help="Trusted public key (repeatable; default $EDGE_HOME/keys/edge.pub)."),
        revoked_key: Optional[List[str]] = typer.Option(
            None, "--revoked-key", help="Key id or public key file whose signatures are refused (repeatable; "
            "adds to $EDGE_REVOKED_KEYS)."),
        no_activate: bool = typer.Option(False, "--no-activate", help="Install without making it the active version."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Verify a bundle and install it into a model store, offline."""
        store = open_store(data, profile, trusted_key, create=True, revoked_keys=revoked_key)
        try:
            info(f"installing {bundle.name} into {store.root} (profile {store.profile.name})")
            inst = store.install(bundle, activate=not no_activate)
            status = next(m for m in store.list() if m.name == inst.name)
        finally:
            store.close()
        row = next(v for v in status.versions if v.version == inst.version)
        result = {"name": inst.name, "version": inst.version, "active": status.active == inst.version,
                  "previous": status.previous, "folder": str(inst.folder), "key_id": inst.key_id,
                  "profile": store.profile.name, "bytes": row.payload_bytes}
        emit(result, as_json, lambda d: stdout().print(
            f"installed {d['name']}@{d['version']} ({'active' if d['active'] else 'not active'}"
            + (f", previous {d['previous']}" if d["previous"] else "") + f") in {d['folder']}"))
