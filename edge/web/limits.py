"""What a server tolerates from its clients: deadlines, sizes, connections, request rates."""

from __future__ import annotations

from dataclasses import dataclass

from edge.errors import ConfigError

# A client on a sane link sends its headers in one packet; 10 s leaves room for a congested
# cellular uplink and still frees a slowloris connection quickly.
HEADER_TIMEOUT_S = 10.0
# Time a request body gets before its first byte, extended as bytes arrive (see BODY_MIN_RATE).
BODY_TIMEOUT_S = 30.0
# Each KiB received extends the body deadline by a second (Apache's mod_reqtimeout works the
# same way): a slow but steady upload finishes, a body that trickles a byte now and then does not.
BODY_MIN_RATE = 1024
# nginx allows 32 KiB of headers by default and h11 16 KiB; nothing we serve needs more.
MAX_HEADER_BYTES = 64 * 1024
# Open connections before uvicorn answers 503: well under the usual 1,024 file descriptors.
MAX_CONNECTIONS = 512


@dataclass(frozen=True)
class Rate:
    """A token bucket: ``burst`` requests at once, refilled at ``per_s`` requests a second."""

    per_s: float
    burst: int

    def __post_init__(self) -> None:
        if not self.per_s > 0 or self.burst < 1:
            raise ConfigError(f"a rate limit needs a positive rate and a burst of at least 1, got "
                              f"{self.per_s}/s with burst {self.burst}")


@dataclass(frozen=True)
class HttpLimits:
    """Limits of one HTTP server; the defaults suit both the agent and the controller."""

    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    body_min_rate: int = BODY_MIN_RATE
    max_header_bytes: int = MAX_HEADER_BYTES
    max_connections: int = MAX_CONNECTIONS
    max_requests: int = 0  # requests in flight before 429; 0: no cap (the agent bounds its queues itself)
    rate: Rate | None = None  # per client address; None: no limit
    path_rates: tuple[tuple[str, Rate], ...] = ()  # an extra bucket per client for these paths (login)
    unmetered: tuple[str, ...] = ()  # fnmatch patterns of long-lived requests max_requests leaves out

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("body_min_rate", "max_header_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_requests < 0:
            raise ConfigError(f"max_requests must not be negative, got {self.max_requests}", hint="0 means no cap")

    @property
    def needs_guard(self) -> bool:
        """Return whether any per-request limit is set (else no middleware is needed)."""
        return bool(self.max_requests or self.rate or self.path_rates)
