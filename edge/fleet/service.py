"""The controller process: broker link, ingestion, rollout ticker and REST API together.

With no options it runs anywhere: an embedded MQTT broker (amqtt) and SQLite under its data
folder. ``broker_url`` points it at a real broker, ``db_url`` at PostgreSQL. The process keeps
no state only in memory: devices, rollouts, desired state, commands and tokens live in the
database, and the MQTT session is persistent (clean_start False), so a restart resumes rollouts
and the broker keeps what arrived meanwhile; ingest acknowledges a message to the broker only
once it is committed. With more than one reader (``ingest_connections`` > 1, ingest workers) the
high-rate channel (telemetry) is read over MQTT 5 through shared subscriptions
(``$share/<group>/...``), which splits load across connections and across controller replicas;
a single reader subscribes plainly, because mosquitto 2.0 does not keep shared subscriptions
across its restarts (see :meth:`FleetService._connect`). Retained channels (status,
reported) are subscribed plainly, since a shared subscription does not receive retained
messages, and so are events and command responses (see :data:`PLAIN_CHANNELS`).
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import delete

from edge import redact, settings
from edge.errors import ConfigError, EdgeError, TransportError
from edge.fleet import auth, commands
from edge.fleet.api import ApiContext, create_app
from edge.fleet.artifacts import ArtifactStore
from edge.fleet.dashboard.routes import Dashboard
from edge.fleet.db import Clock, Database, events_t, health_t, now, open_database, telemetry_t
from edge.fleet.db import redact as redact_db
from edge.fleet.desired import DesiredPublisher
from edge.fleet.ingest import Ingestor
from edge.fleet.rollout import RolloutEngine
from edge.protocol.signing import TrustStore, resolve_revoked
from edge.protocol.topics import Channel, Topics
from edge.web.limits import HttpLimits, Rate

log = logging.getLogger(__name__)

# Seconds between rollout ticks when nothing wakes the ticker earlier.
TICK_S = 1.0
# Telemetry older than this is deleted (7 days: enough to compare versions across a slow rollout).
TELEMETRY_RETENTION_S = 7 * 86400
# Events are fewer and explain failures: keep them longer.
EVENT_RETENTION_S = 90 * 86400
PRUNE_EVERY_S = 300.0
# Seconds to wait for the broker at start-up before going on (the client keeps reconnecting).
CONNECT_WAIT_S = 10.0
SHARE_GROUP = "edge-fleet"
# The channels read through shared subscriptions (high rate, never retained).
SHARED_CHANNELS = (Channel.TELEMETRY,)
# The channels the main connection reads plainly: retained ones, and events and responses, which
# are few and must not be lost: mosquitto 2.0 does not restore shared subscriptions from its
# persistence file, so what devices send between a broker restart and the controller's
# resubscribe would be dropped, and one lost event stalls a rollout. (Each replica then stores
# every event; rows are deduplicated by message id and rollout states only move forward.)
PLAIN_CHANNELS = (Channel.STATUS, Channel.REPORTED, Channel.EVENTS, Channel.RESP)
# Reader ids checked for stale sessions at start: more readers than this is not a configuration.
MAX_READERS = 16
# Seconds a thread may hold the GIL while another waits (Python's default is 5 ms). The MQTT
# threads make several socket calls per message, each releasing the GIL; with the default, each
# call waits up to 5 ms behind the ingest writer and reception falls to a few hundred messages
# per second. 0.2 ms keeps them responsive at a small cost in switches.
SWITCH_INTERVAL_S = 0.0002
# Unacknowledged messages the broker may have in flight to one ingest connection (MQTT 5 Receive
# Maximum). Ingest acknowledges only after the commit, so this must cover what arrives while a
# batch fills and commits (four full batches); beyond it the broker queues, and it is what a
# killed controller gets again on restart. mosquitto's default without it is 20.
RECEIVE_MAXIMUM = 4 * 5000
# The REST API and dashboard per client address: a dashboard tab makes a few requests a second and
# a script or the CLI bursts; 20/s sustained with bursts of 100 leaves them all alone.
API_RATE = Rate(per_s=20, burst=100)
# Logins per client address, successful or not: 10 at once, then one every 6 s (failed ones are
# also counted per user name by the dashboard's LoginThrottle).
LOGIN_RATE = Rate(per_s=1 / 6, burst=10)
# Requests in flight before 429: each holds a database connection or a thread; live streams and
# bundle downloads last long and are bounded by the connection cap instead.
MAX_REQUESTS = 64
CONTROLLER_LIMITS = HttpLimits(max_connections=1024, max_requests=MAX_REQUESTS, rate=API_RATE,
                               path_rates=(("/dashboard/login", LOGIN_RATE),),
                               unmetered=("/dashboard/events", "/api/v1/bundles/*/download"))


@dataclass(frozen=True)
class ServiceConfig:
    """Everything `edge fleet serve` can be told."""

    data_dir: Path
    db_url: str | None = None
    broker_url: str | None = None  # None: start the embedded broker
    host: str = "127.0.0.1"
    port: int = 8700  # REST API; 0 picks a free port
    mqtt_port: int = 1883  # the embedded broker's port; 0 picks a free one
    fleet: str = "default"
    root: str = "edge"
    public_url: str | None = None  # how devices reach the API (bundle downloads)
    trusted_keys: tuple[Path, ...] = ()
    revoked_keys: tuple[str, ...] = ()  # key ids or key files whose uploads are refused
    admin_token: str | None = None
    ingest_connections: int = 1  # at most MAX_READERS; more use shared subscriptions (see _connect)
    ingest_workers: int = 0  # extra processes reading the shared subscriptions (MQTT 5 brokers)
    tick_s: float = TICK_S
    client_id: str | None = None
    telemetry_retention_s: float = TELEMETRY_RETENTION_S
    http: HttpLimits = CONTROLLER_LIMITS  # floods and slow clients of the REST API and dashboard
    extra: dict[str, Any] = field(default_factory=dict)


def controller_limits(rate_per_s: float | None = None, max_requests: int | None = None,
                      max_connections: int | None = None, header_timeout_s: float | None = None,
                      body_timeout_s: float | None = None) -> HttpLimits:
    """Return CONTROLLER_LIMITS with the given values replaced (None keeps the default; a rate of 0: none)."""
    limits = CONTROLLER_LIMITS
    if rate_per_s is not None:
        rate = Rate(rate_per_s, max(1, round(5 * rate_per_s))) if rate_per_s > 0 else None
        limits = replace(limits, rate=rate)
    changes = {"max_requests": max_requests, "max_connections": max_connections,
               "header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s}
    return replace(limits, **{k: v for k, v in changes.items() if v is not None})


def trust_store(config: ServiceConfig) -> TrustStore:
    """Return the keys uploads must be signed with: --trusted-key, <data>/trusted-keys/*.pub,
    else the user's default public key; minus --revoked-key and $EDGE_REVOKED_KEYS."""
    paths = list(config.trusted_keys)
    folder = config.data_dir / "trusted-keys"
    if folder.is_dir():
        paths += sorted(folder.glob("*.pub"))
    if not paths:
        default = settings.signing_key() or settings.edge_home() / "keys" / "edge.key"
        if default.with_suffix(".pub").exists():
            paths.append(default.with_suffix(".pub"))
    if not paths:
        log.warning("no trusted keys: every upload will be refused (pass --trusted-key)")
    return TrustStore.from_files(paths, resolve_revoked([*config.revoked_keys, *settings.revoked_keys()]))


class HttpServer:
    """uvicorn serving an ASGI app from a background thread."""

    def __init__(self, app: Any, host: str, port: int, limits: HttpLimits | None = None) -> None:
        import uvicorn

        from edge.web import guard_app, uvicorn_options

        guards = {} if limits is None else {"ws": "none", **uvicorn_options(limits)}
        self._server = uvicorn.Server(uvicorn.Config(app if limits is None else guard_app(app, limits), host=host,
                                                     port=port, log_level="warning", lifespan="off", access_log=False,
                                                     **guards))
        self._thread: threading.Thread | None = None
        self.host = host

    def start(self, timeout: float = 15.0) -> "HttpServer":
        """Start serving; return once the socket is bound."""
        self._thread = threading.Thread(target=self._server.run, name="edge-fleet-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the REST API cannot listen on {self.host}", hint="is the port taken? use --port")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        """Return the bound port."""
        return self._server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """Return the base URL."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        """Stop serving."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)


class FleetService:
    """The running controller."""

    def __init__(self, config: ServiceConfig, clock: Clock = now) -> None:
        self.config, self.clock = config, clock
        self.topics = Topics(fleet=config.fleet, root=config.root)
        if not 1 <= config.ingest_connections <= MAX_READERS:
            raise ConfigError(f"ingest_connections must be 1 to {MAX_READERS}")
        if not 0 <= config.ingest_workers < MAX_READERS:
            raise ConfigError(f"ingest_workers must be 0 to {MAX_READERS - 1}")
        self.db: Database | None = None
        self.broker: Any = None
        self.clients: list[Any] = []
        self.http: HttpServer | None = None
        self.dashboard: Dashboard | None = None
        self.ingestor: Ingestor | None = None
        self.engine: RolloutEngine | None = None
        self.generated_token: str | None = None
        self.broker_url = config.broker_url
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._last_prune = 0.0
        self.workers: list[Any] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "FleetService":
        """Open the database, start the broker (if embedded), MQTT, ingestion, ticker and API."""
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.db = db = open_database(cfg.db_url, cfg.data_dir)
        try:
            self._start(db)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, db: Database) -> None:
        cfg = self.config
        store = ArtifactStore(db, cfg.data_dir / "bundles", trust_store(cfg), self.clock)
        self.engine = RolloutEngine(db, store, self.clock)
        if self.broker_url is None:
            from edge.transport.embedded_broker import EmbeddedBroker

            broker = EmbeddedBroker(cfg.host, cfg.mqtt_port, state_file=cfg.data_dir / "broker-retained.json")
            try:
                self.broker = broker.start()
            except TransportError as exc:
                raise TransportError(exc.message, hint=f"is another broker on that port? use it with --broker "
                                     f"mqtt://{cfg.host}:{cfg.mqtt_port}, or pick another --mqtt-port") from exc
            self.broker_url = broker.url
        secret = auth.download_secret(db)
        # Bind the API first: the public URL (put into desired state) needs its real port.
        ctx = ApiContext(db, store, self.engine, None, secret, self.clock, self.wake, self.stats)
        self.dashboard = Dashboard(db)
        self.http = HttpServer(create_app(ctx, self.dashboard.routes()), cfg.host, cfg.port, cfg.http).start()
        public = cfg.public_url or self._default_public_url()
        self.desired = ctx.desired = DesiredPublisher(db, self.topics, public, secret, self.clock)
        self.ingestor = Ingestor(db, self.topics, self.clock, on_events=self.wake).start()
        self._connect()
        self._ticker = threading.Thread(target=self._tick_loop, name="edge-fleet-ticker", daemon=True)
        self._ticker.start()
        # Last: a token generated by a start that then failed would never be shown to anyone.
        self.generated_token = auth.ensure_admin_token(db, cfg.admin_token, self.clock)
        log.info("fleet controller: api %s, broker %s, database %s", self.http.url,
                 redact.redact_url(self.broker_url or ""), redact_db(db.url))

    def _default_public_url(self) -> str:
        assert self.http is not None
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        return f"http://{host}:{self.http.port}"

    def _client_id(self, i: int) -> str:
        base = self.config.client_id or f"edge-fleet-{self.config.fleet}"
        return base if i == 0 else f"{base}-{i}"

    def _connect(self) -> None:
        from edge.transport.mqtt import MqttClient

        assert self.ingestor is not None and self.broker_url is not None
        handle = self.ingestor.handle
        main = MqttClient(self.broker_url, self._client_id(0), clean_start=False, receive_maximum=RECEIVE_MAXIMUM)
        self.clients.append(main)
        # Every handler is registered before the first connect: a resumed session delivers what
        # the broker kept for it right after CONNACK, and a message with no handler is lost.
        # Acks are deferred: the ingest acknowledges a message once its batch is committed.
        for channel in PLAIN_CHANNELS:
            main.subscribe(self.topics.fleet_filter(channel), handle, qos=1, defer_ack=True)
        # Shared subscriptions split the high-rate channels across connections, workers and
        # replicas, but mosquitto 2.0 does not keep them across its own restart (the queued messages
        # survive, the subscription does not until the reader subscribes again): what devices send
        # in between is lost. A single reader subscribes plainly, which a restart keeps.
        share = self.config.ingest_connections > 1 or self.config.ingest_workers > 0
        prefix, other = (f"$share/{SHARE_GROUP}/", "") if share else ("", f"$share/{SHARE_GROUP}/")
        for channel in SHARED_CHANNELS:  # over MQTT 3.1.1 the transport subscribes these plainly
            main.subscribe(prefix + self.topics.fleet_filter(channel), handle, qos=1, defer_ack=True)

        def drop_other_kind(info: Any) -> None:
            # A previous run's session may hold the other kind of subscription: both would deliver.
            if info.protocol == "5":  # over 3.1.1 both kinds are the same plain filter
                for channel in SHARED_CHANNELS:
                    main.unsubscribe(other + self.topics.fleet_filter(channel))

        main.on_connect(drop_other_kind)
        main.start()
        if not main.wait_connected(CONNECT_WAIT_S):
            log.warning("broker %s not reachable yet; retrying in the background (%s)", main.broker, main.last_error)
        shared = share and main.shared_subscriptions and main.connected
        n = self.config.ingest_connections if shared else 1
        for i in range(1, n):
            client = MqttClient(self.broker_url, self._client_id(i), clean_start=False, receive_maximum=RECEIVE_MAXIMUM)
            self.clients.append(client)
            for channel in SHARED_CHANNELS:
                client.subscribe(f"$share/{SHARE_GROUP}/{self.topics.fleet_filter(channel)}", handle, qos=1,
                                 defer_ack=True)
            client.start()
        log.info("ingesting with %d MQTT connection(s)%s", n, " over shared subscriptions" if shared else "")
        if self.config.ingest_workers and not shared:
            log.warning("ingest workers need shared subscriptions (MQTT 5); broker %s has none: not started",
                        main.broker)
        elif self.config.ingest_workers:
            self.workers = [self._spawn_worker(i) for i in range(self.config.ingest_workers)]
        if main.connected:  # also after a run with more readers than this one
            threading.Thread(target=self._clear_stale_sessions, args=(n, self.config.ingest_workers if shared else 0),
                             name="edge-fleet-sessions", daemon=True).start()

    def _clear_stale_sessions(self, connections: int, workers: int) -> None:
        """End the broker sessions of readers a previous run had and this one does not.

        A persistent session in a shared group keeps receiving its share of messages while
        nobody reads it (until it expires): with fewer connections than last time, that share
        would be lost. Connecting once with a clean start under each unused id ends them.
        """
        from edge.transport.mqtt import MqttClient

        base = self._client_id(0)
        ids = [self._client_id(i) for i in range(connections, MAX_READERS)]
        ids += [f"{base}-w{i}" for i in range(workers, MAX_READERS)]
        for client_id in ids:
            if self._stop.is_set():
                return
            client = MqttClient(self.broker_url, client_id, clean_start=True)  # type: ignore[arg-type]
            try:
                client.start()
                client.wait_connected(CONNECT_WAIT_S)
            finally:
                client.stop()

    def _spawn_worker(self, index: int) -> Any:
        import multiprocessing

        # spawn, not fork: a forked copy of this process would inherit its threads' locks.
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=run_ingest_worker, args=(self.config, self.broker_url, self._client_id(0), index,
                                                           ready := ctx.Event()),
                           name=f"edge-fleet-ingest-{index}", daemon=True)
        proc.start()
        proc.ready = ready  # type: ignore[attr-defined]
        return proc

    def wait_workers(self, timeout: float) -> bool:
        """Wait until every ingest worker's subscriptions are in place; return whether they are."""
        deadline = time.monotonic() + timeout
        return all(p.ready.wait(max(0.0, deadline - time.monotonic())) for p in self.workers)

    def _check_workers(self) -> None:
        for i, proc in enumerate(self.workers):
            if not proc.is_alive() and not self._stop.is_set():
                log.error("ingest worker %d exited with %s; starting it again", i, proc.exitcode)
                self.workers[i] = self._spawn_worker(i)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> Any:
        """Publish at QoS 1 through the main connection."""
        if not self.clients:
            raise TransportError("not connected to a broker")
        return self.clients[0].publish(topic, payload, qos=1, retain=retain)

    def wake(self) -> None:
        """Make the ticker run now (after a rollout or event changed something)."""
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        """Return ingestion counters and connection state."""
        out = self.ingestor.stats() if self.ingestor else {}
        out["mqtt_connected"] = [c.connected for c in self.clients]
        out["mqtt_protocol"] = self.clients[0].protocol if self.clients else None
        return out

    def _tick_loop(self) -> None:
        assert self.engine is not None
        while not self._stop.is_set():
            self._wake.wait(self.config.tick_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.tick_once()

    def tick_once(self) -> None:
        """Advance rollouts, publish desired state and commands, prune old rows (errors logged)."""
        assert self.engine is not None and self.db is not None
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("rollouts", self.engine.tick),
            ("desired state", lambda: self.desired.publish_pending(lambda t, p: self.publish(t, p, retain=True))),
            ("commands", lambda: commands.send_pending(self.db, self.topics, lambda t, p: self.publish(t, p),  # type: ignore[arg-type]
                                                       self.clock)),
            ("pruning", self._prune),
            ("ingest workers", self._check_workers),
        ]
        for name, step in steps:
            try:
                step()
            except EdgeError as exc:
                log.error("ticker: %s failed: %s", name, exc)
            except Exception:
                log.exception("ticker: %s failed", name)

    def _prune(self) -> None:
        t = self.clock()
        if t - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = t
        assert self.db is not None
        with self.db.write() as conn:
            cutoff = t - self.config.telemetry_retention_s
            conn.execute(delete(telemetry_t).where(telemetry_t.c.ts < cutoff))
            conn.execute(delete(health_t).where(health_t.c.ts < cutoff))
            conn.execute(delete(events_t).where(events_t.c.ts < t - EVENT_RETENTION_S))

    def stop(self) -> None:
        """Stop everything, writing what was received before the connections closed."""
        self._stop.set()
        self._wake.set()
        if self.dashboard is not None:
            self.dashboard.close()  # its live streams would keep the HTTP server from stopping
        if self.http is not None:
            self.http.stop()
        if self._ticker is not None:
            self._ticker.join(30)
        if self.ingestor is not None:
            # Before the connections close, so the acks of the last batches still reach the broker
            # (what arrives from now on stays unacknowledged and comes again after a restart).
            self.ingestor.stop()
        for client in self.clients:
            try:
                client.stop()
            except TransportError as exc:
                log.warning("stopping MQTT client: %s", exc)
        self.clients = []
        for proc in self.workers:
            proc.terminate()  # SIGTERM: the worker writes what it holds, then exits
        for proc in self.workers:
            proc.join(30)
        self.workers = []
        if self.broker is not None:
            self.broker.stop()
        if self.db is not None:
            self.db.dispose()

    def run_forever(self, on_ready: Callable[["FleetService"], None] | None = None) -> None:
        """Start, call ``on_ready``, and serve until SIGINT or SIGTERM."""
        import signal

        self.start()
        stop = threading.Event()
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if on_ready:
                on_ready(self)
            while not stop.wait(1.0):
                pass
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            self.stop()


def run_ingest_worker(config: ServiceConfig, broker_url: str, client_base: str, index: int, ready: Any = None) -> None:
    """Read the shared telemetry subscription into the database until SIGTERM.

    A worker is a separate process: MQTT reception and batch writes get a core (and a GIL) of
    their own, and the broker spreads the shared subscriptions across every reader.
    """
    import logging as _logging
    import signal

    from edge.transport.mqtt import MqttClient

    _logging.basicConfig(level=settings.log_level(), stream=sys.stderr,
                         format=f"%(asctime)s %(levelname)s worker-{index} %(name)s: %(message)s")
    redact.install()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    topics = Topics(fleet=config.fleet, root=config.root)
    db = open_database(config.db_url, config.data_dir)
    ingestor = Ingestor(db, topics).start()
    client = MqttClient(broker_url, f"{client_base}-w{index}", clean_start=False, receive_maximum=RECEIVE_MAXIMUM)
    handles = [client.subscribe(f"$share/{SHARE_GROUP}/{topics.fleet_filter(channel)}", ingestor.handle, qos=1,
                                defer_ack=True)
               for channel in SHARED_CHANNELS]
    client.start()
    try:
        if ready is not None and all(h.wait(CONNECT_WAIT_S * 3) for h in handles):
            ready.set()
        while not stop.wait(1.0):
            pass
    finally:
        ingestor.stop()  # first: the acks of what it writes leave before the connection closes
        client.stop()
        db.dispose()
