"""Rollouts: waves, soak, health gates, failure ratio, halt and fleet-wide revert.

:class:`RolloutEngine` keeps no state of its own: every call reads the rollout from the
database, moves it through the transition table of :mod:`edge.fleet.states` and writes it back
in one transaction (the rollout row locked), so the ticker, the REST API and a restarted
controller all see and continue the same rollout. Devices are told a new version by changing
their rows in ``desired_models``; :mod:`edge.fleet.desired` publishes those as retained messages.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from typing import Any, Iterable, Sequence

from sqlalchemy import and_, bindparam, delete, func, or_, select, update
from sqlalchemy.engine import Connection

from edge.errors import ConfigError, ConflictError, NotFoundError
from edge.fleet.artifacts import ArtifactStore
from edge.fleet.db import (
    Clock,
    Database,
    bundles_t,
    desired_t,
    device_models_t,
    devices_t,
    now,
    rollout_devices_t as rd,
    rollouts_t,
    transitions_t,
)
from edge.fleet.desired import bump_desired
from edge.fleet.health import GateResult, Member, collect, evaluate
from edge.fleet.plan import RolloutPlan, RolloutSpec, next_window_start, wave_size
from edge.fleet.registry import Received, target_condition
from edge.fleet.states import (
    ACTIVE,
    ADVANCE_FROM,
    ASSIGNED,
    EVENT_STATES,
    IN_PROGRESS,
    DeviceState,
    RolloutEvent,
    RolloutState,
    next_state,
)
from edge.fleet.variants import Variant, choose_variant, load_variants
from edge.protocol.messages import Event

log = logging.getLogger(__name__)

S, E, D = RolloutState, RolloutEvent, DeviceState
# Gates read many telemetry rows: judge at most this often while a wave soaks (and at its end).
GATE_INTERVAL_S = 30.0
# IN lists are cut into chunks of this size (SQLite allows 32766 parameters; keep statements small).
CHUNK = 500


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), CHUNK):
        yield items[i:i + CHUNK]


def apply_device_events(conn: Connection, batch: Sequence[Received], clock: Clock = now) -> int:
    """Advance devices' rollout states from their events (forward only); return rows changed."""
    groups: dict[DeviceState, list[dict[str, Any]]] = {}
    for item in batch:
        body: Event = item.envelope.body  # type: ignore[assignment]
        target = EVENT_STATES.get(body.kind)
        if target is None or not body.deployment_id:
            continue
        detail = f"{body.kind.value}: {body.detail}"[:500] if body.detail else body.kind.value
        groups.setdefault(target, []).append(
            {"r_id": body.deployment_id, "d_id": item.envelope.device, "t": clock(), "detail": detail})
    changed = 0
    for target, rows in groups.items():
        # (no IN list: an expanding parameter cannot be used with executemany)
        stmt = (update(rd).where(rd.c.rollout_id == bindparam("r_id"), rd.c.device_id == bindparam("d_id"),
                                 or_(*(rd.c.state == s.value for s in sorted(ADVANCE_FROM[target]))))
                .values(state=target.value, updated_at=bindparam("t"), detail=bindparam("detail")))
        changed += max(conn.execute(stmt, rows).rowcount, 0)
    return changed


class RolloutEngine:
    """Create, steer and advance rollouts; every method is one database transaction."""

    def __init__(self, db: Database, store: ArtifactStore, clock: Clock = now) -> None:
        self.db, self.store, self.clock = db, store, clock

    # ------------------------------------------------------------------ user actions

    def create(self, spec: RolloutSpec) -> dict[str, Any]:
        """Plan a rollout of ``spec.model@spec.version``; the ticker starts it."""
        t = self.clock()
        rid = f"ro-{secrets.token_hex(5)}"
        with self.db.write() as conn:
            variants = self.store.variants(conn, spec.model, spec.version)
            if not variants:
                raise NotFoundError(f"no bundle of {spec.model}@{spec.version} is stored",
                                    hint="publish one with `edge fleet publish BUNDLE`")
            busy = conn.execute(select(rollouts_t.c.id, rollouts_t.c.state).where(
                rollouts_t.c.model == spec.model, rollouts_t.c.state.in_([s.value for s in ACTIVE]))).first()
            if busy is not None:
                raise ConflictError(f"rollout {busy.id} of {spec.model} is still {busy.state}",
                                    hint=f"wait for it, or `edge fleet rollout abort {busy.id}`")
            seq = (conn.execute(select(func.max(rollouts_t.c.seq))).scalar() or 0) + 1
            conn.execute(rollouts_t.insert().values(
                id=rid, seq=seq, model=spec.model, version=spec.version, state=S.PENDING.value,
                target_kind=spec.target.kind, target_value=spec.target.value,
                plan=spec.plan.model_dump(mode="json"), wave_index=-1, created_at=t, updated_at=t,
                reason=f"variants for {', '.join(sorted(variants))}"))
            conn.execute(transitions_t.insert().values(rollout_id=rid, ts=t, from_state="", event="create",
                                                       to_state=S.PENDING.value, reason=""))
        return self.status(rid)

    def act(self, rollout_id: str, event: RolloutEvent, reason: str = "") -> dict[str, Any]:
        """Apply a user action: pause, resume, abort or rollback."""
        if event not in (E.PAUSE, E.RESUME, E.ABORT, E.ROLLBACK):
            raise ConfigError(f"{event.value} is not a user action", hint="use pause, resume, abort or rollback")
        with self.db.write() as conn:
            r = self._load(conn, rollout_id)
            state = RolloutState(r["state"])
            if event is E.PAUSE:
                self._transition(conn, r, event, reason or "paused by the user", paused_from=state.value)
            elif event is E.RESUME:
                paused_at = conn.execute(select(func.max(transitions_t.c.ts)).where(
                    transitions_t.c.rollout_id == rollout_id, transitions_t.c.event == E.PAUSE.value)).scalar()
                self._transition(conn, r, event, reason or "resumed by the user", paused_from=None)
                self._shift_deadlines(conn, r, self.clock() - (paused_at or self.clock()))
            elif event is E.ABORT:
                self._transition(conn, r, event, reason or "aborted by the user")
                self._skip_queued(conn, rollout_id, "the rollout was aborted")
            else:
                self._transition(conn, r, event, reason or "rolled back by the user")
                self._revert(conn, r)
        return self.status(rollout_id)

    # ------------------------------------------------------------------ queries

    def status(self, rollout_id: str) -> dict[str, Any]:
        """Return a rollout with its plan, device counts per state and wave, and its transitions."""
        with self.db.read() as conn:
            r = self._load(conn, rollout_id, lock=False)
            out = self._summary(conn, r)
            per_wave: dict[str, dict[str, int]] = {}
            for row in conn.execute(select(rd.c.wave, rd.c.state, func.count()).where(
                    rd.c.rollout_id == rollout_id).group_by(rd.c.wave, rd.c.state)):
                key = "unassigned" if row[0] is None else str(row[0])
                per_wave.setdefault(key, {})[row[1]] = row[2]
            out["waves_progress"] = per_wave
            out["refused"] = [dict(x) for x in conn.execute(select(rd.c.device_id, rd.c.profile, rd.c.detail).where(
                rd.c.rollout_id == rollout_id, rd.c.state == D.REFUSED.value).order_by(rd.c.device_id).limit(50)).mappings()]
            out["failed"] = [dict(x) for x in conn.execute(select(rd.c.device_id, rd.c.detail).where(
                rd.c.rollout_id == rollout_id, rd.c.state == D.FAILED.value).order_by(rd.c.device_id).limit(50)).mappings()]
            out["transitions"] = [
                {"ts": t.ts, "from": t.from_state, "event": t.event, "to": t.to_state, "reason": t.reason}
                for t in conn.execute(select(transitions_t).where(transitions_t.c.rollout_id == rollout_id)
                                      .order_by(transitions_t.c.id))]
        return out

    def devices(self, rollout_id: str, state: str | None = None, limit: int = 100, after: str | None = None) -> list[dict]:
        """Return a page of a rollout's devices."""
        with self.db.read() as conn:
            self._load(conn, rollout_id, lock=False)
            stmt = select(rd).where(rd.c.rollout_id == rollout_id)
            if state:
                stmt = stmt.where(rd.c.state == state)
            if after:
                stmt = stmt.where(rd.c.device_id > after)
            rows = conn.execute(stmt.order_by(rd.c.device_id).limit(max(1, min(limit, 1000)))).mappings()
            return [{k: v for k, v in r.items() if k != "rollout_id"} for r in rows]

    def list(self, state: str | None = None, model: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Return rollouts, newest first."""
        with self.db.read() as conn:
            stmt = select(rollouts_t)
            if state:
                stmt = stmt.where(rollouts_t.c.state == state)
            if model:
                stmt = stmt.where(rollouts_t.c.model == model)
            rows = conn.execute(stmt.order_by(rollouts_t.c.seq.desc()).limit(max(1, min(limit, 1000)))).mappings().all()
            return [self._summary(conn, r) for r in rows]

    def _summary(self, conn: Connection, r: Any) -> dict[str, Any]:
        counts = {row[0]: row[1] for row in conn.execute(select(rd.c.state, func.count()).where(
            rd.c.rollout_id == r["id"]).group_by(rd.c.state))}
        plan = RolloutPlan.model_validate(r["plan"])
        return {
            "id": r["id"], "model": r["model"], "version": r["version"], "state": r["state"],
            "target": {"kind": r["target_kind"], "value": r["target_value"]}, "plan": plan.model_dump(mode="json"),
            "wave": r["wave_index"], "waves": list(plan.waves), "wave_started_at": r["wave_started_at"],
            "soak_until": r["soak_until"], "reason": r["reason"], "gate": r["last_gate"], "devices": counts,
            "created_at": r["created_at"], "updated_at": r["updated_at"], "finished_at": r["finished_at"],
        }

    # ------------------------------------------------------------------ the ticker

    def tick(self) -> int:
        """Advance every rollout that can move; return how many were looked at."""
        with self.db.read() as conn:
            ids = list(conn.execute(select(rollouts_t.c.id).where(rollouts_t.c.state.in_(
                [S.PENDING.value, S.DEPLOYING.value, S.SOAKING.value, S.REVERTING.value])).order_by(
                rollouts_t.c.seq)).scalars())
            completed = self._in_force(conn)
        for rid in ids:
            with self.db.write() as conn:
                self._step(conn, self._load(conn, rid))
        for rid in completed:
            with self.db.write() as conn:
                r = self._load(conn, rid)
                if r["state"] == S.COMPLETED.value:
                    self._follow_target(conn, r)
        return len(ids) + len(completed)

    def _in_force(self, conn: Connection) -> list[str]:
        # The newest completed rollout per (model, target) keeps serving devices that join it.
        rows = conn.execute(select(rollouts_t.c.id, rollouts_t.c.model, rollouts_t.c.target_kind,
                                   rollouts_t.c.target_value).where(rollouts_t.c.state == S.COMPLETED.value)
                            .order_by(rollouts_t.c.seq.desc())).all()
        seen, out = set(), []
        for row in rows:
            key = (row.model, row.target_kind, row.target_value)
            if key not in seen:
                seen.add(key)
                out.append(row.id)
        return out

    def _step(self, conn: Connection, r: Any) -> None:
        state = RolloutState(r["state"])
        plan = RolloutPlan.model_validate(r["plan"])
        if state is S.REVERTING:
            dirty = conn.execute(select(func.count()).select_from(rd.join(devices_t, devices_t.c.id == rd.c.device_id))
                                 .where(rd.c.rollout_id == r["id"], rd.c.state == D.REVERTED.value,
                                        devices_t.c.desired_dirty.is_(True))).scalar_one()
            if dirty == 0:
                self._transition(conn, r, E.REVERT_DONE, "every device was told its previous version")
            return
        variants = self._variants(conn, r)
        self._sync_members(conn, r, variants, plan)
        if state is S.PENDING:
            self._start_wave(conn, r, plan, E.START)
            return
        last_wave = r["wave_index"] >= len(plan.waves) - 1
        if last_wave:  # devices joining during the last wave get the new version at once
            self._assign_queued(conn, r, plan, None, r["wave_index"])
        self._time_out(conn, r)
        why = self._too_many_failures(conn, r, plan)
        if why:
            self._halt(conn, r, plan, why)
            return
        if state is S.DEPLOYING:
            busy = conn.execute(select(func.count()).select_from(rd).where(
                rd.c.rollout_id == r["id"], rd.c.state.in_([s.value for s in IN_PROGRESS]),
                rd.c.wave <= r["wave_index"])).scalar_one()
            if busy == 0:
                self._transition(conn, r, E.WAVE_DONE, f"wave {r['wave_index'] + 1} finished; soaking {plan.soak_s:g} s",
                                 soak_until=self.clock() + plan.soak_s)
            return
        # SOAKING: judge health now and then, and at the end of the soak.
        t = self.clock()
        soak_over = t >= (r["soak_until"] or 0)
        last = r["last_gate"] or {}
        if not soak_over and t - last.get("at", 0) < GATE_INTERVAL_S:
            return
        gate = self._gate(conn, r, plan)
        conn.execute(update(rollouts_t).where(rollouts_t.c.id == r["id"]).values(
            last_gate={**gate.to_dict(), "at": t, "wave": r["wave_index"]}))
        if not gate.passed:
            self._halt(conn, r, plan, "health gate failed: " + "; ".join(gate.failures))
        elif soak_over and (gate.judged or not plan.require_traffic):
            self._start_wave(conn, r, plan, E.SOAK_PASSED)

    def _start_wave(self, conn: Connection, r: Any, plan: RolloutPlan, event: RolloutEvent) -> None:
        counts = self._counts(conn, r["id"])
        eligible = sum(n for s, n in counts.items() if s not in (D.REFUSED.value, D.SKIPPED.value))
        assigned = sum(n for s, n in counts.items() if s in {x.value for x in ASSIGNED})
        for j in range(r["wave_index"] + 1, len(plan.waves)):
            want = wave_size(plan.waves[j], eligible)
            if want > assigned:
                self._transition(conn, r, event, f"wave {j + 1} of {len(plan.waves)}: {plan.waves[j]} = {want} of "
                                 f"{eligible} devices", wave_index=j, wave_started_at=self.clock(), soak_until=None)
                self._assign_queued(conn, r, plan, want - assigned, j)
                return
        if event is E.START:  # nothing to deploy yet: wait in pending for devices to appear
            conn.execute(update(rollouts_t).where(rollouts_t.c.id == r["id"]).values(
                reason="waiting: no device of the target has a fitting variant yet", updated_at=self.clock()))
            return
        self._transition(conn, r, E.FINISHED, f"every wave passed; {assigned} devices on {r['version']}",
                         wave_index=len(plan.waves) - 1)

    def _halt(self, conn: Connection, r: Any, plan: RolloutPlan, why: str) -> None:
        log.warning("rollout %s halted: %s", r["id"], why)
        if plan.auto_revert:
            self._transition(conn, r, E.AUTO_REVERT, why)
            self._revert(conn, r)
        else:
            self._transition(conn, r, E.HALT, why)

    # ------------------------------------------------------------------ members

    def _variants(self, conn: Connection, r: Any) -> dict[str, Variant]:
        rows = self.store.list(conn, r["model"], r["version"])
        texts = dict(conn.execute(select(bundles_t.c.sha256, bundles_t.c.manifest).where(
            bundles_t.c.sha256.in_([b["sha256"] for b in rows]))).all())
        return load_variants(rows, texts)

    def _resolve(self, variants: dict[str, Variant], plan: RolloutPlan, dev: Any) -> dict[str, Any]:
        choice = choose_variant(variants, dev.profile or "", dev.capabilities, plan.allow_fallback)
        if choice.variant is None:
            return {"state": D.REFUSED.value, "bundle_sha256": None, "detail": choice.reason}
        return {"state": D.QUEUED.value, "bundle_sha256": choice.variant.sha256, "detail": ""}

    def _sync_members(self, conn: Connection, r: Any, variants: dict[str, Variant], plan: RolloutPlan,
                      extra: Any = None) -> None:
        """Add devices that joined the target, re-check refused ones whose profile changed, and
        skip queued ones that left."""
        t, rid = self.clock(), r["id"]
        cond = target_condition(r["target_kind"], r["target_value"])
        if extra is not None:
            cond = and_(cond, extra)
        member = select(rd.c.device_id).where(rd.c.rollout_id == rid, rd.c.device_id == devices_t.c.id)
        cols = (devices_t.c.id, devices_t.c.profile, devices_t.c.capabilities)
        new = conn.execute(select(*cols).where(cond, ~member.exists())).all()
        rows = [{"rollout_id": rid, "device_id": d.id, "profile": d.profile or "", "joined_at": t, "updated_at": t,
                 **self._resolve(variants, plan, d)} for d in new]
        if rows:
            conn.execute(rd.insert(), rows)
        changed = conn.execute(select(*cols).select_from(rd.join(devices_t, devices_t.c.id == rd.c.device_id)).where(
            rd.c.rollout_id == rid, cond,
            ((rd.c.state == D.REFUSED.value) & (rd.c.profile != devices_t.c.profile)) | (rd.c.state == D.SKIPPED.value),
        )).all()
        updates = [{"d_id": d.id, "profile": d.profile or "", "t": t, **self._resolve(variants, plan, d)} for d in changed]
        if updates:
            conn.execute(update(rd).where(rd.c.rollout_id == rid, rd.c.device_id == bindparam("d_id")).values(
                state=bindparam("state"), bundle_sha256=bindparam("bundle_sha256"), detail=bindparam("detail"),
                profile=bindparam("profile"), updated_at=bindparam("t"), joined_at=bindparam("t")), updates)
        conn.execute(update(rd).where(rd.c.rollout_id == rid, rd.c.state == D.QUEUED.value,
                                      rd.c.device_id.not_in(select(devices_t.c.id).where(cond)))
                     .values(state=D.SKIPPED.value, detail="left the target", updated_at=t))

    def _assign_queued(self, conn: Connection, r: Any, plan: RolloutPlan, how_many: int | None, wave: int) -> int:
        """Tell up to ``how_many`` queued devices (all when None) the new version; online ones first."""
        queued = conn.execute(select(rd.c.device_id, rd.c.bundle_sha256, devices_t.c.online).select_from(
            rd.join(devices_t, devices_t.c.id == rd.c.device_id)).where(
            rd.c.rollout_id == r["id"], rd.c.state == D.QUEUED.value)).all()
        # Online devices first (an offline canary stalls a wave until it times out), then a
        # stable pseudo-random order so waves spread across the fleet rather than by id.
        queued.sort(key=lambda q: (not q.online, hashlib.sha1(f"{r['id']}/{q.device_id}".encode()).digest()))
        picked = queued if how_many is None else queued[:how_many]
        self._assign(conn, r, plan, [(q.device_id, q.bundle_sha256) for q in picked], wave)
        return len(picked)

    def _assign(self, conn: Connection, r: Any, plan: RolloutPlan, picked: list[tuple[str, str]], wave: int) -> None:
        if not picked:
            return
        t, rid, model, version = self.clock(), r["id"], r["model"], r["version"]
        ids = [d for d, _ in picked]
        current: dict[str, Any] = {}
        running: dict[str, str] = {}
        for chunk in _chunks(ids):
            for row in conn.execute(select(desired_t).where(desired_t.c.model == model, desired_t.c.device_id.in_(chunk))):
                current[row.device_id] = row
            running.update(conn.execute(select(device_models_t.c.device_id, device_models_t.c.version).where(
                device_models_t.c.model == model, device_models_t.c.device_id.in_(chunk))).all())
        start = next_window_start(plan.maintenance_window, max(t, plan.activate_after or 0))
        deadline = start + plan.device_timeout_s
        members, desired, bumped = [], [], []
        for device, sha in picked:
            cur = current.get(device)
            done = running.get(device) == version and cur is not None and cur.bundle_sha256 == sha
            members.append({"d_id": device, "state": (D.COMMITTED if done else D.NOTIFIED).value, "wave": wave,
                            "prev_v": cur.version if cur else None, "prev_sha": cur.bundle_sha256 if cur else None,
                            "at": t, "deadline": deadline,
                            "detail": "already running this version" if done else ""})
            if cur is not None and cur.bundle_sha256 == sha and cur.rollout_id == rid:
                continue
            desired.append({"device_id": device, "model": model, "version": version, "bundle_sha256": sha,
                            "rollout_id": rid, "activate_after": plan.activate_after,
                            "maintenance_window": plan.maintenance_window, "updated_at": t})
            bumped.append(device)
        conn.execute(update(rd).where(rd.c.rollout_id == rid, rd.c.device_id == bindparam("d_id")).values(
            state=bindparam("state"), wave=bindparam("wave"), previous_version=bindparam("prev_v"),
            previous_sha256=bindparam("prev_sha"), assigned_at=bindparam("at"), deadline=bindparam("deadline"),
            updated_at=bindparam("at"), detail=bindparam("detail")), members)
        for chunk in _chunks(bumped):
            conn.execute(delete(desired_t).where(desired_t.c.model == model, desired_t.c.device_id.in_(chunk)))
        if desired:
            conn.execute(desired_t.insert(), desired)
        bump_desired(conn, bumped)

    def _follow_target(self, conn: Connection, r: Any) -> None:
        """Give a completed rollout's version to devices that joined its target since, unless a
        newer rollout of the same model already gave them another."""
        rid, plan = r["id"], RolloutPlan.model_validate(r["plan"])
        other = rd.alias("other")
        newer = select(other.c.device_id).select_from(other.join(rollouts_t, rollouts_t.c.id == other.c.rollout_id)).where(
            rollouts_t.c.model == r["model"], rollouts_t.c.seq > r["seq"],
            rollouts_t.c.state != S.REVERTED.value, other.c.state.in_([s.value for s in ASSIGNED]))
        self._sync_members(conn, r, self._variants(conn, r), plan, devices_t.c.id.not_in(newer))
        if self._assign_queued(conn, r, plan, None, len(plan.waves) - 1):
            conn.execute(update(rollouts_t).where(rollouts_t.c.id == rid).values(updated_at=self.clock()))

    # ------------------------------------------------------------------ failure handling

    def _time_out(self, conn: Connection, r: Any) -> None:
        t = self.clock()
        conn.execute(update(rd).where(rd.c.rollout_id == r["id"], rd.c.state.in_([s.value for s in IN_PROGRESS]),
                                      rd.c.deadline < t).values(state=D.FAILED.value, updated_at=t,
                                                                detail="timed out before committing"))

    def _too_many_failures(self, conn: Connection, r: Any, plan: RolloutPlan) -> str | None:
        counts = self._counts(conn, r["id"])
        failed = counts.get(D.FAILED.value, 0)
        finished = failed + counts.get(D.COMMITTED.value, 0)
        if finished >= plan.min_finished_for_ratio and finished and failed / finished > plan.max_failure_ratio:
            return (f"{failed} of {finished} finished devices failed ({failed / finished:.0%}, "
                    f"more than the allowed {plan.max_failure_ratio:.0%})")
        return None

    def _gate(self, conn: Connection, r: Any, plan: RolloutPlan) -> GateResult:
        rows = conn.execute(select(rd.c.device_id, rd.c.previous_version, rd.c.assigned_at).where(
            rd.c.rollout_id == r["id"], rd.c.state.in_([D.ACTIVATED.value, D.COMMITTED.value]))).all()
        members = [Member(x.device_id, x.previous_version if x.previous_version != r["version"] else None,
                          x.assigned_at or 0.0) for x in rows]
        new_all, new_paired, old = collect(conn, r["model"], r["version"], members, plan.gates.baseline_window_s)
        return evaluate(plan.gates, new_all, new_paired, old)

    def _revert(self, conn: Connection, r: Any) -> None:
        """Give every device this rollout changed the desired state it had before."""
        rid, model, t = r["id"], r["model"], self.clock()
        rows = conn.execute(select(rd.c.device_id, rd.c.previous_version, rd.c.previous_sha256).where(
            rd.c.rollout_id == rid, rd.c.state.in_([s.value for s in ASSIGNED]))).all()
        owned: set[str] = set()
        for chunk in _chunks([x.device_id for x in rows]):
            owned.update(conn.execute(select(desired_t.c.device_id).where(
                desired_t.c.model == model, desired_t.c.rollout_id == rid, desired_t.c.device_id.in_(chunk))).scalars())
        restore = [x for x in rows if x.device_id in owned]
        for chunk in _chunks([x.device_id for x in restore]):
            conn.execute(delete(desired_t).where(desired_t.c.model == model, desired_t.c.device_id.in_(chunk)))
        back = [{"device_id": x.device_id, "model": model, "version": x.previous_version,
                 "bundle_sha256": x.previous_sha256, "rollout_id": None, "activate_after": None,
                 "maintenance_window": None, "updated_at": t} for x in restore if x.previous_sha256]
        if back:
            conn.execute(desired_t.insert(), back)
        bump_desired(conn, [x.device_id for x in restore])
        conn.execute(update(rd).where(rd.c.rollout_id == rid, rd.c.state.in_([s.value for s in ASSIGNED])).values(
            state=D.REVERTED.value, updated_at=t, detail="told its previous version"))
        self._skip_queued(conn, rid, "the rollout was reverted")

    def _skip_queued(self, conn: Connection, rid: str, why: str) -> None:
        conn.execute(update(rd).where(rd.c.rollout_id == rid, rd.c.state == D.QUEUED.value).values(
            state=D.SKIPPED.value, detail=why, updated_at=self.clock()))

    def _shift_deadlines(self, conn: Connection, r: Any, by: float) -> None:
        if by <= 0:
            return
        conn.execute(update(rd).where(rd.c.rollout_id == r["id"], rd.c.deadline.is_not(None)).values(
            deadline=rd.c.deadline + by))
        if r["soak_until"] is not None:
            conn.execute(update(rollouts_t).where(rollouts_t.c.id == r["id"]).values(soak_until=r["soak_until"] + by))

    # ------------------------------------------------------------------ plumbing

    def _counts(self, conn: Connection, rid: str) -> dict[str, int]:
        return {row[0]: row[1] for row in conn.execute(select(rd.c.state, func.count()).where(
            rd.c.rollout_id == rid).group_by(rd.c.state))}

    def _load(self, conn: Connection, rollout_id: str, lock: bool = True) -> Any:
        stmt = select(rollouts_t).where(rollouts_t.c.id == rollout_id)
        if lock:
            stmt = stmt.with_for_update()
        row = conn.execute(stmt).mappings().first()
        if row is None:
            raise NotFoundError(f"unknown rollout {rollout_id!r}", hint="list rollouts with `edge fleet rollout status`")
        return row

    def _transition(self, conn: Connection, r: Any, event: RolloutEvent, reason: str, **values: Any) -> RolloutState:
        """Move a rollout along the transition table and record the transition."""
        state = RolloutState(r["state"])
        target = next_state(state, event, r["paused_from"])
        t = self.clock()
        conn.execute(update(rollouts_t).where(rollouts_t.c.id == r["id"]).values(
            state=target.value, reason=reason, updated_at=t,
            **({"finished_at": t} if target in (S.COMPLETED, S.ABORTED, S.REVERTED) else {}), **values))
        conn.execute(transitions_t.insert().values(rollout_id=r["id"], ts=t, from_state=state.value,
                                                   event=event.value, to_state=target.value, reason=reason))
        log.info("rollout %s: %s --%s--> %s (%s)", r["id"], state.value, event.value, target.value, reason)
        return target


__all__ = ["RolloutEngine", "RolloutSpec", "apply_device_events", "bump_desired"]
