"""Helpers for the broker hardening tests: a mosquitto run from a generated configuration, and
a plain paho client that reports exactly what the broker did (tests may use paho directly; only
edge/ code must go through edge/transport/).
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from edge.fleet.brokerconf import BrokerFiles
from edge.fleet.pki import FleetPki, IssuedCert, Role, build_certificate
from tests.fixtures.broker import MOSQUITTO, _wait_port

# Bound for anything a test waits for; reached only when something is broken.
WAIT_S = 10.0
# MQTT 5 PUBACK reason "Not authorized": what mosquitto answers a publish the ACL refuses.
NOT_AUTHORIZED = 0x87


@dataclass(frozen=True)
class Identity:
    """A client certificate and key (plus the CA the client trusts)."""

    ca_file: Path
    cert_file: Path | None
    key_file: Path | None


def identity(pki: FleetPki, cert: IssuedCert) -> Identity:
    """Return the identity of an issued certificate."""
    return Identity(pki.ca_file, pki.path(cert.cert_file), pki.path(cert.key_file))


def forge(pki: FleetPki, cn: str, out: Path, *, role: Role = Role.DEVICE, days: int = 30,
          valid_from: datetime | None = None) -> Identity:
    """Sign a certificate with the fleet CA's key without the name checks of FleetPki.issue.

    Stands for a careless or compromised issuing process: the broker side must still hold.
    """
    ca_cert = x509.load_pem_x509_certificate(pki.ca_file.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key_file.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    start = valid_from or datetime.now(timezone.utc) - timedelta(minutes=5)
    cert = build_certificate(cn, key.public_key(), ca_cert, ca_key, role=role,  # type: ignore[arg-type]
                             not_before=start, not_after=start + timedelta(days=days))
    out.mkdir(parents=True, exist_ok=True)
    stem = uuid.uuid4().hex[:8]
    cert_file, key_file = out / f"{stem}.pem", out / f"{stem}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Identity(pki.ca_file, cert_file, key_file)


class FleetBroker:
    """mosquitto started from a folder written by write_broker_config."""

    host = "127.0.0.1"

    def __init__(self, files: BrokerFiles, port: int, controller_port: int, log: Path) -> None:
        self.files, self.port, self.controller_port, self.log = files, port, controller_port, log
        self._proc: subprocess.Popen | None = None

    def start(self) -> "FleetBroker":
        """Start mosquitto and wait for both listeners."""
        assert MOSQUITTO is not None
        self._proc = subprocess.Popen([MOSQUITTO, "-c", str(self.files.config)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.host, self.port, self._proc, self.log)
        _wait_port(self.host, self.controller_port, self._proc, self.log)
        return self

    def reload(self) -> None:
        """Send SIGHUP and wait until mosquitto logged the reload (it is single-threaded: the next
        packet it handles sees the new ACLs, password files and CRL)."""
        assert self._proc is not None
        before = self.log.read_text().count("Reloading config")
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + WAIT_S
        while self.log.read_text().count("Reloading config") == before:
            if time.monotonic() > deadline:
                raise AssertionError("mosquitto did not reload")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop mosquitto."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)

    def running(self) -> bool:
        """Return whether mosquitto runs."""
        return self._proc is not None and self._proc.poll() is None


class Probe:
    """A paho client that records connection outcome, acks and messages."""

    def __init__(self, port: int, *, ident: Identity | None = None, client_id: str | None = None,
                 protocol: int = 5, username: str | None = None, password: str | None = None,
                 context: ssl.SSLContext | None = None, will: tuple[str, bytes] | None = None,
                 check_hostname: bool = True) -> None:
        self.port = port
        proto = mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311
        # No reconnects: a refused client must stay refused, and a dropped one gone.
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"probe-{uuid.uuid4().hex[:8]}",
                                  protocol=proto, reconnect_on_failure=False)
        self.protocol = protocol
        if context is not None:
            self.client.tls_set_context(context)
        elif ident is not None:
            self.client.tls_set(ca_certs=str(ident.ca_file) if ident.ca_file else None,
                                certfile=str(ident.cert_file) if ident.cert_file else None,
                                keyfile=str(ident.key_file) if ident.key_file else None,
                                cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if not check_hostname:
            self.client.tls_insecure_set(True)
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=False)
        self._cond = threading.Condition()
        self.connack: Any = None  # reason code of CONNACK
        self.disconnected: Any = None  # reason of the disconnect, once disconnected
        self.error: BaseException | None = None  # raised by connect(): TLS refused by this side, ...
        self.messages: list[tuple[str, bytes, bool]] = []
        self._acks: dict[int, int] = {}
        self._subacks: dict[int, list[int]] = {}
        c = self.client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        self._started = False

    # --- paho callbacks (network thread) ---

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._cond:
            self.connack = reason
            self._cond.notify_all()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._cond:
            self.disconnected = reason
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((message.topic, message.payload, bool(message.retain)))
            self._cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._cond:
            self._acks[mid] = int(getattr(reason, "value", 0) or 0)
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        with self._cond:
            self._subacks[mid] = [int(getattr(r, "value", r)) for r in reasons]
            self._cond.notify_all()

    # --- actions ---

    def connect(self, timeout: float = WAIT_S) -> bool:
        """Connect; return True on a successful CONNACK, False when either side refused."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except (ssl.SSLError, OSError) as exc:  # this side refused the server, or the server hung up
            self.error = exc
            return False
        self.client.loop_start()
        self._started = True
        with self._cond:
            self._cond.wait_for(lambda: self.connack is not None or self.disconnected is not None, timeout)
            ok = self.connack is not None and not self.connack.is_failure and self.disconnected is None
        return ok

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = WAIT_S) -> int:
        """Publish at QoS 1 and return the PUBACK reason code (always 0 over MQTT 3.1.1)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._cond:
            if not self._cond.wait_for(lambda: info.mid in self._acks or self.disconnected is not None, timeout):
                raise AssertionError(f"no PUBACK for {topic}")
            if info.mid not in self._acks:
                raise AssertionError(f"disconnected while publishing to {topic}: {self.disconnected}")
            return self._acks[info.mid]

    def subscribe(self, topic_filter: str, *, timeout: float = WAIT_S) -> list[int]:
        """Subscribe at QoS 1 and return the SUBACK codes (0x80/0x87 and up: refused)."""
        _, mid = self.client.subscribe(topic_filter, qos=1)
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks or self.disconnected is not None, timeout):
                raise AssertionError(f"no SUBACK for {topic_filter}")
            if mid not in self._subacks:
                raise AssertionError(f"disconnected while subscribing to {topic_filter}: {self.disconnected}")
            return self._subacks[mid]

    def wait_for(self, payload: bytes, timeout: float = WAIT_S) -> bool:
        """Wait until a message with this payload arrived."""
        with self._cond:
            return self._cond.wait_for(lambda: any(p == payload for _, p, _ in self.messages), timeout)

    def wait_topic(self, topic: str, timeout: float = WAIT_S) -> bool:
        """Wait until a message on this topic arrived."""
        with self._cond:
            return self._cond.wait_for(lambda: any(t == topic for t, _, _ in self.messages), timeout)

    def topics(self) -> list[str]:
        """Return the topics of every message received."""
        with self._cond:
            return [t for t, _, _ in self.messages]

    def wait_disconnected(self, timeout: float = WAIT_S) -> bool:
        """Wait until the broker closed the connection."""
        with self._cond:
            return self._cond.wait_for(lambda: self.disconnected is not None, timeout)

    def got(self, payload: bytes) -> list[str]:
        """Return the topics a message with this payload arrived on."""
        with self._cond:
            return [t for t, p, _ in self.messages if p == payload]

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        try:
            self.client.disconnect()
        except Exception:  # noqa: BLE001 - closing a refused client may fail; nothing to report
            pass
        if self._started:
            self.client.loop_stop()

    def drop(self) -> None:
        """Close the socket without DISCONNECT, so the broker publishes the will."""
        sock = self.client.socket()
        if sock is not None:  # the network thread sees EOF and ends without sending DISCONNECT
            sock.shutdown(socket.SHUT_RDWR)
        if self._started:
            self.client.loop_stop()

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def token() -> bytes:
    """Return a unique payload."""
    return uuid.uuid4().hex.encode()
