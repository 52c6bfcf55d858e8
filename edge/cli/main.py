"""Entry point of the `edge` command: ``edge <noun> <verb>``."""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Sequence

import typer
from typer.exceptions import Abort, Exit, TyperException

from edge import __version__, redact, settings
from edge.errors import EdgeError

app = typer.Typer(
    name="edge",
    help="Edge: compile models per device, ship them to fleets, run them offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.",
                                 callback=_print_version, is_eager=True),
) -> None:
    """Edge: compile models per device, ship them to fleets, run them offline."""
    _state["debug"] = debug
    logging.basicConfig(
        level="DEBUG" if debug else settings.log_level(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    redact.install()  # passwords, tokens and signed URLs never reach the log, whoever logs them


# Command modules under edge/cli/, each with a register(app) function, in --help order.
COMMAND_MODULES = ("export", "profiles", "keys", "bundle", "flash", "models", "agent", "fleet", "broker", "demo")
# Modules that add commands to another module's group: `edge fleet certs|broker-config` live in broker.py.
EXTENDS = {"broker": "fleet"}


def _register(only: str | None = None) -> None:
    # Imported here, not at import time of edge.cli.main, so `import edge` stays free of work.
    # A module not written yet is skipped; an import error inside an existing one is raised.
    # With ``only``, just that command's module is imported: the others cost start-up time and
    # memory a long-running `edge agent run` should not pay.
    import importlib
    import importlib.util

    for name in COMMAND_MODULES:
        if name in _registered or (only is not None and only not in (name, EXTENDS.get(name))):
            continue
        qualified = f"edge.cli.{name}"
        if importlib.util.find_spec(qualified) is None:
            continue
        groups, commands = len(app.registered_groups), len(app.registered_commands)
        importlib.import_module(qualified).register(app)
        _registered[name] = (app.registered_groups[groups:], app.registered_commands[commands:])
    # --help lists commands in COMMAND_MODULES order, whatever order they were registered in.
    app.registered_groups = [g for n in COMMAND_MODULES for g in _registered.get(n, ([], []))[0]]
    app.registered_commands = [c for n in COMMAND_MODULES for c in _registered.get(n, ([], []))[1]]


# Command module name -> the typer groups and commands its register() added.
_registered: dict[str, tuple[list, list]] = {}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` and return the exit code (tests call this directly)."""
    args = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in args if not a.startswith("-")), None)
    _register(first if first in COMMAND_MODULES else None)
    command = typer.main.get_command(app)
    _state["debug"] = "--debug" in args
    try:
        result = command.main(args=args, prog_name="edge", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except EdgeError as exc:
        if _state["debug"]:
            print(redact.redact(traceback.format_exc()), end="", file=sys.stderr)
        print(redact.redact(f"Error: {exc.message}" + (f" ({exc.hint})" if exc.hint else "")), file=sys.stderr)
        return exc.exit_code
    except Exit as exc:
        return exc.exit_code
    except Abort:
        print("Aborted.", file=sys.stderr)
        return 1
    except TyperException as exc:  # usage errors: typer's vendored click exceptions
        show = getattr(exc, "show", None)
        if show:
            show()
        else:
            print(f"Error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
