"""The MQTT client of Edge: the one place that drives paho.

:class:`MqttClient` owns one network thread that runs paho's ``loop()`` and its own reconnect
loop (capped exponential backoff with jitter, :class:`~edge.transport.backoff.Backoff`); paho's
built-in reconnect is never used. On every (re)connect it re-subscribes every filter, runs the
``on_connect`` hooks (birth messages) and then flushes what was published while disconnected,
in order. Handlers and hooks run in the network thread: each call is wrapped so an exception is
logged with the topic and a truncated payload and never stops the loop. Handlers must be quick;
hand long work (downloads, installs) to another thread.

MQTT 5 is tried first; a broker that answers "unsupported protocol version" (amqtt, old
mosquitto) gets MQTT 3.1.1 from then on. Shared subscriptions (``$share/group/filter``) are
used only over MQTT 5; over 3.1.1 the plain filter is subscribed, so every subscriber gets every
message (see :attr:`MqttClient.shared_subscriptions`).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Union

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.errors import ConfigError, ConnectError, PublishError, TransportError
from edge.transport.acks import NO_ACK, Ack, AckBook
from edge.transport.backoff import Backoff
from edge.transport.errors import UNSUPPORTED_PROTOCOL, error_for_exception, error_for_rc, error_for_reason
from edge.transport.handles import AckTracker, PublishHandle, SubscribeHandle
from edge.transport.names import check_client_id, check_filter, check_topic, strip_share
from edge.transport.url import BrokerUrl, TlsOptions, parse_broker_url

log = logging.getLogger(__name__)
paho_log = logging.getLogger("edge.transport.paho")

Will = tuple[str, bytes, int, bool]  # topic, payload, qos, retain
WillSource = Union[Will, Callable[[], Will], None]
Handler = Callable[[str, bytes, bool], None]  # topic, payload, retained
DeferredHandler = Callable[[str, bytes, bool, Ack], None]  # ... and the Ack to call once stored

# Seconds paho's select() waits per loop turn; publishes from other threads wake it at once, so
# this only bounds how fast stop() and the overdue-ack check react.
LOOP_TICK_S = 0.25
# Loop turn while received messages wait for their application's ack: an ack queued from another
# thread is sent within this (the broker sends no more than its in-flight window until then).
ACK_TICK_S = 0.005
# Default seconds to wait for a PUBACK before wait() gives up and the loop logs the message.
ACK_TIMEOUT_S = 10.0
# MQTT 5 session expiry when clean_start is False: an hour covers restarts and short outages
# without the broker keeping state forever for devices that are gone.
SESSION_EXPIRY_S = 3600
# Messages kept in memory while disconnected; beyond that publish() fails fast (the agent's
# durable outbox is the place for anything that must survive a long outage).
MAX_BACKLOG = 10_000
# Largest payload publish() accepts by default. Fleet messages are a few KiB; brokers cap
# messages (AWS IoT Core at 128 KiB, mosquitto where configured) and one that a broker refuses
# by dropping the connection would be resent after every reconnect, forever.
MAX_PAYLOAD = 256 * 1024
# Seconds for the TCP connect and TLS handshake of one attempt.
CONNECT_TIMEOUT_S = 10.0
# Bytes of a payload shown when a handler fails.
LOG_PAYLOAD_BYTES = 200
# Topics whose matching subscriptions are remembered: matching a topic against every filter costs
# microseconds per filter and message; a fleet of 10,000 devices has about 50,000 topics.
MAX_ROUTES = 100_000
# paho's protocol constants, named once.
PROTOCOL_NAMES = {MQTTProtocolVersion.MQTTv5: "5", MQTTProtocolVersion.MQTTv311: "3.1.1"}


@dataclass(frozen=True)
class ConnectionInfo:
    """What an ``on_connect`` hook learns about the connection just made."""

    protocol: str  # "5" or "3.1.1"
    session_present: bool
    count: int  # 1 for the first connection of this client, 2 after the first reconnect, ...


@dataclass
class _Subscription:
    topic_filter: str
    handler: Handler | DeferredHandler
    qos: int
    handle: SubscribeHandle
    defer_ack: bool = False


def _truncate(payload: bytes) -> bytes:
    return payload if len(payload) <= LOG_PAYLOAD_BYTES else payload[:LOG_PAYLOAD_BYTES] + b"..."


class MqttClient:
    """A resilient MQTT client: own reconnect loop, re-subscription, hooks, acks per message id."""

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        will: WillSource = None,
        tls: TlsOptions | None = None,
        clean_start: bool = False,
        keepalive: int = 15,
        username: str | None = None,
        password: str | None = None,
        protocol: str = "auto",
        backoff: Backoff | None = None,
        ack_timeout: float = ACK_TIMEOUT_S,
        session_expiry: int = SESSION_EXPIRY_S,
        max_backlog: int = MAX_BACKLOG,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        max_payload: int = MAX_PAYLOAD,
        receive_maximum: int | None = None,
    ) -> None:
        """Describe a client; nothing connects until :meth:`start`.

        ``will`` is a (topic, payload, qos, retain) tuple, or a callable returning one that is
        called before every connection attempt (so a will can carry a per-connection session
        counter). ``protocol`` is "auto" (MQTT 5, falling back to 3.1.1), "5" or "3.1.1".
        ``receive_maximum`` (MQTT 5) is how many unacknowledged QoS 1/2 messages the broker may
        send at once: raise it for subscribers that defer acks (broker default 20 for mosquitto,
        whose ``max_inflight_messages`` also bounds MQTT 3.1.1 clients).
        """
        self.broker: BrokerUrl = parse_broker_url(url, tls=tls, username=username, password=password)
        check_client_id(client_id)
        if protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"unknown MQTT protocol {protocol!r}", hint="use auto, 5 or 3.1.1")
        if keepalive < 1:
            raise ConfigError("keepalive must be at least 1 second")
        if receive_maximum is not None and not 1 <= receive_maximum <= 65535:
            raise ConfigError(f"receive_maximum {receive_maximum} is out of range", hint="use 1 to 65535")
        self.client_id = client_id
        self._will = will
        self._clean_start = clean_start
        self._keepalive = keepalive
        self._protocol = MQTTProtocolVersion.MQTTv311 if protocol == "3.1.1" else MQTTProtocolVersion.MQTTv5
        self._may_fall_back = protocol == "auto"
        self._backoff = backoff or Backoff()
        self.ack_timeout = ack_timeout
        self._session_expiry = session_expiry
        self._max_backlog = max_backlog
        self._connect_timeout = connect_timeout
        self.max_payload = max_payload
        self._receive_maximum = receive_maximum

        self._paho: paho.Client | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connected = threading.Event()  # the broker accepted us: publishes may go out now
        self._ready = threading.Event()  # ... and the hooks ran and the backlog left: what callers see
        # Held while deciding "send now or backlog" and while a (re)connect resubscribes, runs
        # hooks and flushes the backlog, so messages leave in the order publish() was called.
        self._order = threading.RLock()
        self._subs: dict[str, _Subscription] = {}
        self._subs_lock = threading.Lock()
        self._routes: dict[str, list[_Subscription]] = {}  # topic -> its subscriptions; under _subs_lock
        self._acks = AckTracker()
        self._deliveries = AckBook()  # received messages whose deferred handlers have not acked
        self._manual_ack = False  # a deferred subscription exists: we send every ack, not paho
        self._backlog: deque[tuple[str, bytes, int, bool, PublishHandle]] = deque()
        self._connect_hooks: list[Callable[[ConnectionInfo], None]] = []
        self._disconnect_hooks: list[Callable[[TransportError | None], None]] = []
        self._connections = 0
        self._fell_back = False
        self._refused = False
        self._in_hooks = False
        self._release_pending = False
        self._v5_seen = False  # an MQTT 5 connection succeeded once: never fall back on silence
        self._warned_share = False
        self.last_error: TransportError | None = None

    # -- public API -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Return whether the broker accepted the current connection (and its hooks ran)."""
        return self._ready.is_set()

    @property
    def protocol(self) -> str:
        """Return the MQTT version in use or being tried: "5" or "3.1.1"."""
        return PROTOCOL_NAMES[self._protocol]

    @property
    def shared_subscriptions(self) -> bool:
        """Return whether ``$share/...`` filters are subscribed as shared (MQTT 5 only)."""
        return self._protocol == MQTTProtocolVersion.MQTTv5

    @property
    def pending_acks(self) -> int:
        """Return how many publishes and subscribes await their acknowledgement."""
        return len(self._acks)

    def on_connect(self, callback: Callable[[ConnectionInfo], None]) -> None:
        """Call ``callback(info)`` after every successful (re)connect; its publishes leave first.

        Order on the wire after a reconnect: what the hooks publish (birth messages), then what
        the previous connection left unacknowledged (resent), then what was published while
        disconnected, then new publishes.

        Runs in the network thread: publish from it freely, but never wait for an ack there.
        """
        self._connect_hooks.append(callback)

    def on_disconnect(self, callback: Callable[[TransportError | None], None]) -> None:
        """Call ``callback(error)`` when an established connection ends (None when we stopped it)."""
        self._disconnect_hooks.append(callback)

    def start(self) -> "MqttClient":
        """Start connecting in the background; return at once."""
        if self._thread is not None:
            raise TransportError("MQTT client already started", hint="create a new MqttClient to reconnect")
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.client_id}", daemon=True)
        self._thread.start()
        return self

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for a connection whose hooks ran; return whether there is one."""
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no will is sent) and stop the network thread."""
        self._stopping.set()
        with self._order:
            backlog = list(self._backlog)
            self._backlog.clear()
        stopped = ConnectError("MQTT client stopped before the message was acknowledged")
        for *_, handle in backlog:
            handle.resolve(stopped)
        if self._thread is not None:
            self._thread.join(timeout)
        self._acks.fail(stopped)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> PublishHandle:
        """Publish a message; return a handle whose ``wait(timeout)`` says whether it was acked.

        While disconnected the message waits in memory (up to ``max_backlog``) and leaves after
        the next connect, in order.
        """
        check_topic(topic)
        if qos not in (0, 1, 2):
            raise PublishError(f"invalid QoS {qos!r}; use 0, 1 or 2")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise PublishError(f"payload must be bytes, not {type(payload).__name__}")
        handle = PublishHandle(topic, qos)
        if len(payload) > self.max_payload:
            handle.resolve(PublishError(f"a {len(payload)}-byte message to {topic} is over the "
                                        f"{self.max_payload}-byte limit"))
            return handle
        with self._order:
            if self._stopping.is_set():
                handle.resolve(ConnectError("MQTT client is stopped"))
            elif not (self._ready.is_set() or (self._in_hooks and threading.current_thread() is self._thread)):
                if len(self._backlog) >= self._max_backlog:
                    handle.resolve(PublishError(
                        f"not connected and {self._max_backlog} messages already wait; dropped {topic}"))
                else:
                    self._backlog.append((topic, bytes(payload), qos, retain, handle))
            else:
                self._send(topic, bytes(payload), qos, retain, handle)
        return handle

    def subscribe(self, topic_filter: str, handler: Handler | DeferredHandler, qos: int = 1, *,
                  defer_ack: bool = False) -> SubscribeHandle:
        """Route messages matching ``topic_filter`` to ``handler(topic, payload, retained)``.

        A message is acknowledged to the broker when the handler returns; with ``defer_ack`` the
        handler is called as ``handler(topic, payload, retained, ack)`` and the message is
        acknowledged only when ``ack()`` is called (from any thread; see :mod:`.acks`). Until then
        the broker keeps it and sends it again after a reconnect. The subscription is renewed on
        every reconnect. Returns a handle that resolves on the first SUBACK.
        """
        check_filter(topic_filter)
        if qos not in (0, 1, 2):
            raise ConfigError(f"invalid QoS {qos!r}; use 0, 1 or 2")
        if defer_ack and not self._manual_ack:
            if self._thread is not None:  # paho's ack mode is chosen when its client is built
                raise ConfigError(f"deferred acks for {topic_filter} asked after start()",
                                  hint="subscribe with defer_ack=True before starting the client")
            self._manual_ack = True
        sub = _Subscription(topic_filter, handler, qos, SubscribeHandle(topic_filter, qos), defer_ack)
        with self._subs_lock:
            self._subs[topic_filter] = sub
            self._routes.clear()
        with self._order:
            if self._connected.is_set():
                self._send_subscribe(sub)
        return sub.handle

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop routing ``topic_filter`` and tell the broker."""
        with self._subs_lock:
            self._subs.pop(topic_filter, None)
            self._routes.clear()
        with self._order:
            if self._connected.is_set() and self._paho is not None:
                self._paho.unsubscribe(self._wire_filter(topic_filter))

    # -- network thread ---------------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            connected_before = self._connections
            try:
                self._open()
                self._pump()
            except TransportError as exc:
                self._note_error(exc)
            except Exception as exc:  # a paho bug must not end the thread: log, back off, retry
                log.exception("MQTT network loop of %s failed", self.client_id)
                self._note_error(error_for_exception(exc, str(self.broker)))
            if self._stopping.is_set():
                break  # still connected: _close() says DISCONNECT, so the broker drops the will
            self._mark_disconnected(self.last_error)
            if self._fell_back:
                self._fell_back = False
                continue  # retry at once with MQTT 3.1.1
            attempt = 1 if self._connections > connected_before else attempt + 1
            delay = self._backoff.delay(attempt)
            log.info("MQTT %s: reconnecting to %s in %.1f s (attempt %d)", self.client_id, self.broker, delay, attempt)
            self._stopping.wait(delay)
        self._close()

    def _open(self) -> None:
        self._refused = False
        self._release_pending = False
        if self._paho is None:
            self._paho = self._build()
        will = self._will() if callable(self._will) else self._will
        if will is not None:
            topic, payload, qos, retain = will
            self._paho.will_set(check_topic(topic), payload, qos, retain)
        try:
            if self._protocol == MQTTProtocolVersion.MQTTv5:
                props = Properties(PacketTypes.CONNECT)
                if not self._clean_start:
                    props.SessionExpiryInterval = self._session_expiry
                if self._receive_maximum is not None:
                    props.ReceiveMaximum = self._receive_maximum
                self._paho.connect(self.broker.host, self.broker.port, self._keepalive,
                                   clean_start=self._clean_start, properties=props)
            else:
                self._paho.connect(self.broker.host, self.broker.port, self._keepalive)
        except Exception as exc:
            raise error_for_exception(exc, str(self.broker)) from exc

    def _pump(self) -> None:
        client = self._paho
        assert client is not None
        connack_deadline = time.monotonic() + self._connect_timeout
        while not self._stopping.is_set():
            if not self._connected.is_set() and time.monotonic() > connack_deadline and not self._fell_back:
                client._sock_close()  # noqa: SLF001  (no CONNACK: nothing to say DISCONNECT to)
                if self._may_fall_back and self._protocol == MQTTProtocolVersion.MQTTv5 and not self._v5_seen:
                    # Some 3.1.1-only brokers never answer an MQTT 5 CONNECT: treat silence as "no".
                    log.info("MQTT %s: no answer to an MQTT 5 CONNECT from %s; trying 3.1.1",
                             self.client_id, self.broker)
                    self._protocol, self._paho, self._fell_back = MQTTProtocolVersion.MQTTv311, None, True
                else:
                    self._note_error(ConnectError(f"{self.broker} sent no CONNACK within {self._connect_timeout:.0f} s"))
                return
            rc = client.loop(timeout=ACK_TICK_S if self._deliveries.outstanding else LOOP_TICK_S)
            self._send_acks(client)
            if self._release_pending and rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._release()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                err = error_for_rc(rc, f"connection to {self.broker}")
                if err is not None and self.broker.tls is not None and not self._connected.is_set():
                    err = ConnectError(f"{self.broker} closed the TLS connection before accepting it",
                                       hint="does it require a client certificate, or distrust ours?")
                # A refused CONNACK already recorded the broker's reason, more precise than rc.
                if err is not None and not self._fell_back and not self._refused:
                    self._note_error(err)
                return
            for late in self._acks.overdue(self.ack_timeout):
                log.warning("MQTT %s: no acknowledgement after %.0f s for message id %s on %s",
                            self.client_id, self.ack_timeout, late.mid, late.topic)

    def _close(self) -> None:
        client = self._paho
        if client is None:
            return
        if self._connected.is_set():
            self._send_acks(client)  # what was stored before stop() must not come back
            try:
                client.disconnect()
                # Let the loop write DISCONNECT; paho closes the socket once it is sent.
                for _ in range(int(2.0 / LOOP_TICK_S)):
                    if not self._connected.is_set():
                        break
                    if client.loop(timeout=LOOP_TICK_S) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        break
            except Exception:  # the socket may already be gone; nothing left to tell the broker
                log.debug("MQTT %s: disconnect was not clean", self.client_id, exc_info=True)
        self._mark_disconnected(None)
        try:
            client._sock_close()  # noqa: SLF001  (paho offers no public close without DISCONNECT)
        except OSError:
            pass

    def _build(self) -> paho.Client:
        kwargs: dict[str, Any] = {
            "callback_api_version": CallbackAPIVersion.VERSION2,
            "client_id": self.client_id,
            "protocol": self._protocol,
            "reconnect_on_failure": False,
            # With a deferred subscription every received message is acknowledged by us (see
            # _on_message and acks.py); without one paho acks as each handler returns.
            "manual_ack": self._manual_ack,
        }
        if self._protocol != MQTTProtocolVersion.MQTTv5:
            kwargs["clean_session"] = self._clean_start
        client = paho.Client(**kwargs)
        if self.broker.username:
            client.username_pw_set(self.broker.username, self.broker.password)
        tls = self.broker.tls
        if tls is not None:
            try:
                client.tls_set(
                    ca_certs=str(tls.ca_file) if tls.ca_file else None,
                    certfile=str(tls.cert_file) if tls.cert_file else None,
                    keyfile=str(tls.key_file) if tls.key_file else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise error_for_exception(ssl.SSLError(str(exc)), str(self.broker)) from exc
            client.tls_insecure_set(tls.insecure)
        client.connect_timeout = self._connect_timeout
        client.suppress_exceptions = True  # our callbacks catch everything; this is a second net
        # paho logs a peer's reset at ERROR; we report every connection problem ourselves, once,
        # translated, so its own lines are debugging detail. Only hooked when that detail is
        # wanted (set at connect): paho formats a line, properties included, for every packet it
        # sends or receives once a hook is set, a good part of the CPU a received message costs.
        if paho_log.isEnabledFor(logging.DEBUG):
            client.on_log = lambda _c, _u, _level, message: paho_log.debug("%s", message)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        # Only the network thread may write to the socket. Without a write hook, paho (run by our
        # own thread, not loop_start) writes from whichever thread publishes, while the network
        # thread writes too: two threads pop packets off one queue, so messages leave out of
        # order (seen: a QoS 1 event five places late) and a partial write could interleave.
        # With the hook set, paho only queues and wakes the network thread's select().
        client.on_socket_register_write = _network_thread_writes
        return client

    def _note_error(self, err: TransportError) -> None:
        same = self.last_error is not None and str(self.last_error) == str(err)
        self.last_error = err
        # Log a new problem loudly, the same problem again quietly (it repeats every backoff).
        log.log(logging.DEBUG if same else logging.WARNING, "MQTT %s: %s", self.client_id, err)

    def _mark_disconnected(self, err: TransportError | None) -> None:
        self._ready.clear()
        if not self._connected.is_set():
            return
        self._connected.clear()
        self._acks.connection_lost(ConnectError("connection lost before the QoS 0 message was sent"))
        for hook in list(self._disconnect_hooks):
            try:
                hook(err)
            except Exception:
                log.exception("MQTT %s: on_disconnect hook %r failed", self.client_id, hook)

    # -- paho callbacks (network thread) ----------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        err = error_for_reason(reason, f"connection to {self.broker}")
        if err is not None:
            if (reason.value == UNSUPPORTED_PROTOCOL and self._may_fall_back
                    and self._protocol == MQTTProtocolVersion.MQTTv5):
                log.info("MQTT %s: %s speaks MQTT 3.1.1 only; falling back", self.client_id, self.broker)
                self._protocol = MQTTProtocolVersion.MQTTv311
                self._paho = None
                self._fell_back = True
                return
            self._refused = True
            self._note_error(err)
            return
        self._connections += 1
        self._v5_seen = self._v5_seen or self._protocol == MQTTProtocolVersion.MQTTv5
        self.last_error = None
        info = ConnectionInfo(self.protocol, bool(getattr(flags, "session_present", False)), self._connections)
        log.info("MQTT %s: connected to %s (MQTT %s, session present: %s)",
                 self.client_id, self.broker, info.protocol, info.session_present)
        with self._order:
            self._connected.set()
            with self._subs_lock:
                subs = list(self._subs.values())
            for sub in subs:
                self._send_subscribe(sub)
            self._in_hooks = True  # their publishes go out at once, ahead of everything queued
            try:
                for hook in list(self._connect_hooks):
                    try:
                        hook(info)
                    except Exception:
                        log.exception("MQTT %s: on_connect hook %r failed", self.client_id, hook)
            finally:
                self._in_hooks = False
        # paho resends the messages the last connection left unacknowledged right after this
        # callback returns; the backlog and new publishes follow them (see _release).
        self._release_pending = True

    def _release(self) -> None:
        """After paho's resends: send the backlog in order, then let publish() send directly."""
        self._release_pending = False
        with self._order:
            while self._backlog and self._connected.is_set():
                self._send(*self._backlog.popleft())
            if self._connected.is_set():
                self._ready.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        err = error_for_reason(reason, "connection")
        if err is None and not self._stopping.is_set():
            err = ConnectError(f"connection to {self.broker} lost")
        self._mark_disconnected(err)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        payload = bytes(message.payload)
        try:
            topic = message.topic
        except UnicodeDecodeError:
            log.warning("MQTT %s: dropped a message whose topic is not UTF-8 (%r)", self.client_id, message._topic)
            if self._manual_ack:
                self._ack_now(client, message)
            return
        subs = self._routes.get(topic)
        if subs is None:
            with self._subs_lock:
                subs = [s for s in self._subs.values() if paho.topic_matches_sub(strip_share(s.topic_filter), topic)]
                if len(self._routes) >= MAX_ROUTES:
                    self._routes.clear()
                self._routes[topic] = subs
        deferred = sum(s.defer_ack for s in subs) if message.qos else 0
        acks = iter(self._deliveries.deliver(self._connections, message.mid, message.qos, deferred) if deferred else ())
        for sub in subs:
            ack = (next(acks) if deferred else NO_ACK) if sub.defer_ack else None
            try:
                if ack is None:
                    sub.handler(topic, payload, bool(message.retain))  # type: ignore[call-arg]
                else:
                    sub.handler(topic, payload, bool(message.retain), ack)  # type: ignore[call-arg]
            except Exception:
                log.exception("MQTT %s: handler for %s failed on topic %s (payload %r)",
                              self.client_id, sub.topic_filter, topic, _truncate(payload))
                if ack is not None:
                    ack()  # the handler kept nothing; holding the message would only stall the session
        if not deferred and self._manual_ack:
            self._ack_now(client, message)

    def _ack_now(self, client: paho.Client, message: paho.MQTTMessage) -> None:
        if message.qos:
            client.ack(message.mid, message.qos)

    def _send_acks(self, client: paho.Client) -> None:
        """Send the acks deferred handlers gave, on the connection that delivered their messages."""
        for connection, mid, qos in self._deliveries.take():
            if connection == self._connections and self._connected.is_set():
                client.ack(mid, qos)
            else:  # the broker sends the message again on this connection, under its own id
                log.debug("MQTT %s: ack of message id %s from an earlier connection dropped", self.client_id, mid)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._acks.resolve(mid, error_for_reason(reason, "publish"))

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        err = next((e for e in (error_for_reason(r, "subscribe") for r in reasons) if e is not None), None)
        if err is not None:
            log.error("MQTT %s: %s (message id %s)", self.client_id, err, mid)
        self._acks.resolve(mid, err)

    # -- sending (caller holds self._order) -------------------------------------------------

    def _send(self, topic: str, payload: bytes, qos: int, retain: bool, handle: PublishHandle) -> None:
        client = self._paho
        if client is None:
            handle.resolve(ConnectError("not connected"))
            return
        try:
            info = client.publish(topic, payload, qos, retain)
        except (ValueError, TypeError) as exc:
            handle.resolve(PublishError(f"cannot publish to {topic}: {exc}"))
            return
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0):
            # NO_CONN with QoS > 0: paho keeps the message and resends it after the reconnect.
            self._acks.register(info.mid, handle)
        else:
            handle.mid = info.mid
            handle.resolve(error_for_rc(info.rc, f"publish to {topic}") or PublishError(f"publish to {topic} failed"))

    def _wire_filter(self, topic_filter: str) -> str:
        if topic_filter.startswith("$share/") and self._protocol != MQTTProtocolVersion.MQTTv5:
            if not self._warned_share:
                self._warned_share = True
                log.warning("MQTT %s: broker speaks MQTT 3.1.1; subscribing %s unshared",
                            self.client_id, topic_filter)
            return strip_share(topic_filter)
        return topic_filter

    def _send_subscribe(self, sub: _Subscription) -> None:
        client = self._paho
        if client is None:
            return
        rc, mid = client.subscribe(self._wire_filter(sub.topic_filter), sub.qos)
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            handle = sub.handle if not sub.handle.done else SubscribeHandle(sub.topic_filter, sub.qos)
            self._acks.register(mid, handle)
        else:
            err = error_for_rc(rc, f"subscribe to {sub.topic_filter}")
            log.warning("MQTT %s: %s", self.client_id, err)


def _network_thread_writes(client: paho.Client, userdata: Any, sock: Any) -> None:
    """Leave the write to the network thread's loop (see ``_build``)."""

