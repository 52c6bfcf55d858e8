"""Typed fleet messages inside a versioned JSON envelope; decoding is strict.

Envelope: ``{"v": 1, "type": <MessageType>, "id": <unique id>, "ts": <unix seconds>,
"device": <device id>, "body": {...}}``. ``id`` is unique per message (the controller
deduplicates on it); telemetry also carries a per-device ``seq``.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from enum import Enum
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from edge.errors import TransportError
from edge.protocol.manifest import NAME_PATTERN, VERSION_PATTERN
from edge.protocol.topics import ID_PATTERN

ENVELOPE_VERSION = 1
# A message larger than this is refused before parsing: real ones are a few KiB.
MAX_MESSAGE_BYTES = 256 * 1024


class MessageType(str, Enum):
    """Every message type on the wire."""

    STATUS = "status"
    TELEMETRY = "telemetry"
    EVENT = "event"
    REPORTED = "reported"
    DESIRED = "desired"
    COMMAND = "command"
    RESPONSE = "response"


# NaN and Infinity mean nothing in any field of ours, and encode() would write them as null (so a
# message carrying one could not be re-encoded as itself): refuse them when decoding.
_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _finite(value: Any) -> Any:
    """Return ``value`` if no float inside it is NaN or infinite (for free-form ``Any`` fields)."""
    stack = [value]  # iterative: decoded JSON may nest as deep as json.loads allows
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("NaN and Infinity are not allowed")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return value


Finite = Annotated[Any, AfterValidator(_finite)]


class _Body(BaseModel):
    model_config = _STRICT


class Capabilities(_Body):
    """What a device can run."""

    architecture: str
    providers: tuple[str, ...]
    ram_mb: int = Field(ge=0)
    disk_mb: int = Field(ge=0)
    cpu_count: int = Field(ge=0)


class Status(_Body):
    """Birth (online) and death (offline, the last will) of a device session."""

    type: Literal["status"] = "status"
    state: Literal["online", "offline"]
    session: int = Field(ge=0)  # bdSeq: increments per connection; stale deaths carry an old one
    agent_version: str = ""
    profile: str = ""
    capabilities: Capabilities | None = None
    http_url: str | None = None
    reason: str | None = None  # clean shutdown, will, ...


class ModelReport(_Body):
    """One model on a device."""

    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    state: str
    provider: str | None = None
    previous: str | None = None
    error: str | None = None


class Telemetry(_Body):
    """Periodic metrics of a device."""

    type: Literal["telemetry"] = "telemetry"
    seq: int = Field(ge=0)
    session: int = Field(ge=0)
    uptime_s: float = Field(ge=0)
    agent_version: str
    models: tuple[ModelReport, ...] = ()
    requests: int = Field(0, ge=0)
    errors: int = Field(0, ge=0)
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    tokens_per_s: float | None = None
    cpu_percent: float | None = None
    ram_used_mb: float | None = None
    ram_total_mb: float | None = None
    disk_free_mb: float | None = None
    temperature_c: float | None = None
    outbox_depth: int = Field(0, ge=0)
    outbox_dropped: int = Field(0, ge=0)
    per_model: dict[str, dict[str, float]] = Field(default_factory=dict)


class EventKind(str, Enum):
    """Steps of a deployment on a device."""

    DOWNLOAD_STARTED = "download_started"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    INSTALLED = "installed"
    ACTIVATED = "activated"
    HEALTH_OK = "health_ok"
    HEALTH_FAILED = "health_failed"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    REMOVED = "removed"


class Event(_Body):
    """One step of an install, activation or rollback."""

    type: Literal["event"] = "event"
    kind: EventKind
    model: str | None = None
    version: str | None = None
    deployment_id: str | None = None
    detail: str = ""
    error_code: str | None = None


class DesiredModel(_Body):
    """One model a device should run."""

    version: str = Field(pattern=VERSION_PATTERN)
    bundle_url: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    deployment_id: str | None = None
    activate_after: float | None = None  # unix time: download now, activate later
    maintenance_window: str | None = None  # "HH:MM-HH:MM" UTC


class Desired(_Body):
    """The retained desired state of one device."""

    type: Literal["desired"] = "desired"
    generation: int = Field(ge=0)
    models: dict[str, DesiredModel] = Field(default_factory=dict)


class Reported(_Body):
    """The retained reported state of one device."""

    type: Literal["reported"] = "reported"
    generation: int = Field(ge=0)
    models: tuple[ModelReport, ...] = ()


class CommandMessage(_Body):
    """A command; ``id`` makes it idempotent, the response echoes it."""

    type: Literal["command"] = "command"
    command: Literal["deploy", "rollback", "restart", "set-config", "ping"]
    args: dict[str, Finite] = Field(default_factory=dict)
    expires_at: float | None = None


class Response(_Body):
    """The answer to a command."""

    type: Literal["response"] = "response"
    command_id: str
    ok: bool
    result: dict[str, Finite] = Field(default_factory=dict)
    error: str | None = None
    error_code: str | None = None


Body = Union[Status, Telemetry, Event, Reported, Desired, CommandMessage, Response]


class Envelope(BaseModel):
    """The versioned wrapper of every message."""

    model_config = _STRICT

    v: Literal[1] = ENVELOPE_VERSION
    id: str = Field(min_length=1, max_length=64)
    ts: float
    device: str = Field(pattern=ID_PATTERN.pattern)
    body: Body = Field(discriminator="type")


_ENVELOPE = TypeAdapter(Envelope)


def new_id() -> str:
    """Return a new unique message id."""
    return uuid.uuid4().hex


def wrap(device: str, body: Body, message_id: str | None = None, ts: float | None = None) -> Envelope:
    """Wrap a body for sending."""
    return Envelope(id=message_id or new_id(), ts=time.time() if ts is None else ts, device=device, body=body)


def encode(envelope: Envelope) -> bytes:
    """Serialize an envelope to compact JSON bytes."""
    return envelope.model_dump_json(exclude_none=True).encode()


def decode(payload: bytes) -> Envelope:
    """Parse and validate a message, raising TransportError with the reason."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise TransportError(f"message of {len(payload)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        # Fast path (half the time of json.loads + validate_python): a valid message parses
        # straight from JSON. Anything else takes the path below, which says what is wrong.
        return _ENVELOPE.validate_json(payload)
    except ValidationError:
        pass
    try:
        data = json.loads(payload)
        # json.loads accepts lone surrogate escapes ("\ud800") that no encoder, database or log
        # can write back as UTF-8: refuse them here rather than crash whoever handles the message.
        json.dumps(data, ensure_ascii=False).encode()
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, Python's int digit limit, surrogates
        raise TransportError(f"message is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and data.get("v") not in (None, ENVELOPE_VERSION):
        raise TransportError(f"unsupported message version {data.get('v')!r}; this side speaks v{ENVELOPE_VERSION}")
    try:
        return _ENVELOPE.validate_python(data)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])
        raise TransportError(f"invalid message: {details}") from exc
