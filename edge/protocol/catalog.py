"""The set of known device profiles: built-in ones plus folders the user adds."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edge.errors import NotFoundError, ProfileError
from edge.protocol.profile import DeviceProfile, load_profile_file


def builtin_profile_dir() -> Path:
    """Return the folder of profiles shipped with the package."""
    return Path(str(resources.files("device_profiles")))


@dataclass(frozen=True)
class Catalog:
    """Profiles by name, with the file each came from."""

    profiles: dict[str, DeviceProfile]
    sources: dict[str, Path]

    def names(self) -> list[str]:
        """Return the profile names, sorted."""
        return sorted(self.profiles)

    def get(self, name: str) -> DeviceProfile:
        """Return one profile, or raise listing the known names."""
        try:
            return self.profiles[name]
        except KeyError:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise NotFoundError(
                f"unknown device profile {name!r}",
                hint=f"{hint}known profiles: {', '.join(self.names())}",
            ) from None


def load_catalog(extra_dirs: tuple[Path, ...] = ()) -> Catalog:
    """Load every profile: ``extra_dirs`` first (they may override built-ins), then built-ins."""
    profiles: dict[str, DeviceProfile] = {}
    sources: dict[str, Path] = {}
    for folder in (*extra_dirs, builtin_profile_dir()):
        if not folder.is_dir():
            raise ProfileError(f"profile folder {folder} does not exist")
        seen_here: set[str] = set()
        for path in sorted(folder.glob("*.yaml")):
            profile = load_profile_file(path)
            if profile.name in seen_here:
                raise ProfileError(f"{path}: profile {profile.name!r} defined twice in {folder}")
            seen_here.add(profile.name)
            if profile.name not in profiles:
                profiles[profile.name] = profile
                sources[profile.name] = path
    return Catalog(profiles, sources)
