"""TLS with client certificates end to end, built with the CLI; bad certificates refused both ways.

The module's CA, certificates and mosquitto configuration come from `edge fleet certs ...` and
`edge fleet broker-config`, so these tests also exercise the commands. Every refusal has a
control beside it (the same client with the right certificate connects), so a broker that
refused everything would fail here too.
"""

from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest

from edge.cli.main import main
from edge.errors import TlsError
from edge.fleet.brokerconf import BrokerFiles
from edge.fleet.pki import FleetPki, Role
from edge.transport import Backoff, MqttClient
from edge.transport.embedded_broker import free_port
from edge.transport.url import TlsOptions
from tests.fixtures.broker import MOSQUITTO
from tests.hardening.mqtt_probe import FleetBroker, Identity, Probe, forge, identity, token

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

FLEET = "t1"
B = f"edge/v1/{FLEET}"


@dataclass
class TlsWorld:
    pki: FleetPki
    broker: FleetBroker
    ids: dict[str, Identity]
    tmp: Path
    other: FleetPki  # a CA that has nothing to do with this fleet


def _cli(*args: str) -> None:
    rc = main(list(args))
    assert rc == 0, f"edge {' '.join(args)} exited {rc}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsWorld]:
    tmp = tmp_path_factory.mktemp("tls")
    pki_dir = str(tmp / "pki")
    _cli("fleet", "certs", "init", "--fleet", FLEET, "--pki", pki_dir)
    for name in ("dev-a", "dev-r"):
        _cli("fleet", "certs", "issue", name, "--pki", pki_dir)
    _cli("fleet", "certs", "issue", "controller", "--role", "controller", "--pki", pki_dir)
    _cli("fleet", "certs", "issue", "127.0.0.1", "--role", "server", "--host", "localhost", "--pki", pki_dir)
    _cli("fleet", "certs", "revoke", "dev-r", "--pki", pki_dir)
    port, cport = free_port(), free_port()
    out = tmp / "broker"
    _cli("fleet", "broker-config", "-o", str(out), "--pki", pki_dir, "--port", str(port), "--bind", "127.0.0.1",
         "--controller-port", str(cport), "--run-as", "root", "--log-file", str(out / "mosquitto.log"))
    pki = FleetPki.open(Path(pki_dir))
    now = datetime.now(timezone.utc)
    ids = {
        "dev-a": identity(pki, pki.current("dev-a", Role.DEVICE)),
        "controller": identity(pki, pki.current("controller", Role.CONTROLLER)),
        "dev-r": identity(pki, [c for c in pki.certificates() if c.name == "dev-r"][0]),
        "expired": forge(pki, "dev-a", tmp / "bad", valid_from=now - timedelta(days=10), days=2),
        "not-yet-valid": forge(pki, "dev-a", tmp / "bad", valid_from=now + timedelta(days=10), days=30),
        "server-as-client": identity(pki, pki.current("127.0.0.1", Role.SERVER)),
    }
    other = FleetPki.init(tmp / "other", FLEET)  # same fleet name, same device name, another key
    other_dev = other.issue("dev-a", Role.DEVICE)
    ids["other-ca"] = identity(other, other_dev)
    files = BrokerFiles(out / "mosquitto.conf", out / "devices.acl", out / "controller.acl", (), (), (), ())
    broker = FleetBroker(files, port, cport, out / "mosquitto.log").start()
    try:
        yield TlsWorld(pki, broker, ids, tmp, other)
    finally:
        broker.stop()


def _refused_by_broker(p: Probe) -> bool:
    """Whether the broker refused the client (TLS 1.2: handshake alert; TLS 1.3: after it, before CONNACK)."""
    ok = p.connect()
    p.close()
    return not ok and not isinstance(p.error, ssl.SSLCertVerificationError)


def test_cli_wrote_a_tls_config_with_client_certificates(tls: TlsWorld) -> None:
    conf = tls.broker.files.config.read_text()
    for line in ("require_certificate true", "use_identity_as_username true", "tls_version tlsv1.2",
                 "allow_anonymous false", "per_listener_settings true"):
        assert line in conf
    assert conf.count("crlfile ") == 2
    acl = tls.broker.files.device_acl.read_text()
    assert "user dev-a\n" in acl and "user dev-r" not in acl  # revoked: shut out of the ACL too


def test_edge_clients_talk_over_mutual_tls_end_to_end(tls: TlsWorld) -> None:
    ca = tls.pki.ca_file
    got: list[bytes] = []
    arrived = threading.Event()

    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        got.append(payload)
        arrived.set()

    controller = MqttClient(
        f"mqtts://127.0.0.1:{tls.broker.controller_port}", "edge-fleet-t1-0",
        tls=TlsOptions(ca, tls.ids["controller"].cert_file, tls.ids["controller"].key_file),
    )
    device = MqttClient(
        f"mqtts://localhost:{tls.broker.port}", "dev-a",
        tls=TlsOptions(ca, tls.ids["dev-a"].cert_file, tls.ids["dev-a"].key_file),
    )
    try:
        granted = controller.subscribe(f"{B}/+/telemetry", on_message)
        controller.start()
        device.start()
        assert controller.wait_connected(10) and device.wait_connected(10)
        granted.wait(10)
        payload = token()
        device.publish(f"{B}/dev-a/telemetry", payload).wait(10)
        assert arrived.wait(10) and got == [payload]
    finally:
        device.stop()
        controller.stop()


def test_the_control_client_connects(tls: TlsWorld) -> None:
    with Probe(tls.broker.port, ident=tls.ids["dev-a"]) as p:
        assert p.connect()


def test_client_without_certificate_is_refused(tls: TlsWorld) -> None:
    assert _refused_by_broker(Probe(tls.broker.port, ident=Identity(tls.pki.ca_file, None, None)))
    assert _refused_by_broker(Probe(tls.broker.controller_port, ident=Identity(tls.pki.ca_file, None, None)))


def test_client_certificate_from_another_ca_is_refused(tls: TlsWorld) -> None:
    other = tls.ids["other-ca"]
    # The client trusts our CA (so the server side is fine) but presents the other CA's certificate.
    assert _refused_by_broker(Probe(tls.broker.port, ident=Identity(tls.pki.ca_file, other.cert_file, other.key_file)))


@pytest.mark.parametrize("which", ["expired", "not-yet-valid", "dev-r", "server-as-client"])
def test_bad_client_certificates_are_refused(tls: TlsWorld, which: str) -> None:
    # expired, not yet valid, revoked (CRL), and a server certificate (no clientAuth usage)
    assert _refused_by_broker(Probe(tls.broker.port, ident=tls.ids[which]))


def test_client_that_trusts_another_ca_refuses_the_server(tls: TlsWorld) -> None:
    dev = tls.ids["dev-a"]
    p = Probe(tls.broker.port, ident=Identity(tls.other.ca_file, dev.cert_file, dev.key_file))
    assert not p.connect()
    assert isinstance(p.error, ssl.SSLCertVerificationError), p.error


def test_client_with_only_system_cas_refuses_the_server(tls: TlsWorld) -> None:
    dev = tls.ids["dev-a"]
    ctx = ssl.create_default_context()  # system trust store: our private CA is not in it
    ctx.load_cert_chain(dev.cert_file, dev.key_file)
    p = Probe(tls.broker.port, context=ctx)
    assert not p.connect()
    assert isinstance(p.error, ssl.SSLCertVerificationError), p.error


def test_edge_client_reports_a_tls_error_for_an_untrusted_server(tls: TlsWorld) -> None:
    dev = tls.ids["dev-a"]
    client = MqttClient(f"mqtts://127.0.0.1:{tls.broker.port}", "dev-a",
                        tls=TlsOptions(tls.other.ca_file, dev.cert_file, dev.key_file),
                        backoff=Backoff(initial=0.05, maximum=0.2))
    try:
        client.start()
        assert not client.wait_connected(1.0)
        assert isinstance(client.last_error, TlsError), client.last_error
    finally:
        client.stop()


def test_plain_mqtt_on_the_tls_port_is_refused(tls: TlsWorld) -> None:
    p = Probe(tls.broker.port)  # no TLS at all
    assert not p.connect(timeout=3)
    p.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_below_1_2_is_refused(tls: TlsWorld) -> None:
    dev = tls.ids["dev-a"]

    def context(version: ssl.TLSVersion) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer old versions at all
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = version
        ctx.load_verify_locations(tls.pki.ca_file)
        ctx.load_cert_chain(dev.cert_file, dev.key_file)
        return ctx

    with Probe(tls.broker.port, context=context(ssl.TLSVersion.TLSv1_2)) as control:
        assert control.connect()
    try:
        old = context(ssl.TLSVersion.TLSv1_1)
    except ssl.SSLError:
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    p = Probe(tls.broker.port, context=old)
    assert not p.connect()
    p.close()


def test_server_certificate_for_another_host_is_refused_by_the_client(tls: TlsWorld) -> None:
    cert = tls.pki.issue("broker.invalid", Role.SERVER)
    port, cport = free_port(), free_port()
    out = tls.tmp / "wrong-host"
    _cli("fleet", "broker-config", "-o", str(out), "--pki", str(tls.pki.folder), "--server-cert", "broker.invalid",
         "--port", str(port), "--bind", "127.0.0.1", "--controller-port", str(cport), "--run-as", "root",
         "--log-file", str(out / "mosquitto.log"))
    assert "broker.invalid" not in (out / "mosquitto.conf").read_text()  # paths are copies under tls/
    assert (out / "tls" / "server.pem").read_bytes() == tls.pki.path(cert.cert_file).read_bytes()
    files = BrokerFiles(out / "mosquitto.conf", out / "devices.acl", out / "controller.acl", (), (), (), ())
    broker = FleetBroker(files, port, cport, out / "mosquitto.log").start()
    try:
        p = Probe(port, ident=tls.ids["dev-a"])  # connects to 127.0.0.1: not a name in the certificate
        assert not p.connect()
        assert isinstance(p.error, ssl.SSLCertVerificationError), p.error
        with Probe(port, ident=tls.ids["dev-a"], check_hostname=False) as control:
            assert control.connect()  # the chain is fine; only the name was wrong
    finally:
        broker.stop()


def test_certs_cli_lists_and_refuses_unsafe_names(tls: TlsWorld, capsys: pytest.CaptureFixture[str]) -> None:
    pki_dir = str(tls.pki.folder)
    assert main(["fleet", "certs", "list", "--pki", pki_dir, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    states = {(c["name"], c["state"]) for c in listed["certificates"]}
    assert ("dev-r", "revoked") in states and ("dev-a", "active") in states
    for bad in ("dev+1", "dev#", "a/b", "$SYS", "dev 1", ""):
        assert main(["fleet", "certs", "issue", bad, "--pki", pki_dir]) == 2, bad
    assert "invalid device name" in capsys.readouterr().err
    # one name, one role: a device name cannot become a controller's
    assert main(["fleet", "certs", "issue", "dev-a", "--role", "controller", "--pki", pki_dir]) == 2
    assert main(["fleet", "certs", "issue", "dev-a", "--pki", pki_dir]) == 2  # already active
    assert main(["fleet", "certs", "crl", "--pki", pki_dir, "--json"]) == 0
    nxt = datetime.fromisoformat(json.loads(capsys.readouterr().out)["next_update"])
    assert nxt > datetime.now(timezone.utc) + timedelta(days=100)
