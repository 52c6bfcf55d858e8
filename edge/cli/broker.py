"""`edge fleet broker-config` and `edge fleet certs init | issue | revoke | list | crl`.

These commands add themselves to the `fleet` group that edge/cli/fleet.py registers (or create
the group when that module is absent). They work on files only: the fleet CA folder
(``--pki``, default $EDGE_FLEET_DATA/pki) and the broker configuration folder (``--out``).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, List, Optional

import typer

from edge import settings
from edge.cli.output import emit, info, print_table, stdout
from edge.errors import ConfigError

PKI = typer.Option(None, "--pki", help="Fleet CA folder (default $EDGE_FLEET_DATA/pki).")
JSON = typer.Option(False, "--json", help="Print JSON.")
# Warn when the CRL expires sooner than this: past it the broker refuses every client.
CRL_WARN = timedelta(days=30)
# Warn about certificates expiring sooner than this: their holders are cut off at expiry.
CERT_WARN = timedelta(days=30)


def _pki_dir(pki: Optional[Path]) -> Path:
    return (pki or settings.fleet_data() / "pki").expanduser()


def _fleet_group(app: typer.Typer) -> typer.Typer:
    for group in app.registered_groups:
        if group.name == "fleet" and group.typer_instance is not None:
            return group.typer_instance
    sub = typer.Typer(help="The fleet controller: devices, bundles, rollouts, broker.", no_args_is_help=True)
    app.add_typer(sub, name="fleet")
    return sub


def _read_ids(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read devices file {path}: {exc}") from exc
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def register(app: typer.Typer) -> None:
    """Add `broker-config` and the `certs` commands to the `fleet` group."""
    fleet_app = _fleet_group(app)
    certs = typer.Typer(help="The fleet CA: broker, device and controller certificates, revocation.",
                        no_args_is_help=True)
    fleet_app.add_typer(certs, name="certs")

    @certs.command("init")
    def certs_init(
        fleet: str = typer.Option("default", "--fleet", help="Fleet id (named in the CA certificate)."),
        days: int = typer.Option(3650, "--days", help="Validity of the CA certificate."),
        pki: Optional[Path] = PKI,
        as_json: bool = JSON,
    ) -> None:
        """Create the fleet CA (ca.pem, ca.key) and an empty revocation list."""
        from edge.fleet.pki import FleetPki

        ca = FleetPki.init(_pki_dir(pki), fleet, days=days)
        data = {"pki": str(ca.folder), "fleet": ca.fleet, "ca": str(ca.ca_file), "ca_key": str(ca.ca_key_file),
                "crl": str(ca.crl_file)}
        emit(data, as_json, lambda d: stdout().print(
            f"fleet CA for {d['fleet']} in {d['pki']}\n  certificate {d['ca']} (give to devices, controller, broker)\n"
            f"  key         {d['ca_key']} (keep offline)\n  CRL         {d['crl']}"))

    @certs.command("issue")
    def certs_issue(
        name: str = typer.Argument(..., help="Device id, controller name, or the broker's host name."),
        role: str = typer.Option("device", "--role", help="device, controller or server."),
        host: Optional[List[str]] = typer.Option(None, "--host", help="Extra DNS name or IP of a server certificate (repeatable)."),
        days: int = typer.Option(365, "--days", help="Validity in days."),
        replace: bool = typer.Option(False, "--replace", help="Issue a new certificate although one is active (the old stays valid until revoked)."),
        pki: Optional[Path] = PKI,
        as_json: bool = JSON,
    ) -> None:
        """Issue a key and certificate signed by the fleet CA."""
        from edge.fleet.pki import FleetPki, Role

        try:
            role_value = Role(role)
        except ValueError:
            raise ConfigError(f"unknown role {role!r}", hint="valid: device, controller, server") from None
        ca = FleetPki.open(_pki_dir(pki))
        cert = ca.issue(name, role_value, days=days, hosts=tuple(host or ()), replace=replace)
        data = {"name": cert.name, "role": cert.role.value, "serial": cert.serial, "not_after": cert.not_after,
                "certificate": str(ca.path(cert.cert_file)), "key": str(ca.path(cert.key_file)), "ca": str(ca.ca_file)}
        emit(data, as_json, lambda d: stdout().print(
            f"{d['role']} certificate for {d['name']} (serial {d['serial']}, until {d['not_after']})\n"
            f"  certificate {d['certificate']}\n  key         {d['key']} (secret: copy to that machine only)\n"
            f"  CA          {d['ca']}"))

    @certs.command("revoke")
    def certs_revoke(
        name: Optional[str] = typer.Argument(None, help="Revoke every active certificate of this name."),
        serial: Optional[str] = typer.Option(None, "--serial", help="Revoke one certificate by serial (hex)."),
        pki: Optional[Path] = PKI,
        as_json: bool = JSON,
    ) -> None:
        """Revoke certificates and re-sign the CRL; then rerun broker-config and reload the broker."""
        from edge.fleet.pki import FleetPki

        ca = FleetPki.open(_pki_dir(pki))
        revoked = ca.revoke(name, serial=serial)
        data = {"revoked": [{"name": c.name, "role": c.role.value, "serial": c.serial} for c in revoked],
                "crl": str(ca.crl_file)}
        emit(data, as_json, lambda d: stdout().print(
            "\n".join(f"revoked {r['role']} {r['name']} serial {r['serial']}" for r in d["revoked"])
            + f"\nCRL updated: {d['crl']}\nnext: `edge fleet broker-config ...` and reload mosquitto (SIGHUP)"))

    @certs.command("list")
    def certs_list(pki: Optional[Path] = PKI, as_json: bool = JSON) -> None:
        """List every certificate the fleet CA issued."""
        from edge.fleet.pki import FleetPki

        ca = FleetPki.open(_pki_dir(pki))
        now = datetime.now(timezone.utc)
        rows = [{"name": c.name, "role": c.role.value, "serial": c.serial, "not_after": c.not_after,
                 "state": "revoked" if c.revoked_at else ("expired" if c.expired(now) else "active")}
                for c in ca.certificates()]
        emit({"fleet": ca.fleet, "certificates": rows}, as_json, lambda d: print_table(
            ("name", "role", "state", "until", "serial"),
            [(r["name"], r["role"], r["state"], r["not_after"][:19], r["serial"]) for r in d["certificates"]],
            title=f"fleet {d['fleet']}"))

    @certs.command("crl")
    def certs_crl(
        days: int = typer.Option(180, "--days", help="Validity of the new CRL."),
        pki: Optional[Path] = PKI,
        as_json: bool = JSON,
    ) -> None:
        """Re-sign the CRL with a new expiry (run well before it expires; the broker needs a valid CRL)."""
        from edge.fleet.pki import FleetPki

        ca = FleetPki.open(_pki_dir(pki))
        ca.refresh_crl(days)
        data = {"crl": str(ca.crl_file), "next_update": ca.crl_next_update().isoformat()}
        emit(data, as_json, lambda d: stdout().print(f"{d['crl']} valid until {d['next_update']}"))

    @fleet_app.command("broker-config")
    def broker_config(
        out: Path = typer.Option(..., "-o", "--out", help="Folder for mosquitto.conf, ACLs, password files, TLS copies."),
        fleet: Optional[str] = typer.Option(None, "--fleet", help="Fleet id (default: the CA's fleet, else 'default')."),
        root: str = typer.Option("edge", "--topic-root", help="Root of the topic tree."),
        auth: str = typer.Option("certs", "--auth", help="certs (client certificates) or password."),
        device: Optional[List[str]] = typer.Option(None, "--device", help="Device id (repeatable); with --auth certs, devices with an active certificate are added."),
        devices_file: Optional[Path] = typer.Option(None, "--devices-file", help="File with one device id per line."),
        revoked: Optional[List[str]] = typer.Option(None, "--revoked", help="Device id to shut out (repeatable); revoked certificates are added."),
        controller: Optional[List[str]] = typer.Option(None, "--controller", help="Controller user name (repeatable; default: controller certificates, else 'controller')."),
        server: Optional[str] = typer.Option(None, "--server-cert", help="Name of the server certificate to use (default: the newest)."),
        port: int = typer.Option(8883, "--port", help="Device listener port."),
        bind: str = typer.Option("0.0.0.0", "--bind", help="Device listener address."),
        controller_port: int = typer.Option(8884, "--controller-port", help="Controller listener port."),
        controller_bind: str = typer.Option("127.0.0.1", "--controller-bind", help="Controller listener address (keep it private)."),
        credentials: Optional[Path] = typer.Option(None, "--credentials", help="Password mode: JSON {user: password}; missing users get random passwords (default $EDGE_FLEET_DATA/broker-credentials.json)."),
        deploy_dir: Optional[Path] = typer.Option(None, "--deploy-dir", help="Where the folder will live on the broker host (default: --out)."),
        run_as: Optional[str] = typer.Option(None, "--run-as", help="Account mosquitto drops root privileges to."),
        log_file: Optional[Path] = typer.Option(None, "--log-file", help="Broker log file (default: stderr)."),
        insecure_plaintext: bool = typer.Option(False, "--insecure-plaintext", help="Password mode without TLS (lab only)."),
        pki: Optional[Path] = PKI,
        as_json: bool = JSON,
    ) -> None:
        """Write mosquitto's configuration for a fleet: listeners, TLS, limits, per-device ACLs."""
        from edge.fleet.brokerconf import AuthMode, BrokerSpec, TlsFiles, complete_credentials, write_broker_config
        from edge.fleet.pki import FleetPki, Role

        try:
            mode = AuthMode(auth)
        except ValueError:
            raise ConfigError(f"unknown --auth {auth!r}", hint="valid: certs, password") from None
        pki_dir = _pki_dir(pki)
        ca = FleetPki.open(pki_dir) if (pki_dir / "ca.pem").exists() or mode is AuthMode.CERTS else None
        devices = list(device or ()) + (_read_ids(devices_file) if devices_file else [])
        shut_out = list(revoked or ())
        controllers = list(controller or ())
        tls = None
        warnings: list[str] = []
        if ca is not None:
            active, gone = ca.names(Role.DEVICE)
            if mode is AuthMode.CERTS:
                devices += active
            shut_out += gone
            if not controllers:
                controllers = ca.names(Role.CONTROLLER)[0]
            servers = [c for c in ca.certificates()
                       if c.role is Role.SERVER and c.active(datetime.now(timezone.utc))
                       and (server is None or c.name == server)]
            if not servers:
                raise ConfigError(f"no active server certificate{f' named {server!r}' if server else ''} in {pki_dir}",
                                  hint="issue one with `edge fleet certs issue HOST --role server`")
            chosen = servers[-1]
            tls = TlsFiles(ca.ca_file, ca.path(chosen.cert_file), ca.path(chosen.key_file), ca.crl_file)
            now = datetime.now(timezone.utc)
            soon = sorted({c.name for c in ca.certificates() if c.active(now)
                           and datetime.fromisoformat(c.not_after) - now < CERT_WARN})
            if soon:
                warnings.append(f"certificates expiring within {CERT_WARN.days} days: {', '.join(soon)} "
                                f"(issue new ones with `edge fleet certs issue NAME --replace`)")
            left = ca.crl_next_update() - now
            if left < CRL_WARN:
                warnings.append(f"the CRL expires in {left.days} days; the broker then refuses every client "
                                f"(run `edge fleet certs crl`)")
        spec = BrokerSpec(
            fleet=fleet or (ca.fleet if ca else "default"), root=root, auth=mode,
            devices=tuple(dict.fromkeys(devices)), revoked=tuple(dict.fromkeys(shut_out)),
            controllers=tuple(dict.fromkeys(controllers or ["controller"])), tls=tls,
            port=port, bind=bind, controller_port=controller_port, controller_bind=controller_bind,
            allow_plaintext=insecure_plaintext, run_as=run_as, log_file=log_file.resolve() if log_file else None,
        )
        creds_path = None
        creds = None
        if mode is AuthMode.PASSWORD:
            creds_path = (credentials or settings.fleet_data() / "broker-credentials.json").expanduser()
            creds = complete_credentials(spec, creds_path)
        files = write_broker_config(spec, out, deploy_dir=deploy_dir, credentials=creds)
        if tls is None:
            warnings.append("no TLS: passwords and messages cross the network in clear text")
        for w in warnings:
            info(f"[yellow]warning:[/yellow] {w}")
        data: dict[str, Any] = {
            "fleet": spec.fleet, "auth": mode.value, "config": str(files.config),
            "device_acl": str(files.device_acl), "controller_acl": str(files.controller_acl),
            "devices": list(files.devices), "revoked": list(files.revoked), "controllers": list(spec.controllers),
            "device_listener": f"{bind}:{port}", "controller_listener": f"{controller_bind}:{controller_port}",
            "credentials": str(creds_path) if creds_path else None, "warnings": warnings,
        }
        emit(data, as_json, lambda d: stdout().print(
            f"mosquitto configuration for fleet {d['fleet']} ({d['auth']}): {d['config']}\n"
            f"  {len(d['devices'])} device(s), {len(d['revoked'])} shut out, controllers: {', '.join(d['controllers'])}\n"
            f"  devices connect to {d['device_listener']}, the controller to {d['controller_listener']}\n"
            + (f"  passwords to hand out: {d['credentials']} (secret)\n" if d["credentials"] else "")
            + f"run: mosquitto -c {d['config']}   (after a change: reload with SIGHUP)"))
