"""Message delivery from agents to the controller's database: nothing lost, nothing stored twice.

* A controller killed (SIGKILL) with messages received but not committed gets them again from its
  persistent session after a restart: ingest acknowledges only after the commit.
* Telemetry sent while the broker restarts and the controller is away reaches the controller when
  it returns (its subscription is kept in the broker's persistence file).
* Agents (the real outbox and sender, three of them in processes of their own) send 10,000 QoS 1
  telemetry messages while the broker restarts 20 times and the network between every client and
  the broker is cut 20 times, mid-packet; every message id sent is stored exactly once.

Both use a mosquitto of their own with persistence on (a restart keeps sessions and queues) and a
real `edge fleet serve` subprocess on SQLite.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from edge.protocol.messages import Telemetry, encode, wrap
from edge.protocol.topics import Channel, Topics
from edge.transport import MqttClient
from tests.fixtures.broker import MOSQUITTO, MosquittoBroker, broker  # noqa: F401
from tests.hardening.delivery import Controller, CutProxy, agent_process, run_agent
from tests.transport.helpers import FAST, WAIT_S, unique, wait_until

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="needs mosquitto (persistent sessions across restarts)")

FLEET = "dlv"
# Bound for the controller to store what it was sent; reached only when something is lost.
STORE_WAIT_S = 120.0


def _stored(db: Path) -> dict[str, int]:
    """Return how many telemetry rows each message id has."""
    if not db.exists():
        return {}
    with sqlite3.connect(db, timeout=30) as conn:
        return dict(conn.execute("SELECT msg_id, COUNT(*) FROM telemetry GROUP BY msg_id").fetchall())


def _send(pub: MqttClient, device: str, seq: int):
    env = wrap(device, Telemetry(seq=seq, session=1, uptime_s=float(seq), agent_version="delivery-test"))
    return env.id, pub.publish(Topics(fleet=FLEET).device(device, Channel.TELEMETRY), encode(env), qos=1)


def test_a_controller_killed_between_receipt_and_commit_gets_the_messages_again(broker, tmp_path: Path) -> None:
    if not isinstance(broker, MosquittoBroker):
        pytest.skip("needs mosquitto")
    ctl = Controller(tmp_path / "ctl", broker.url, FLEET).start()
    pub = MqttClient(broker.url, unique("device"), backoff=FAST).start()
    lock = None
    try:
        assert pub.wait_connected(WAIT_S)
        probe, handle = _send(pub, "probe", 1)  # through once: subscriptions and sessions exist
        assert handle.wait(WAIT_S)
        assert wait_until(lambda: probe in _stored(ctl.db_path), timeout=STORE_WAIT_S), ctl.log()
        # A stuck database: the ingest receives but cannot commit (a slow disk, a long lock).
        lock = sqlite3.connect(ctl.db_path, isolation_level=None, timeout=30)
        lock.execute("BEGIN IMMEDIATE")
        sent = [_send(pub, f"dev-{i % 5}", i) for i in range(1, 201)]
        assert all(h.wait(WAIT_S) for _, h in sent)  # the broker has them all
        ids = {i for i, _ in sent}
        assert wait_until(lambda: ctl.stats()["uncommitted"] == len(ids), timeout=STORE_WAIT_S), ctl.stats()
        assert not ids & set(_stored(ctl.db_path))
        ctl.kill()  # received, unacknowledged, uncommitted
        lock.execute("ROLLBACK")
        lock.close()
        lock = None
        assert not ids & set(_stored(ctl.db_path))
        ctl.start()
        assert wait_until(lambda: ids <= set(_stored(ctl.db_path)), timeout=STORE_WAIT_S), ctl.log()
        rows = _stored(ctl.db_path)
        assert set(rows) == ids | {probe} and set(rows.values()) == {1}  # all there, each once
        assert ctl.stats()["telemetry"] >= len(ids)  # the broker sent them again after the restart
    finally:
        if lock is not None:
            lock.close()
        pub.stop()
        ctl.stop()


def test_telemetry_sent_while_the_broker_restarts_and_the_controller_is_away_is_stored(broker, tmp_path: Path) -> None:
    if not isinstance(broker, MosquittoBroker):
        pytest.skip("needs mosquitto")
    proxy = CutProxy(broker.host, broker.port)  # the controller's only way to the broker
    ctl = Controller(tmp_path / "ctl", proxy.url, FLEET).start()
    pub = MqttClient(broker.url, unique("device"), backoff=FAST).start()
    try:
        assert pub.wait_connected(WAIT_S)
        probe, handle = _send(pub, "probe", 1)
        assert handle.wait(WAIT_S)
        assert wait_until(lambda: probe in _stored(ctl.db_path), timeout=STORE_WAIT_S), ctl.log()
        proxy.cut()  # the controller is away ...
        broker.stop()  # ... while the broker restarts (its sessions come back from its file) ...
        broker.start()
        assert pub.wait_connected(WAIT_S)
        sent = [_send(pub, f"dev-{i % 5}", i) for i in range(1, 51)]  # ... and devices report
        assert all(h.wait(WAIT_S) for _, h in sent)
        proxy.restore()
        ids = {i for i, _ in sent}
        # A shared subscription would have lost these: mosquitto 2.0 restores it only on resubscribe.
        assert wait_until(lambda: ids <= set(_stored(ctl.db_path)), timeout=STORE_WAIT_S), ctl.log()
    finally:
        pub.stop()
        proxy.close()
        ctl.stop()


AGENTS_IN_PROCESSES = 3
AGENTS_IN_THREADS = 1
MESSAGES = 10_000
RESTARTS = 20
CUTS = 20
# Seconds of undisturbed traffic between two faults.
CALM_S = 1.5


@pytest.mark.slow
def test_ten_thousand_messages_cross_broker_restarts_and_network_cuts_without_loss(broker, tmp_path: Path) -> None:
    if not isinstance(broker, MosquittoBroker):
        pytest.skip("needs mosquitto")
    rng = random.Random(6)
    proxy = CutProxy(broker.host, broker.port)
    ctl = Controller(tmp_path / "ctl", proxy.url, FLEET).start()
    agents = AGENTS_IN_PROCESSES + AGENTS_IN_THREADS
    per_agent = MESSAGES // agents
    # Spread the messages over the faults: each fault round is about two calm periods long.
    rate = per_agent / (RESTARTS * (2 * CALM_S + 0.8))
    folders = [tmp_path / f"agent-{i}" for i in range(agents)]
    procs = [agent_process(proxy.url, f"agent-{i}", per_agent, rate, folders[i], FLEET) for i in range(AGENTS_IN_PROCESSES)]
    results: list[dict] = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        run_agent(proxy.url, f"agent-{i}", per_agent, rate, folders[i], FLEET)), daemon=True)
        for i in range(AGENTS_IN_PROCESSES, agents)]
    for t in threads:
        t.start()
    restarts = 0
    try:
        for _ in range(max(RESTARTS, CUTS)):
            time.sleep(CALM_S)
            if restarts < RESTARTS:
                broker.stop()  # SIGTERM: mosquitto saves sessions and queues, as in a maintenance restart
                time.sleep(rng.uniform(0.1, 0.5))
                broker.start()
                restarts += 1
            time.sleep(CALM_S)
            if proxy.cuts < CUTS:
                proxy.cut(grace=rng.uniform(0.05, 0.3))
                time.sleep(rng.uniform(0.2, 1.0))
                proxy.restore()
        for p in procs:
            out, _ = p.communicate(timeout=300)
            results.append(json.loads(out.strip().splitlines()[-1]))
        for t in threads:
            t.join(300)
        sent: set[str] = set()
        for folder in folders:
            sent |= set((folder / "ids.txt").read_text().split())
        assert len(results) == agents and all(r["left"] == 0 and r["dropped"] == 0 for r in results), results
        last, still = -1, time.monotonic()
        while not sent <= set(_stored(ctl.db_path)) and time.monotonic() - still < STORE_WAIT_S:
            n = len(_stored(ctl.db_path))
            if n != last:
                last, still = n, time.monotonic()
            time.sleep(1.0)
        rows = _stored(ctl.db_path)
        lost = sent - set(rows)
        duplicates = sum(n - 1 for n in rows.values())
        stats = ctl.stats()
        redelivered = stats.get("telemetry", 0) - stats.get("telemetry_new", 0)
        print(f"\nmessage delivery: {len(sent)} messages from {agents} agents ({AGENTS_IN_PROCESSES} in processes), "
              f"{restarts} broker restarts, {proxy.cuts} network cuts ({proxy.truncated} directions cut mid-read), "
              f"lost {len(lost)}, duplicate rows {duplicates}, redelivered and deduplicated {redelivered}")
        assert len(sent) == MESSAGES
        assert restarts == RESTARTS and proxy.cuts == CUTS and proxy.truncated > 0
        assert not lost, f"{len(lost)} messages lost; controller log: {ctl.log()}"
        assert duplicates == 0 and len(rows) == len(sent)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        proxy.close()
        ctl.stop()
