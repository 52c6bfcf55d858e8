"""`edge keys generate | show`."""

from __future__ import annotations

from pathlib import Path

import typer

from edge import settings
from edge.cli.output import emit, stdout
from edge.protocol.signing import generate_keypair, key_id, load_public_key


def register(app: typer.Typer) -> None:
    """Add the `keys` commands to the CLI."""
    sub = typer.Typer(help="Ed25519 signing keys for bundles.", no_args_is_help=True)
    app.add_typer(sub, name="keys")

    @sub.command("generate")
    def generate(
        out: Path = typer.Option(None, "-o", "--out", help="Folder for the key pair (default: $EDGE_HOME/keys)."),
        name: str = typer.Option("edge", "--name", help="File name stem of the pair."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Create a new signing key pair (NAME.key private, NAME.pub public)."""
        folder = out or settings.edge_home() / "keys"
        priv, pub = generate_keypair(folder, name)
        data = {"private": str(priv), "public": str(pub), "key_id": key_id(load_public_key(pub))}
        emit(data, as_json, lambda d: stdout().print(
            f"private key {d['private']} (keep secret)\npublic key  {d['public']} (give to devices)\nkey id      {d['key_id']}"
        ))

    @sub.command("show")
    def show(path: Path = typer.Argument(..., help="Public or private key file."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """Print a key's id."""
        data = {"path": str(path), "key_id": key_id(load_public_key(path))}
        emit(data, as_json, lambda d: stdout().print(d["key_id"]))
