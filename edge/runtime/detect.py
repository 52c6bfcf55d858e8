"""Pick the device profile that fits this machine, and say why."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

from edge.errors import NotFoundError
from edge.protocol.catalog import Catalog
from edge.protocol.enums import Accelerator, ExecutionProvider
from edge.protocol.profile import DeviceProfile
from edge.runtime.session import available_providers


@dataclass(frozen=True)
class MachineFacts:
    """What detection looks at."""

    machine: str
    cpu_flags: frozenset[str]
    board_model: str
    providers: tuple[str, ...]

    def to_dict(self) -> dict:
        """Return the facts as JSON-able data (flags trimmed to the interesting ones)."""
        interesting = sorted(f for f in self.cpu_flags if f.startswith(("avx", "fma", "asimd", "sve", "neon")))
        return {
            "machine": self.machine,
            "cpu_flags": interesting,
            "board_model": self.board_model,
            "providers": list(self.providers),
        }


@dataclass
class Verdict:
    """Whether one profile fits, with the reasons."""

    profile: str
    fits: bool
    priority: int
    reasons: list[str] = field(default_factory=list)


def read_machine_facts(root: Path = Path("/")) -> MachineFacts:
    """Read CPU flags, board model and ORT providers of this machine."""
    flags: set[str] = set()
    try:
        for line in (root / "proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                flags.update(value.split())
    except OSError:
        pass
    model = ""
    try:
        model = (root / "proc/device-tree/model").read_bytes().rstrip(b"\x00").decode(errors="replace")
    except OSError:
        pass
    return MachineFacts(platform.machine(), frozenset(flags), model, tuple(available_providers()))


def judge(profile: DeviceProfile, facts: MachineFacts) -> Verdict:
    """Decide whether ``profile`` fits the machine described by ``facts``."""
    v = Verdict(profile.name, True, profile.detect.priority)
    if not profile.architecture.accepts(facts.machine):
        v.fits = False
        v.reasons.append(f"architecture {profile.architecture.value} != {facts.machine}")
    missing = [f for f in profile.detect.cpu_flags if f not in facts.cpu_flags]
    if missing:
        v.fits = False
        v.reasons.append(f"CPU lacks {', '.join(missing)}")
    elif profile.detect.cpu_flags:
        v.reasons.append(f"CPU has {', '.join(profile.detect.cpu_flags)}")
    if profile.detect.board_model:
        if any(b in facts.board_model for b in profile.detect.board_model):
            v.reasons.append(f"board is {facts.board_model!r}")
        else:
            v.fits = False
            v.reasons.append(f"board is not {' or '.join(profile.detect.board_model)}")
    if profile.accelerator is Accelerator.CUDA:
        gpu = [p.name.value for p in profile.execution_providers if p.name.needs_gpu]
        if not set(gpu) & set(facts.providers):
            v.fits = False
            v.reasons.append(f"onnxruntime offers none of {', '.join(gpu)}")
        else:
            v.reasons.append("onnxruntime offers CUDA")
    else:
        extra = [p.name.value for p in profile.execution_providers if p.name is not ExecutionProvider.CPU]
        absent = [p for p in extra if p not in facts.providers]
        if absent:
            v.reasons.append(f"{', '.join(absent)} not in this onnxruntime (CPU fallback)")
    return v


def detect_profile(catalog: Catalog, facts: MachineFacts | None = None) -> tuple[DeviceProfile, list[Verdict]]:
    """Return the fitting profile with the highest priority, and the verdict on every profile."""
    facts = facts or read_machine_facts()
    verdicts = [judge(catalog.get(n), facts) for n in catalog.names()]
    fitting = sorted((v for v in verdicts if v.fits), key=lambda v: (-v.priority, v.profile))
    if not fitting:
        raise NotFoundError(
            "no device profile fits this machine",
            hint="write one (see `edge profiles show generic-cpu`) and pass --profile",
        )
    return catalog.get(fitting[0].profile), verdicts
