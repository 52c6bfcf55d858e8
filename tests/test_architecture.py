"""The layout enforces the architecture: imports point one way, devices never import torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "optimum", "accelerate", "gguf")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _top(name: str) -> str:
    return name.split(".")[0]


def test_edge_never_imports_export_libraries() -> None:
    offenders = [
        f"{p.relative_to(ROOT)} imports {name}"
        for p in _modules("edge")
        for name in _imports(p)
        if _top(name) in HEAVY or _top(name) == "exporters"
    ]
    # edge/cli/export.py is the one CLI seam that imports the exporter, lazily, inside the command.
    # edge/cli/export.py and edge/cli/demo.py are the build-machine commands: they import the
    # exporter lazily, inside the command.
    allowed = ("edge/cli/export.py imports exporters", "edge/cli/demo.py imports exporters")
    offenders = [o for o in offenders if not o.startswith(allowed)]
    assert offenders == []


def test_protocol_depends_on_nothing_of_ours_but_errors() -> None:
    bad = [
        f"{p.relative_to(ROOT)} imports {n}"
        for p in _modules("edge/protocol")
        for n in _imports(p)
        if n.startswith("edge.") and not (n.startswith("edge.protocol") or n == "edge.errors")
    ]
    assert bad == []


@pytest.mark.parametrize(("a", "b"), [("agent", "fleet"), ("fleet", "agent")])
def test_agent_and_fleet_never_import_each_other(a: str, b: str) -> None:
    bad = [
        f"{p.relative_to(ROOT)} imports {n}"
        for p in _modules(f"edge/{a}")
        for n in _imports(p)
        if n.startswith(f"edge.{b}")
    ]
    assert bad == []


def test_only_transport_talks_to_paho() -> None:
    bad = [
        str(p.relative_to(ROOT))
        for p in _modules("edge")
        if any(_top(n) == "paho" for n in _imports(p)) and "transport" not in p.parts
    ]
    assert bad == []


def test_only_settings_reads_the_environment() -> None:
    bad = []
    for p in _modules("edge"):
        if p.name == "settings.py":
            continue
        text = p.read_text()
        if "os.environ" in text or "os.getenv" in text:
            bad.append(str(p.relative_to(ROOT)))
    assert bad == []


def test_device_side_runs_with_export_libraries_blocked(tmp_path: Path) -> None:
    """Import every edge module with torch/transformers/optimum made unimportable."""
    script = f"""
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {HEAVY!r}:
            raise ImportError('blocked on the device: ' + name)
sys.meta_path.insert(0, Block())
import edge
for mod in pkgutil.walk_packages(edge.__path__, 'edge.'):
    if mod.name in ('edge.cli.export', 'edge.cli.demo'):
        continue
    importlib.import_module(mod.name)
from edge.cli.main import main
assert main(['profiles', 'detect', '--json']) == 0
rc = main(['export', 'x.onnx', '--profile', 'generic-cpu'])
assert rc != 0
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})
assert not loaded, loaded
print('device side OK')
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "device side OK" in out.stdout


def test_every_error_class_has_a_unique_code_and_exit_code() -> None:
    from edge.errors import EdgeError, all_error_classes

    classes = all_error_classes()
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes))
    assert all(issubclass(c, EdgeError) and c.exit_code > 0 for c in classes)
    doc = EdgeError.__module__
    import edge.errors as errors_module

    for cls in classes:  # the tree drawn in the module docstring lists every class
        assert cls.__name__ in errors_module.__doc__, cls.__name__
    assert doc == "edge.errors"
