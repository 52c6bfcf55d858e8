"""Controller CPU per ingested status report, for several source trees in one interleaved run.

Each round starts, for every variant in turn, a fresh mosquitto and a fresh ``edge fleet serve``
(SQLite) from that variant's source tree, brings up ``--devices`` simulated devices (births
included, one connection each, as in ``tools/fleet_sim.py``), lets them report steadily for
``--duration`` seconds, waits until every acknowledged report is stored, and reads the
controller's CPU time (all its processes). Rounds interleave the variants so that a change in the
machine's load hits them alike; compare ratios, not absolutes.

    git archive HEAD edge | tar -x -C /tmp/before          # the tree to compare with
    python tools/bench_ingest.py --variant before=/tmp/before --devices 10000 --duration 20 --rounds 2

The current tree is always a variant ("current").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

import fleet_sim  # noqa: E402  (the simulated devices and their lean reports)

ROOT = TOOLS.parent


def start_controller(work: Path, broker: str, src: Path) -> tuple[subprocess.Popen, str]:
    """Start `edge fleet serve` importing ``edge`` from ``src``; return it and its API URL."""
    import httpx

    port = fleet_sim.free_port()
    env = dict(os.environ, EDGE_FLEET_ADMIN_TOKEN=fleet_sim.ADMIN_TOKEN, EDGE_HOME=str(work / "home"),
               PYTHONPATH=str(src))
    cmd = [sys.executable, "-m", "edge.cli.main", "fleet", "serve", "--broker", broker, "--port", str(port),
           "--data", str(work / "ctl"), "--fleet", fleet_sim.FLEET]
    with open(work / "controller.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"controller exited: {(work / 'controller.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("controller did not start")


async def run_once(name: str, src: Path, args: Any) -> dict[str, Any]:
    """Measure one variant once."""
    import httpx

    work = Path(tempfile.mkdtemp(prefix=f"bench-ingest-{name}-"))
    procs: list[subprocess.Popen] = []
    try:
        mosq, port = fleet_sim.start_mosquitto(work)
        procs.append(mosq)
        ctl, url = start_controller(work, f"mqtt://127.0.0.1:{port}", src)
        procs.append(ctl)
        api = httpx.Client(base_url=url, headers={"authorization": f"Bearer {fleet_sim.ADMIN_TOKEN}"}, timeout=60)
        sim = fleet_sim.Sim("127.0.0.1", port)
        devices = await fleet_sim.bring_up(sim, args.devices, "ing-")
        deadline = time.time() + 120
        while time.time() < deadline:
            if api.get("/api/v1/devices", params={"status": "online", "limit": 1}).json()["total"] >= args.devices:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(2.0)  # births written; start from a quiet controller
        cpu0, load0 = fleet_sim.cpu_seconds(ctl.pid), os.getloadavg()[0]
        took = await fleet_sim.report_steadily(sim, devices, args.interval, args.duration)
        db_url = f"sqlite:///{work / 'ctl' / 'fleet.db'}"
        last, still = -1, time.monotonic()
        while True:
            count, _, _ = fleet_sim.stored_telemetry(db_url, work / "ctl", "ing-")
            if count >= sim.acked and not any(d.reports for d in devices):
                break
            if count != last:
                last, still = count, time.monotonic()
            elif time.monotonic() - still > 30:
                break
            await asyncio.sleep(0.5)
        cpu = fleet_sim.cpu_seconds(ctl.pid) - cpu0
        count, _, stored = fleet_sim.stored_telemetry(db_url, work / "ctl", "ing-", lags=True)
        for t in sim.loop_tasks:
            t.cancel()
        for d in devices:
            if d.writer:
                d.writer.close()
        return {"variant": name, "sent": sim.sent, "acked": sim.acked, "stored": count, "offered": sim.sent / took,
                "cpu_us": cpu / max(count, 1) * 1e6, "p99_s": fleet_sim.pct(stored, 0.99),
                "load": (load0 + os.getloadavg()[0]) / 2}
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


async def main_async(args: Any) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * args.devices + 1000)), hard))
    variants = [("current", ROOT)] + [(n, Path(p).resolve()) for n, p in (v.split("=", 1) for v in args.variant)]
    results = []
    for r in range(args.rounds):
        for name, src in (variants if r % 2 == 0 else variants[::-1]):
            res = await run_once(name, src, args)
            print(f"round {r + 1} {name}: {res['cpu_us']:.0f} us/msg, offered {res['offered']:.0f} msg/s, "
                  f"stored {res['stored']}/{res['acked']}, p99 lag {res['p99_s']:.2f} s, load {res['load']:.1f}",
                  file=sys.stderr, flush=True)
            results.append(res)
    print(f"\n### bench_ingest: {args.devices} devices every {args.interval:g} s for {args.duration:g} s, "
          f"{args.rounds} round(s)\n")
    print("| variant | controller CPU per stored report: median (each run) | vs current | offered msg/s | lost "
          "| p99 lag | load (2 cores) |")
    print("|---|---|---|---|---|---|---|")
    medians = {name: statistics.median(r["cpu_us"] for r in results if r["variant"] == name) for name, _ in variants}
    for name, _ in variants:
        mine = [r for r in results if r["variant"] == name]
        runs = ", ".join(f"{r['cpu_us']:.0f}" for r in mine)
        print(f"| {name} | {medians[name]:.0f} us ({runs}) | {medians[name] / medians['current']:.2f}x | "
              f"{statistics.median(r['offered'] for r in mine):.0f} | {sum(r['acked'] - r['stored'] for r in mine)} | "
              f"{max(r['p99_s'] for r in mine):.2f} s | {statistics.mean(r['load'] for r in mine):.1f} |")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", action="append", default=[], metavar="NAME=SRC",
                   help="another source tree holding an edge/ package (repeatable)")
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--interval", type=float, default=5.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=2)
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
