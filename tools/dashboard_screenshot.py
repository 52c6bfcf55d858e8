"""Make docs/dashboard.png: a demo fleet in a real `edge fleet serve`, photographed by Chromium.

The fleet is built the way a real one fills the database: 240 devices send births, telemetry,
reported state and deployment events through the controller's ingestion; signed bundles go
through the artifact store; rollouts move through the real rollout engine (one finished, one in
its third wave with a few failures). Then `edge fleet serve` runs on that database and Debian's
Chromium logs in and takes the overview (and, for reference, the rollout and device list under
test-artifacts/dashboard/demo-*.png).

Usage: ``python tools/dashboard_screenshot.py [--out docs/dashboard.png]``. Needs Playwright
and Debian's chromium.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.fleet import auth  # noqa: E402
from edge.fleet.artifacts import ArtifactStore  # noqa: E402
from edge.fleet.auth import Role  # noqa: E402
from edge.fleet.dashboard import users  # noqa: E402
from edge.fleet.dashboard.tables import ensure_tables  # noqa: E402
from edge.fleet.db import open_database  # noqa: E402
from edge.fleet.desired import DesiredPublisher  # noqa: E402
from edge.fleet.ingest import Ingestor  # noqa: E402
from edge.fleet.plan import parse_spec  # noqa: E402
from edge.fleet.rollout import RolloutEngine  # noqa: E402
from edge.protocol.messages import EventKind  # noqa: E402
from edge.protocol.signing import TrustStore, generate_keypair, load_signing_key  # noqa: E402
from edge.protocol.topics import Topics  # noqa: E402
from tests.fixtures.bundles import make_generic_bundle  # noqa: E402
from tests.fleet.helpers import Devices  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FLEET = (("pi5", "raspberry-pi-5", 120), ("orin", "jetson-orin-nano", 40), ("nuc", "x86-avx2", 60),
         ("box", "generic-cpu", 20))
DEMO_PASSWORD = "a demo passphrase, nothing more"
STEPS = (EventKind.DOWNLOAD_STARTED, EventKind.DOWNLOADED, EventKind.VERIFIED, EventKind.INSTALLED,
         EventKind.ACTIVATED, EventKind.HEALTH_OK, EventKind.COMMITTED)


def build_fleet(data: Path, work: Path) -> Path:
    """Fill a controller database under ``data``; return the trusted public key."""
    priv, pub = generate_keypair(work, "demo")
    key = load_signing_key(priv)
    db = open_database(None, data)
    store = ArtifactStore(db, data / "bundles", TrustStore.from_files([pub]))
    for name, versions in (("minilm", ("1.0.0", "1.1.0", "1.2.0")), ("smollm2", ("0.9.0",))):
        for version in versions:
            for _, profile, _ in FLEET:
                store.add_file(make_generic_bundle(work, key, name, version, profile,
                                                   latency_ms={"p50": 3.1, "p95": 5.4}))
    topics, clock = Topics(), time.time
    ing, dev = Ingestor(db, topics, clock), Devices(topics, clock)
    engine = RolloutEngine(db, store, clock)
    desired = DesiredPublisher(db, topics, "http://ctl", auth.download_secret(db), clock)
    running: dict[str, dict[str, str]] = {}
    msgs = []
    for prefix, profile, n in FLEET:
        for i in range(n):
            d = f"{prefix}-{i:03d}"
            running[d] = {"minilm": "1.1.0" if i % 10 < 7 else "1.0.0"}
            msgs += [dev.birth(d, 1, profile=profile), dev.reported(d, running[d]),
                     dev.telemetry(d, models=running[d], requests=50 + i, p95=8.0 + i % 9)]
    ing.process(msgs)

    def follow(rid: str, ids: list[str], model: str, version: str, steps=STEPS) -> None:
        out = [dev.event(d, k, rid, model=model, version=version) for d in ids for k in steps]
        if EventKind.COMMITTED in steps:
            for d in ids:
                previous = running[d].get(model)
                running[d][model] = version
                out.append(dev.reported(d, running[d], previous={model: previous} if previous else None))
        ing.process(out)

    def members(rid: str, state: str) -> list[str]:
        return [m["device_id"] for m in engine.devices(rid, state, limit=1000)]

    def tick() -> None:
        engine.tick()
        while desired.publish_pending(lambda t, p: type("H", (), {"wait": lambda self, s: True})()):
            pass

    # A finished rollout: SmolLM2 to every Jetson.
    done = engine.create(parse_spec({"model": "smollm2", "version": "0.9.0",
                                     "target": {"kind": "profile", "value": "jetson-orin-nano"},
                                     "plan": {"waves": ["100%"], "soak_s": 0}}))["id"]
    tick()
    follow(done, members(done, "notified"), "smollm2", "0.9.0")
    tick()
    tick()
    # One in flight: MiniLM 1.2.0, canary and 5% done (one failed its health check), 25% rolling.
    rid = engine.create(parse_spec({"model": "minilm", "version": "1.2.0", "plan": {
        "waves": ["1", "5%", "25%", "100%"], "soak_s": 0, "max_failure_ratio": 0.5}}))["id"]
    tick()
    follow(rid, members(rid, "notified"), "minilm", "1.2.0")
    tick()
    tick()
    wave2 = members(rid, "notified")
    follow(rid, wave2[1:], "minilm", "1.2.0")
    ing.process([dev.event(wave2[0], EventKind.HEALTH_FAILED, rid, model="minilm", version="1.2.0",
                           detail="p95 latency 182 ms over the 120 ms budget"),
                 dev.event(wave2[0], EventKind.ROLLED_BACK, rid, model="minilm", version="1.2.0",
                           detail="health check failed: back to 1.1.0")])
    tick()
    tick()
    wave3 = members(rid, "notified")
    follow(rid, wave3[: len(wave3) // 2], "minilm", "1.2.0")
    follow(rid, wave3[len(wave3) // 2: len(wave3) * 3 // 4], "minilm", "1.2.0", STEPS[:4])
    tick()
    # A few devices went away, a few have a broken model.
    gone = ["pi5-017", "pi5-052", "pi5-088", "nuc-031", "orin-009", "box-004", "pi5-101"]
    ing.process([dev.death(d, 1, reason="connection lost") for d in gone])
    broken = {"nuc-044": "model file missing", "pi5-063": "onnxruntime: CUDA out of memory"}
    for d, why in broken.items():
        ing.process([dev.event(d, EventKind.FAILED, None, model="minilm", version=running[d]["minilm"], detail=why)])
    with db.write() as conn:
        from edge.fleet.db import device_models_t

        for d, why in broken.items():
            conn.execute(device_models_t.update().where(device_models_t.c.device_id == d).values(state="failed", error=why))
    ensure_tables(db)
    users.create_user(db, "ana", DEMO_PASSWORD, Role.ADMIN, created_by="demo")
    db.dispose()
    return pub


def main() -> None:
    """Build the fleet, serve it, photograph it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = ap.parse_args()
    from playwright.sync_api import expect, sync_playwright

    work = Path(tempfile.mkdtemp(prefix="edge-dashboard-shot-"))
    token = "edge_demo_" + secrets.token_urlsafe(24)
    proc = None
    try:
        pub = build_fleet(work / "ctl", work)
        log = work / "controller.log"
        env = {**os.environ, "EDGE_FLEET_ADMIN_TOKEN": token, "EDGE_HOME": str(work / "home")}
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "edge.cli.main", "fleet", "serve", "--data", str(work / "ctl"),
                                     "--port", "0", "--mqtt-port", "0", "--trusted-key", str(pub)],
                                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + 60
        while not (m := re.search(r"edge fleet: api (\S+)", log.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(log.read_text())
            time.sleep(0.1)
        url = m.group(1)
        chromium = shutil.which("chromium") or "/usr/bin/chromium"
        extra = ROOT / "test-artifacts" / "dashboard"
        extra.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1440, "height": 900}, device_scale_factor=1).new_page()
            page.goto(url + "/ui/")
            page.locator("#username").fill("ana")
            page.locator("#password").fill(DEMO_PASSWORD)
            page.locator("#login-submit").click()
            expect(page.locator("[data-model='minilm']")).to_be_visible()
            page.wait_for_timeout(1500)  # let the live badge connect
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            page.locator("[data-rollout]").first.click()
            expect(page.locator("#rollout-state")).to_be_visible()
            page.wait_for_timeout(800)
            page.screenshot(path=str(extra / "demo-rollout.png"), full_page=True)
            page.goto(url + "/ui/devices")
            expect(page.locator("tr[data-device]").first).to_be_visible()
            page.screenshot(path=str(extra / "demo-devices.png"), full_page=True)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
