"""Commands to one device (ping, restart, rollback a model, set-config): stored, sent, answered, expired.

A command is a row first (so a restart still sends it and still matches its answer), then a
QoS 1 message whose envelope id is the command id; the device's response echoes that id.
Rolling a model back also changes the device's desired state to the version it ran before,
or the device would install the newer one again at its next convergence.
"""

from __future__ import annotations

import logging
import re
import secrets
from enum import Enum
from typing import Any, Callable

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from edge.errors import ConfigError, NotFoundError, TransportError
from edge.fleet.db import Clock, Database, bundles_t, commands_t, desired_t, device_models_t, devices_t, now
from edge.fleet.desired import Handle, bump_desired
from edge.fleet.variants import choose_variant, load_variants
from edge.protocol.manifest import NAME_PATTERN, VERSION_PATTERN
from edge.protocol.messages import CommandMessage, encode, wrap
from edge.protocol.topics import Channel, Command, Topics

log = logging.getLogger(__name__)

# A command not answered in this long is expired: long enough for a device to reconnect.
DEFAULT_TTL_S = 3600.0
# set-config's keys and values are checked by the agent, which answers what it refused and why
# (agents of different versions know different settings).
USER_COMMANDS = {"ping": Command.PING, "restart": Command.RESTART, "rollback": Command.ROLLBACK,
                 "set-config": Command.SET_CONFIG}


class CommandState(str, Enum):
    """Where a command stands."""

    PENDING = "pending"  # stored, not yet acknowledged by the broker
    SENT = "sent"
    ANSWERED = "answered"
    EXPIRED = "expired"


def _row(r: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(r).items() if v is not None}


def create_command(db: Database, device_id: str, name: str, args: dict[str, Any] | None = None,
                   ttl_s: float = DEFAULT_TTL_S, clock: Clock = now) -> dict[str, Any]:
    """Store a command for a device (sent by the service); for rollback, change desired state too."""
    if name not in USER_COMMANDS:
        raise ConfigError(f"unknown command {name!r}", hint=f"use one of: {', '.join(USER_COMMANDS)}")
    args = dict(args or {})
    t = clock()
    with db.write() as conn:
        dev = conn.execute(select(devices_t.c.id, devices_t.c.profile, devices_t.c.capabilities).where(
            devices_t.c.id == device_id)).first()
        if dev is None:
            raise NotFoundError(f"unknown device {device_id!r}")
        note = None
        if name == "rollback":
            note = _rollback_desired(conn, dev, args, t)
        cid = f"cmd-{secrets.token_hex(8)}"
        conn.execute(commands_t.insert().values(id=cid, device_id=device_id, command=name, args=args, created_at=t,
                                                expires_at=t + ttl_s, state=CommandState.PENDING.value))
        row = conn.execute(select(commands_t).where(commands_t.c.id == cid)).mappings().one()
    out = _row(row)
    if note:
        out["note"] = note
    return out


def _rollback_desired(conn: Connection, dev: Any, args: dict[str, Any], t: float) -> str:
    model = args.get("name")  # the agent's rollback command names the model in args.name
    if not isinstance(model, str) or not re.match(NAME_PATTERN, model):
        raise ConfigError("rollback needs args.name, the model to roll back", hint="e.g. --model minilm")
    version = args.get("version")
    if version is None:
        version = conn.execute(select(device_models_t.c.previous).where(
            device_models_t.c.device_id == dev.id, device_models_t.c.model == model)).scalar()
    if not isinstance(version, str) or not re.match(VERSION_PATTERN, version):
        raise ConfigError(f"device {dev.id} reports no previous version of {model}",
                          hint="name the version to go back to with args.version")
    args["version"] = version
    rows = [dict(r) for r in conn.execute(select(bundles_t).where(
        bundles_t.c.name == model, bundles_t.c.version == version)).mappings()]
    variants = load_variants(rows, {r["sha256"]: r["manifest"] for r in rows})
    choice = choose_variant(variants, dev.profile or "", dev.capabilities, allow_fallback=True)
    if choice.variant is None:
        return (f"desired state unchanged: {choice.reason or f'no bundle of {model}@{version} is stored'}; "
                "the device may reinstall the newer version at its next convergence")
    conn.execute(desired_t.delete().where(desired_t.c.device_id == dev.id, desired_t.c.model == model))
    conn.execute(desired_t.insert().values(device_id=dev.id, model=model, version=version,
                                           bundle_sha256=choice.variant.sha256, rollout_id=None,
                                           activate_after=None, maintenance_window=None, updated_at=t))
    bump_desired(conn, [dev.id])
    return f"desired state of {model} set to {version}"


def get_command(db: Database, command_id: str) -> dict[str, Any]:
    """Return one command with its response, or raise NotFoundError."""
    with db.read() as conn:
        row = conn.execute(select(commands_t).where(commands_t.c.id == command_id)).mappings().first()
    if row is None:
        raise NotFoundError(f"unknown command {command_id!r}")
    return _row(row)


def list_commands(db: Database, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """Return a device's commands, newest first."""
    with db.read() as conn:
        rows = conn.execute(select(commands_t).where(commands_t.c.device_id == device_id)
                            .order_by(commands_t.c.created_at.desc()).limit(max(1, min(limit, 500)))).mappings()
        return [_row(r) for r in rows]


def send_pending(db: Database, topics: Topics, publish: Callable[[str, bytes], Handle], clock: Clock = now,
                 timeout_s: float = 30.0) -> int:
    """Publish stored commands (QoS 1), expire stale ones; return how many the broker acknowledged."""
    t = clock()
    with db.write() as conn:
        conn.execute(update(commands_t).where(commands_t.c.state.in_(
            [CommandState.PENDING.value, CommandState.SENT.value]), commands_t.c.expires_at < t)
            .values(state=CommandState.EXPIRED.value))
        rows = conn.execute(select(commands_t).where(commands_t.c.state == CommandState.PENDING.value)
                            .order_by(commands_t.c.created_at).limit(500)).mappings().all()
    sent = []
    for r in rows:
        body = CommandMessage(command=USER_COMMANDS[r["command"]].value, args=r["args"] or {}, expires_at=r["expires_at"])
        payload = encode(wrap(r["device_id"], body, message_id=r["id"], ts=t))
        try:
            handle = publish(topics.device(r["device_id"], Channel.CMD, USER_COMMANDS[r["command"]]), payload)
            if handle.wait(timeout_s) is False:
                continue
        except TransportError as exc:
            log.warning("command %s to %s not sent: %s", r["id"], r["device_id"], exc)
            continue
        sent.append(r["id"])
    if sent:
        with db.write() as conn:
            conn.execute(update(commands_t).where(commands_t.c.id.in_(sent),
                                                  commands_t.c.state == CommandState.PENDING.value)
                         .values(state=CommandState.SENT.value, sent_at=t))
    return len(sent)
