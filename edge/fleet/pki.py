"""A small certificate authority for one fleet: the broker's server certificate, a client
certificate per device and per controller, and the revocation list the broker checks.

Layout of the PKI folder (the CA key is the one secret that must never leave it)::

    ca.pem  ca.key          the fleet CA (self-signed, may sign leaf certificates only)
    crl.pem                 revoked serials, re-signed on every revocation and by refresh_crl()
    index.json              every certificate issued: name, role, serial, validity, revocation
    issued/<role>/<name>.pem, <name>.key

Client certificates carry the device or controller id as their common name; the broker takes
that name as the MQTT user name (``use_identity_as_username``), so the ACL, not the CA, decides
what a certificate may do. Keys are ECDSA P-256: every TLS stack on small devices has it, and
signing is fast enough for a broker accepting thousands of reconnects.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.errors import ConfigError, NotFoundError
from edge.protocol.topics import check_id

# A fleet CA outlives its devices; rotate it by building a new fleet PKI (see docs/security.md).
CA_DAYS = 3650
# Leaf certificates expire within a year so a lost device's key stops working on its own.
LEAF_DAYS = 365
# The broker refuses every client once the CRL is past its next-update time (OpenSSL treats an
# expired CRL as an error), so it is valid for long and refreshed on every change.
CRL_DAYS = 180
# Clock skew between the machine issuing and devices with a poor RTC.
BACKDATE = timedelta(minutes=5)
# DNS names of a server certificate.
HOST_PATTERN = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")

Clock = Callable[[], datetime]


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Role(str, Enum):
    """What a certificate is for."""

    DEVICE = "device"  # an agent; client auth; CN = device id
    CONTROLLER = "controller"  # the fleet controller; client auth; CN = controller user name
    SERVER = "server"  # the broker; server auth; CN and SANs = its host names and addresses


@dataclass(frozen=True)
class IssuedCert:
    """One certificate in the index."""

    name: str
    role: Role
    serial: str  # hex
    not_before: str  # ISO 8601 UTC
    not_after: str
    cert_file: str  # relative to the PKI folder
    key_file: str
    revoked_at: str | None = None

    def expired(self, at: datetime) -> bool:
        """Return whether the certificate is past its validity at ``at``."""
        return datetime.fromisoformat(self.not_after) <= at

    def active(self, at: datetime) -> bool:
        """Return whether the certificate is unrevoked and unexpired at ``at``."""
        return self.revoked_at is None and not self.expired(at)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _check_host(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not HOST_PATTERN.match(host):
        raise ConfigError(f"invalid server host name {host!r}", hint="give DNS names or IP addresses")
    return x509.DNSName(host.lower())


def check_name(name: str, role: Role) -> str:
    """Return ``name`` if it may be the common name of a certificate of ``role``, else raise."""
    if role is Role.SERVER:
        _check_host(name)
        return name
    # Device and controller names become MQTT user names matched by the ACL: the id alphabet.
    return check_id(name, f"{role.value} name")


def build_certificate(
    subject_cn: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    role: Role | None,
    not_before: datetime,
    not_after: datetime,
    hosts: tuple[str, ...] = (),
    organization: str = "Edge",
) -> x509.Certificate:
    """Sign a certificate: a CA when ``role`` is None (self-signed when ``issuer`` is None), else a leaf.

    No name checks here: :meth:`FleetPki.issue` checks them; tests use this to forge the
    certificates a careless or compromised CA could sign.
    """
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        x509.NameAttribute(NameOID.COMMON_NAME, subject_cn),
    ])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if role is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if role is Role.SERVER else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=False,
                              crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            # One purpose per certificate: a device certificate cannot serve as the broker's.
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if issuer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
        if role is Role.SERVER:
            names = [_check_host(h) for h in (subject_cn, *hosts)]
            unique = list(dict.fromkeys(names))
            builder = builder.add_extension(x509.SubjectAlternativeName(unique), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class FleetPki:
    """The CA of one fleet, in one folder. Create with :meth:`init`, reopen with :meth:`open`."""

    def __init__(self, folder: Path, clock: Clock = _now) -> None:
        self.folder = Path(folder)
        self.clock = clock
        if not self.ca_file.is_file() or not self.index_file.is_file():
            raise NotFoundError(f"no fleet CA in {self.folder}", hint="create one with `edge fleet certs init`")
        try:
            data = json.loads(self.index_file.read_text())
            self.fleet: str = data["fleet"]
            self._certs = [IssuedCert(**{**c, "role": Role(c["role"])}) for c in data["certificates"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.index_file} is unreadable or corrupt: {exc}") from exc

    # --- files -----------------------------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        """Return the CA certificate (give it to devices, controllers and the broker)."""
        return self.folder / "ca.pem"

    @property
    def ca_key_file(self) -> Path:
        """Return the CA private key (keep it offline)."""
        return self.folder / "ca.key"

    @property
    def crl_file(self) -> Path:
        """Return the certificate revocation list the broker loads."""
        return self.folder / "crl.pem"

    @property
    def index_file(self) -> Path:
        """Return the index of issued certificates."""
        return self.folder / "index.json"

    def path(self, relative: str) -> Path:
        """Return the absolute path of a file named in the index."""
        return self.folder / relative

    # --- creation --------------------------------------------------------------------------

    @classmethod
    def init(cls, folder: Path, fleet: str, *, days: int = CA_DAYS, clock: Clock = _now) -> "FleetPki":
        """Create a new CA (and an empty CRL) in ``folder``; refuse to overwrite one."""
        check_id(fleet, "fleet id")
        _check_days(days)
        folder = Path(folder)
        if (folder / "ca.pem").exists() or (folder / "ca.key").exists():
            raise ConfigError(f"{folder} already holds a fleet CA", hint="choose another --pki folder")
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        start = clock() - BACKDATE
        cert = build_certificate(f"Edge fleet CA {fleet}", key.public_key(), None, key, role=None,
                                 not_before=start, not_after=start + timedelta(days=days),
                                 organization=f"Edge fleet {fleet}")
        _write_private(folder / "ca.key", _key_pem(key))
        _write_public(folder / "ca.pem", _cert_pem(cert))
        _write_public(folder / "index.json", json.dumps({"fleet": fleet, "certificates": []}, indent=2).encode())
        pki = cls(folder, clock)
        pki.refresh_crl()
        return pki

    @classmethod
    def open(cls, folder: Path, clock: Clock = _now) -> "FleetPki":
        """Open an existing CA folder."""
        return cls(folder, clock)

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        try:
            cert = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
            key = serialization.load_pem_private_key(self.ca_key_file.read_bytes(), password=None)
        except FileNotFoundError as exc:
            raise NotFoundError(f"CA file {exc.filename} is missing",
                                hint="issuing and revoking need the CA key; run where it is kept") from exc
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot load the fleet CA from {self.folder}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{self.ca_key_file} is not an EC private key")
        return cert, key

    def _save_index(self) -> None:
        data = {"fleet": self.fleet,
                "certificates": [{**asdict(c), "role": c.role.value} for c in self._certs]}
        _write_public(self.index_file, json.dumps(data, indent=2).encode())

    # --- issuing and revoking --------------------------------------------------------------

    def issue(
        self,
        name: str,
        role: Role,
        *,
        days: int = LEAF_DAYS,
        hosts: tuple[str, ...] = (),
        replace: bool = False,
        valid_from: datetime | None = None,
    ) -> IssuedCert:
        """Issue a key and certificate for ``name``; refuse a second active one unless ``replace``.

        A replaced certificate stays valid until it expires or is revoked by serial, so a device
        can switch to its new key before the old one stops working.
        """
        role = Role(role)
        check_name(name, role)
        _check_days(days)
        if hosts and role is not Role.SERVER:
            raise ConfigError("host names (--host) only apply to server certificates")
        now = self.clock()
        clash = [c for c in self._certs if c.name == name and c.active(now)]
        other_role = [c for c in clash if c.role is not role]
        if other_role:
            raise ConfigError(f"{name!r} already holds an active {other_role[0].role.value} certificate",
                              hint="device and controller names must differ: the name is the MQTT user")
        if clash and not replace:
            raise ConfigError(f"{name!r} already has an active {role.value} certificate "
                              f"(serial {clash[0].serial})",
                              hint="pass --replace to issue a new one (the old stays valid until revoked)")
        ca_cert, ca_key = self._ca()
        key = ec.generate_private_key(ec.SECP256R1())
        start = (valid_from or now) - BACKDATE
        end = start + timedelta(days=days)
        if end > ca_cert.not_valid_after_utc:
            end = ca_cert.not_valid_after_utc  # a leaf cannot outlive its CA
        cert = build_certificate(name, key.public_key(), ca_cert, ca_key, role=role,
                                 not_before=start, not_after=end, hosts=hosts,
                                 organization=f"Edge fleet {self.fleet}")
        rel = f"issued/{role.value}/{name}"
        _write_private(self.folder / f"{rel}.key", _key_pem(key))
        _write_public(self.folder / f"{rel}.pem", _cert_pem(cert))
        issued = IssuedCert(name=name, role=role, serial=f"{cert.serial_number:x}",
                            not_before=start.isoformat(), not_after=end.isoformat(),
                            cert_file=f"{rel}.pem", key_file=f"{rel}.key")
        self._certs.append(issued)
        self._save_index()
        return issued

    def revoke(self, name: str | None = None, *, serial: str | None = None) -> list[IssuedCert]:
        """Revoke every unrevoked certificate of ``name`` (or the one ``serial``) and re-sign the CRL."""
        if (name is None) == (serial is None):
            raise ConfigError("revoke takes a name or a serial (exactly one of them)",
                              hint="`edge fleet certs revoke NAME` or `edge fleet certs revoke --serial HEX`")
        at = self.clock()
        hits = [i for i, c in enumerate(self._certs)
                if c.revoked_at is None and (c.name == name if name is not None else c.serial == serial.lower())]
        if not hits:
            what = f"name {name!r}" if name is not None else f"serial {serial}"
            raise NotFoundError(f"no unrevoked certificate with {what}",
                                hint="`edge fleet certs list` shows what was issued")
        for i in hits:
            c = self._certs[i]
            self._certs[i] = IssuedCert(**{**asdict(c), "revoked_at": at.isoformat()})
        self._save_index()
        self.refresh_crl()
        return [self._certs[i] for i in hits]

    def refresh_crl(self, days: int = CRL_DAYS) -> Path:
        """Re-sign the CRL with every revoked serial and a new next-update time."""
        _check_days(days)
        ca_cert, ca_key = self._ca()
        now = self.clock()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - BACKDATE)
            .next_update(now + timedelta(days=days))
        )
        for c in self._certs:
            if c.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(c.serial, 16))
                    .revocation_date(datetime.fromisoformat(c.revoked_at))
                    .build()
                )
        crl = builder.sign(ca_key, hashes.SHA256())
        _write_public(self.crl_file, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_file

    def crl_next_update(self) -> datetime:
        """Return when the current CRL expires (the broker then refuses every client)."""
        try:
            crl = x509.load_pem_x509_crl(self.crl_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {self.crl_file}: {exc}", hint="run `edge fleet certs crl`") from exc
        if crl.next_update_utc is None:
            raise ConfigError(f"{self.crl_file} has no next-update time", hint="run `edge fleet certs crl`")
        return crl.next_update_utc

    # --- queries ---------------------------------------------------------------------------

    def certificates(self) -> list[IssuedCert]:
        """Return every certificate issued, oldest first."""
        return list(self._certs)

    def names(self, role: Role) -> tuple[list[str], list[str]]:
        """Return (names with an active certificate, names whose every certificate is revoked) of ``role``."""
        now = self.clock()
        active = sorted({c.name for c in self._certs if c.role is role and c.active(now)})
        revoked = sorted({c.name for c in self._certs if c.role is role and c.revoked_at is not None} - set(active))
        return active, revoked

    def current(self, name: str, role: Role) -> IssuedCert:
        """Return the newest active certificate of ``name``."""
        now = self.clock()
        for c in reversed(self._certs):
            if c.name == name and c.role is Role(role) and c.active(now):
                return c
        raise NotFoundError(f"no active {Role(role).value} certificate for {name!r}",
                            hint=f"issue one with `edge fleet certs issue {name} --role {Role(role).value}`")


def _check_days(days: int) -> None:
    if not isinstance(days, int) or days < 1 or days > 36500:
        raise ConfigError(f"invalid validity of {days!r} days", hint="use 1 to 36500")
