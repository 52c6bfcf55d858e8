"""MQTT names: topic names to publish to, subscription filters, shared subscriptions, client ids.

Checked before anything reaches paho, so a bad name fails at the call with our error instead of
deep in the network thread (or, worse, as a subscription that silently matches nothing).
"""

from __future__ import annotations

import re

from edge.errors import ConfigError, PublishError

# MQTT client ids: printable, no spaces or wildcards, bounded (brokers must accept 23, most 65535).
CLIENT_ID_PATTERN = re.compile(r"^[\x21-\x7e]{1,128}$")
# MQTT's limit on a topic or filter, in UTF-8 bytes.
MAX_TOPIC_BYTES = 65535


def check_client_id(client_id: str) -> str:
    """Return ``client_id`` if brokers will accept it, else raise ConfigError."""
    if not isinstance(client_id, str) or not CLIENT_ID_PATTERN.match(client_id):
        raise ConfigError(f"invalid MQTT client id {client_id!r}",
                          hint="use 1-128 printable ASCII characters without spaces")
    return client_id


def check_topic(topic: str) -> str:
    """Return ``topic`` if it is a valid topic name to publish to, else raise PublishError."""
    if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic or "\x00" in topic:
        raise PublishError(f"invalid topic {topic!r}: empty, or has a wildcard or NUL")
    if len(topic.encode()) > MAX_TOPIC_BYTES:
        raise PublishError("topic is longer than MQTT's 65535-byte limit")
    return topic


def check_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if it is a valid subscription filter, else raise ConfigError."""
    plain = strip_share(topic_filter)
    levels = plain.split("/") if plain else []
    ok = bool(levels) and "\x00" not in plain and len(topic_filter.encode()) <= MAX_TOPIC_BYTES
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+"):
            ok = False
    if not ok:
        raise ConfigError(f"invalid MQTT topic filter {topic_filter!r}",
                          hint="'+' and '#' must fill a whole level, '#' only the last")
    return topic_filter


def strip_share(topic_filter: str) -> str:
    """Return the filter without a ``$share/<group>/`` prefix (what messages are matched against)."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3 or not parts[1] or "+" in parts[1] or "#" in parts[1]:
            raise ConfigError(f"invalid shared subscription {topic_filter!r}", hint="use $share/GROUP/FILTER")
        return parts[2]
    return topic_filter
