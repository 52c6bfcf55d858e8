"""Translate paho's return codes, CONNACK/PUBACK/SUBACK reason codes and exceptions into ours.

Every ``MQTTErrorCode``, every MQTT 3.1.1 CONNACK code and every MQTT 5 reason code maps to one
:class:`~edge.errors.TransportError` subclass here, and nowhere else; a test enumerates paho's
enums so a code added by a future paho release fails the build instead of surfacing raw.
"""

from __future__ import annotations

import socket
import ssl

from paho.mqtt.client import connack_string, error_string
from paho.mqtt.enums import ConnackCode, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from edge.errors import (
    BrokerAuthError,
    ConnectError,
    ProtocolError,
    PublishError,
    TlsError,
    TransportError,
)

# Return codes that are not errors: AGAIN means "would block, call again" inside paho's loop.
OK_CODES = frozenset({MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN})

ERROR_CLASSES: dict[MQTTErrorCode, type[TransportError]] = {
    MQTTErrorCode.MQTT_ERR_NOMEM: PublishError,
    MQTTErrorCode.MQTT_ERR_PROTOCOL: ProtocolError,
    MQTTErrorCode.MQTT_ERR_INVAL: PublishError,
    MQTTErrorCode.MQTT_ERR_NO_CONN: ConnectError,
    MQTTErrorCode.MQTT_ERR_CONN_REFUSED: ConnectError,
    MQTTErrorCode.MQTT_ERR_NOT_FOUND: ProtocolError,
    MQTTErrorCode.MQTT_ERR_CONN_LOST: ConnectError,
    MQTTErrorCode.MQTT_ERR_TLS: TlsError,
    MQTTErrorCode.MQTT_ERR_PAYLOAD_SIZE: PublishError,
    MQTTErrorCode.MQTT_ERR_NOT_SUPPORTED: ProtocolError,
    MQTTErrorCode.MQTT_ERR_AUTH: BrokerAuthError,
    MQTTErrorCode.MQTT_ERR_ACL_DENIED: BrokerAuthError,
    MQTTErrorCode.MQTT_ERR_UNKNOWN: TransportError,
    MQTTErrorCode.MQTT_ERR_ERRNO: ConnectError,
    MQTTErrorCode.MQTT_ERR_QUEUE_SIZE: PublishError,
    MQTTErrorCode.MQTT_ERR_KEEPALIVE: ConnectError,
}

# MQTT 3.1.1 CONNACK return codes (paho reports them as ReasonCodes since 2.0 too).
CONNACK_CLASSES: dict[ConnackCode, type[TransportError] | None] = {
    ConnackCode.CONNACK_ACCEPTED: None,
    ConnackCode.CONNACK_REFUSED_PROTOCOL_VERSION: ProtocolError,
    ConnackCode.CONNACK_REFUSED_IDENTIFIER_REJECTED: ProtocolError,
    ConnackCode.CONNACK_REFUSED_SERVER_UNAVAILABLE: ConnectError,
    ConnackCode.CONNACK_REFUSED_BAD_USERNAME_PASSWORD: BrokerAuthError,
    ConnackCode.CONNACK_REFUSED_NOT_AUTHORIZED: BrokerAuthError,
}

# MQTT 5 reason codes >= 0x80 (failures), by value; values below 0x80 are successes.
REASON_CLASSES: dict[int, type[TransportError]] = {
    0x80: TransportError,  # Unspecified error
    0x81: ProtocolError,  # Malformed packet
    0x82: ProtocolError,  # Protocol error
    0x83: TransportError,  # Implementation specific error
    0x84: ProtocolError,  # Unsupported protocol version
    0x85: ProtocolError,  # Client identifier not valid
    0x86: BrokerAuthError,  # Bad user name or password
    0x87: BrokerAuthError,  # Not authorized
    0x88: ConnectError,  # Server unavailable
    0x89: ConnectError,  # Server busy
    0x8A: BrokerAuthError,  # Banned
    0x8B: ConnectError,  # Server shutting down
    0x8C: BrokerAuthError,  # Bad authentication method
    0x8D: ConnectError,  # Keep alive timeout
    0x8E: ConnectError,  # Session taken over (another client connected with our id)
    0x8F: ProtocolError,  # Topic filter invalid
    0x90: PublishError,  # Topic name invalid
    0x91: ProtocolError,  # Packet identifier in use
    0x92: ProtocolError,  # Packet identifier not found
    0x93: ProtocolError,  # Receive maximum exceeded
    0x94: ProtocolError,  # Topic alias invalid
    0x95: PublishError,  # Packet too large
    0x96: ConnectError,  # Message rate too high
    0x97: PublishError,  # Quota exceeded
    0x98: ConnectError,  # Administrative action
    0x99: PublishError,  # Payload format invalid
    0x9A: ProtocolError,  # Retain not supported
    0x9B: ProtocolError,  # QoS not supported
    0x9C: ConnectError,  # Use another server
    0x9D: ConnectError,  # Server moved
    0x9E: ProtocolError,  # Shared subscription not supported
    0x9F: ConnectError,  # Connection rate exceeded
    0xA0: ConnectError,  # Maximum connect time
    0xA1: ProtocolError,  # Subscription identifiers not supported
    0xA2: ProtocolError,  # Wildcard subscription not supported
}

# MQTT 5 "Unsupported protocol version", and the 3.1.1 code paho converts to it: the broker
# speaks 3.1.1 only (amqtt), so the client retries with 3.1.1.
UNSUPPORTED_PROTOCOL = 0x84


def error_for_rc(rc: int, action: str) -> TransportError | None:
    """Return the error for a paho return code (None for success), naming the action."""
    code = MQTTErrorCode(rc)
    if code in OK_CODES:
        return None
    cls = ERROR_CLASSES[code]
    return cls(f"{action} failed: {error_string(code)} ({code.name})")


def check_rc(rc: int, action: str) -> None:
    """Raise the error for a paho return code unless it is a success."""
    err = error_for_rc(rc, action)
    if err is not None:
        raise err


def error_for_reason(reason: ReasonCode | int, action: str) -> TransportError | None:
    """Return the error for a CONNACK/PUBACK/SUBACK reason code (None below 0x80)."""
    value = reason.value if isinstance(reason, ReasonCode) else int(reason)
    if value < 0x80:
        return None
    cls = REASON_CLASSES.get(value, TransportError)
    name = str(reason) if isinstance(reason, ReasonCode) else f"reason code {value:#x}"
    return cls(f"{action} refused by the broker: {name}")


def error_for_connack(code: int, action: str = "connect") -> TransportError | None:
    """Return the error for an MQTT 3.1.1 CONNACK return code (None when accepted)."""
    cls = CONNACK_CLASSES[ConnackCode(code)]
    return None if cls is None else cls(f"{action} refused by the broker: {connack_string(code)}")


def error_for_exception(exc: BaseException, where: str) -> TransportError:
    """Translate an exception raised by paho or the socket layer while talking to ``where``."""
    if isinstance(exc, TransportError):
        return exc
    if isinstance(exc, (ssl.SSLError, ssl.CertificateError)):
        return TlsError(f"TLS handshake with {where} failed: {exc}",
                        hint="check the CA file, the client certificate and key, and the host name")
    if isinstance(exc, socket.gaierror):
        return ConnectError(f"cannot resolve the broker host of {where}: {exc}")
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout, OSError)):
        return ConnectError(f"cannot connect to {where}: {exc}", hint="is the broker running and reachable?")
    if isinstance(exc, ValueError):
        return ProtocolError(f"invalid MQTT request to {where}: {exc}")
    return TransportError(f"unexpected error talking to {where}: {exc!r}")
