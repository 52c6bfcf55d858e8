"""`edge profiles list | show | check | detect`."""

from __future__ import annotations

from pathlib import Path

import typer

from edge import settings
from edge.cli.output import emit, print_table, stdout
from edge.protocol.catalog import Catalog, load_catalog
from edge.protocol.profile import load_profile_file

JSON = typer.Option(False, "--json", help="Print JSON.")


def catalog() -> Catalog:
    """Load the profile catalog with the user's extra folders."""
    return load_catalog(settings.profile_path())


def register(app: typer.Typer) -> None:
    """Add the `profiles` commands to the CLI."""
    sub = typer.Typer(help="Device profiles: list, show, check and detect.", no_args_is_help=True)
    app.add_typer(sub, name="profiles")

    @sub.command("list")
    def list_(as_json: bool = JSON) -> None:
        """List the known device profiles."""
        cat = catalog()
        rows = []
        for name in cat.names():
            p = cat.get(name)
            rows.append(
                {
                    "name": name,
                    "architecture": p.architecture.value,
                    "providers": p.provider_names(),
                    "encoder": p.models.encoder.precision.value,
                    "llm": p.models.llm.precision.value,
                    "memory_mb": p.memory_mb,
                    "source": str(cat.sources[name]),
                }
            )
        emit(
            rows,
            as_json,
            lambda rs: print_table(
                ["name", "arch", "providers", "encoder", "llm", "memory MB"],
                [[r["name"], r["architecture"], " > ".join(r["providers"]), r["encoder"], r["llm"], r["memory_mb"]] for r in rs],
            ),
        )

    @sub.command("show")
    def show(name: str = typer.Argument(..., help="Profile name."), as_json: bool = JSON) -> None:
        """Show one profile in full."""
        import yaml

        data = catalog().get(name).to_dict()
        emit(data, as_json, lambda d: stdout().print(yaml.safe_dump(d, sort_keys=False), end=""))

    @sub.command("check")
    def check(path: Path = typer.Argument(..., help="Profile YAML file to validate.")) -> None:
        """Validate a profile file; exit non-zero with the reason when it is invalid."""
        profile = load_profile_file(path)
        stdout().print(f"{path}: valid profile {profile.name!r}")

    @sub.command("detect")
    def detect(as_json: bool = JSON) -> None:
        """Print the profile that fits this machine, and why."""
        from edge.runtime.detect import detect_profile, read_machine_facts

        facts = read_machine_facts()
        chosen, verdicts = detect_profile(catalog(), facts)
        data = {
            "profile": chosen.name,
            "machine": facts.to_dict(),
            "verdicts": [
                {"profile": v.profile, "fits": v.fits, "priority": v.priority, "reasons": v.reasons} for v in verdicts
            ],
        }

        def render(d: dict) -> None:
            out = stdout()
            out.print(f"{d['profile']}")
            for v in d["verdicts"]:
                mark = "fits" if v["fits"] else "no  "
                out.print(f"  {mark} {v['profile']:<18} {'; '.join(v['reasons'])}")

        emit(data, as_json, render)
