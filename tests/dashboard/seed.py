"""A registered fleet of any size, written through the controller's real ingestion.

Shared by the 10,000-device test and ``tools/bench_dashboard.py``. Each device sends a birth and
a telemetry message (offline ones then their last will), exactly as an agent does, through
:class:`edge.fleet.ingest.Ingestor`. The rows its reported state would write (``device_models``)
and its tags and groups are inserted directly: ingestion applies reported states one device at
a time (~5 ms each here), which would make seeding take a minute. The mix is fixed, so tests can
predict every filter's count (:func:`expected`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge.fleet.db import Database, device_models_t, labels_t
from edge.fleet.ingest import Ingestor, Raw
from edge.protocol.messages import Capabilities, ModelReport, Status, Telemetry, encode, wrap
from edge.protocol.topics import Channel, Topics

PROFILES = ("raspberry-pi-5", "jetson-orin-nano", "x86-avx2", "generic-cpu")
OFFLINE_EVERY = 20  # every 20th device is offline
CANARY_EVERY = 100  # every 100th is tagged canary
SITES = 20  # tags site-00 .. site-19
STORES = 250  # groups store-000 .. store-249
FAILED_EVERY = 500  # the device after every 500th reports its model failed (degraded when online)
# Messages per ingestion batch: the ingestor's own batch size is 5000.
BATCH = 5000


@dataclass(frozen=True)
class Seeded:
    """How many devices, and the time their messages carry."""

    n: int
    at: float


def device_id(i: int) -> str:
    """Return the id of the i-th seeded device."""
    return f"dev-{i:05d}"


def _messages(i: int, at: float, topics: Topics) -> list[Raw]:
    d = device_id(i)
    profile = PROFILES[i % len(PROFILES)]
    arch = "aarch64" if profile in PROFILES[:2] else "x86_64"
    caps = Capabilities(architecture=arch, providers=("CPUExecutionProvider",), ram_mb=8192, disk_mb=65536, cpu_count=4)
    version = "1.1.0" if i % 3 == 0 else "1.0.0"
    failed = i % FAILED_EVERY == 1
    model = ModelReport(name="minilm", version=version, state="failed" if failed else "active",
                        provider="CPUExecutionProvider", error="health check failed" if failed else None)
    ts = at - (i % 10)
    bodies: list[tuple[Channel, Any, bool]] = [
        (Channel.STATUS, Status(state="online", session=1, agent_version="0.1.0", profile=profile, capabilities=caps), True),
        (Channel.TELEMETRY, Telemetry(seq=1, session=1, uptime_s=3600, agent_version="0.1.0", models=(model,),
                                      requests=100 + i % 50, errors=i % 3, latency_p50_ms=5.0 + i % 7,
                                      latency_p95_ms=10.0 + i % 30, cpu_percent=float(i % 100), ram_used_mb=1024.0,
                                      ram_total_mb=8192.0), False),
    ]
    if i % OFFLINE_EVERY == 0:
        bodies.append((Channel.STATUS, Status(state="offline", session=1, reason="connection lost"), True))
    return [Raw(topics.device(d, ch), encode(wrap(d, body, ts=ts + k * 0.001)), retained, ts + 0.01)
            for k, (ch, body, retained) in enumerate(bodies)]


def seed_devices(db: Database, n: int, at: float, topics: Topics = Topics()) -> Seeded:
    """Register ``n`` devices through ingestion, then label them; return what was made."""
    ingestor = Ingestor(db, topics, clock=lambda: at)
    batch: list[Raw] = []
    for i in range(n):
        batch += _messages(i, at, topics)
        if len(batch) >= BATCH:
            ingestor.process(batch)
            batch = []
    if batch:
        ingestor.process(batch)
    labels, models = [], []
    for i in range(n):
        d = device_id(i)
        failed = i % FAILED_EVERY == 1
        models.append({"device_id": d, "model": "minilm", "version": "1.1.0" if i % 3 == 0 else "1.0.0",
                       "state": "failed" if failed else "active", "provider": "CPUExecutionProvider",
                       "previous": None, "error": "health check failed" if failed else None})
        labels.append({"kind": "tag", "value": f"site-{i % SITES:02d}", "device_id": d})
        if i % CANARY_EVERY == 0:
            labels.append({"kind": "tag", "value": "canary", "device_id": d})
        labels.append({"kind": "group", "value": f"store-{i % STORES:03d}", "device_id": d})
    with db.write() as conn:
        for table, rows in ((labels_t, labels), (device_models_t, models)):
            for start in range(0, len(rows), 2000):
                conn.execute(table.insert(), rows[start:start + 2000])
    return Seeded(n, at)


def expected(n: int) -> dict[str, int]:
    """Return how many seeded devices each filter of the tests matches."""
    ids = range(n)
    return {
        "offline": sum(1 for i in ids if i % OFFLINE_EVERY == 0),
        "canary": sum(1 for i in ids if i % CANARY_EVERY == 0),
        "site-07": sum(1 for i in ids if i % SITES == 7),
        "store-042": sum(1 for i in ids if i % STORES == 42),
        "jetson-orin-nano": sum(1 for i in ids if i % len(PROFILES) == 1),
        "minilm@1.1.0": sum(1 for i in ids if i % 3 == 0),
        "failed": sum(1 for i in ids if i % FAILED_EVERY == 1),
        "failed_online": sum(1 for i in ids if i % FAILED_EVERY == 1 and i % OFFLINE_EVERY != 0),
    }
