"""Mosquitto configuration for one fleet: listeners, TLS, limits and per-device access control.

Two listeners, each with its own ACL (``per_listener_settings true``):

* the **device listener** (``port``, all interfaces by default): one ACL block per registered
  device, naming its own topics only. A device may write its ``status``, ``telemetry``,
  ``events``, ``reported`` and ``resp`` topics and read its ``desired`` and ``cmd/+`` topics,
  and read back its own retained ``status`` (the agent re-announces its birth when a stale will
  overwrote it); nothing else, not even wildcards over its own subtree. The client id is forced to the user
  name (``use_username_as_clientid``), so one device cannot knock another off by connecting
  with its client id.
* the **controller listener** (``controller_port``, loopback by default): the controller role
  reads every device's upward channels and writes every device's ``desired`` and ``cmd``
  topics. Client ids are free there because the controller runs several connections (shared
  subscriptions) under one identity.

Identities: with ``AuthMode.CERTS`` a client certificate signed by the fleet CA is required,
its common name is the user name (``use_identity_as_username``) and revoked serials are refused
through the CRL. With ``AuthMode.PASSWORD`` the user names and PBKDF2 hashes go to a password
file per listener. Either way the ACL lists registered names only, so a certificate or password
left behind by a revoked device grants nothing once the configuration is regenerated, even
before the CRL reaches the broker.

Every id passes :func:`edge.protocol.topics.check_id` first: ``+``, ``#``, ``/`` or ``$`` in a
user name would widen the rules written for it. Topic strings come from
:class:`edge.protocol.topics.Topics`, the one module that builds them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from edge.errors import ConfigError
from edge.protocol.messages import MAX_MESSAGE_BYTES
from edge.protocol.topics import Channel, Topics, check_id

# The largest MQTT packet accepted: the largest Edge message plus room for the topic and MQTT 5
# properties. Bundles travel over HTTP, never MQTT, so anything bigger is an attack or a bug.
MAX_PACKET_BYTES = MAX_MESSAGE_BYTES + 16 * 1024
# Per-client queue of QoS 1 messages: mosquitto's default of 1000 drops messages for a briefly
# slow controller ingesting a whole fleet (REFERENCE.md); the byte cap bounds broker memory.
MAX_QUEUED_MESSAGES = 100_000
MAX_QUEUED_BYTES = 256 * 1024 * 1024
# Persistent sessions of clients gone longer than this are dropped; desired state is retained,
# so a device that comes back later still converges.
PERSISTENT_CLIENT_EXPIRATION = "30d"
# Seconds between saves of the in-memory state: QoS 1 messages and retained state survive a
# clean restart always, and a crash loses at most this much.
AUTOSAVE_INTERVAL_S = 60
# Iterations of mosquitto's PBKDF2-SHA512 password hash ($7$, what mosquitto_passwd writes).
# Generated passwords carry 192 bits, so the broker's per-connect cost is kept low on purpose.
PASSWORD_ITERATIONS = 101
# Shortest password accepted from a credentials file: shorter ones fall to offline guessing.
MIN_PASSWORD_CHARS = 16
# Minimum TLS version (mosquitto's tls_version sets the minimum since 2.0).
TLS_MIN_VERSION = "tlsv1.2"
DEFAULT_PORT = 8883
DEFAULT_CONTROLLER_PORT = 8884

DEVICE_WRITES = (Channel.STATUS, Channel.TELEMETRY, Channel.EVENTS, Channel.REPORTED, Channel.RESP)
# Written channels a device may also read back: its own retained status (edge/agent/fleet_link.py
# subscribes to it to repair a stale will that overwrote its birth).
DEVICE_READS_BACK = (Channel.STATUS,)
CONTROLLER_READS = (Channel.STATUS, Channel.TELEMETRY, Channel.EVENTS, Channel.REPORTED, Channel.RESP,
                    Channel.DESIRED)


class AuthMode(str, Enum):
    """How clients prove who they are."""

    CERTS = "certs"  # a client certificate per device/controller; CN = user name
    PASSWORD = "password"  # user name and password, checked against a password file


@dataclass(frozen=True)
class TlsFiles:
    """PEM files the broker's listeners use."""

    ca_file: Path  # verifies client certificates (the fleet CA)
    cert_file: Path  # the broker's own certificate
    key_file: Path
    crl_file: Path | None = None  # revoked client certificates

    def check(self) -> None:
        """Raise ConfigError naming any file that does not exist."""
        for what, path in (("CA", self.ca_file), ("server certificate", self.cert_file),
                           ("server key", self.key_file), ("CRL", self.crl_file)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"TLS {what} file {path} does not exist")


@dataclass(frozen=True)
class BrokerSpec:
    """Everything the generated configuration depends on."""

    fleet: str
    devices: tuple[str, ...]
    controllers: tuple[str, ...] = ("controller",)
    revoked: tuple[str, ...] = ()  # left out of the ACL and password file even when listed in devices
    root: str = "edge"
    auth: AuthMode = AuthMode.CERTS
    tls: TlsFiles | None = None
    port: int = DEFAULT_PORT
    bind: str = "0.0.0.0"
    controller_port: int = DEFAULT_CONTROLLER_PORT
    # The controller listener does not bind client ids to user names: keep it off device networks.
    controller_bind: str = "127.0.0.1"
    allow_plaintext: bool = False  # password auth without TLS: lab use only
    run_as: str | None = None  # mosquitto's `user` (the account it drops root privileges to)
    log_file: Path | None = None  # None: stderr (journald under systemd)
    data_dir: Path | None = None  # persistence folder; default <deploy dir>/data

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "auth", AuthMode(self.auth))
        except ValueError:
            raise ConfigError(f"unknown auth mode {self.auth!r}", hint="use certs or password") from None
        Topics(self.fleet, self.root)  # checks the fleet id and the root
        for name in (*self.devices, *self.revoked):
            check_id(name, "device id")
        for name in self.controllers:
            check_id(name, "controller name")
        if not self.controllers:
            raise ConfigError("a broker configuration needs at least one controller name")
        for what, names in (("device", self.devices), ("controller", self.controllers)):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ConfigError(f"{what} id(s) listed twice: {', '.join(dupes)}")
        both = sorted(set(self.devices) & set(self.controllers))
        if both:
            raise ConfigError(f"name(s) both a device and a controller: {', '.join(both)}",
                              hint="the name is the MQTT user name; one name, one role")
        for what, port in (("port", self.port), ("controller port", self.controller_port)):
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise ConfigError(f"invalid {what} {port!r}", hint="use 1 to 65535")
        if self.port == self.controller_port:
            raise ConfigError(f"the device and controller listeners both use port {self.port}")
        for what, value in (("bind address", self.bind), ("controller bind address", self.controller_bind),
                            ("run-as user", self.run_as or "x")):
            if not value or any(c.isspace() for c in value) or "#" in value:
                raise ConfigError(f"invalid {what} {value!r}")
        for what, path in (("log file", self.log_file), ("data folder", self.data_dir)):
            if path is not None:
                check_config_path(Path(path), what)
        if self.auth is AuthMode.CERTS and self.tls is None:
            raise ConfigError("certificate authentication needs TLS files (CA, server certificate and key)",
                              hint="create them with `edge fleet certs init` and `edge fleet certs issue`")
        if self.auth is AuthMode.PASSWORD and self.tls is None and not self.allow_plaintext:
            raise ConfigError("password authentication without TLS sends passwords in clear text",
                              hint="give TLS files, or pass --insecure-plaintext for a lab broker")

    @property
    def topics(self) -> Topics:
        """Return the topic builder of the fleet."""
        return Topics(self.fleet, self.root)

    def active_devices(self) -> list[str]:
        """Return the devices that get access: listed and not revoked, sorted."""
        revoked = set(self.revoked)
        return sorted(d for d in self.devices if d not in revoked)


def check_config_path(path: Path, what: str) -> Path:
    """Return ``path`` if mosquitto.conf can name it: absolute, no whitespace or '#'."""
    text = str(path)
    if not Path(path).is_absolute() or any(c.isspace() for c in text) or "#" in text:
        raise ConfigError(f"{what} {text!r} cannot go into mosquitto.conf",
                          hint="use an absolute path without spaces or '#'")
    return path


@dataclass(frozen=True)
class BrokerFiles:
    """What :func:`write_broker_config` wrote."""

    config: Path
    device_acl: Path
    controller_acl: Path
    password_files: tuple[Path, ...]
    tls_files: tuple[Path, ...]
    devices: tuple[str, ...]
    revoked: tuple[str, ...]


def render_device_acl(spec: BrokerSpec) -> str:
    """Return the device listener's ACL: one block per active device, its own topics only."""
    t = spec.topics
    lines = [
        f"# Device ACL of fleet {spec.fleet} ({t.base}), generated by `edge fleet broker-config`.",
        "# Regenerate instead of editing. No rule before the first `user` line: anonymous gets nothing.",
        "# No `pattern` rules: every grant names one registered device, so a certificate or password",
        "# for an unlisted or revoked name gets no access at all.",
    ]
    revoked = sorted(set(spec.revoked))
    if revoked:
        lines.append(f"# revoked (no access): {', '.join(revoked)}")
    for device in spec.active_devices():
        lines += ["", f"user {device}"]
        lines += [f"topic {'readwrite' if ch in DEVICE_READS_BACK else 'write'} {t.device(device, ch)}"
                  for ch in DEVICE_WRITES]
        lines += [f"topic read {t.device(device, Channel.DESIRED)}", f"topic read {t.commands_filter(device)}"]
    return "\n".join(lines) + "\n"


def render_controller_acl(spec: BrokerSpec) -> str:
    """Return the controller listener's ACL: read every device's reports, write desired and cmd."""
    t = spec.topics
    lines = [
        f"# Controller ACL of fleet {spec.fleet} ({t.base}), generated by `edge fleet broker-config`.",
        "# Regenerate instead of editing. Anonymous clients get nothing.",
    ]
    for name in sorted(spec.controllers):
        lines += ["", f"user {name}"]
        lines += [f"topic read {t.fleet_filter(ch)}" for ch in CONTROLLER_READS]
        lines += [f"topic write {t.fleet_filter(Channel.DESIRED)}", f"topic write {t.fleet_filter(Channel.CMD)}"]
    return "\n".join(lines) + "\n"


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PASSWORD_ITERATIONS) -> str:
    """Return a mosquitto 2.0 password hash (``$7$``: PBKDF2-SHA512), as mosquitto_passwd writes."""
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def new_password() -> str:
    """Return a random password (192 bits, URL-safe)."""
    return secrets.token_urlsafe(24)


def render_password_file(users: dict[str, str]) -> str:
    """Return a mosquitto password file for ``{user: password}``."""
    lines = []
    for user in sorted(users):
        check_id(user, "user name")
        lines.append(f"{user}:{hash_password(users[user])}")
    return "\n".join(lines) + "\n"


def load_credentials(path: Path) -> dict[str, str]:
    """Read a credentials file (JSON ``{user: password}``); an absent file is empty."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read credentials file {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ConfigError(f"credentials file {path} must map user names to password strings")
    for user, password in data.items():
        check_id(user, "user name")
        if len(password) < MIN_PASSWORD_CHARS:
            raise ConfigError(f"the password of {user!r} in {path} is shorter than {MIN_PASSWORD_CHARS} characters",
                              hint="delete it from the file and a random one is generated")
    return data


def complete_credentials(spec: BrokerSpec, path: Path) -> dict[str, str]:
    """Give every active device and controller a password in the credentials file; drop the rest.

    Existing passwords are kept; revoked and unlisted names are removed. The file is written
    with mode 0600: it holds the secrets each device and controller must be given.
    """
    known = load_credentials(path)
    wanted = [*spec.active_devices(), *spec.controllers]
    creds = {name: known.get(name) or new_password() for name in wanted}
    _write(Path(path), json.dumps(creds, indent=2, sort_keys=True) + "\n", private=True)
    return creds


def render_config(spec: BrokerSpec, deploy_dir: Path) -> str:
    """Return mosquitto.conf, with file paths as they will be on the broker host (``deploy_dir``)."""
    d = Path(deploy_dir)
    data_dir = spec.data_dir or d / "data"
    out = [
        f"# Mosquitto configuration of Edge fleet {spec.fleet} ({spec.topics.base}).",
        "# Generated by `edge fleet broker-config`; regenerate instead of editing, then reload",
        "# (SIGHUP: ACLs, password files, certificates and CRL) or restart mosquitto.",
        "",
        "# Each listener has its own ACL: device certificates get nothing on the controller",
        "# listener, the controller gets nothing on the device listener.",
        "per_listener_settings true",
        "",
        "# QoS 1 commands and retained state survive a restart.",
        "persistence true",
        f"persistence_location {data_dir}/",
        f"autosave_interval {AUTOSAVE_INTERVAL_S}",
        f"persistent_client_expiration {PERSISTENT_CLIENT_EXPIRATION}",
        "",
        "# Limits: Edge messages are at most a few hundred KiB; bundles travel over HTTP.",
        f"max_packet_size {MAX_PACKET_BYTES}",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
        "# Commands and acks are small packets: Nagle's algorithm would hold each up to ~40 ms.",
        "set_tcp_nodelay true",
        "",
        f"log_dest {'file ' + str(spec.log_file) if spec.log_file else 'stderr'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
    ]
    if spec.run_as:
        out += ["", f"user {spec.run_as}"]
    out += ["", "# --- device listener ---", *_listener(spec, deploy_dir, spec.port, spec.bind, "devices", True)]
    out += ["", "# --- controller listener (keep it on a private network: client ids are not bound) ---",
            *_listener(spec, deploy_dir, spec.controller_port, spec.controller_bind, "controller", False)]
    return "\n".join(out) + "\n"


def _listener(spec: BrokerSpec, d: Path, port: int, bind: str, role: str, bind_client_id: bool) -> list[str]:
    lines = [
        f"listener {port} {bind}",
        "protocol mqtt",
        "allow_anonymous false",
        "allow_zero_length_clientid false",
        f"acl_file {Path(d) / f'{role}.acl'}",
    ]
    if bind_client_id:
        lines.append("use_username_as_clientid true")
    if spec.auth is AuthMode.PASSWORD:
        lines.append(f"password_file {Path(d) / f'{role}.passwd'}")
    if spec.tls is not None:
        tls_dir = Path(d) / "tls"
        lines += [
            f"cafile {tls_dir / 'ca.pem'}",
            f"certfile {tls_dir / 'server.pem'}",
            f"keyfile {tls_dir / 'server.key'}",
            f"tls_version {TLS_MIN_VERSION}",
        ]
        if spec.auth is AuthMode.CERTS:
            lines += ["require_certificate true", "use_identity_as_username true"]
            if spec.tls.crl_file is not None:
                lines.append(f"crlfile {tls_dir / 'crl.pem'}")
    return lines


def _write(path: Path, text: str | bytes, *, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(text.encode() if isinstance(text, str) else text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_broker_config(
    spec: BrokerSpec,
    out_dir: Path,
    *,
    deploy_dir: Path | None = None,
    credentials: dict[str, str] | None = None,
) -> BrokerFiles:
    """Write mosquitto.conf, both ACLs, password files (password mode) and TLS copies into ``out_dir``.

    ``deploy_dir`` is where the folder will live on the broker host (default: ``out_dir``);
    ``credentials`` maps every active device and controller to its password (password mode).
    The output is regenerated as a whole: files a previous run wrote are replaced.
    """
    out = Path(out_dir).resolve()
    deploy = check_config_path(Path(deploy_dir) if deploy_dir is not None else out, "deploy folder")
    passwords: list[Path] = []
    if spec.auth is AuthMode.PASSWORD:
        creds = credentials or {}
        missing = [n for n in (*spec.active_devices(), *spec.controllers) if n not in creds]
        if missing:
            raise ConfigError(f"no password for {', '.join(missing)}", hint="pass a credentials file")
        for role, names in (("devices", spec.active_devices()), ("controller", list(spec.controllers))):
            path = out / f"{role}.passwd"
            _write(path, render_password_file({n: creds[n] for n in names}), private=True)
            passwords.append(path)
    else:
        for role in ("devices", "controller"):
            (out / f"{role}.passwd").unlink(missing_ok=True)
    tls_written: list[Path] = []
    if spec.tls is not None:
        spec.tls.check()
        tls_dir = out / "tls"
        for src, name, private in ((spec.tls.ca_file, "ca.pem", False), (spec.tls.cert_file, "server.pem", False),
                                   (spec.tls.key_file, "server.key", True), (spec.tls.crl_file, "crl.pem", False)):
            dest = tls_dir / name
            if src is None:
                dest.unlink(missing_ok=True)
                continue
            if Path(src).resolve() != dest:
                _write(dest, Path(src).read_bytes(), private=private)
            tls_written.append(dest)
    if spec.data_dir is None:
        (out / "data").mkdir(parents=True, exist_ok=True)
    device_acl, controller_acl = out / "devices.acl", out / "controller.acl"
    _write(device_acl, render_device_acl(spec))
    _write(controller_acl, render_controller_acl(spec))
    config = out / "mosquitto.conf"
    _write(config, render_config(spec, deploy))
    return BrokerFiles(config, device_acl, controller_acl, tuple(passwords), tuple(tls_written),
                       tuple(spec.active_devices()), tuple(sorted(set(spec.revoked))))
