"""The dashboard ships whole in the package: every asset is package data, nothing comes from a CDN,
and the pages never build markup from strings."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

from tests.dashboard.conftest import Served

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "edge" / "fleet" / "dashboard" / "static"


def _files() -> list[str]:
    return sorted(str(p.relative_to(STATIC.parent)) for p in STATIC.rglob("*") if p.is_file())


def test_every_static_file_is_package_data() -> None:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["edge.fleet.dashboard"]
    missing = [f for f in _files() if not any(fnmatch.fnmatch(f, p) and f.count("/") == p.count("/") for p in patterns)]
    assert missing == [], "add these to [tool.setuptools.package-data] in pyproject.toml"
    assert "static/vendor/uplot/LICENSE" in _files()


def test_no_asset_comes_from_the_internet() -> None:
    html = (STATIC / "index.html").read_text()
    assert re.findall(r'(?:src|href)="(https?:|//)', html) == []
    for js in STATIC.rglob("*.js"):
        if "vendor" in js.parts:
            continue
        text = js.read_text()
        assert not re.search(r'from\s+"(https?:|//)', text), js
        assert not re.search(r"\.(innerHTML|outerHTML)\s*=|insertAdjacentHTML\(|document\.write\(", text), \
            f"{js}: build DOM nodes, not markup"


def test_the_shell_and_assets_are_served_with_safe_headers(served: Served) -> None:
    with served.client() as c:
        shell = c.get("/ui/devices/some-device")  # every page is the same shell: deep links work
        assert shell.status_code == 200 and "text/html" in shell.headers["content-type"]
        assert "script-src 'self'" in shell.headers["content-security-policy"]
        assert shell.headers["x-frame-options"] == "DENY"
        assert c.get("/").headers["location"] == "/ui/"
        js = c.get("/ui/static/app.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert c.get("/ui/static/vendor/uplot/uPlot.iife.min.js").status_code == 200
        for escape in ("/ui/static/%2e%2e/routes.py", "/ui/static/..%2froutes.py"):
            assert "from __future__" not in c.get(escape).text  # no file outside static/
