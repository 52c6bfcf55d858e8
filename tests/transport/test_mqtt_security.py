"""TLS with client certificates, and user name/password authentication, against mosquitto."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest

from edge.errors import BrokerAuthError, ConnectError, TlsError
from edge.transport import MqttClient
from tests.fixtures.broker import MOSQUITTO, MosquittoBroker
from tests.transport.helpers import FAST, WAIT_S, unique

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")


def _cert(subject: str, issuer_key, issuer_name, key, *, ca: bool = False, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256()), name


def _write(path: Path, cert=None, key=None) -> Path:
    from cryptography.hazmat.primitives import serialization

    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from cryptography.hazmat.primitives.asymmetric import ec

    d = tmp_path_factory.mktemp("pki")
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca, ca_name = _cert("edge test CA", None, None, ca_key, ca=True)
    server, _ = _cert("localhost", ca_key, ca_name, server_key, server=True)
    client, _ = _cert("device-1", ca_key, ca_name, client_key)
    return {
        "ca": _write(d / "ca.pem", ca), "server": _write(d / "server.pem", server),
        "server_key": _write(d / "server.key", key=server_key), "client": _write(d / "client.pem", client),
        "client_key": _write(d / "client.key", key=client_key),
    }  # fmt: skip


@pytest.fixture()
def tls_broker(tmp_path: Path, pki: dict[str, Path]):
    b = MosquittoBroker(tmp_path / "tls", extra_config="\n".join([
        f"cafile {pki['ca']}", f"certfile {pki['server']}", f"keyfile {pki['server_key']}",
        "require_certificate true",
    ])).start()  # fmt: skip
    yield b
    b.stop()


def test_tls_with_a_client_certificate(tls_broker, pki: dict[str, Path]) -> None:
    url = f"mqtts://127.0.0.1:{tls_broker.port}?ca={pki['ca']}&cert={pki['client']}&key={pki['client_key']}"
    c = MqttClient(url, unique("dev"), backoff=FAST).start()
    try:
        assert c.wait_connected(WAIT_S), c.last_error
        assert c.publish("secure/x", b"hello").wait(WAIT_S)
    finally:
        c.stop()


def test_tls_without_a_client_certificate_is_refused(tls_broker, pki: dict[str, Path]) -> None:
    c = MqttClient(f"mqtts://127.0.0.1:{tls_broker.port}?ca={pki['ca']}", unique("dev"), backoff=FAST).start()
    try:
        assert not c.wait_connected(1.0)
        # TLS 1.3 refuses the missing certificate after the handshake: the connection drops.
        assert isinstance(c.last_error, (TlsError, ConnectError)), c.last_error
        assert "certificate" in str(c.last_error)
    finally:
        c.stop()


def test_tls_with_an_unknown_ca_is_a_tls_error(tls_broker, tmp_path: Path, pki: dict[str, Path]) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    other_key = ec.generate_private_key(ec.SECP256R1())
    other, _ = _cert("other CA", None, None, other_key, ca=True)
    other_ca = _write(tmp_path / "other-ca.pem", other)
    url = f"mqtts://127.0.0.1:{tls_broker.port}?ca={other_ca}&cert={pki['client']}&key={pki['client_key']}"
    c = MqttClient(url, unique("dev"), backoff=FAST).start()
    try:
        assert not c.wait_connected(1.0)
        assert isinstance(c.last_error, TlsError), c.last_error
        assert "certificate" in str(c.last_error).lower()
    finally:
        c.stop()


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed")
def test_username_and_password(tmp_path: Path) -> None:
    folder = tmp_path / "auth"
    folder.mkdir()
    passwd = folder / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "device-1", "s3cret"], check=True)
    b = MosquittoBroker(folder, extra_config=f"password_file {passwd}", anonymous=False).start()
    good = MqttClient(f"mqtt://device-1:s3cret@127.0.0.1:{b.port}", unique("dev"), backoff=FAST).start()
    bad = MqttClient(f"mqtt://127.0.0.1:{b.port}", unique("dev"), username="device-1", password="wrong",
                     backoff=FAST).start()
    try:
        assert good.wait_connected(WAIT_S), good.last_error
        assert not bad.wait_connected(1.0)
        assert isinstance(bad.last_error, BrokerAuthError), bad.last_error
    finally:
        good.stop()
        bad.stop()
        b.stop()
