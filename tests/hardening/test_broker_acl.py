"""Per-device access control, proved against a real mosquitto run from the generated configuration.

One broker for the module (certificate authentication, the production setup). A privileged
observer (test-only ACL block: read ``#``) watches every topic. Absence is proved without sleeps:
after the action under test is acknowledged, the controller publishes a sentinel that the
watching client may read; mosquitto is single-threaded and keeps per-subscriber order, so when
the sentinel arrives, a message that was going to be delivered already has been.

Subscriptions to forbidden filters: mosquitto 2.0 grants the SUBACK and then drops each
message the ACL does not let the subscriber read (other versions answer 0x80/0x87); the tests
accept either SUBACK and assert on what is delivered.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from edge.errors import ConfigError
from edge.fleet.brokerconf import (
    AuthMode,
    BrokerSpec,
    TlsFiles,
    complete_credentials,
    hash_password,
    render_controller_acl,
    render_device_acl,
    write_broker_config,
)
from edge.fleet.pki import FleetPki, Role
from edge.transport.embedded_broker import free_port
from tests.fixtures.broker import MOSQUITTO
from tests.hardening.mqtt_probe import NOT_AUTHORIZED, FleetBroker, Identity, Probe, forge, identity, token

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

FLEET = "f1"
B = f"edge/v1/{FLEET}"
# Seconds to wait for a message that must not come, where no sentinel can reach the client
# (identities with no read access at all). A delivery would take milliseconds.
ABSENCE_S = 0.3


@dataclass
class World:
    """The module's broker, CA and long-lived privileged clients."""

    pki: FleetPki
    broker: FleetBroker
    ids: dict[str, Identity]
    observer: Probe
    controller: Probe
    tmp: Path
    spec: BrokerSpec

    def regenerate(self, spec: BrokerSpec) -> None:
        """Rewrite the configuration (with the observer's block) and reload the broker."""
        files = write_broker_config(spec, self.broker.files.config.parent)
        _add_observer(files.controller_acl)
        self.broker.reload()

    def probe(self, actor: str, protocol: int = 5, **kw: object) -> Probe:
        """Connect as ``actor`` ("name" or "name@device" / "name@controller" for the listener)."""
        name, _, listener = actor.partition("@")
        if not listener:
            listener = "controller" if name == "controller" else "device"
        port = self.broker.controller_port if listener == "controller" else self.broker.port
        p = Probe(port, ident=self.ids[name], protocol=protocol, client_id=kw.pop("client_id", None), **kw)  # type: ignore[arg-type]
        assert p.connect(), f"{actor} could not connect: {p.error or p.connack or p.disconnected}"
        return p

    def sentinel_to(self, device: str) -> bytes:
        """Publish a sentinel command to ``device`` from the controller and return it."""
        s = token()
        assert self.controller.publish(f"{B}/{device}/cmd/ping", s) == 0
        return s


def _add_observer(controller_acl: Path) -> None:
    with controller_acl.open("a") as fh:  # the tests' privileged observer
        fh.write("\nuser observer\ntopic read #\ntopic read $SYS/#\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("acl")
    pki = FleetPki.init(tmp / "pki", FLEET)
    ids: dict[str, Identity] = {}
    for name in ("dev-a", "dev-b", "dev-a2", "dev-r", "dev-z"):
        ids[name] = identity(pki, pki.issue(name, Role.DEVICE))
    for name in ("controller", "observer"):
        ids[name] = identity(pki, pki.issue(name, Role.CONTROLLER))
    server = pki.issue("127.0.0.1", Role.SERVER, hosts=("localhost",))
    pki.revoke("dev-r")
    # Certificates a careless CA could sign: wildcard and separator characters in the name.
    for key, cn in (("forged-plus", "+"), ("forged-hash", "#"), ("forged-slash", "dev-a/#")):
        ids[key] = forge(pki, cn, tmp / "forged")
    port, cport = free_port(), free_port()
    spec = BrokerSpec(
        fleet=FLEET,
        # dev-r is still in the registry but revoked; dev-z holds a CA-signed certificate but was
        # never registered (a CRL not yet updated, a certificate issued by mistake).
        devices=("dev-a", "dev-b", "dev-a2", "dev-r"),
        revoked=("dev-r",),
        controllers=("controller",),
        tls=TlsFiles(pki.ca_file, pki.path(server.cert_file), pki.path(server.key_file), pki.crl_file),
        port=port, bind="127.0.0.1", controller_port=cport, run_as="root",
        log_file=tmp / "broker" / "mosquitto.log",
    )
    files = write_broker_config(spec, tmp / "broker")
    _add_observer(files.controller_acl)
    broker = FleetBroker(files, port, cport, tmp / "broker" / "mosquitto.log").start()
    observer = Probe(cport, ident=ids["observer"])
    controller = Probe(cport, ident=ids["controller"])
    try:
        assert observer.connect() and controller.connect()
        assert observer.subscribe("#") == [1]
        yield World(pki, broker, ids, observer, controller, tmp, spec)
    finally:
        observer.close()
        controller.close()
        broker.stop()


# --- the matrix ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pub:
    """``actor`` publishes to ``topic``; ``allowed`` says whether the observer must get it."""

    actor: str
    topic: str
    allowed: bool
    retain: bool = False


@dataclass(frozen=True)
class Sub:
    """``actor`` subscribes to ``filter``; ``source`` publishes to ``topic``; may ``actor`` read it?"""

    actor: str
    filter: str
    source: str
    topic: str
    allowed: bool
    retained: bool = False  # published (retained) before the subscription


PUBLISH = {
    # a device writes its own upward channels
    "dev-own-status": Pub("dev-a", f"{B}/dev-a/status", True),
    "dev-own-status-retained": Pub("dev-a", f"{B}/dev-a/status", True, retain=True),
    "dev-own-telemetry": Pub("dev-a", f"{B}/dev-a/telemetry", True),
    "dev-own-events": Pub("dev-a", f"{B}/dev-a/events", True),
    "dev-own-reported": Pub("dev-a", f"{B}/dev-a/reported", True),
    "dev-own-resp": Pub("dev-a", f"{B}/dev-a/resp", True),
    # ... but not its own downward channels
    "dev-own-desired": Pub("dev-a", f"{B}/dev-a/desired", False),
    "dev-own-cmd": Pub("dev-a", f"{B}/dev-a/cmd/deploy", False),
    # ... nor another device's topics
    "dev-other-status": Pub("dev-a", f"{B}/dev-b/status", False),
    "dev-other-status-retained": Pub("dev-a", f"{B}/dev-b/status", False, retain=True),
    "dev-other-telemetry": Pub("dev-a", f"{B}/dev-b/telemetry", False),
    "dev-other-events": Pub("dev-a", f"{B}/dev-b/events", False),
    "dev-other-reported": Pub("dev-a", f"{B}/dev-b/reported", False),
    "dev-other-resp": Pub("dev-a", f"{B}/dev-b/resp", False),
    "dev-other-desired": Pub("dev-a", f"{B}/dev-b/desired", False),
    "dev-other-cmd": Pub("dev-a", f"{B}/dev-b/cmd/restart", False),
    "dev-prefix-sibling": Pub("dev-a", f"{B}/dev-a2/status", False),
    # ... nor anything outside its exact channels
    "dev-own-deeper-level": Pub("dev-a", f"{B}/dev-a/status/extra", False),
    "dev-own-unknown-channel": Pub("dev-a", f"{B}/dev-a/logs", False),
    "dev-fleet-level": Pub("dev-a", f"{B}/status", False),
    "dev-other-fleet": Pub("dev-a", "edge/v1/f2/dev-a/status", False),
    "dev-other-root": Pub("dev-a", "other/v1/f1/dev-a/status", False),
    "dev-sys": Pub("dev-a", "$SYS/broker/edge", False),
    # the controller writes desired state and commands of every device, nothing else
    "ctl-desired": Pub("controller", f"{B}/dev-a/desired", True),
    "ctl-desired-retained": Pub("controller", f"{B}/dev-b/desired", True, retain=True),
    "ctl-cmd": Pub("controller", f"{B}/dev-b/cmd/deploy", True),
    "ctl-forge-status": Pub("controller", f"{B}/dev-a/status", False),
    "ctl-forge-telemetry": Pub("controller", f"{B}/dev-a/telemetry", False),
    "ctl-forge-reported": Pub("controller", f"{B}/dev-a/reported", False),
    "ctl-forge-resp": Pub("controller", f"{B}/dev-a/resp", False),
    "ctl-other-fleet": Pub("controller", "edge/v1/f2/dev-a/desired", False),
    "ctl-other-root": Pub("controller", "other/v1/f1/dev-a/desired", False),
    # identities with no grant on the listener they use
    "dev-on-controller-listener": Pub("dev-a@controller", f"{B}/dev-a/status", False),
    "ctl-on-device-listener": Pub("controller@device", f"{B}/dev-a/desired", False),
    "unregistered-cert": Pub("dev-z", f"{B}/dev-z/status", False),
    "forged-cn-plus": Pub("forged-plus", f"{B}/dev-a/status", False),
    "forged-cn-hash": Pub("forged-hash", f"{B}/dev-b/status", False),
    "forged-cn-slash": Pub("forged-slash", f"{B}/dev-a/status", False),
}

SUBSCRIBE = {
    # a device reads its own desired state and commands
    "dev-read-own-desired": Sub("dev-a", f"{B}/dev-a/desired", "controller", f"{B}/dev-a/desired", True),
    "dev-read-own-desired-retained": Sub("dev-a", f"{B}/dev-a/desired", "controller", f"{B}/dev-a/desired",
                                         True, retained=True),
    "dev-read-own-cmd-wildcard": Sub("dev-a", f"{B}/dev-a/cmd/+", "controller", f"{B}/dev-a/cmd/deploy", True),
    "dev-read-own-cmd-exact": Sub("dev-a", f"{B}/dev-a/cmd/restart", "controller", f"{B}/dev-a/cmd/restart", True),
    # ... and nothing of another device, however the filter is written
    "dev-read-other-desired": Sub("dev-a", f"{B}/dev-b/desired", "controller", f"{B}/dev-b/desired", False),
    "dev-read-other-desired-retained": Sub("dev-a", f"{B}/dev-b/desired", "controller", f"{B}/dev-b/desired",
                                           False, retained=True),
    "dev-read-other-cmd": Sub("dev-a", f"{B}/dev-b/cmd/+", "controller", f"{B}/dev-b/cmd/deploy", False),
    "dev-read-fleet-desired-wildcard": Sub("dev-a", f"{B}/+/desired", "controller", f"{B}/dev-b/desired", False),
    "dev-read-fleet-cmd-wildcard": Sub("dev-a", f"{B}/+/cmd/+", "controller", f"{B}/dev-b/cmd/ping", False),
    "dev-read-fleet-hash": Sub("dev-a", f"{B}/#", "controller", f"{B}/dev-b/desired", False),
    "dev-read-everything": Sub("dev-a", "#", "controller", f"{B}/dev-b/cmd/ping", False),
    "dev-read-other-subtree": Sub("dev-a", f"{B}/dev-b/#", "controller", f"{B}/dev-b/desired", False),
    "dev-read-sibling-subtree": Sub("dev-a", f"{B}/dev-a2/#", "controller", f"{B}/dev-a2/desired", False),
    "dev-read-other-status": Sub("dev-a", f"{B}/dev-b/status", "dev-b", f"{B}/dev-b/status", False),
    "dev-read-fleet-telemetry": Sub("dev-a", f"{B}/+/telemetry", "dev-b", f"{B}/dev-b/telemetry", False),
    "dev-read-shared-telemetry": Sub("dev-a", f"$share/g/{B}/+/telemetry", "dev-b", f"{B}/dev-b/telemetry", False),
    "dev-read-own-status": Sub("dev-a", f"{B}/dev-a/status", "dev-a", f"{B}/dev-a/status", True),  # the agent's will repair
    "dev-read-own-telemetry": Sub("dev-a", f"{B}/dev-a/telemetry", "dev-a", f"{B}/dev-a/telemetry", False),
    "dev-read-own-resp-via-hash": Sub("dev-a", f"{B}/dev-a/#", "dev-a", f"{B}/dev-a/resp", False),
    # the controller reads every device's upward channels, not the commands
    "ctl-read-status": Sub("controller", f"{B}/+/status", "dev-a", f"{B}/dev-a/status", True),
    "ctl-read-telemetry": Sub("controller", f"{B}/+/telemetry", "dev-b", f"{B}/dev-b/telemetry", True),
    "ctl-read-shared-telemetry": Sub("controller", f"$share/ingest/{B}/+/telemetry", "dev-a",
                                     f"{B}/dev-a/telemetry", True),
    "ctl-read-events": Sub("controller", f"{B}/+/events", "dev-a", f"{B}/dev-a/events", True),
    "ctl-read-resp": Sub("controller", f"{B}/+/resp", "dev-b", f"{B}/dev-b/resp", True),
    "ctl-read-reported-retained": Sub("controller", f"{B}/+/reported", "dev-a", f"{B}/dev-a/reported", True,
                                      retained=True),
    "ctl-read-cmd": Sub("controller", f"{B}/+/cmd/+", "controller", f"{B}/dev-b/cmd/ping", False),
    # identities without grants read nothing
    "unregistered-cert-read-own": Sub("dev-z", f"{B}/dev-z/#", "controller", f"{B}/dev-z/desired", False),
    "forged-cn-plus-read-commands": Sub("forged-plus", f"{B}/+/cmd/+", "controller", f"{B}/dev-b/cmd/ping", False),
}

PROTOCOLS = [pytest.param(5, id="mqtt5"), pytest.param(4, id="mqtt311")]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", list(PUBLISH.values()), ids=list(PUBLISH))
def test_publish_matrix(world: World, case: Pub, protocol: int) -> None:
    payload = token()
    with world.probe(case.actor, protocol) as actor:
        rc = actor.publish(case.topic, payload, retain=case.retain)
    sentinel = world.sentinel_to("dev-a")
    assert world.observer.wait_for(sentinel)
    delivered = world.observer.got(payload)
    assert delivered == ([case.topic] if case.allowed else []), delivered
    if protocol == 5:  # MQTT 5 tells the publisher; 3.1.1 can only drop silently
        assert (rc == NOT_AUTHORIZED) != case.allowed, f"PUBACK reason {rc:#x}"


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", list(SUBSCRIBE.values()), ids=list(SUBSCRIBE))
def test_subscribe_matrix(world: World, case: Sub, protocol: int) -> None:
    payload = token()
    name = case.actor.partition("@")[0]
    device_actor = name.startswith("dev-") and name in {"dev-a", "dev-b", "dev-a2"}
    with world.probe(case.actor, protocol) as actor:
        if device_actor:  # the sentinel's way in
            actor.subscribe(f"{B}/{name}/cmd/+")
        source = actor if case.source == case.actor else None

        def send() -> None:
            if source is not None:
                source.publish(case.topic, payload, retain=case.retained)
            else:
                with world.probe(case.source) as other:
                    other.publish(case.topic, payload, retain=case.retained)

        if case.retained:
            send()
        codes = actor.subscribe(case.filter)
        if not case.retained:
            send()
        assert world.observer.wait_for(payload), "the source's message never reached the broker"
        if device_actor:
            assert actor.wait_for(world.sentinel_to(name))
        elif case.allowed:
            assert actor.wait_for(payload)
        else:
            actor.wait_for(payload, timeout=ABSENCE_S)
        got = actor.got(payload)
    if case.allowed:
        assert got and set(got) == {case.topic}
        assert all(c < 0x80 for c in codes)
    else:
        assert got == [], f"read {got} through {case.filter} (SUBACK {codes})"


def test_matrix_is_at_least_forty_cases() -> None:
    assert len(PUBLISH) + len(SUBSCRIBE) >= 40


# --- connections ----------------------------------------------------------------------------


def test_revoked_device_is_refused_and_a_valid_one_is_not(world: World) -> None:
    revoked = Probe(world.broker.port, ident=world.ids["dev-r"])
    assert not revoked.connect()
    revoked.close()
    with world.probe("dev-a"):  # same CA, same listener, unrevoked: the control
        pass


def test_a_device_cannot_take_over_another_devices_client_id(world: World) -> None:
    with world.probe("dev-b") as victim:
        with world.probe("dev-a", client_id="dev-b") as thief:
            # The broker renamed the thief's session to its own user name: the victim stays on.
            assert thief.publish(f"{B}/dev-a/telemetry", token()) == 0
            victim.subscribe(f"{B}/dev-b/cmd/+")
            assert victim.wait_for(world.sentinel_to("dev-b"))
            assert victim.disconnected is None


def test_a_device_will_reaches_its_own_status_only(world: World) -> None:
    own, other = token(), token()
    a = world.probe("dev-a", will=(f"{B}/dev-a/status", own))
    a.drop()
    assert world.observer.wait_for(own)
    b = Probe(world.broker.port, ident=world.ids["dev-b"], will=(f"{B}/dev-a/status", other))
    if b.connect():  # mosquitto 2.0 accepts the CONNECT and checks the will when publishing it
        b.drop()
    else:
        b.close()
    assert world.observer.wait_for(world.sentinel_to("dev-a"))
    assert world.observer.got(other) == []


def test_sys_topics_reach_the_observer_but_not_a_device(world: World) -> None:
    with Probe(world.broker.controller_port, ident=world.ids["observer"]) as obs:  # the control
        assert obs.connect()
        obs.subscribe("$SYS/broker/version")
        assert obs.wait_topic("$SYS/broker/version")
    with world.probe("dev-a") as dev:
        dev.subscribe(f"{B}/dev-a/cmd/+")
        dev.subscribe("$SYS/#")
        assert dev.wait_for(world.sentinel_to("dev-a"))
        assert [t for t in dev.topics() if t.startswith("$SYS")] == []


def test_revocation_takes_effect_on_reload_for_connected_and_new_sessions(world: World) -> None:
    """Revoke, regenerate, SIGHUP: the open session loses its grants (ACL), a reconnect is refused (CRL)."""
    cert = world.pki.issue("dev-c", Role.DEVICE)
    ident = identity(world.pki, cert)
    spec = dataclasses.replace(world.spec, devices=(*world.spec.devices, "dev-c"))
    world.regenerate(spec)
    with Probe(world.broker.port, ident=ident) as dev:
        assert dev.connect()
        before = token()
        assert dev.publish(f"{B}/dev-c/telemetry", before) == 0
        assert world.observer.wait_for(before)
        world.pki.revoke("dev-c")
        active, revoked = world.pki.names(Role.DEVICE)
        world.regenerate(dataclasses.replace(spec, revoked=(*spec.revoked, *revoked)))
        assert "user dev-c" not in world.broker.files.device_acl.read_text()
        after = token()
        assert dev.publish(f"{B}/dev-c/telemetry", after) == NOT_AUTHORIZED
        assert world.observer.wait_for(world.sentinel_to("dev-a"))
        assert world.observer.got(after) == []
    again = Probe(world.broker.port, ident=ident)
    assert not again.connect()
    again.close()


# --- generation --------------------------------------------------------------------------------

UNSAFE_IDS = ["dev+1", "dev#", "+", "#", "a/b", "dev/+", "$SYS", "$share", "dev 1", " dev", "dev\n1", "", "-dev",
              "dev\x00", "d" * 65, "dév"]


def _spec(**kw: object) -> BrokerSpec:
    base: dict[str, object] = {"fleet": FLEET, "devices": ("dev-a",), "auth": AuthMode.PASSWORD,
                               "allow_plaintext": True}
    base.update(kw)
    return BrokerSpec(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", UNSAFE_IDS, ids=[repr(b) for b in UNSAFE_IDS])
@pytest.mark.parametrize("where", ["devices", "controllers", "revoked", "fleet"])
def test_unsafe_ids_are_refused_at_generation(bad: str, where: str) -> None:
    value: object = bad if where == "fleet" else (bad,)
    with pytest.raises(ConfigError, match="invalid"):
        _spec(**{where: value})


@pytest.mark.parametrize(("kw", "message"), [
    ({"devices": ("dev-a", "dev-a")}, "listed twice"),
    ({"devices": ("controller",)}, "both a device and a controller"),
    ({"controllers": ()}, "at least one controller"),
    ({"port": 8883, "controller_port": 8883}, "both use port"),
    ({"port": 0}, "invalid port"),
    ({"root": "edge/#"}, "invalid topic root"),
    ({"bind": "0.0.0.0 # x"}, "invalid bind"),
    ({"auth": AuthMode.CERTS}, "needs TLS files"),
    ({"allow_plaintext": False}, "clear text"),
    ({"auth": "ldap"}, "unknown auth mode"),
    ({"log_file": Path("/var/log/my broker.log")}, "cannot go into mosquitto.conf"),
    ({"data_dir": Path("relative/data")}, "cannot go into mosquitto.conf"),
])
def test_inconsistent_specs_are_refused(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _spec(**kw)


def test_acls_grant_exact_topics_and_nothing_to_anonymous_or_revoked() -> None:
    spec = _spec(devices=("dev-a", "dev-b", "dev-x"), revoked=("dev-x",), controllers=("ctl-1", "ctl-2"))
    dev = render_device_acl(spec)
    body = [line for line in dev.splitlines() if line and not line.startswith("#")]
    assert body[0] == "user dev-a"  # nothing before the first user line: anonymous gets nothing
    assert not any(line.startswith("pattern") for line in body)
    assert "user dev-x" not in body and "# revoked (no access): dev-x" in dev
    grants = [line for line in body if line.startswith("topic")]
    assert len(grants) == 2 * 7
    assert all("+" not in line.split()[-1].rsplit("/", 1)[0] and "#" not in line for line in grants)
    assert f"topic read {B}/dev-a/cmd/+" in body and f"topic readwrite {B}/dev-a/status" in body
    assert f"topic write {B}/dev-a/telemetry" in body
    ctl = render_controller_acl(spec)
    assert ctl.count("\nuser ") == 2
    assert f"topic write {B}/+/cmd/+" in ctl and f"topic read {B}/+/cmd/+" not in ctl
    assert f"topic write {B}/+/status" not in ctl


def test_config_sets_limits_persistence_and_client_id_binding(tmp_path: Path) -> None:
    pki = FleetPki.init(tmp_path / "pki", FLEET)
    server = pki.issue("broker.example", Role.SERVER)
    spec = _spec(auth=AuthMode.CERTS, allow_plaintext=False,
                 tls=TlsFiles(pki.ca_file, pki.path(server.cert_file), pki.path(server.key_file), pki.crl_file))
    files = write_broker_config(spec, tmp_path / "out", deploy_dir=Path("/etc/mosquitto/edge"))
    conf = files.config.read_text()
    for line in ("persistence true", "persistence_location /etc/mosquitto/edge/data/", "max_packet_size ",
                 "max_queued_messages 100000", "tls_version tlsv1.2", "set_tcp_nodelay true",
                 "persistent_client_expiration 30d", "cafile /etc/mosquitto/edge/tls/ca.pem",
                 "crlfile /etc/mosquitto/edge/tls/crl.pem"):
        assert line in conf, line
    device_part, controller_part = conf.split("# --- controller listener")
    assert "use_username_as_clientid true" in device_part and "use_username_as_clientid" not in controller_part
    assert "listener 8884 127.0.0.1" in controller_part
    assert (tmp_path / "out" / "tls" / "server.key").stat().st_mode & 0o077 == 0


def test_password_hashes_are_mosquitto_pbkdf2() -> None:
    import base64
    import hashlib

    line = hash_password("correct horse battery staple", salt=b"0123456789ab")
    _, alg, iterations, salt, digest = line.split("$")
    assert alg == "7"
    expected = hashlib.pbkdf2_hmac("sha512", b"correct horse battery staple", base64.b64decode(salt), int(iterations))
    assert base64.b64decode(digest) == expected


# --- password authentication against the broker ---------------------------------------------


def test_password_fleet_end_to_end(tmp_path: Path) -> None:
    pki = FleetPki.init(tmp_path / "pki", FLEET)
    server = pki.issue("127.0.0.1", Role.SERVER)
    port, cport = free_port(), free_port()
    spec = BrokerSpec(
        fleet=FLEET, devices=("dev-a", "dev-b"), auth=AuthMode.PASSWORD,
        # Server authentication only: clients prove themselves with passwords.
        tls=TlsFiles(pki.ca_file, pki.path(server.cert_file), pki.path(server.key_file)),
        port=port, bind="127.0.0.1", controller_port=cport, run_as="root", log_file=tmp_path / "out" / "broker.log",
    )
    creds_file = tmp_path / "secrets" / "credentials.json"
    creds = complete_credentials(spec, creds_file)
    assert set(creds) == {"dev-a", "dev-b", "controller"} and creds_file.stat().st_mode & 0o077 == 0
    files = write_broker_config(spec, tmp_path / "out", credentials=creds)
    with files.controller_acl.open("a") as fh:
        fh.write("\nuser observer\ntopic read #\n")
    with files.password_files[1].open("a") as fh:
        fh.write(f"observer:{hash_password('observer-password-0123')}\n")
    broker = FleetBroker(files, port, cport, tmp_path / "out" / "broker.log").start()
    server_only = Identity(pki.ca_file, None, None)

    def probe(user: str | None, password: str | None, p: int = port) -> Probe:
        return Probe(p, ident=server_only, username=user, password=password)

    try:
        with probe("observer", "observer-password-0123", cport) as obs:
            assert obs.connect() and obs.subscribe("#") == [1]
            with probe("dev-a", creds["dev-a"]) as dev:
                assert dev.connect()
                own, other = token(), token()
                assert dev.publish(f"{B}/dev-a/telemetry", own) == 0
                assert dev.publish(f"{B}/dev-b/telemetry", other) == NOT_AUTHORIZED
                assert obs.wait_for(own) and obs.got(other) == []
            for user, password, p in (("dev-a", creds["dev-b"], port),  # another device's password
                                      ("dev-a", "wrong-password-0123456", port),
                                      ("dev-q", creds["dev-a"], port),  # unknown user
                                      (None, None, port),  # anonymous
                                      ("dev-a", creds["dev-a"], cport),  # device on the controller listener
                                      ("controller", creds["controller"], port)):  # and the other way round
                refused = probe(user, password, p)
                assert not refused.connect(), (user, p)
                refused.close()
            # Revoke dev-b: regenerate without it, reload; its password stops working.
            with probe("dev-b", creds["dev-b"]) as b:
                assert b.connect()
            spec2 = dataclasses.replace(spec, revoked=("dev-b",))
            creds2 = complete_credentials(spec2, creds_file)
            assert "dev-b" not in creds2 and creds2["dev-a"] == creds["dev-a"]
            write_broker_config(spec2, tmp_path / "out", credentials=creds2)
            broker.reload()
            with probe("dev-a", creds["dev-a"]) as dev:  # reloading keeps the others working
                assert dev.connect()
            gone = probe("dev-b", creds["dev-b"])
            assert not gone.connect()
            gone.close()
    finally:
        broker.stop()


def test_broker_config_cli_password_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge.cli.main import main

    creds = tmp_path / "creds.json"
    args = ["fleet", "broker-config", "-o", str(tmp_path / "out"), "--auth", "password", "--fleet", FLEET,
            "--pki", str(tmp_path / "no-pki"), "--credentials", str(creds), "--device", "dev-a", "--device", "dev-b",
            "--json"]
    assert main(args) == 2  # no TLS and no --insecure-plaintext: refused
    assert "clear text" in capsys.readouterr().err
    assert main([*args, "--insecure-plaintext", "--revoked", "dev-b"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["devices"] == ["dev-a"] and out["revoked"] == ["dev-b"] and out["warnings"]
    assert set(json.loads(creds.read_text())) == {"dev-a", "controller"} and creds.stat().st_mode & 0o077 == 0
    passwd = (tmp_path / "out" / "devices.passwd").read_text()
    assert passwd.startswith("dev-a:$7$101$") and "dev-b" not in passwd
    assert main([*args[:-2], "dev+b", "--insecure-plaintext"]) == 2  # unsafe id refused at generation
