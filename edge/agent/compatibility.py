"""Whether a signed manifest fits this device: validity window, profile, architecture, providers,
memory and disk. Every refusal names what the bundle wants and what the device has.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from datetime import datetime, timezone

from edge.errors import CompatibilityError, ResourceError, SignatureError
from edge.protocol.enums import Architecture, ExecutionProvider
from edge.protocol.manifest import Manifest
from edge.protocol.profile import DeviceProfile

MIB = 1 << 20
# Disk kept free beyond the payload so the journal, state files and logs can still be written
# after a large install (a full SD card bricks more than the model store).
DISK_RESERVE_BYTES = 32 * MIB


@dataclass(frozen=True)
class DeviceFacts:
    """What the target device offers; ``local`` when it is the machine running this code."""

    machine: str
    providers: tuple[str, ...]
    available_ram_mb: int | None  # None: unknown (flashing a store for another device)
    local: bool

    @classmethod
    def here(cls) -> "DeviceFacts":
        """Read this machine: platform.machine(), the ORT providers, the available RAM."""
        import psutil

        from edge.runtime.session import available_providers

        return cls(platform.machine(), tuple(available_providers()),
                   int(psutil.virtual_memory().available // MIB), True)

    @classmethod
    def from_profile(cls, profile: DeviceProfile) -> "DeviceFacts":
        """Describe a device that is not this machine from its profile (SD card flashing)."""
        return cls(profile.architecture.value, tuple(profile.provider_names()), None, False)

    @classmethod
    def for_profile(cls, profile: DeviceProfile) -> "DeviceFacts":
        """Return this machine's facts when the profile's architecture fits it, else the profile's."""
        if profile.architecture.accepts(platform.machine()):
            return cls.here()
        return cls.from_profile(profile)


def parse_time(value: str, what: str) -> datetime:
    """Parse an ISO 8601 time from a signed manifest (naive times are UTC)."""
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise SignatureError(f"{what} {value!r} is not an ISO 8601 time") from exc
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def check_validity(manifest: Manifest, now: datetime | None = None) -> None:
    """Refuse a manifest whose signed validity window has ended."""
    if manifest.expires_at is None:
        return
    now = now or datetime.now(timezone.utc)
    expires = parse_time(manifest.expires_at, "expires_at")
    if now >= expires:
        raise SignatureError(
            f"{manifest.ref}: signature expired at {manifest.expires_at}",
            hint="ask for a freshly signed bundle (or check the device clock)",
        )


def check_fit(manifest: Manifest, profile: DeviceProfile, facts: DeviceFacts) -> None:
    """Refuse a bundle built for another profile or architecture, or needing absent providers."""
    if manifest.profile != profile.name:
        raise CompatibilityError(
            f"{manifest.ref} is built for profile {manifest.profile}, this device is {profile.name}",
            hint=f"export it with --profile {profile.name}",
        )
    if facts.machine == Architecture.ANY.value:  # a portable profile flashed from another machine
        fits = manifest.architecture is Architecture.ANY
    else:
        fits = manifest.architecture.accepts(facts.machine)
    if not fits:
        raise CompatibilityError(
            f"{manifest.ref} is built for {manifest.architecture.value}, this device is {facts.machine}",
        )
    known = {p.value for p in ExecutionProvider}
    unknown = [p for p in manifest.required_providers if p not in known]
    if unknown:
        raise CompatibilityError(f"{manifest.ref} names unknown execution provider(s) {', '.join(unknown)}")
    if not set(manifest.required_providers) & set(facts.providers):
        raise CompatibilityError(
            f"{manifest.ref} needs one of {', '.join(manifest.required_providers)}; "
            f"this device offers {', '.join(facts.providers) or '(none)'}",
        )


def check_budgets(
    manifest: Manifest,
    profile: DeviceProfile,
    facts: DeviceFacts,
    *,
    store_bytes: int,
    free_disk_bytes: int,
    other_active_ram_mb: int,
) -> None:
    """Refuse a bundle that does not fit the profile's memory and disk budgets or the free space."""
    need_ram = manifest.min_ram_mb + other_active_ram_mb
    if need_ram > profile.memory_mb:
        others = f" ({other_active_ram_mb} MB for the other active models)" if other_active_ram_mb else ""
        raise ResourceError(
            f"{manifest.ref} needs {manifest.min_ram_mb} MB of RAM{others}; profile {profile.name} "
            f"budgets {profile.memory_mb} MB",
        )
    if facts.available_ram_mb is not None and manifest.min_ram_mb > facts.available_ram_mb:
        raise ResourceError(
            f"{manifest.ref} needs {manifest.min_ram_mb} MB of RAM; {facts.available_ram_mb} MB are available",
            hint="stop other programs or remove an active model",
        )
    size = manifest.payload_size()
    if size > profile.max_bundle_mb * MIB:
        raise ResourceError(
            f"{manifest.ref} is {_mb(size)}, over the profile's max_bundle_mb {profile.max_bundle_mb}")
    budget = profile.disk_mb * MIB - store_bytes
    if size > budget:
        raise ResourceError(
            f"{manifest.ref} needs {_mb(size)} of disk; the store holds {_mb(store_bytes)} of "
            f"profile {profile.name}'s {profile.disk_mb} MB budget",
            hint="remove an old version with `edge models remove NAME@VERSION`",
        )
    if size + DISK_RESERVE_BYTES > free_disk_bytes:
        raise ResourceError(
            f"{manifest.ref} needs {_mb(size)} of disk (+{_mb(DISK_RESERVE_BYTES)} reserve); "
            f"{_mb(free_disk_bytes)} are free",
        )


def _mb(n: int) -> str:
    return f"{n / MIB:.1f} MB"
