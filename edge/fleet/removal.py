"""Take a model off devices: its rows leave their desired state, and their agents uninstall it.

    POST /api/v1/undeploy {"model": "tiny", "target": {"kind": "group", "value": "lab"}}
    POST /api/v1/undeploy {"model": "tiny", "devices": ["edge-0", "edge-7"]}
    edge fleet undeploy tiny --group lab

What a device does then is the agent's policy (:mod:`edge.agent.removal`): it stops serving the
model, deletes every version and reports a ``removed`` event per version; the model leaves the
device's reported models, so the registry, the CLI and the dashboard stop showing it.

* Refused while a rollout of the model is active (pending, deploying, soaking, paused or
  halted): it would hand the model back. Abort the rollout first.
* Devices of the target whose desired state does not name the model are left as they are (a
  model flashed by hand is not the controller's to remove) and counted as ``unchanged``.
* A completed rollout keeps giving its version to devices that *join* its target later; the
  devices it already covered stay its members and do not get the model back.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import delete, select

from edge.errors import ConfigError, ConflictError, NotFoundError
from edge.fleet.db import Database, desired_t, devices_t, rollouts_t
from edge.fleet.desired import bump_desired
from edge.fleet.plan import Target
from edge.fleet.registry import target_condition
from edge.fleet.states import ACTIVE
from edge.protocol.manifest import NAME_PATTERN
from edge.protocol.topics import ID_PATTERN

# Devices one request may name; a larger set is a tag or a group.
MAX_DEVICES = 1000
# Device ids listed in the answer (the count is always complete).
LISTED = 100
# IN lists are cut into chunks of this size (SQLite allows 32766 parameters; keep statements small).
CHUNK = 500


class RemovalSpec(BaseModel):
    """A request to take ``model`` off a target or off named devices."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(pattern=NAME_PATTERN)
    target: Target | None = None
    devices: tuple[str, ...] | None = Field(None, min_length=1, max_length=MAX_DEVICES)

    @model_validator(mode="after")
    def _one_selection(self) -> "RemovalSpec":
        if (self.target is None) == (self.devices is None):
            raise ValueError("give either target {kind, value} or devices [ids], not both or neither")
        for d in self.devices or ():
            if not ID_PATTERN.match(d):
                raise ValueError(f"invalid device id {d!r}")
        return self


def parse_removal(data: object) -> RemovalSpec:
    """Validate a removal request, raising ConfigError naming the bad field."""
    try:
        return RemovalSpec.model_validate(data)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(body)'}: {e['msg']}" for e in exc.errors()[:5])
        raise ConfigError(f"invalid removal: {details}",
                          hint="fields: model, and target {kind: all|tag|group|profile, value} or devices [ids]") from exc


def remove_model(db: Database, spec: RemovalSpec) -> dict[str, Any]:
    """Drop ``spec.model`` from the desired state of the selected devices; return what changed."""
    with db.write() as conn:
        busy = conn.execute(select(rollouts_t.c.id, rollouts_t.c.state).where(
            rollouts_t.c.model == spec.model, rollouts_t.c.state.in_([s.value for s in ACTIVE]))).first()
        if busy is not None:
            raise ConflictError(f"rollout {busy.id} of {spec.model} is still {busy.state}; it would deploy the model again",
                                hint=f"`edge fleet rollout abort {busy.id}` first")
        if spec.devices is not None:
            wanted = sorted(set(spec.devices))
            known = set(conn.execute(select(devices_t.c.id).where(devices_t.c.id.in_(wanted))).scalars())
            missing = [d for d in wanted if d not in known]
            if missing:
                raise NotFoundError(f"unknown device(s) {', '.join(missing[:10])}",
                                    hint="list devices with `edge fleet devices`")
            selected = wanted
        else:
            assert spec.target is not None
            cond = target_condition(spec.target.kind, spec.target.value)
            selected = sorted(conn.execute(select(devices_t.c.id).where(cond)).scalars())
        named: list[str] = []
        for i in range(0, len(selected), CHUNK):
            chunk = selected[i:i + CHUNK]
            named += conn.execute(select(desired_t.c.device_id).where(
                desired_t.c.model == spec.model, desired_t.c.device_id.in_(chunk))).scalars()
            conn.execute(delete(desired_t).where(desired_t.c.model == spec.model, desired_t.c.device_id.in_(chunk)))
        bump_desired(conn, named)
    named.sort()
    return {"model": spec.model, "removed": len(named), "unchanged": len(selected) - len(named),
            "devices": named[:LISTED]}
