"""`edge fleet serve | status | devices | device | tag | group | command | bundles | publish | rollout | undeploy | token`.

`serve` runs the controller; every other verb talks to a running controller's REST API
(``--controller``, default $EDGE_CONTROLLER or http://127.0.0.1:8700) with ``--token``
(default $EDGE_FLEET_TOKEN). Heavy imports happen inside the commands, so `edge --help` on a
device without the fleet extra still works.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, List, Optional

import typer

from edge import settings
from edge.cli.output import emit, print_table, stdout
from edge.errors import ConfigError


def _when(ts: float | None) -> str:
    if not ts:
        return ""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _client(controller: str | None, token: str | None) -> Any:
    from edge.fleet.client import ControllerClient

    return ControllerClient(controller or settings.controller_url(), token or settings.fleet_token())


CONTROLLER = typer.Option(None, "--controller", help="Controller URL (default $EDGE_CONTROLLER or http://127.0.0.1:8700).")
TOKEN = typer.Option(None, "--token", help="API token (default $EDGE_FLEET_TOKEN).")
JSON = typer.Option(False, "--json", help="Print JSON.")


def _print_rollout(d: dict[str, Any]) -> None:
    out = stdout()
    target = d["target"]["kind"] + (f" {d['target']['value']}" if d["target"]["value"] else "")
    wave = d["wave"]
    where = f"wave {wave + 1}/{len(d['waves'])} ({d['waves'][wave]})" if wave >= 0 else "not started"
    out.print(f"[bold]{d['id']}[/bold] {d['model']}@{d['version']} -> {target}: [bold]{d['state']}[/bold], {where}")
    if d.get("reason"):
        out.print(f"  {d['reason']}")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(d["devices"].items())) or "no devices yet"
    out.print(f"  devices: {counts}")
    gate = d.get("gate")
    if gate:
        verdict = "passed" if gate["passed"] else "FAILED: " + "; ".join(gate["failures"])
        out.print(f"  last gate: {verdict}" + (f" ({'; '.join(gate['notes'])})" if gate.get("notes") else ""))
    for t in d.get("transitions", [])[-8:]:
        out.print(f"  {_when(t['ts'])}  {t['from'] or '-'} --{t['event']}--> {t['to']}  {t['reason']}")
    for r in d.get("refused", [])[:5]:
        out.print(f"  refused {r['device_id']}: {r['detail']}")


def register(app: typer.Typer) -> None:
    """Add the `fleet` commands to the CLI."""
    sub = typer.Typer(help="The fleet controller: devices, bundles, rollouts.", no_args_is_help=True)
    app.add_typer(sub, name="fleet")
    rollout = typer.Typer(help="Roll a model version out in waves, watch, pause, abort, roll back.",
                          no_args_is_help=True)
    sub.add_typer(rollout, name="rollout")
    token_app = typer.Typer(help="API tokens (read-only or admin).", no_args_is_help=True)
    sub.add_typer(token_app, name="token")

    @sub.command("serve")
    def serve(
        data: Optional[Path] = typer.Option(None, "--data", help="Data folder (default $EDGE_FLEET_DATA or $EDGE_HOME/fleet)."),
        db: Optional[str] = typer.Option(None, "--db", help="Database URL: sqlite:///PATH or postgresql://... (default SQLite in --data)."),
        broker: Optional[str] = typer.Option(None, "--broker", help="MQTT broker URL, e.g. mqtt://host:1883 (default: an embedded broker)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address the API (and the embedded broker) listen on; 0.0.0.0 for all."),
        port: int = typer.Option(8700, "--port", help="REST API port (0 picks a free one)."),
        mqtt_port: int = typer.Option(1883, "--mqtt-port", help="Embedded broker port (0 picks a free one)."),
        fleet: str = typer.Option("default", "--fleet", help="Fleet id in the topic tree."),
        root: str = typer.Option("edge", "--topic-root", help="Root of the topic tree."),
        public_url: Optional[str] = typer.Option(None, "--public-url", help="URL devices use to reach this API (bundle downloads)."),
        trusted_key: Optional[List[Path]] = typer.Option(None, "--trusted-key", help="Public key uploads must be signed with (repeatable)."),
        revoked_key: Optional[List[str]] = typer.Option(None, "--revoked-key", help="Key id or public key file whose uploads are refused (repeatable; adds to $EDGE_REVOKED_KEYS)."),
        ingest_connections: int = typer.Option(1, "--ingest-connections", help="MQTT connections reading telemetry; more than 1 share MQTT 5 subscriptions, which mosquitto 2.0 forgets on restart until the readers reconnect."),
        ingest_workers: int = typer.Option(0, "--ingest-workers", help="Extra processes reading telemetry (MQTT 5 brokers; one per spare core)."),
        rate_limit: Optional[float] = typer.Option(None, "--rate-limit", help="API requests a second per client address, in bursts of 4x, before 429 (default 50; 0: no limit)."),
        max_requests: Optional[int] = typer.Option(None, "--max-requests", help="API requests in flight before 429 (default 64; 0: no cap)."),
        max_connections: Optional[int] = typer.Option(None, "--max-connections", help="Open HTTP connections before new requests get 503 (default 900)."),
        header_timeout: Optional[float] = typer.Option(None, "--header-timeout", help="Seconds a client gets to send a request's headers (default 10)."),
        body_timeout: Optional[float] = typer.Option(None, "--body-timeout", help="Seconds a client gets to send a request body, plus one per KiB received (default 30)."),
    ) -> None:
        """Run the controller: embedded broker and SQLite unless told otherwise."""
        from edge.redact import redact_url

        try:
            from edge.fleet.service import FleetService, ServiceConfig, controller_limits
        except ModuleNotFoundError as exc:
            if exc.name not in ("sqlalchemy", "amqtt"):
                raise
            raise ConfigError(f"the fleet controller needs {exc.name}, which is not installed",
                              hint='pip install "edge-fleet[fleet]"') from exc

        config = ServiceConfig(
            data_dir=(data or settings.fleet_data()).expanduser(), db_url=db or settings.fleet_db(),
            broker_url=broker or settings.fleet_broker(), host=host, port=port, mqtt_port=mqtt_port, fleet=fleet,
            root=root, public_url=public_url, trusted_keys=tuple(trusted_key or ()), revoked_keys=tuple(revoked_key or ()),
            admin_token=settings.fleet_admin_token(), ingest_connections=ingest_connections,
            ingest_workers=ingest_workers,
            http=controller_limits(rate_limit, max_requests, max_connections, header_timeout, body_timeout))

        def ready(svc: FleetService) -> None:
            err = sys.stderr
            if svc.generated_token:
                print("admin token (shown once; keep it, e.g. export EDGE_FLEET_TOKEN=...):", file=err)
                print(f"  {svc.generated_token}", file=err)
            assert svc.http is not None
            print(f"edge fleet: api {svc.http.url} broker {redact_url(svc.broker_url or '')} data {config.data_dir}",
                  file=err, flush=True)

        FleetService(config).run_forever(ready)

    @sub.command("status")
    def status(controller: Optional[str] = CONTROLLER, token: Optional[str] = TOKEN, as_json: bool = JSON) -> None:
        """Show device counts, ingestion figures and rollouts in progress."""
        with _client(controller, token) as c:
            data = c.get("/api/v1/stats")
            data["rollouts"] = [r for r in c.get("/api/v1/rollouts", limit=20)["items"]
                                if r["state"] not in ("completed", "aborted", "reverted")]

        def render(d: dict[str, Any]) -> None:
            stdout().print(f"devices {d['devices']} (online {d['online']}, offline {d['offline']})")
            ing = d.get("ingest", {})
            stdout().print("ingest: " + ", ".join(f"{k} {v}" for k, v in sorted(ing.items())))
            for r in d["rollouts"]:
                _print_rollout(r)
        emit(data, as_json, render)

    @sub.command("devices")
    def devices(
        search: Optional[str] = typer.Option(None, "--search", help="Part of a device id."),
        tag: Optional[str] = typer.Option(None, "--tag"), group: Optional[str] = typer.Option(None, "--group"),
        profile: Optional[str] = typer.Option(None, "--profile"),
        status_: Optional[str] = typer.Option(None, "--status", help="online or offline."),
        model: Optional[str] = typer.Option(None, "--model"), version: Optional[str] = typer.Option(None, "--version"),
        limit: int = typer.Option(50, "--limit", help="Devices per page (max 1000)."),
        after: Optional[str] = typer.Option(None, "--after", help="Show the page after this device id."),
        controller: Optional[str] = CONTROLLER, token: Optional[str] = TOKEN, as_json: bool = JSON,
    ) -> None:
        """List devices, filtered and paged on the controller."""
        with _client(controller, token) as c:
            data = c.get("/api/v1/devices", search=search, tag=tag, group=group, profile=profile, status=status_,
                         model=model, version=version, limit=limit, after=after)

        def render(d: dict[str, Any]) -> None:
            rows = [(x["id"], x["status"], x["profile"], " ".join(f"{m['model']}@{m['version']}" for m in x["models"]),
                     ",".join(x["tags"]), ",".join(x["groups"]), _when(x["last_seen"])) for x in d["items"]]
            print_table(("device", "status", "profile", "models", "tags", "groups", "last seen (UTC)"), rows,
                        title=f"{len(rows)} of {d['total']} devices")
            if d["next"]:
                stdout().print(f"more: --after {d['next']}")
        emit(data, as_json, render)

    @sub.command("device")
    def device(device_id: str = typer.Argument(...), controller: Optional[str] = CONTROLLER,
               token: Optional[str] = TOKEN, as_json: bool = JSON) -> None:
        """Show one device: state, models, recent telemetry, events and commands."""
        with _client(controller, token) as c:
            data = c.get(f"/api/v1/devices/{device_id}")

        def render(d: dict[str, Any]) -> None:
            out = stdout()
            out.print(f"[bold]{d['id']}[/bold] {d['status']} (session {d['session']}), profile {d['profile'] or '?'}, "
                      f"agent {d['agent_version'] or '?'}, last seen {_when(d['last_seen'])}")
            out.print(f"tags: {', '.join(d['tags']) or '-'}  groups: {', '.join(d['groups']) or '-'}")
            for m in d["models"]:
                out.print(f"model {m['model']}@{m['version']} {m['state']}" + (f" (previous {m['previous']})" if m.get("previous") else ""))
            for e in d["events"][:10]:
                out.print(f"  {_when(e['ts'])} {e['kind']} {e.get('model', '')}@{e.get('version', '')} {e.get('detail', '')}")
        emit(data, as_json, render)

    def _labels(kind: str) -> None:
        @sub.command(kind)
        def change(device_id: str = typer.Argument(...), values: List[str] = typer.Argument(..., help=f"{kind.title()}s."),
                   remove: bool = typer.Option(False, "--remove", help=f"Remove these {kind}s instead of adding them."),
                   controller: Optional[str] = CONTROLLER, token: Optional[str] = TOKEN, as_json: bool = JSON) -> None:
            with _client(controller, token) as c:
                data = c.post(f"/api/v1/devices/{device_id}/{kind}s", {"remove" if remove else "add": list(values)})
            emit(data, as_json, lambda d: stdout().print(f"{d['id']} {kind}s: {', '.join(d[kind + 's']) or '-'}"))
        change.__doc__ = f"Add (or --remove) {kind}s of a device."

    _labels("tag")
    _labels("group")

    @sub.command("command")
    def command(
        device_id: str = typer.Argument(...),
        name: str = typer.Argument(..., help="ping, restart, rollback or set-config."),
        model: Optional[str] = typer.Option(None, "--model", help="Model to roll back."),
        version: Optional[str] = typer.Option(None, "--version", help="Version to roll back to (default: the previous one)."),
        setting: Optional[List[str]] = typer.Option(
            None, "--set", help="set-config: KEY=VALUE, e.g. telemetry_interval=30 or download_rate_kb=512; "
                                "VALUE null goes back to the agent's own option (repeatable)."),
        wait: float = typer.Option(10.0, "--wait", help="Seconds to wait for the answer (0: do not wait)."),
        controller: Optional[str] = CONTROLLER, token: Optional[str] = TOKEN, as_json: bool = JSON,
    ) -> None:
        """Send a command to a device and wait for its answer."""
        args: dict[str, Any] = {k: v for k, v in (("name", model), ("version", version)) if v}
        args.update(_settings(setting or []))
        with _client(controller, token) as c:
            data = c.post(f"/api/v1/devices/{device_id}/commands", {"command": name, "args": args})
            deadline = time.monotonic() + wait
            while data["state"] not in ("answered", "expired") and time.monotonic() < deadline:
                time.sleep(0.2)
                data = c.get(f"/api/v1/commands/{data['id']}")

        def render(d: dict[str, Any]) -> None:
            line = f"{d['id']} {d['command']} to {d['device_id']}: {d['state']}"
            if d["state"] == "answered":
                line += " ok" if d.get("ok") else f" failed: {d.get('error')}"
            stdout().print(line + (f" ({d['note']})" if d.get("note") else ""))
        emit(data, as_json, render)

    @sub.command("bundles")
    def bundles(name: Optional[str] = typer.Option(None, "--name"), version: Optional[str] = typer.Option(None, "--version"),
                controller: Optional[str] = CONTROLLER, token: Optional[str] = TOKEN, as_json: bool = JSON) -> None:
        """List the bundles stored on the controller."""
        with _client(controller, token) as c:
            data = c.get("/api/v1/bundles", name=name, version=version)["items"]
        emit(data, as_json, lambda d: print_table(
            ("name", "version", "profile", "precision", "size", "sha256", "uploaded (UTC)"),
            [(b["name"], b["version"], b["profile"], b["precision"], b["size"], b["sha256"][:16], _when(b["uploaded_at"]))
             for b in d]))

    @sub.command("publish")
    def publish(bundle: Path = typer.Argument(..., help="Signed .edgebundle file."),
                controller: Optional[str] = CONTROLLER, token: Optional[str] = TOKEN, as_json: bool = JSON) -> None:
        """Upload a signed bundle (verified by the controller with its trusted keys)."""
        with _client(controller, token) as c:
            data = c.upload(bundle)
        emit(data, as_json, lambda d: stdout().print(
            f"{'stored' if d['new'] else 'already stored'} {d['name']}@{d['version']} for {d['profile']} "
            f"(sha256 {d['sha256'][:16]}..., {d['size']} bytes)"))

    @rollout.command("create")
    def rollout_create(
        model: str = typer.Argument(...), version: str = typer.Argument(...),
        tag: Optional[str] = typer.Option(None, "--tag", help="Target devices with this tag."),
        group: Optional[str] = typer.Option(None, "--group", help="Target devices in this group."),
        profile: Optional[str] = typer.Option(None, "--profile", help="Target devices of this profile."),
        waves: str = typer.Option("1,10%,50%,100%", "--waves", help="Cumulative waves: counts or shares."),
        soak: float = typer.Option(600.0, "--soak", help="Seconds to watch each wave before widening."),
        timeout: float = typer.Option(1800.0, "--device-timeout", help="Seconds a device may take before it counts as failed."),
        max_failure_ratio: float = typer.Option(0.1, "--max-failure-ratio", help="Halt above this share of failed devices."),
        min_finished: int = typer.Option(1, "--min-finished", help="Judge the failure ratio once this many finished."),
        auto_revert: bool = typer.Option(True, "--auto-revert/--no-auto-revert", help="Revert the fleet when a gate fails."),
        window: Optional[str] = typer.Option(None, "--window", help="Maintenance window HH:MM-HH:MM (UTC) for activation."),
        activate_after: Optional[str] = typer.Option(None, "--activate-after", help="Activate from this time (ISO 8601 or unix)."),
        controller: Optional[str] = CONTROLLER, token: Optional[str] = TOKEN, as_json: bool = JSON,
    ) -> None:
        """Start a rollout of MODEL@VERSION (all devices unless --tag, --group or --profile)."""
        chosen = [(k, v) for k, v in (("tag", tag), ("group", group), ("profile", profile)) if v]
        if len(chosen) > 1:
            raise ConfigError("give at most one of --tag, --group, --profile")
        target = {"kind": chosen[0][0], "value": chosen[0][1]} if chosen else {"kind": "all"}
        plan: dict[str, Any] = {"waves": [w.strip() for w in waves.split(",") if w.strip()], "soak_s": soak,
                                "device_timeout_s": timeout, "max_failure_ratio": max_failure_ratio,
                                "min_finished_for_ratio": min_finished, "auto_revert": auto_revert}
        if window:
            plan["maintenance_window"] = window
        if activate_after:
            plan["activate_after"] = _parse_time(activate_after)
        with _client(controller, token) as c:
            data = c.post("/api/v1/rollouts", {"model": model, "version": version, "target": target, "plan": plan})
        emit(data, as_json, _print_rollout)

    @rollout.command("status")
    def rollout_status(rollout_id: Optional[str] = typer.Argument(None, help="Rollout id (default: list them)."),
                       controller: Optional[str] = CONTROLLER, token: Optional[str] = TOKEN, as_json: bool = JSON) -> None:
        """Show one rollout in detail, or list rollouts."""
        with _client(controller, token) as c:
            data = c.get(f"/api/v1/rollouts/{rollout_id}") if rollout_id else c.get("/api/v1/rollouts")["items"]
        if rollout_id:
            emit(data, as_json, _print_rollout)
        else:
            emit(data, as_json, lambda d: print_table(
                ("id", "model", "version", "target", "state", "wave", "devices", "created (UTC)"),
                [(r["id"], r["model"], r["version"], f"{r['target']['kind']} {r['target']['value']}".strip(), r["state"],
                  f"{r['wave'] + 1}/{len(r['waves'])}", sum(r["devices"].values()), _when(r["created_at"])) for r in d]))

    def _action(verb: str, doc: str) -> None:
        @rollout.command(verb)
        def act(rollout_id: str = typer.Argument(...), reason: str = typer.Option("", "--reason"),
                controller: Optional[str] = CONTROLLER, token: Optional[str] = TOKEN, as_json: bool = JSON) -> None:
            with _client(controller, token) as c:
                data = c.post(f"/api/v1/rollouts/{rollout_id}/{verb}", {"reason": reason})
            emit(data, as_json, _print_rollout)
        act.__doc__ = doc

    _action("pause", "Pause a rollout (devices already told keep going).")
    _action("resume", "Resume a paused rollout.")
    _action("abort", "Stop a rollout; devices keep what they have.")
    _action("rollback", "Revert every device of a rollout to its previous version.")

    @sub.command("undeploy")
    def undeploy(
        model: str = typer.Argument(...),
        device: Optional[List[str]] = typer.Option(None, "--device", help="Take it off this device (repeatable)."),
        tag: Optional[str] = typer.Option(None, "--tag", help="Take it off devices with this tag."),
        group: Optional[str] = typer.Option(None, "--group", help="Take it off devices in this group."),
        profile: Optional[str] = typer.Option(None, "--profile", help="Take it off devices of this profile."),
        everywhere: bool = typer.Option(False, "--all", help="Take it off every device."),
        controller: Optional[str] = CONTROLLER, token: Optional[str] = TOKEN, as_json: bool = JSON,
    ) -> None:
        """Take MODEL off devices: their agents stop serving it and delete its files."""
        chosen = [(k, v) for k, v in (("tag", tag), ("group", group), ("profile", profile)) if v]
        if len(chosen) + bool(device) + everywhere != 1:
            raise ConfigError("say which devices: one of --device ID (repeatable), --tag, --group, --profile or --all")
        body: dict[str, Any] = {"model": model}
        if device:
            body["devices"] = list(device)
        else:
            body["target"] = {"kind": chosen[0][0], "value": chosen[0][1]} if chosen else {"kind": "all"}
        with _client(controller, token) as c:
            data = c.post("/api/v1/undeploy", body)

        def render(d: dict[str, Any]) -> None:
            listed = ", ".join(d["devices"]) + (" ..." if d["removed"] > len(d["devices"]) else "")
            stdout().print(f"{d['model']} leaves the desired state of {d['removed']} device(s)"
                           + (f": {listed}" if listed else "") + f"; {d['unchanged']} did not have it")
        emit(data, as_json, render)

    @token_app.command("admin")
    def token_admin(
        data: Optional[Path] = typer.Option(None, "--data", help="Data folder of the controller (default $EDGE_FLEET_DATA or $EDGE_HOME/fleet)."),
        db: Optional[str] = typer.Option(None, "--db", help="Its database URL, if not SQLite in --data."),
        name: str = typer.Option("admin-recovery", "--name", help="Name of the new token."),
    ) -> None:
        """Create an admin token directly in the controller's database (a lost admin token's way back)."""
        from edge.fleet.auth import Role, create_token
        from edge.fleet.db import open_database

        folder = (data or settings.fleet_data()).expanduser()
        if not db and not (folder / "fleet.db").exists():
            raise ConfigError(f"no controller database in {folder}", hint="pass --data or --db")
        database = open_database(db or settings.fleet_db(), folder, create=False)
        try:
            made = create_token(database, name, Role.ADMIN)
        finally:
            database.dispose()
        stdout().print(f"admin token {made['id']} ({name}), shown once:\n  {made['token']}")

    @token_app.command("create")
    def token_create(name: str = typer.Argument(...), role: str = typer.Option("read", "--role", help="read or admin."),
                     controller: Optional[str] = CONTROLLER, token: Optional[str] = TOKEN, as_json: bool = JSON) -> None:
        """Create an API token (shown once)."""
        with _client(controller, token) as c:
            data = c.post("/api/v1/tokens", {"name": name, "role": role})
        emit(data, as_json, lambda d: stdout().print(f"{d['role']} token {d['id']} ({d['name']}): {d['token']}"))

    @token_app.command("list")
    def token_list(controller: Optional[str] = CONTROLLER, token: Optional[str] = TOKEN, as_json: bool = JSON) -> None:
        """List API tokens (never the tokens themselves)."""
        with _client(controller, token) as c:
            data = c.get("/api/v1/tokens")["items"]
        emit(data, as_json, lambda d: print_table(("id", "name", "role", "created (UTC)", "revoked"),
                                                  [(t["id"], t["name"], t["role"], _when(t["created_at"]), t["revoked"]) for t in d]))

    @token_app.command("revoke")
    def token_revoke(token_id: str = typer.Argument(...), controller: Optional[str] = CONTROLLER,
                     token: Optional[str] = TOKEN) -> None:
        """Revoke an API token."""
        with _client(controller, token) as c:
            c.request("DELETE", f"/api/v1/tokens/{token_id}")
        stdout().print(f"revoked {token_id}")


def _settings(pairs: List[str]) -> dict[str, Any]:
    """Parse --set KEY=VALUE pairs; VALUE is JSON (a number, null), else kept as text for the agent to judge."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r} is not KEY=VALUE", hint="e.g. --set telemetry_interval=30")
        try:
            out[key.strip()] = json.loads(raw, parse_constant=str)  # NaN and Infinity stay text
        except ValueError:
            out[key.strip()] = raw
    return out


def _parse_time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"invalid time {text!r}", hint="use ISO 8601 (2026-01-31T02:00Z) or unix seconds") from exc
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
