"""Parts for the message delivery tests: a controller subprocess, a TCP relay that can cut the
network, and an agent that sends telemetry through the real outbox.

The agent runs in a thread of the test or as a subprocess of its own::

    python -m tests.hardening.delivery --broker mqtt://127.0.0.1:PORT --device d1 --count 2500 \\
        --rate 30 --data DIR --fleet F

It writes the id of every message it queued to ``DIR/ids.txt`` and, once its outbox is empty (or
it gives up), one JSON line with what is left and what was dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from edge.agent.outbox import Kind, Outbox, OutboxLimits, OutboxSender
from edge.protocol.messages import Telemetry, encode, wrap
from edge.protocol.topics import Channel, Topics
from edge.transport import Backoff, MqttClient
from edge.transport.embedded_broker import free_port

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "delivery-admin-token-0123456789"
# Agents reconnect quickly: the test restarts the broker and cuts the network every few seconds,
# and production's 30 s ceiling would spend the test's time waiting.
AGENT_BACKOFF = Backoff(initial=0.1, maximum=1.0)
# Seconds an agent waits for its outbox to empty once everything is queued.
DRAIN_S = 180.0
# Seconds the controller gets to start (a loaded 2-core machine imports slowly).
START_S = 60.0


# ----------------------------------------------------------------------------- controller


class Controller:
    """`edge fleet serve` as a subprocess on a broker of the test's choice, SQLite in ``data``."""

    def __init__(self, data: Path, broker_url: str, fleet: str) -> None:
        self.data, self.broker_url, self.fleet = data, broker_url, fleet
        self.db_path = data / "fleet.db"
        self.log_path = data / "controller.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> "Controller":
        """Start the process and wait until its API answers and its MQTT connections are up."""
        self.data.mkdir(parents=True, exist_ok=True)
        port = free_port("127.0.0.1")
        env = dict(os.environ, EDGE_FLEET_ADMIN_TOKEN=ADMIN, EDGE_HOME=str(self.data / "home"))
        cmd = [sys.executable, "-m", "edge.cli.main", "fleet", "serve", "--broker", self.broker_url,
               "--port", str(port), "--data", str(self.data), "--db", f"sqlite:///{self.db_path}",
               "--fleet", self.fleet]
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the controller exited with {self.proc.returncode}: {self.log()}")
            try:
                if all(self.stats().get("mqtt_connected") or [False]):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the controller did not come up: {self.log()}")

    def stats(self) -> dict[str, Any]:
        """Return the ingest figures of GET /api/v1/stats."""
        r = httpx.get(f"{self.url}/api/v1/stats", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)
        r.raise_for_status()
        return r.json()["ingest"]

    def kill(self) -> None:
        """SIGKILL the process: no flushing, no clean disconnect."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """Stop the process (SIGTERM), killing it if it does not exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self) -> str:
        """Return the end of the controller's log."""
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""


# ----------------------------------------------------------------------------- network cuts


def _reset(sock: socket.socket) -> None:
    """Close with an RST, the way a dead link or a crashed peer ends a connection."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)  # wakes the relay thread blocked in recv()
    except OSError:
        pass
    sock.close()


class _Link:
    """One client connection and its connection to the broker."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.cutting = False
        self._closed = threading.Lock()
        self.closed = False

    def close(self) -> None:
        with self._closed:
            if self.closed:
                return
            self.closed = True
        _reset(self.client)
        _reset(self.upstream)


class CutProxy:
    """A TCP relay between MQTT clients and a broker that a test can cut and restore.

    :meth:`cut` severs every connection in both directions, forwarding only the first half of
    whatever each direction reads next (so the far side gets a truncated packet), and refuses new
    connections until :meth:`restore`.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._up = threading.Event()
        self._up.set()
        self.cuts = 0
        self.truncated = 0  # directions that delivered half a read and then died
        threading.Thread(target=self._accept, name="cut-proxy", daemon=True).start()

    @property
    def url(self) -> str:
        """Return the URL clients use instead of the broker's."""
        return f"mqtt://127.0.0.1:{self.port}"

    def cut(self, grace: float = 0.2) -> None:
        """Sever every connection now and refuse new ones until :meth:`restore`."""
        self._up.clear()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.cutting = True
        time.sleep(grace)  # traffic in flight: each direction forwards half of its next read, then dies
        for link in links:
            link.close()
        self.cuts += 1

    def restore(self) -> None:
        """Accept and relay connections again."""
        self._up.set()

    def close(self) -> None:
        """Stop listening and sever everything."""
        self._up.clear()
        self._listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up.is_set():
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
                upstream.settimeout(None)
            except OSError:  # the broker is down (being restarted)
                _reset(client)
                continue
            link = _Link(client, upstream)
            with self._lock:
                self._links.add(link)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._relay, args=(link, src, dst), daemon=True).start()

    def _relay(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if link.cutting:
                    if len(data) > 1:
                        dst.sendall(data[: len(data) // 2])
                        with self._lock:
                            self.truncated += 1
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            link.close()
            with self._lock:
                self._links.discard(link)


# ----------------------------------------------------------------------------- agent


def run_agent(broker_url: str, device: str, count: int, rate: float, data: Path, fleet: str,
              stop: threading.Event | None = None) -> dict[str, Any]:
    """Queue ``count`` telemetry messages at ``rate`` per second through the real outbox and sender;
    return what is left and what was dropped once the outbox is empty (or after DRAIN_S)."""
    data.mkdir(parents=True, exist_ok=True)
    topic = Topics(fleet=fleet).device(device, Channel.TELEMETRY)
    box = Outbox(data / "outbox.db", OutboxLimits())
    client = MqttClient(broker_url, f"edge-agent-{device}", backoff=AGENT_BACKOFF, clean_start=False, keepalive=5)
    sender = OutboxSender(box, client)
    sender.start()
    client.start()
    started = time.monotonic()
    try:
        with open(data / "ids.txt", "a") as ids:
            for seq in range(1, count + 1):
                if stop is not None and stop.is_set():
                    break
                env = wrap(device, Telemetry(seq=seq, session=1, uptime_s=seq / rate, agent_version="delivery-test",
                                             requests=seq))
                box.put(topic, encode(env), kind=Kind.TELEMETRY)
                ids.write(env.id + "\n")
                ids.flush()
                time.sleep(max(0.0, started + seq / rate - time.monotonic()))
        sender.flush(DRAIN_S)
        return {"device": device, "left": box.depth(), "dropped": box.dropped_total()}
    finally:
        sender.stop()
        client.stop()
        box.close()


def agent_process(broker_url: str, device: str, count: int, rate: float, data: Path, fleet: str) -> subprocess.Popen:
    """Start :func:`run_agent` in a process of its own; its last stdout line is the JSON result."""
    cmd = [sys.executable, "-m", "tests.hardening.delivery", "--broker", broker_url, "--device", device,
           "--count", str(count), "--rate", str(rate), "--data", str(data), "--fleet", fleet]
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "agent.log", "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)


def main() -> int:
    p = argparse.ArgumentParser(description="send telemetry through a real outbox")
    p.add_argument("--broker", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--fleet", required=True)
    a = p.parse_args()
    print(json.dumps(run_agent(a.broker, a.device, a.count, a.rate, a.data, a.fleet)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
