"""`edge bundle sign | verify | inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from edge import settings
from edge.cli.output import emit, stdout
from edge.errors import ConfigError
from edge.protocol.bundle import BundleReader, resign_bundle, verify_bundle
from edge.protocol.signing import SigningKey, TrustStore, load_signing_key, resolve_revoked


def default_key_path() -> Path:
    """Return the signing key used when --key is not given."""
    return settings.signing_key() or settings.edge_home() / "keys" / "edge.key"


def resolve_signing_key(path: Path | None) -> SigningKey:
    """Load the signing key from --key, $EDGE_SIGNING_KEY or $EDGE_HOME/keys/edge.key."""
    return load_signing_key(path or default_key_path())


def trust_from(paths: list[Path] | None, revoked: list[str] | None = None) -> TrustStore:
    """Build the trust store from --trusted-key options (the default public key when none),
    refusing the --revoked-key keys and those of $EDGE_REVOKED_KEYS."""
    if not paths:
        default = default_key_path().with_suffix(".pub")
        if not default.exists():
            raise ConfigError("no trusted key given", hint="pass --trusted-key PUB (from `edge keys generate`)")
        paths = [default]
    return TrustStore.from_files(list(paths), revoked_from(revoked))


def revoked_from(values: list[str] | None) -> frozenset[str]:
    """Return the key ids of --revoked-key options and $EDGE_REVOKED_KEYS."""
    return resolve_revoked([*(values or ()), *settings.revoked_keys()])


def register(app: typer.Typer) -> None:
    """Add the `bundle` commands to the CLI."""
    sub = typer.Typer(help="Signed model bundles: sign, verify, inspect.", no_args_is_help=True)
    app.add_typer(sub, name="bundle")

    @sub.command("sign")
    def sign(
        bundle: Path = typer.Argument(..., help="Bundle file."),
        key: Optional[Path] = typer.Option(None, "--key", help="Private key (default $EDGE_SIGNING_KEY or $EDGE_HOME/keys/edge.key)."),
        out: Optional[Path] = typer.Option(None, "-o", "--out", help="Write the signed bundle here instead of in place."),
    ) -> None:
        """Sign (or re-sign) a bundle after checking every payload hash."""
        signing = resolve_signing_key(key)
        written = resign_bundle(bundle, signing, out)
        stdout().print(f"signed {written} with key {signing.id}")

    @sub.command("verify")
    def verify(
        bundle: Path = typer.Argument(..., help="Bundle file."),
        trusted_key: Optional[List[Path]] = typer.Option(None, "--trusted-key", help="Trusted public key (repeatable)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Check the signature and every byte of every payload file."""
        result = verify_bundle(bundle, trust_from(trusted_key))
        m = result.manifest
        data = {"bundle": str(bundle), "valid": True, "key_id": result.key_id, "name": m.name,
                "version": m.version, "profile": m.profile, "files": len(m.files), "bytes": m.payload_size()}
        emit(data, as_json, lambda d: stdout().print(
            f"OK {d['name']}@{d['version']} for {d['profile']}: signature by {d['key_id']}, "
            f"{d['files']} files, {d['bytes']} bytes verified"))

    @sub.command("inspect")
    def inspect(
        bundle: Path = typer.Argument(..., help="Bundle file."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Print a bundle's manifest (without verifying it)."""
        import yaml

        with BundleReader(bundle) as reader:
            data = reader.manifest.model_dump(mode="json")
            data["_signed"] = reader.signature_bytes is not None
        emit(data, as_json, lambda d: stdout().print(yaml.safe_dump(d, sort_keys=False), end=""))
