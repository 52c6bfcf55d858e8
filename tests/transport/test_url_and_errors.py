"""Broker URLs, and the translation of every paho code into our error tree."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
from paho.mqtt.enums import ConnackCode, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edge.errors import (
    BrokerAuthError, ConfigError, ConnectError, EdgeError, ProtocolError, PublishError, TlsError,
    TransportError, all_error_classes,
)  # fmt: skip
from edge.transport import errors as terr
from edge.transport.url import TlsOptions, parse_broker_url


# ------------------------------------------------------------------------------------- URLs
def test_plain_and_tls_urls_get_their_default_ports() -> None:
    plain = parse_broker_url("mqtt://broker.local")
    assert (plain.scheme, plain.host, plain.port, plain.tls) == ("mqtt", "broker.local", 1883, None)
    secure = parse_broker_url("mqtts://broker.local")
    assert secure.port == 8883 and secure.tls == TlsOptions()
    assert parse_broker_url("mqtt://[::1]:1999").host == "::1"


def test_credentials_come_from_the_url_or_explicit_arguments(tmp_path: Path) -> None:
    u = parse_broker_url("mqtt://dev%40fleet:p%3Ass@h:1884")
    assert (u.username, u.password, u.port) == ("dev@fleet", "p:ss", 1884)
    assert "p:ss" not in str(u) and "dev@fleet@h:1884" in str(u)
    explicit = parse_broker_url("mqtt://a:b@h", username="u2", password="s2")
    assert (explicit.username, explicit.password) == ("u2", "s2")
    with pytest.raises(ConfigError, match="password but no user"):
        parse_broker_url("mqtt://:secret@h")


def test_tls_files_from_the_query_or_options(tmp_path: Path) -> None:
    for name in ("ca.pem", "c.pem", "k.pem"):
        (tmp_path / name).write_text("x")
    u = parse_broker_url(f"mqtts://h?ca={tmp_path}/ca.pem&cert={tmp_path}/c.pem&key={tmp_path}/k.pem")
    assert u.tls == TlsOptions(tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "k.pem")
    merged = parse_broker_url(f"mqtts://h?ca={tmp_path}/ca.pem", tls=TlsOptions(insecure=True))
    assert merged.tls.ca_file == tmp_path / "ca.pem" and merged.tls.insecure
    with pytest.raises(ConfigError, match="both a certificate and a key"):
        parse_broker_url(f"mqtts://h?cert={tmp_path}/c.pem")
    with pytest.raises(ConfigError, match="does not exist"):
        parse_broker_url("mqtts://h?ca=/nonexistent/ca.pem")


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("http://h:1883", "unsupported broker URL scheme"),
        ("mqtt://", "no host"),
        ("mqtt://h:1883/topic", "path"),
        ("mqtt://h?ca=/x", "TLS options given for a plain"),
        ("mqtts://h?cafile=/x", r"unknown broker URL option\(s\) cafile.*valid: ca, cert, key, insecure"),
        ("mqtt://h:99999", "invalid broker URL"),
        ("mqtts://h?insecure=maybe", "not a boolean"),
    ],
)
def test_bad_urls_are_refused_with_the_reason(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_broker_url(url)


# ------------------------------------------------------------------------------------- errors
def test_every_paho_error_code_maps_to_our_tree() -> None:
    for code in MQTTErrorCode:
        if code in terr.OK_CODES:
            assert terr.error_for_rc(code, "x") is None
            continue
        assert code in terr.ERROR_CLASSES, f"{code.name} is not mapped"
        err = terr.error_for_rc(code, "publish")
        assert isinstance(err, TransportError) and code.name in str(err)


def test_every_connack_code_maps() -> None:
    for code in ConnackCode:
        err = terr.error_for_connack(code)
        if code is ConnackCode.CONNACK_ACCEPTED:
            assert err is None
        else:
            assert isinstance(err, TransportError)
    assert isinstance(terr.error_for_connack(ConnackCode.CONNACK_REFUSED_BAD_USERNAME_PASSWORD), BrokerAuthError)


def test_every_mqtt5_failure_reason_code_maps_explicitly() -> None:
    failures = sorted(v for v in ReasonCode.names if v >= 0x80)
    assert failures, "paho lists no reason codes"
    missing = [hex(v) for v in failures if v not in terr.REASON_CLASSES]
    assert missing == []
    for value in failures:
        packet = next(iter(next(iter(ReasonCode.names[value].values()))))
        err = terr.error_for_reason(ReasonCode(packet, identifier=value), "connect")
        assert isinstance(err, terr.REASON_CLASSES[value])
    assert terr.error_for_reason(ReasonCode(PacketTypes.PUBACK, identifier=0x10), "publish") is None  # no subscribers
    assert isinstance(terr.error_for_reason(ReasonCode(PacketTypes.CONNACK, identifier=0x86), "c"), BrokerAuthError)
    assert isinstance(terr.error_for_reason(ReasonCode(PacketTypes.CONNACK, identifier=0x84), "c"), ProtocolError)


def test_socket_and_tls_exceptions_are_translated() -> None:
    assert isinstance(terr.error_for_exception(ssl.SSLError("bad cert"), "b"), TlsError)
    assert isinstance(terr.error_for_exception(ConnectionRefusedError(111, "refused"), "b"), ConnectError)
    assert isinstance(terr.error_for_exception(socket.gaierror(-2, "unknown"), "b"), ConnectError)
    assert isinstance(terr.error_for_exception(ValueError("bad"), "b"), ProtocolError)
    assert isinstance(terr.error_for_exception(RuntimeError("?"), "b"), TransportError)


def test_transport_errors_belong_to_the_one_tree() -> None:
    classes = set(all_error_classes())
    for cls in {*terr.ERROR_CLASSES.values(), *terr.REASON_CLASSES.values(), ConnectError, PublishError}:
        assert cls in classes and issubclass(cls, TransportError) and issubclass(cls, EdgeError)
        assert cls.exit_code == TransportError.exit_code


@pytest.mark.parametrize("url", ["mqtt://:s3cret-pw@h", "mqtt://u:s3cret-pw@h:99999", "mqtt://u:s3cret-pw@h/topic",
                                 "http://u:s3cret-pw@h", "mqtt://u:s3cret-pw@h?ca=/x"])
def test_errors_quote_the_url_without_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_broker_url(url)
    assert "s3cret-pw" not in str(info.value) and ":***@h" in str(info.value)
