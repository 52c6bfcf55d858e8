"""Benchmark the dashboard's device list with a large registered fleet (10,000 devices by default).

1. Seeds the fleet into a fresh controller database through real ingestion
   (:mod:`tests.dashboard.seed`: births and telemetry, then labels and running models).
2. Starts a real `edge fleet serve` on that database (a subprocess, its embedded broker idle).
3. Times the paged list API from a keep-alive client: the first page, a deep page (keyset
   cursor), id search, and each filter (tag, group, profile, status, model version), both the
   REST route ``/api/v1/devices`` and the dashboard's ``/dashboard/devices`` (the same page plus
   each device's health), plus the overview.
4. With Chromium (Debian's, via Playwright): logs in and times the Devices page from navigation
   until the first 50 rows are on screen, the next page, and a filter change.

Usage: ``python tools/bench_dashboard.py [--devices 10000] [--requests 50] [--renders 10]``.
Prints a markdown table, the machine and the command. Figures go to BENCHMARKS.md; tests never time.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from edge.fleet.db import open_database  # noqa: E402
from tests.dashboard.seed import device_id, seed_devices  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def percentiles(samples: list[float]) -> tuple[float, float]:
    """Return (p50, p95) in milliseconds."""
    s = sorted(samples)
    return statistics.median(s) * 1000, s[min(len(s) - 1, int(len(s) * 0.95))] * 1000


def timed(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    """Run fn n times (after one warm-up); return (p50, p95) ms."""
    fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return percentiles(samples)


def start_controller(data: Path, token: str) -> tuple[subprocess.Popen, str]:
    """Start `edge fleet serve` on the seeded data folder; return it and its API URL."""
    log = data / "controller.log"
    env = {**os.environ, "EDGE_FLEET_ADMIN_TOKEN": token, "EDGE_HOME": str(data / "home")}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edge.cli.main", "fleet", "serve", "--data", str(data),
                                 "--port", "0", "--mqtt-port", "0", "--rate-limit", "0"],  # timed, not throttled
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = re.search(r"edge fleet: api (\S+)", log.read_text(errors="replace"))
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"edge fleet serve did not start:\n{log.read_text()[-2000:]}")


def bench_api(url: str, token: str, n_devices: int, requests: int) -> list[tuple[str, str, float, float]]:
    """Time the list routes; return (what, route, p50 ms, p95 ms) rows."""
    cases = [
        ("first page (50)", {"limit": 50}),
        ("deep page (50, keyset cursor)", {"limit": 50, "after": device_id(int(n_devices * 0.9))}),
        ("search by id", {"limit": 50, "search": "dev-042"}),
        ("filter: tag", {"limit": 50, "tag": "site-07"}),
        ("filter: group", {"limit": 50, "group": "store-042"}),
        ("filter: profile", {"limit": 50, "profile": "jetson-orin-nano"}),
        ("filter: status offline", {"limit": 50, "status": "offline"}),
        ("filter: model version", {"limit": 50, "model": "minilm", "version": "1.1.0"}),
        ("filters combined (tag + status)", {"limit": 50, "tag": "canary", "status": "online"}),
        ("page of 1000", {"limit": 1000}),
    ]
    rows = []
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=60) as c:
        for what, params in cases:
            for route in ("/api/v1/devices", "/dashboard/devices"):
                r = c.get(route, params=params)
                r.raise_for_status()
                p50, p95 = timed(lambda: c.get(route, params=params).raise_for_status(), requests)
                rows.append((what, route, p50, p95))
        p50, p95 = timed(lambda: c.get("/dashboard/overview").raise_for_status(), max(5, requests // 5))
        rows.append(("overview (counts, versions, rollouts, failures)", "/dashboard/overview", p50, p95))
    return rows


def bench_render(url: str, token: str, renders: int) -> list[tuple[str, float, float]]:
    """Time the Devices page in Chromium; return (what, p50 ms, p95 ms) rows (none without Chromium)."""
    chromium = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        print("playwright not installed: skipping the page render", file=sys.stderr)
        return []
    if chromium is None:
        print("no chromium: skipping the page render", file=sys.stderr)
        return []
    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1440, "height": 900}).new_page()
        page.goto(url + "/ui/")
        page.get_by_role("tab", name="API token").click()
        page.locator("#token").fill(token)
        page.locator("#login-submit").click()
        page.wait_for_selector(".topbar .user-name")

        def load() -> None:
            page.goto(url + "/ui/devices")
            # (locator waits: the page's CSP forbids the string evaluation wait_for_function uses)
            expect(page.locator("tr[data-device]")).to_have_count(50, timeout=30_000)

        out.append(("Devices page: navigation to 50 rows on screen", *timed(load, renders)))

        def next_page() -> None:
            first = page.locator("tr[data-device]").first.get_attribute("data-device")
            page.locator("#page-next").click()
            expect(page.locator("tr[data-device]").first).not_to_have_attribute("data-device", first or "", timeout=30_000)

        load()
        out.append(("Devices page: next page", *timed(next_page, renders)))

        def filter_change() -> None:
            load()
            t0 = time.perf_counter()
            page.locator("#filter-status").select_option("offline")
            expect(page.locator("tr[data-device]:not([data-status='offline'])")).to_have_count(0, timeout=30_000)
            expect(page.locator("tr[data-status='offline']")).to_have_count(50, timeout=30_000)
            samples.append(time.perf_counter() - t0)

        samples: list[float] = []
        for _ in range(renders + 1):
            filter_change()
        out.append(("Devices page: status filter applied", *percentiles(samples[1:])))
        browser.close()
    return out


def main() -> None:
    """Seed, serve, measure, print."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=50, help="timed requests per API case")
    ap.add_argument("--renders", type=int, default=10, help="timed page loads")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="edge-bench-dashboard-"))
    token = "edge_bench_" + secrets.token_urlsafe(24)
    proc = None
    try:
        t0 = time.perf_counter()
        db = open_database(None, folder)
        seed_devices(db, args.devices, time.time())
        db.dispose()
        seeded_s = time.perf_counter() - t0
        proc, url = start_controller(folder, token)
        api_rows = bench_api(url, token, args.devices, args.requests)
        render_rows = bench_render(url, token, args.renders)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
        shutil.rmtree(folder, ignore_errors=True)

    print(f"\n### Dashboard device list, {args.devices:,} registered devices (SQLite)\n")
    print("| case | route | p50 ms | p95 ms |")
    print("|---|---|---:|---:|")
    for what, route, p50, p95 in api_rows:
        print(f"| {what} | `{route}` | {p50:.1f} | {p95:.1f} |")
    for what, p50, p95 in render_rows:
        print(f"| {what} | Chromium | {p50:.0f} | {p95:.0f} |")
    print(f"\nSeeding {args.devices:,} devices through ingestion took {seeded_s:.1f} s.")
    print(f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.")
    print(f"Command: python tools/bench_dashboard.py --devices {args.devices} --requests {args.requests} "
          f"--renders {args.renders}")


if __name__ == "__main__":
    main()
