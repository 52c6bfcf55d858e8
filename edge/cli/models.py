"""`edge models list | activate | rollback | remove | verify` on a device's model store."""

from __future__ import annotations

from pathlib import Path

import typer

from edge.cli.flash import STORE_HELP, open_store
from edge.cli.output import emit, print_table, stdout
from edge.errors import ConfigError

JSON = typer.Option(False, "--json", help="Print JSON.")
DATA = typer.Option(..., "--data", help=STORE_HELP)


def parse_ref(ref: str) -> tuple[str, str]:
    """Split ``NAME@VERSION``; refuse anything else."""
    name, sep, version = ref.partition("@")
    if not sep or not name or not version:
        raise ConfigError(f"{ref!r} is not NAME@VERSION", hint="e.g. tiny@1.0.0 (see `edge models list`)")
    return name, version


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB" if n >= 1 << 20 else f"{n / 1024:.1f} KB"


def register(app: typer.Typer) -> None:
    """Add the `models` commands to the CLI."""
    sub = typer.Typer(help="Models installed in a device's store: list, activate, roll back, remove.",
                      no_args_is_help=True)
    app.add_typer(sub, name="models")

    @sub.command("list")
    def list_(data: Path = DATA, as_json: bool = JSON) -> None:
        """List installed models, their versions, and which one is active."""
        with open_store(data, None, None, create=False) as store:
            models = [m.to_dict() for m in store.list()]

        def render(ms: list[dict]) -> None:
            rows = []
            for m in ms:
                for v in reversed(m["versions"]):
                    state = "active" if v["active"] else "previous" if v["previous"] else ""
                    notes = "; ".join(x for x in (v["failed"] and f"failed: {v['failed']}",
                                                  v["problem"] and f"damaged: {v['problem']}") if x)
                    rows.append([m["name"], v["version"], state, v["task"], v["precision"],
                                 _size(v["payload_bytes"]), "yes" if v["healthy"] else "", notes])
            print_table(["name", "version", "state", "task", "precision", "size", "healthy", "notes"], rows)

        emit(models, as_json, render)

    @sub.command("activate")
    def activate(
        ref: str = typer.Argument(..., metavar="NAME@VERSION", help="Installed version to serve."),
        data: Path = DATA,
        force: bool = typer.Option(False, "--force", help="Activate even a version that failed a health check."),
    ) -> None:
        """Make an installed version the active one (the current one stays for rollback)."""
        name, version = parse_ref(ref)
        with open_store(data, None, None, create=False) as store:
            inst = store.activate(name, version, force=force)
        stdout().print(f"{inst.ref} is active")

    @sub.command("rollback")
    def rollback(name: str = typer.Argument(..., help="Model name."), data: Path = DATA) -> None:
        """Switch a model back to its previous version."""
        with open_store(data, None, None, create=False) as store:
            inst = store.rollback(name)
        stdout().print(f"rolled back: {inst.ref} is active")

    @sub.command("remove")
    def remove(ref: str = typer.Argument(..., metavar="NAME@VERSION", help="Installed version to delete."),
               data: Path = DATA) -> None:
        """Delete an installed version (never the active one)."""
        name, version = parse_ref(ref)
        with open_store(data, None, None, create=False) as store:
            store.remove(name, version)
        stdout().print(f"removed {name}@{version}")

    @sub.command("verify")
    def verify(
        ref: str = typer.Argument(..., metavar="NAME[@VERSION]", help="Model (its active version) or one version."),
        data: Path = DATA,
        as_json: bool = JSON,
    ) -> None:
        """Re-hash every file of an installed version against its signed manifest."""
        name, _, version = ref.partition("@")
        with open_store(data, None, None, create=False) as store:
            inst = store.verify(name, version or None)
        data_out = {"name": inst.name, "version": inst.version, "files": len(inst.manifest.files),
                    "bytes": inst.manifest.payload_size(), "valid": True}
        emit(data_out, as_json, lambda d: stdout().print(
            f"OK {d['name']}@{d['version']}: {d['files']} files, {d['bytes']} bytes match their SHA-256"))
