"""Per-device variant selection: which bundle of ``name@version`` fits a device.

A version is built once per device profile. A device gets the variant built for its profile;
failing that (and when the rollout allows it) a portable variant whose manifest the device can
run: architecture, execution providers and RAM checked against the capabilities it announced.
A device with neither is refused, with the reason, never given a bundle it cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge.errors import BundleError
from edge.protocol.enums import Architecture
from edge.protocol.manifest import Manifest, parse_manifest


@dataclass(frozen=True)
class Variant:
    """One stored bundle of the version being rolled out."""

    sha256: str
    profile: str
    size: int
    manifest: Manifest


@dataclass(frozen=True)
class Choice:
    """The variant chosen for a device, or why none fits."""

    variant: Variant | None
    reason: str = ""


def load_variants(rows: list[dict[str, Any]], manifests: dict[str, str]) -> dict[str, Variant]:
    """Build variants by profile from bundle records and their manifest texts."""
    out = {}
    for r in rows:
        try:
            manifest = parse_manifest(manifests[r["sha256"]].encode())
        except (KeyError, BundleError):
            continue  # verified at upload; an unreadable one is simply not offered
        out[r["profile"]] = Variant(r["sha256"], r["profile"], r["size"], manifest)
    return out


def fits(manifest: Manifest, capabilities: dict[str, Any] | None) -> str:
    """Return why a device with ``capabilities`` cannot run ``manifest`` ("" when it can)."""
    if not capabilities:
        return "the device has not announced its capabilities"
    arch = str(capabilities.get("architecture", ""))
    if not Architecture(manifest.architecture).accepts(arch):
        return f"built for {manifest.architecture.value}, device is {arch or 'unknown'}"
    providers = set(capabilities.get("providers") or ())
    missing = [p for p in manifest.required_providers if p not in providers]
    if missing:
        return f"needs {', '.join(missing)}"
    ram = int(capabilities.get("ram_mb") or 0)
    if ram and ram < manifest.min_ram_mb:
        return f"needs {manifest.min_ram_mb} MB RAM, device has {ram}"
    return ""


def choose_variant(variants: dict[str, Variant], profile: str, capabilities: dict[str, Any] | None,
                   allow_fallback: bool) -> Choice:
    """Pick the variant for one device: its own profile first, then a compatible portable one."""
    if profile and profile in variants:
        return Choice(variants[profile])
    reasons = []
    if allow_fallback:
        # Portable builds (architecture "any") first, then the smallest: the most conservative fit.
        ordered = sorted(variants.values(), key=lambda v: (v.manifest.architecture is not Architecture.ANY, v.size))
        for v in ordered:
            why = fits(v.manifest, capabilities)
            if not why:
                return Choice(v)
            reasons.append(f"{v.profile}: {why}")
    built = ", ".join(sorted(variants)) or "none"
    who = f"profile {profile!r}" if profile else "a device that has not reported its profile"
    detail = f"no variant for {who} (built for: {built})"
    if reasons:
        detail += "; " + "; ".join(reasons[:3])
    return Choice(None, detail)
