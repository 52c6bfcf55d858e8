"""Printing for the CLI: data to stdout (JSON or tables), messages to stderr."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.table import Table


def stdout() -> Console:
    """Return a console on stdout (created per call so tests can capture output)."""
    return Console(file=sys.stdout, soft_wrap=True, highlight=False)


def stderr() -> Console:
    """Return a console on stderr for progress and messages."""
    return Console(file=sys.stderr, soft_wrap=True, highlight=False)


def print_json(data: Any) -> None:
    """Print data as indented JSON on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    """Print rows as a table on stdout."""
    table = Table(title=title, show_lines=False)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*("" if v is None else str(v) for v in r))
    stdout().print(table)


def emit(data: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """Print ``data`` as JSON when asked, else with ``render``."""
    if as_json:
        print_json(data)
    else:
        render(data)


def info(message: str) -> None:
    """Print a message for people on stderr."""
    stderr().print(message)
