"""The agent's connection to its fleet: birth and death, desired state, commands, telemetry.

:class:`FleetLink` is the runner's :class:`~edge.agent.runner.Connector`::

    link = FleetLink(FleetOptions(broker_url="mqtts://fleet.example:8883?ca=/etc/edge/ca.pem"))
    Agent(options, connector=link).serve()

What it does, on the topic tree of :class:`~edge.protocol.topics.Topics`:

* **Birth and death.** Before every connection attempt the session counter
  (``DATA/fleet/session``, on disk, so it survives restarts) goes up by one; the last will is a
  retained ``offline`` status carrying that session, and once connected the agent publishes a
  retained ``online`` status with the same session, its profile, capabilities and HTTP URL. A
  will that arrives late carries an older session than the birth, so the controller can ignore
  it (Sparkplug's bdSeq). A clean stop publishes ``offline`` (reason ``shutdown``) itself.
* **Desired state** (retained, per device) goes to the :class:`~edge.agent.deployer.Deployer`.
* **Commands** (``deploy``, ``rollback``, ``restart``, ``set-config``, ``ping``) run once per id
  and are answered on the ``resp`` topic (:mod:`edge.agent.commands`); what ``set-config``
  changes is kept across restarts (:mod:`edge.agent.fleet_config`).
* **Telemetry** every ``telemetry_interval`` seconds, **events** for every deployment step and
  the retained **reported** state go through the durable :mod:`~edge.agent.outbox`.

Inference never waits for any of it: everything runs in background threads.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import edge
from edge.agent.commands import CommandRunner
from edge.agent.deployer import DOWNLOAD_BACKOFF, MAX_ATTEMPTS, Deployer
from edge.agent.files import TMP_PREFIX, write_atomic
from edge.agent.fleet_config import (
    CONFIG_FILE, MAX_INTERVAL_S, MIN_INTERVAL_S, RemoteConfig, describe, load_config, parse_changes, save_config,
)  # fmt: skip
from edge.agent.health import ChildHealthCheck, HealthCheck, RegistryHealthCheck
from edge.agent.outbox import Kind, Outbox, OutboxLimits, OutboxSender
from edge.agent.telemetry import InferenceStats, MetricsSampler, MetricsSource, capabilities, process_uptime, system_stats
from edge.errors import ConfigError, EdgeError, TransportError
from edge.protocol.messages import (
    Body, Capabilities, CommandMessage, Desired, DesiredModel, Envelope, Event, ModelReport, Reported, Response,
    Status, Telemetry, decode, encode, wrap,
)  # fmt: skip
from edge.protocol.topics import Channel, Command, Topics, check_id
from edge.transport import Backoff, ConnectionInfo, MqttClient, TlsOptions, parse_broker_url

log = logging.getLogger(__name__)

# Seconds between telemetry messages by default: fresh enough for a dashboard, ~9,000 small
# messages a day per device.
TELEMETRY_INTERVAL_S = 10.0
# Seconds a clean stop waits for queued events and the offline status to be acknowledged.
STOP_FLUSH_S = 3.0
# Reconnect backoff of the agent: quick first retries, then at most a minute apart.
RECONNECT = Backoff(initial=0.5, maximum=60.0)


@dataclass(frozen=True)
class FleetOptions:
    """How the agent reaches its fleet, validated once."""

    broker_url: str
    topics: Topics = field(default_factory=Topics)
    tls: TlsOptions | None = None
    username: str | None = None
    password: str | None = None
    telemetry_interval: float = TELEMETRY_INTERVAL_S
    keepalive: int = 15
    reconnect: Backoff = RECONNECT
    outbox: OutboxLimits = field(default_factory=OutboxLimits)
    download_rate: float | None = None  # bytes per second; None: no cap
    artifact_base_url: str | None = None  # resolves relative bundle URLs of the desired state
    artifact_token: str | None = None  # sent as "Authorization: Bearer ..." to the artifact server
    download_backoff: Backoff = DOWNLOAD_BACKOFF
    max_download_attempts: int = MAX_ATTEMPTS

    def __post_init__(self) -> None:
        parse_broker_url(self.broker_url, tls=self.tls, username=self.username, password=self.password)
        if not MIN_INTERVAL_S / 10 <= self.telemetry_interval <= MAX_INTERVAL_S:
            raise ConfigError(f"telemetry interval {self.telemetry_interval} s is out of range",
                              hint=f"use {MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:g} seconds")
        if self.download_rate is not None and self.download_rate <= 0:
            raise ConfigError("the download rate cap must be positive (bytes per second)")


class SessionCounter:
    """A counter on disk that only goes up: one value per connection attempt."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.value = 0
        if self.path.exists():
            try:
                self.value = int(self.path.read_text().strip())
            except (OSError, ValueError) as exc:
                # Never reuse a session number: jump to the clock, above any count of attempts.
                self.value = int(time.time())
                log.error("session counter %s is unreadable (%s); continuing from %d", self.path, exc, self.value)

    def next(self) -> int:
        """Return the next session number, written to disk first."""
        self.value += 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, f"{self.value}\n".encode())
        return self.value


class FleetLink:
    """Connect an agent to its fleet (the runner's Connector)."""

    def __init__(
        self,
        options: FleetOptions,
        *,
        metrics_source: MetricsSource | None = None,
        health: HealthCheck | None = None,
        restart: Callable[[], None] | None = None,
    ) -> None:
        self.options = options
        self.topics = options.topics
        self._metrics_source = metrics_source
        self._health = health
        self._restart = restart
        self.client: MqttClient | None = None
        self.outbox: Outbox | None = None
        self.deployer: Deployer | None = None
        self.session = 0
        self._seq = 0
        self._interval = options.telemetry_interval
        self.remote = RemoteConfig()  # what set-config changed (DATA/fleet/config.json)
        self._stopping = threading.Event()
        self._interval_changed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._capabilities: Capabilities | None = None

    # ------------------------------------------------------------------------- lifecycle
    def start(self, agent: Any) -> None:
        """Connect and begin reporting for ``agent`` (device_id, options.data_dir, store, ...); never blocks.

        One start per instance. Reads from ``agent``: ``device_id``, ``options.data_dir`` (or
        ``data_dir``), ``store``, and when present ``profile``, ``registry`` (health checks then load
        the new version into it), ``metrics`` (telemetry), ``address`` (announced HTTP URL) and
        ``stop`` (what the ``restart`` command calls: a service manager restarts the process).
        """
        if self.client is not None:
            raise ConfigError("a FleetLink starts once", hint="create a new FleetLink")
        self.device_id = check_id(agent.device_id)
        data_dir = Path(getattr(agent, "data_dir", None) or agent.options.data_dir)
        self.store = agent.store
        self.profile = getattr(agent, "profile", None)
        address = getattr(agent, "address", None)
        self.http_url = f"http://{address[0]}:{address[1]}" if address else None
        registry, metrics = getattr(agent, "registry", None), getattr(agent, "metrics", None)
        health = self._health or (RegistryHealthCheck(registry) if registry is not None else ChildHealthCheck(self.profile))
        if self._metrics_source is None:
            self._metrics_source = MetricsSampler(metrics.registry) if metrics is not None else InferenceStats
        self._restart = self._restart or getattr(agent, "stop", None)
        folder = data_dir / "fleet"
        folder.mkdir(parents=True, exist_ok=True)
        for path in folder.glob(f"{TMP_PREFIX}*"):  # a session or command file the last process died writing
            path.unlink(missing_ok=True)
        self.data_dir = data_dir
        self.remote = load_config(folder / CONFIG_FILE)  # the controller's settings win over the options
        self._interval = self.remote.interval(self.options.telemetry_interval)
        self.counter = SessionCounter(folder / "session")
        self._capabilities = capabilities(data_dir)
        self.outbox = Outbox(folder / "outbox.db", self.options.outbox)
        headers = {"Authorization": f"Bearer {self.options.artifact_token}"} if self.options.artifact_token else {}
        self.deployer = Deployer(
            self.store, folder / "deployments", health, emit=self._event, on_change=self._publish_reported,
            rate=self.remote.rate(self.options.download_rate), headers=headers, base_url=self.options.artifact_base_url,
            backoff=self.options.download_backoff, max_attempts=self.options.max_download_attempts,
        )  # fmt: skip
        self.commands = CommandRunner(self._command_handlers(), self._respond, folder / "commands.json")
        o = self.options
        self.client = MqttClient(o.broker_url, f"edge-agent-{self.device_id}", will=self._will, tls=o.tls,
                                 username=o.username, password=o.password, keepalive=o.keepalive,
                                 backoff=o.reconnect, clean_start=False)
        self.client.on_connect(self._birth)
        self._subscriptions = [
            self.client.subscribe(self.topics.device(self.device_id, Channel.DESIRED), self._on_desired),
            self.client.subscribe(self.topics.commands_filter(self.device_id), self._on_command),
            self.client.subscribe(self._topic(Channel.STATUS), self._on_own_status),
        ]
        self.sender = OutboxSender(self.outbox, self.client)
        self._publish_reported()
        self.deployer.start()
        self.commands.start()
        self.sender.start()
        self.client.start()
        telemetry = threading.Thread(target=self._telemetry_loop, name="edge-telemetry", daemon=True)
        telemetry.start()
        self._threads.append(telemetry)
        log.info("fleet link of %s started (broker %s)", self.device_id, self.client.broker)

    def wait_ready(self, timeout: float) -> bool:
        """Wait until connected and subscribed (the broker acknowledged both subscriptions)."""
        deadline = time.monotonic() + timeout
        if self.client is None or not self.client.wait_connected(timeout):
            return False
        return all(h.wait(max(0.0, deadline - time.monotonic())) for h in self._subscriptions)

    def stop(self) -> None:
        """Stop reporting, flush what is queued, say goodbye (offline status) and disconnect."""
        if self.client is None or self._stopping.is_set():
            return
        self._stopping.set()
        self._interval_changed.set()
        for t in self._threads:
            t.join(5)
        self.deployer.stop()
        self.commands.stop()
        if self.client.connected:
            self.sender.flush(STOP_FLUSH_S)
            goodbye = self._status("offline", reason="shutdown")
            self.client.publish(self._topic(Channel.STATUS), goodbye, qos=1, retain=True).wait(STOP_FLUSH_S)
        self.sender.stop()
        self.client.stop()
        self.outbox.close()
        log.info("fleet link of %s stopped", self.device_id)

    # ------------------------------------------------------------------------- birth and death
    def _topic(self, channel: Channel) -> str:
        return self.topics.device(self.device_id, channel)

    def _status(self, state: str, reason: str | None = None) -> bytes:
        profile = getattr(self.profile, "name", "") or ""
        body = Status(state=state, session=self.session, agent_version=edge.__version__, profile=profile,
                      capabilities=self._capabilities if state == "online" else None,
                      http_url=self.http_url if state == "online" else None, reason=reason)
        return encode(wrap(self.device_id, body))

    def _will(self) -> tuple[str, bytes, int, bool]:
        """Called before every connection attempt: a new session, and the will that carries it."""
        self.session = self.counter.next()
        return self._topic(Channel.STATUS), self._status("offline", reason="connection lost"), 1, True

    def _birth(self, info: ConnectionInfo) -> None:
        self.client.publish(self._topic(Channel.STATUS), self._status("online"), qos=1, retain=True)
        log.info("%s online (session %d, MQTT %s)", self.device_id, self.session, info.protocol)

    def _on_own_status(self, topic: str, payload: bytes, retained: bool) -> None:
        """Re-publish the birth when a stale will overwrote it.

        When the broker notices a dead connection only after the agent reconnected (keepalive
        expiry, session takeover), the old session's will lands after the new birth and becomes
        the retained status. The controller ignores it (older session), but the retained value
        would mislead whoever reads it later, so the live session restores it.
        """
        env = self._decode(topic, payload, Status)
        if env is None or self._stopping.is_set() or not self.client.connected:
            return
        status: Status = env.body  # type: ignore[assignment]
        if status.state == "offline" and status.session < self.session:
            log.info("stale offline status of session %d seen; re-announcing session %d", status.session, self.session)
            self.client.publish(self._topic(Channel.STATUS), self._status("online"), qos=1, retain=True)

    # ------------------------------------------------------------------------- inbound
    def _decode(self, topic: str, payload: bytes, kind: type) -> Envelope | None:
        if not payload:
            return None  # a cleared retained message
        try:
            env = decode(payload)
        except TransportError as exc:
            log.warning("ignoring a bad message on %s: %s", topic, exc)
            return None
        if env.device != self.device_id or not isinstance(env.body, kind):
            log.warning("ignoring a %s message for %s on %s", env.body.type, env.device, topic)
            return None
        return env

    def _on_desired(self, topic: str, payload: bytes, retained: bool) -> None:
        env = self._decode(topic, payload, Desired)
        if env is None:
            return
        self.deployer.desire(env.body)  # type: ignore[arg-type]  (level-triggered: any generation)

    def _on_command(self, topic: str, payload: bytes, retained: bool) -> None:
        env = self._decode(topic, payload, CommandMessage)
        if env is None:
            return
        try:
            _, _, command = self.topics.parse(topic)
        except ConfigError as exc:
            log.warning("ignoring command on %s: %s", topic, exc)
            return
        body: CommandMessage = env.body  # type: ignore[assignment]
        if command is None or command.value != body.command:
            self._respond(Response(command_id=env.id, ok=False, error_code="request_invalid",
                                   error=f"command {body.command!r} arrived on the {topic} topic"))
            return
        self.commands.submit(env.id, body)

    # ------------------------------------------------------------------------- commands
    def _command_handlers(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        return {
            Command.PING.value: self._cmd_ping,
            Command.DEPLOY.value: self._cmd_deploy,
            Command.ROLLBACK.value: self._cmd_rollback,
            Command.RESTART.value: self._cmd_restart,
            Command.SET_CONFIG.value: self._cmd_set_config,
        }

    def _cmd_ping(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "session": self.session, "uptime_s": round(process_uptime(), 1),
                "agent_version": edge.__version__, "config": self._config()}

    def _cmd_deploy(self, args: dict[str, Any]) -> dict[str, Any]:
        args = dict(args)
        name, force = args.pop("name", None), bool(args.pop("force", False))
        if not isinstance(name, str):
            raise ConfigError("deploy needs a model name in args.name")
        try:
            model = DesiredModel.model_validate(args)
        except ValueError as exc:
            raise ConfigError(f"invalid deploy arguments: {exc}") from exc
        self.deployer.deploy(name, model, force=force)
        return {"accepted": True, "model": name, "version": model.version}

    def _cmd_rollback(self, args: dict[str, Any]) -> dict[str, Any]:
        name = args.get("name")
        if not isinstance(name, str):
            raise ConfigError("rollback needs a model name in args.name")
        return {"model": name, "active": self.deployer.rollback(name)}

    def _cmd_restart(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._restart is None:
            raise ConfigError("this agent cannot restart itself (no restart hook)")

        def later() -> None:
            self.sender.flush(STOP_FLUSH_S)  # let the answer leave first
            self._restart()

        threading.Thread(target=later, name="edge-restart", daemon=True).start()
        return {"restarting": True}

    def _cmd_set_config(self, args: dict[str, Any]) -> dict[str, Any]:
        """Validate, persist, then apply (edge.agent.fleet_config); answer the values now in force."""
        changes = parse_changes(args)
        remote = self.remote.merged(changes)
        save_config(self.data_dir / "fleet" / CONFIG_FILE, remote)  # an error here changes nothing
        self.remote = remote
        interval = remote.interval(self.options.telemetry_interval)
        if interval != self._interval:
            self._interval = interval
            self._interval_changed.set()
        self.deployer.rate = remote.rate(self.options.download_rate)
        in_force = self._config()
        return {key: in_force[key] for key in changes}

    def _config(self) -> dict[str, float]:
        return describe(self._interval, self.deployer.rate)

    def _respond(self, response: Response) -> None:
        self._queue(Channel.RESP, response, Kind.EVENT)

    # ------------------------------------------------------------------------- outbound
    def _queue(self, channel: Channel, body: Body, kind: Kind, retain: bool = False) -> None:
        try:
            self.outbox.put(self._topic(channel), encode(wrap(self.device_id, body)), kind=kind, retain=retain)
        except EdgeError as exc:
            log.error("cannot queue a %s message: %s", channel.value, exc)

    def _event(self, event: Event) -> None:
        self._queue(Channel.EVENTS, event, Kind.EVENT)

    def _publish_reported(self) -> None:
        generation = self.deployer.generation if self.deployer and self.deployer.generation is not None else 0
        reported = Reported(generation=generation, models=self.deployer.report() if self.deployer else ())
        self._queue(Channel.REPORTED, reported, Kind.EVENT, retain=True)

    def _telemetry_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._queue(Channel.TELEMETRY, self._telemetry(), Kind.TELEMETRY)
            except Exception:  # a sensor or metrics failure skips one sample, never the loop
                log.exception("cannot build telemetry")
            self._interval_changed.wait(self._interval)
            self._interval_changed.clear()

    def _telemetry(self) -> Telemetry:
        stats = self._metrics_source() if self._metrics_source is not None else InferenceStats()
        system = system_stats(self.data_dir)
        self._seq += 1
        return Telemetry(
            seq=self._seq, session=self.session, uptime_s=round(process_uptime(), 1), agent_version=edge.__version__,
            models=self._models(stats.providers), requests=stats.requests, errors=stats.errors,
            latency_p50_ms=stats.latency_p50_ms, latency_p95_ms=stats.latency_p95_ms, tokens_per_s=stats.tokens_per_s,
            cpu_percent=system.cpu_percent, ram_used_mb=system.ram_used_mb, ram_total_mb=system.ram_total_mb,
            disk_free_mb=system.disk_free_mb, temperature_c=system.temperature_c,
            outbox_depth=self.outbox.depth(), outbox_dropped=self.outbox.dropped_total(), per_model=stats.per_model,
        )  # fmt: skip

    def _models(self, providers: dict[str, str]) -> tuple[ModelReport, ...]:
        out = []
        try:
            statuses = self.store.list()
        except EdgeError as exc:
            log.error("cannot list models for telemetry: %s", exc)
            return ()
        for st in statuses:
            for v in st.versions:
                state = "active" if v.active else ("failed" if v.failed else "installed")
                out.append(ModelReport(name=v.name, version=v.version, state=state, error=v.failed or v.problem,
                                       previous=st.previous if v.active else None,
                                       provider=(providers.get(v.name) or self.deployer.providers.get(v.name))
                                       if v.active else None))
        return tuple(out)

