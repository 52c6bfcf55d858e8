"""Taking a model off the device when the desired state stops naming it.

Policy:

* Only models the desired state named once are removed by it; their names are kept in the
  deployment journal (``fleet/deployments/_managed.json``), so the rule survives restarts.
  Models flashed by hand, or deployed by a ``deploy`` command, are never removed by it.
* A deployment of the model that has not switched yet is cancelled; one that is switching
  (activating, health check, rolling back) finishes first, and the removal follows.
* The server stops serving the model (requests for it answer 404), the store's record loses its
  active version (the commit point: after a crash nothing serves it), then every installed
  version is deleted, each reported as a ``removed`` event, and the reported state drops it.
* Nothing is kept "for rollback": the controller keeps every bundle, so deploying the model
  again is one resumable download, while files no desired state names would be disk that
  nothing ever frees on a small device.
* A removal that fails (a store error) is reported as a ``failed`` event and tried again when
  the next desired state arrives; an interrupted one is finished then too (it is idempotent).

:class:`Removals` keeps the bookkeeping; the :class:`~edge.agent.deployer.Deployer`'s worker
removes between deployments, with :func:`uninstall`.
"""

from __future__ import annotations

import re
from typing import Any

from edge.agent.deployment import DeploymentJournal
from edge.protocol.manifest import NAME_PATTERN
from edge.protocol.messages import Desired, Event, EventKind


class Removals:
    """Which models the desired state manages, and which of those it no longer names."""

    def __init__(self, journal: DeploymentJournal) -> None:
        self.journal = journal
        self.managed: set[str] = journal.managed()
        self.pending: set[str] = set()  # managed names the last desired state left out

    def left_out(self, desired: Desired) -> set[str]:
        """Return the managed names ``desired`` does not name."""
        return self.managed - set(desired.models)

    def follow(self, desired: Desired) -> None:
        """Remember the names ``desired`` gives; mark the managed names it leaves out."""
        names = {n for n in desired.models if re.match(NAME_PATTERN, n)}
        self.pending = self.managed - names
        if not names <= self.managed:
            self.managed |= names
            self.journal.save_managed(self.managed)

    def adopt(self, name: str) -> None:
        """Take ``name`` out of the desired state's hands (a ``deploy`` command named it)."""
        self.pending.discard(name)
        if name in self.managed:
            self.managed.discard(name)
            self.journal.save_managed(self.managed)

    def done(self, name: str) -> None:
        """Forget ``name``: it was removed."""
        self.adopt(name)

    def later(self, name: str) -> None:
        """Stop trying ``name`` until the next desired state (its removal failed)."""
        self.pending.discard(name)


def uninstall(store: Any, health: Any, name: str) -> tuple[str | None, list[str]]:
    """Stop serving ``name`` and delete its versions; return (the version that served, versions deleted)."""
    active = next((m.version for m in store.active() if m.name == name), None)
    health.release(name)  # stop serving before the files go
    return active, store.uninstall(name)


def removal_events(name: str, active: str | None, removed: list[str]) -> list[Event]:
    """Return one ``removed`` event per deleted version."""
    events = []
    for version in removed:
        what = "stopped serving it and deleted its files" if version == active else "deleted its files"
        events.append(Event(kind=EventKind.REMOVED, model=name, version=version,
                            detail=f"no longer in the desired state: {what}"))
    return events
