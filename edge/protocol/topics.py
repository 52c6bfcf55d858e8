"""The MQTT topic tree, built and parsed here and nowhere else.

``<root>/v1/<fleet>/<device>/<channel>`` where channel is one of :class:`Channel`, and
commands are ``.../cmd/<name>``. Device and fleet ids are a safe alphabet: ``+``, ``#``, ``/``,
``$``, spaces and control characters would widen per-device access rules or wildcards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from edge.errors import ConfigError

PROTOCOL_VERSION = "v1"
# Letters, digits and ._:- only; starts with a letter or digit; 64 characters bound topic length.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
ROOT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}(/[A-Za-z0-9][A-Za-z0-9._-]{0,31}){0,3}$")


class Channel(str, Enum):
    """What a topic carries."""

    STATUS = "status"  # retained birth/death with a session counter (device -> controller)
    TELEMETRY = "telemetry"  # periodic metrics (device -> controller)
    EVENTS = "events"  # install/activate/rollback steps (device -> controller)
    REPORTED = "reported"  # retained: what the device runs now (device -> controller)
    DESIRED = "desired"  # retained: what the device should run (controller -> device)
    CMD = "cmd"  # commands, .../cmd/<name> (controller -> device)
    RESP = "resp"  # command responses (device -> controller)


class Command(str, Enum):
    """Commands the controller sends."""

    DEPLOY = "deploy"
    ROLLBACK = "rollback"
    RESTART = "restart"
    SET_CONFIG = "set-config"
    PING = "ping"


def check_id(value: str, what: str = "device id") -> str:
    """Return ``value`` if it is a safe id, else raise saying why."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise ConfigError(
            f"invalid {what} {value!r}",
            hint="use 1-64 letters, digits, '.', '_', ':' or '-', starting with a letter or digit "
            "(no '+', '#', '/', '$' or spaces: they widen MQTT access rules)",
        )
    return value


@dataclass(frozen=True)
class Topics:
    """Topic builder for one fleet under one root."""

    fleet: str = "default"
    root: str = "edge"

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet id")
        if not ROOT_PATTERN.match(self.root):
            raise ConfigError(f"invalid topic root {self.root!r}", hint="use letters, digits, '.', '_', '-' and '/'")

    @property
    def base(self) -> str:
        """Return ``<root>/v1/<fleet>``."""
        return f"{self.root}/{PROTOCOL_VERSION}/{self.fleet}"

    def device(self, device_id: str, channel: Channel, command: Command | None = None) -> str:
        """Return the topic of one device's channel (``command`` for CMD)."""
        check_id(device_id)
        if channel is Channel.CMD:
            if command is None:
                raise ValueError("a cmd topic needs a command")
            return f"{self.base}/{device_id}/cmd/{command.value}"
        return f"{self.base}/{device_id}/{channel.value}"

    def device_filter(self, device_id: str) -> str:
        """Return the filter of every topic of one device."""
        check_id(device_id)
        return f"{self.base}/{device_id}/#"

    def commands_filter(self, device_id: str) -> str:
        """Return the filter a device subscribes to for its commands."""
        check_id(device_id)
        return f"{self.base}/{device_id}/cmd/+"

    def fleet_filter(self, channel: Channel) -> str:
        """Return the filter of one channel of every device of the fleet."""
        if channel is Channel.CMD:
            return f"{self.base}/+/cmd/+"
        return f"{self.base}/+/{channel.value}"

    def parse(self, topic: str) -> tuple[str, Channel, Command | None]:
        """Split a topic of this fleet into (device id, channel, command)."""
        prefix = self.base + "/"
        if not topic.startswith(prefix):
            raise ConfigError(f"topic {topic!r} is not under {self.base}")
        parts = topic[len(prefix):].split("/")
        try:
            device = check_id(parts[0])
            channel = Channel(parts[1])
        except (IndexError, ValueError, ConfigError) as exc:
            raise ConfigError(f"topic {topic!r} is not an Edge topic") from exc
        if channel is Channel.CMD:
            if len(parts) != 3:
                raise ConfigError(f"topic {topic!r} is not an Edge command topic")
            try:
                return device, channel, Command(parts[2])
            except ValueError as exc:
                raise ConfigError(f"unknown command in topic {topic!r}") from exc
        if len(parts) != 2:
            raise ConfigError(f"topic {topic!r} is not an Edge topic")
        return device, channel, None
