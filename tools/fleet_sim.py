"""Fleet simulator: thousands of lightweight devices against a real broker and controller.

Each simulated device is one MQTT 3.1.1 connection (a minimal asyncio client, no thread per
device) with a retained birth, a last will carrying its session counter, a subscription to its
retained desired state, and a status report (a telemetry message, QoS 1) every ``--interval``
seconds. The controller is a real ``edge fleet serve`` process; the broker a mosquitto of the
simulator's own (or ``--broker``).

The reports are lean so that the simulator, not the controller, is never what limits the rate:
one scheduler task (not a coroutine per device) writes each due device's PUBLISH, built from a
pre-encoded topic and a bytes template, on that device's own connection, and PUBACKs are only
counted. Every message still has its own id, send time and sequence number, and the controller
decodes and validates it like any other.

Two measurements, printed as a markdown table:

* ingest: N devices report every ``--interval`` s for ``--duration`` s. Every message the broker
  acknowledged must end up as one telemetry row (lost = acknowledged - stored; rows are unique per
  message id). Lag = when the row was written (``stored_at``) - when the device sent it (``ts``),
  over every stored row; the receive lag (``received_at`` - ``ts``) shows how much of it is MQTT.
* rollout: a signed bundle is published and a one-wave rollout created for ``--rollout-devices``
  devices; each device starts its "download" as soon as its desired state names the version.
  Latency = "download_started" sent by the device - the moment the rollout was POSTed.

    python tools/fleet_sim.py --devices 1000 --duration 20 --rollout-devices 200   # reduced scale
    python tools/fleet_sim.py --devices 10000 --duration 60 --rollout-devices 1000  # full scale
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.protocol.messages import (  # noqa: E402
    Capabilities, Event, EventKind, Status, decode, encode, wrap,
)  # fmt: skip
from edge.protocol.topics import Channel, Topics  # noqa: E402

FLEET = "sim"
ADMIN_TOKEN = "fleet-sim-admin-token-0123456789"
CAPS = Capabilities(architecture="x86_64", providers=("CPUExecutionProvider",), ram_mb=4096, disk_mb=32000, cpu_count=4)
# New connections per second while the fleet comes up (a SYN flood would measure the kernel).
CONNECT_RATE = 1000
KEEPALIVE_S = 60
# Scheduler tick of the status reports: devices due within a tick leave together.
REPORT_TICK_S = 0.01
# A status report as encode(wrap(Telemetry(...))) writes it (same keys, same order): formatting
# bytes costs about a microsecond where pydantic or json.dumps would cost tens.
TELEMETRY = (b'{"v":1,"id":"%s","ts":%r,"device":"%s","body":{"type":"telemetry","seq":%d,"session":%d,'
             b'"uptime_s":%r,"agent_version":"sim","models":[{"name":"simmodel","version":"1.0.0","state":"active"}],'
             b'"requests":%d,"errors":0,"latency_p95_ms":12.5,"cpu_percent":20.0,"outbox_depth":0,'
             b'"outbox_dropped":0,"per_model":{}}}')


# ----------------------------------------------------------------------------- MQTT 3.1.1 codec


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def connect_packet(client_id: str, will: tuple[str, bytes] | None, keepalive: int) -> bytes:
    flags = 0x02  # clean session: a simulated device keeps no session
    payload = _str(client_id)
    if will:
        flags |= 0x04 | 0x08 | 0x20  # will, QoS 1, retained
        payload += _str(will[0]) + _str(will[1])
    return _packet(0x10, _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload)


def publish_packet(topic: str, payload: bytes, pid: int, retain: bool) -> bytes:
    return _packet(0x32 | (0x01 if retain else 0), _str(topic) + struct.pack("!H", pid) + payload)


class Device:
    """One simulated device on its own connection."""

    def __init__(self, sim: "Sim", device_id: str) -> None:
        self.sim, self.id = sim, device_id
        self.session = 1
        self.seq = 0
        self.requests = 0
        self.pid = 0
        self.inflight: dict[int, asyncio.Future] = {}
        self.writer: asyncio.StreamWriter | None = None
        self.deployments: set[str] = set()
        self.connected = asyncio.Event()
        self.reports: set[int] = set()  # packet ids of status reports awaiting their PUBACK
        self.telemetry_topic = b""

    def _topic(self, channel: Channel) -> str:
        return self.sim.topics.device(self.id, channel)

    def _status(self, state: str) -> bytes:
        body = Status(state=state, session=self.session, profile="generic-cpu", agent_version="sim",
                      capabilities=CAPS if state == "online" else None, reason=None if state == "online" else "will")
        return encode(wrap(self.id, body))

    async def run(self) -> None:
        reader, self.writer = await asyncio.open_connection(self.sim.host, self.sim.port)
        self.writer.write(connect_packet(f"sim-{self.id}", (self._topic(Channel.STATUS), self._status("offline")),
                                         KEEPALIVE_S))
        head = await reader.readexactly(4)
        if head[0] != 0x20 or head[3] != 0:
            raise RuntimeError(f"{self.id}: connection refused ({head!r})")
        self.sim.loop_tasks.append(asyncio.ensure_future(self._read(reader)))
        topic = self._topic(Channel.TELEMETRY).encode()
        self.telemetry_topic = struct.pack("!H", len(topic)) + topic
        self.writer.write(_packet(0x82, struct.pack("!H", self._next_pid()) + _str(self._topic(Channel.DESIRED)) + b"\x01"))
        await self.publish(self._topic(Channel.STATUS), self._status("online"), retain=True)
        self.connected.set()

    def _next_pid(self) -> int:
        self.pid = self.pid % 65535 + 1
        return self.pid

    async def publish(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """Publish at QoS 1; return True once the broker acknowledged it."""
        assert self.writer is not None
        pid = self._next_pid()
        fut = asyncio.get_running_loop().create_future()
        self.inflight[pid] = fut
        self.writer.write(publish_packet(topic, payload, pid, retain))
        try:
            await asyncio.wait_for(fut, 30)
            return True
        except asyncio.TimeoutError:
            self.inflight.pop(pid, None)
            return False

    async def _read(self, reader: asyncio.StreamReader) -> None:
        buf = b""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                buf += data
                while buf:  # whole packets only; a partial one waits for the next read
                    pos, mult, length = 1, 1, 0
                    while pos < len(buf):
                        b = buf[pos]
                        pos += 1
                        length += (b & 0x7F) * mult
                        mult *= 128
                        if not b & 0x80:
                            break
                    else:
                        break
                    if len(buf) < pos + length:
                        break
                    first, body, buf = buf[0], buf[pos:pos + length], buf[pos + length:]
                    self._packet(first, body)
        except ConnectionError:
            return

    def _packet(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 4:  # PUBACK
            pid = struct.unpack("!H", body[:2])[0]
            if pid in self.reports:
                self.reports.discard(pid)
                self.sim.acked += 1
                return
            fut = self.inflight.pop(pid, None)
            if fut and not fut.done():
                fut.set_result(True)
        elif kind == 3:  # PUBLISH: our desired state
            tlen = struct.unpack("!H", body[:2])[0]
            qos = (first >> 1) & 3
            start = 2 + tlen + (2 if qos else 0)
            if qos:
                assert self.writer is not None
                self.writer.write(_packet(0x40, body[2 + tlen:4 + tlen]))
            self.sim.on_desired(self, body[start:])

    def report(self, interval: float, msg_id: bytes) -> None:
        """Write one status report (QoS 1) now; its PUBACK is counted by the reader."""
        assert self.writer is not None
        self.seq += 1
        self.requests += random.randint(0, 20)
        payload = TELEMETRY % (msg_id, time.time(), self.id.encode(), self.seq, self.session,
                               float(self.seq * interval), self.requests)
        pid = self._next_pid()
        self.reports.add(pid)
        self.writer.write(_packet(0x32, self.telemetry_topic + struct.pack("!H", pid) + payload))

    async def event(self, kind: EventKind, deployment: str, version: str) -> None:
        body = Event(kind=kind, model="simmodel", version=version, deployment_id=deployment)
        await self.publish(self._topic(Channel.EVENTS), encode(wrap(self.id, body)))


@dataclass
class Sim:
    """The simulated fleet in this process."""

    host: str
    port: int
    topics: Topics = field(default_factory=lambda: Topics(fleet=FLEET))
    sent: int = 0
    acked: int = 0
    loop_tasks: list = field(default_factory=list)
    download_started: dict[str, float] = field(default_factory=dict)
    commit_delay: float = 0.5

    def on_desired(self, device: Device, payload: bytes) -> None:
        if not payload:
            return
        desired = decode(payload).body
        for name, m in desired.models.items():  # type: ignore[union-attr]
            if m.deployment_id and m.deployment_id not in device.deployments:
                device.deployments.add(m.deployment_id)
                self.download_started[device.id] = time.time()
                asyncio.ensure_future(self._install(device, m.deployment_id, m.version))

    async def _install(self, device: Device, deployment: str, version: str) -> None:
        await device.event(EventKind.DOWNLOAD_STARTED, deployment, version)
        await asyncio.sleep(self.commit_delay)
        for kind in (EventKind.DOWNLOADED, EventKind.VERIFIED, EventKind.INSTALLED, EventKind.ACTIVATED,
                     EventKind.COMMITTED):
            await device.event(kind, deployment, version)


# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mosquitto(work: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text("\n".join([
        f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false",
        # The default 1000 drops QoS 1 messages for a briefly slow subscriber (REFERENCE.md).
        "max_queued_messages 1000000", "max_connections -1", "set_tcp_nodelay true",
        f"log_dest file {work / 'mosquitto.log'}", "log_type error", "log_type warning",
        f"user {os.environ.get('USER') or 'root'}",
    ]) + "\n")
    proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def start_controller(work: Path, broker: str, db: str | None, pub_key: Path, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, EDGE_FLEET_ADMIN_TOKEN=ADMIN_TOKEN, EDGE_HOME=str(work / "home"))
    cmd = [sys.executable, "-m", "edge.cli.main", "fleet", "serve", "--broker", broker, "--port", str(port),
           "--data", str(work / "ctl"), "--fleet", FLEET, "--trusted-key", str(pub_key), "--ingest-workers", str(workers),
           "--rate-limit", "0"]  # the simulator tags devices as fast as it can: not a client to throttle
    if db:
        cmd += ["--db", db]
    log = open(work / "controller.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"controller exited: {(work / 'controller.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("controller did not start")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# ----------------------------------------------------------------------------- scenarios


async def bring_up(sim: Sim, n: int, prefix: str) -> list[Device]:
    devices = [Device(sim, f"{prefix}{i:05d}") for i in range(n)]
    for start in range(0, n, CONNECT_RATE // 10):
        t = time.monotonic()
        await asyncio.gather(*(d.run() for d in devices[start:start + CONNECT_RATE // 10]))
        await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - t)))
    return devices


def stored_telemetry(db_url: str, data: Path, prefix: str, lags: bool = False) -> tuple[int, list[float], list[float]]:
    """Return (rows stored, receive lags, stored lags) of the devices named ``prefix...``."""
    from sqlalchemy import func, select

    from edge.fleet.db import open_database, telemetry_t

    db = open_database(db_url, data, create=False)
    try:
        with db.read() as conn:
            where = telemetry_t.c.device_id.like(f"{prefix}%")
            if not lags:
                return conn.execute(select(func.count()).select_from(telemetry_t).where(where)).scalar_one(), [], []
            rows = conn.execute(select(telemetry_t.c.ts, telemetry_t.c.received_at, telemetry_t.c.stored_at)
                                .where(where)).all()
    finally:
        db.dispose()
    return len(rows), [r.received_at - r.ts for r in rows], [r.stored_at - r.ts for r in rows]


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user + system) of a process and its children so far."""
    import psutil

    total = 0.0
    proc = psutil.Process(pid)
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


async def ingest_scenario(args: Any, sim: Sim, api: Any, db_url: str, data: Path, rows: list, ctl_pid: int) -> None:
    t0 = time.monotonic()
    devices = await bring_up(sim, args.devices, "ing-")
    rows.append(("devices connected (births sent)", f"{len(devices)} in {time.monotonic() - t0:.1f} s"))
    deadline = time.time() + 120
    while time.time() < deadline:
        online = api.get("/api/v1/devices", params={"status": "online", "search": "ing-", "limit": 1}).json()["total"]
        if online >= args.devices:
            break
        await asyncio.sleep(0.5)
    rows.append(("devices online in the registry", f"{online}"))
    cpu0, acked0, sim_cpu0 = cpu_seconds(ctl_pid), sim.acked, time.process_time()
    loads: list[float] = []
    sampler = asyncio.ensure_future(sample_load(loads))
    took = await report_steadily(sim, devices, args.interval, args.duration)
    deadline = time.monotonic() + 30
    while any(d.reports for d in devices) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)  # the last PUBACKs
    sampler.cancel()
    sim_cpu = time.process_time() - sim_cpu0
    rows.append(("status reports sent / acknowledged by the broker", f"{sim.sent} / {sim.acked}"))
    rows.append(("offered rate: target / achieved", f"{args.devices / args.interval:.0f} / {sim.sent / took:.0f} msg/s "
                 f"({args.devices} devices, one report per {args.interval:g} s each, on its own connection; "
                 f"simulator CPU {sim_cpu / took * 100:.0f}% of a core)"))
    rows.append(("1-minute load average during the reports (2 cores), mean / max",
                 f"{statistics.mean(loads):.1f} / {max(loads):.1f}" if loads else "n/a"))
    # Drain: wait until every acknowledged message is stored (or nothing moves for 30 s).
    last, still = -1, time.monotonic()
    while True:
        count, _, _ = stored_telemetry(db_url, data, "ing-")
        if count >= sim.acked:
            break
        if count != last:
            last, still = count, time.monotonic()
        elif time.monotonic() - still > 30:
            break
        await asyncio.sleep(1.0)
    cpu = cpu_seconds(ctl_pid) - cpu0
    count, received, stored = stored_telemetry(db_url, data, "ing-", lags=True)
    lost = sim.acked - count
    rows.append(("stored telemetry rows / lost", f"{count} / {lost} ({'PASS' if lost == 0 else 'FAIL'}: zero lost)"))
    rows.append(("lag device send -> controller receive, p50 / p99 / max",
                 f"{pct(received, .5) * 1000:.0f} / {pct(received, .99) * 1000:.0f} / {max(received) * 1000:.0f} ms"))
    rows.append(("lag device send -> row stored, p50 / p99 / max",
                 f"{pct(stored, .5) * 1000:.0f} / {pct(stored, .99) * 1000:.0f} / {max(stored) * 1000:.0f} ms "
                 f"({'PASS' if pct(stored, .99) < 2 else 'FAIL'}: p99 < 2 s)"))
    per_msg = cpu / max(sim.acked - acked0, 1)
    rows.append(("controller CPU per stored status report (all its processes)",
                 f"{per_msg * 1e6:.0f} us: about {1 / per_msg:,.0f} msg/s per fully available core"))
    stats = api.get("/api/v1/stats").json()["ingest"]
    rows.append(("controller ingest batches / last batch", f"{stats.get('batches')} / {stats.get('last_batch_ms')} ms"))
    timings = []
    for params in ({"limit": 50}, {"limit": 50, "search": "ing-0999"}, {"limit": 50, "status": "online"},
                   {"limit": 50, "after": "ing-05000"}):
        for _ in range(5):
            t = time.perf_counter()
            api.get("/api/v1/devices", params=params).raise_for_status()
            timings.append(time.perf_counter() - t)
    rows.append((f"GET /api/v1/devices at {args.devices} devices (filters, paging), p50 / max",
                 f"{statistics.median(timings) * 1000:.0f} / {max(timings) * 1000:.0f} ms"))
    for d in devices:
        if d.writer:
            d.writer.close()


async def report_steadily(sim: Sim, devices: list[Device], interval: float, duration: float) -> float:
    """Have every device report once per ``interval``, spread evenly over it, for ``duration``
    seconds; return how long the sending took (longer than ``duration`` if the loop fell behind)."""
    slots = max(1, round(interval / REPORT_TICK_S))
    order = list(devices)
    random.shuffle(order)
    buckets = [order[i::slots] for i in range(slots)]
    run = os.urandom(6).hex().encode()  # message ids unique across runs sharing a database
    start, n = time.monotonic(), 0
    for tick in range(round(duration / REPORT_TICK_S)):
        delay = start + tick * REPORT_TICK_S - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        for device in buckets[tick % slots]:
            n += 1
            device.report(interval, b"%s%010x" % (run, n))
        sim.sent += len(buckets[tick % slots])
    return time.monotonic() - start


async def sample_load(out: list[float]) -> None:
    """Append the 1-minute load average every second until cancelled."""
    while True:
        out.append(os.getloadavg()[0])
        await asyncio.sleep(1.0)


async def rollout_scenario(args: Any, sim: Sim, api: Any, bundle: Path, rows: list) -> None:
    devices = await bring_up(sim, args.rollout_devices, "ro-")
    deadline = time.time() + 120
    while api.get("/api/v1/devices", params={"search": "ro-", "status": "online", "limit": 1}).json()["total"] \
            < len(devices) and time.time() < deadline:
        await asyncio.sleep(0.5)
    for d in devices:
        api.post(f"/api/v1/devices/{d.id}/tags", json={"add": ["sim-rollout"]}).raise_for_status()
    r = api.post("/api/v1/bundles", content=bundle.read_bytes())
    r.raise_for_status()
    sim.download_started.clear()
    t_created = time.time()
    r = api.post("/api/v1/rollouts", json={"model": "simmodel", "version": "2.0.0",
                                           "target": {"kind": "tag", "value": "sim-rollout"},
                                           "plan": {"waves": ["100%"], "soak_s": 0}})
    r.raise_for_status()
    rid = r.json()["id"]
    deadline = time.time() + 120
    while len(sim.download_started) < len(devices) and time.time() < deadline:
        await asyncio.sleep(0.2)
    lat = [t - t_created for t in sim.download_started.values()]
    rows.append((f"rollout to {len(devices)} devices: download started, p50 / p95 / max",
                 f"{pct(lat, .5):.2f} / {pct(lat, .95):.2f} / {max(lat):.2f} s "
                 f"({len(lat)}/{len(devices)} devices; {'PASS' if pct(lat, .5) < 5 else 'FAIL'}: p50 < 5 s)"))
    while time.time() < deadline:
        st = api.get(f"/api/v1/rollouts/{rid}").json()
        if st["state"] == "completed":
            break
        await asyncio.sleep(0.5)
    rows.append(("rollout created -> completed (all committed)", f"{time.time() - t_created:.1f} s, state {st['state']}, "
                 f"devices {st['devices']}"))
    for d in devices:
        if d.writer:
            d.writer.close()


def make_bundle(work: Path) -> tuple[Path, Path]:
    from edge.protocol.bundle import describe_payload, write_bundle
    from edge.protocol.manifest import FidelityReport, Manifest, Provenance, TensorSpec
    from edge.protocol.signing import generate_keypair, load_signing_key

    priv, pub = generate_keypair(work / "keys", "sim")
    payload = work / "payload"
    payload.mkdir()
    (payload / "model.onnx").write_bytes(os.urandom(64 * 1024))
    created = "2026-01-01T00:00:00+00:00"
    manifest = Manifest(
        name="simmodel", version="2.0.0", task="generic", profile="generic-cpu", architecture="any",
        precision="fp32", required_providers=("CPUExecutionProvider",), min_ram_mb=64, model_file="model.onnx",
        inputs=(TensorSpec(name="x", dtype="float32", shape=("n", 4)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=("n", 2)),),
        files=tuple(describe_payload(payload, {"model.onnx": "model"})),
        provenance=Provenance(source="fleet_sim", source_format="onnx", exporter_version="0", created_at=created),
        fidelity=FidelityReport(passed=True, metrics={}, thresholds={}, samples=0), created_at=created)
    return write_bundle(work / "sim.edgebundle", manifest, payload, load_signing_key(priv)), pub


async def main_async(args: Any) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * max(args.devices, args.rollout_devices) + 1000
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, need)), hard))  # mosquitto inherits it
    work = Path(tempfile.mkdtemp(prefix="fleet-sim-"))
    procs = []
    rows: list[tuple[str, str]] = []
    try:
        if args.broker:
            broker = args.broker
        else:
            mosq, port = start_mosquitto(work)
            procs.append(mosq)
            broker = f"mqtt://127.0.0.1:{port}"
        host, port = broker.split("://", 1)[1].rsplit(":", 1)
        bundle, pub = make_bundle(work)
        db_url = args.db or f"sqlite:///{work / 'ctl' / 'fleet.db'}"
        ctl, url = start_controller(work, broker, args.db, pub, args.ingest_workers)
        procs.append(ctl)
        import httpx

        api = httpx.Client(base_url=url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
        sim = Sim(host, int(port))
        rows.append(("broker / database / ingest workers", f"{'mosquitto (own)' if not args.broker else broker} / "
                     f"{'SQLite (WAL)' if db_url.startswith('sqlite') else 'PostgreSQL'} / {args.ingest_workers}"))
        rows.append(("machine load average at start (2 cores)", f"{os.getloadavg()[0]:.1f}"))
        if args.devices:
            await ingest_scenario(args, sim, api, db_url, work / "ctl", rows, ctl.pid)
        if args.rollout_devices:
            await rollout_scenario(args, sim, api, bundle, rows)
        for t in sim.loop_tasks:
            t.cancel()
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)
    print(f"\n### fleet_sim: {args.devices} devices every {args.interval:g} s for {args.duration:g} s, "
          f"rollout to {args.rollout_devices}\n")
    print("| measure | result |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0 if all("FAIL" not in v for _, v in rows) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=10_000, help="devices in the ingest scenario (0 skips it)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between status reports of a device")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of steady reporting")
    p.add_argument("--rollout-devices", type=int, default=1000, help="devices in the rollout scenario (0 skips it)")
    p.add_argument("--broker", help="use this broker instead of starting mosquitto")
    p.add_argument("--db", help="controller database URL (default SQLite in a temporary folder)")
    p.add_argument("--ingest-workers", type=int, default=0, help="controller ingest worker processes")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, database)")
    args = p.parse_args()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
