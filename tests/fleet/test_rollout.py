"""The rollout state machine, driven by a fake clock over real databases (SQLite and PostgreSQL).

Devices are played by :class:`Harness`: their events and telemetry go through the real
ingestion path; desired state through the real publisher."""

from __future__ import annotations

import pytest

from edge.errors import ConfigError, ConflictError, NotFoundError
from edge.fleet.plan import next_window_start, parse_spec, wave_size
from edge.fleet.rollout import GATE_INTERVAL_S, RolloutEngine
from edge.fleet.states import TRANSITIONS, RolloutEvent, RolloutState, next_state
from edge.protocol.messages import EventKind
from tests.fleet.harness import Harness

E, S = RolloutEvent, RolloutState


@pytest.fixture()
def h(controller) -> Harness:
    return Harness(controller)


def finish_baseline(h: Harness, ids: list[str], version: str = "1.0.0") -> str:
    """Roll ``version`` out to every device at once and commit it everywhere."""
    h.c.publish_bundle(version=version)
    rid = h.create(version=version, waves=["100%"], soak_s=0)
    h.tick()
    h.follow(ids)
    h.tick()
    h.tick()
    assert h.state(rid) == "completed", h.status(rid)
    return rid


def test_waves_canary_then_shares_with_soak_between(h: Harness) -> None:
    ids = h.add(20)
    h.c.publish_bundle(version="2.0.0")
    rid = h.create(soak_s=600)
    assert h.state(rid) == "pending"
    h.tick()
    st = h.status(rid)
    assert st["state"] == "deploying" and st["wave"] == 0 and st["devices"] == {"notified": 1, "queued": 19}
    canary = h.members(rid, "notified")
    assert h.wanted(canary[0]) == "2.0.0" and h.desired[canary[0]].models["tiny"].deployment_id == rid
    assert all(h.wanted(d) is None for d in ids if d not in canary)

    h.follow(canary)
    h.tick()
    assert h.state(rid) == "soaking"
    h.tick(advance=599)
    assert h.state(rid) == "soaking" and len(h.members(rid, "committed")) == 1
    sizes = []
    for _ in range(3):
        h.tick(advance=2)  # the soak is over: widen
        st = h.status(rid)
        assert st["state"] == "deploying"
        sizes.append(st["devices"].get("notified", 0) + st["devices"]["committed"])
        h.follow(h.members(rid, "notified"))
        h.tick()
        assert h.state(rid) == "soaking"
        h.tick(advance=600)
    assert sizes == [2, 10, 20]  # cumulative: 10%, 50%, 100% of 20
    st = h.status(rid)
    assert st["state"] == "completed" and st["devices"] == {"committed": 20}
    assert [t["event"] for t in st["transitions"]] == [
        "create", "start", "wave_done", "soak_passed", "wave_done", "soak_passed", "wave_done", "soak_passed",
        "wave_done", "finished"]
    assert all(h.wanted(d) == "2.0.0" for d in ids)


def test_failed_health_gate_halts_and_reverts_the_whole_rollout(h: Harness) -> None:
    metric, bad = "p95 latency", dict(errors=1, p95=90.0, tps=40.0)  # each metric: test_gate_verdicts
    ids = h.add(10)
    finish_baseline(h, ids)
    h.serve(ids, requests=100, errors=1, p95=50.0, tps=40.0, times=3)  # v1: 1% errors, 50 ms, 40 tok/s
    h.c.clock.advance(60)
    h.c.publish_bundle(version="2.0.0")
    rid = h.create(waves=["1", "50%", "100%"], soak_s=3600, max_failure_ratio=1.0)
    h.tick()
    h.follow(h.members(rid, "notified"))
    h.tick()
    h.tick(advance=3601)  # the canary's soak passes: no traffic on v2 yet, the gate cannot judge
    assert h.state(rid) == "deploying"
    wave2 = h.members(rid, "notified")
    assert len(wave2) == 4
    h.follow(wave2)
    h.tick()
    assert h.state(rid) == "soaking"
    h.serve(h.members(rid, "committed"), requests=100, **bad)
    h.tick(advance=GATE_INTERVAL_S + 1)  # judged while soaking, long before the soak ends
    st = h.status(rid)
    assert st["state"] == "reverting" and metric in st["reason"], st["reason"]
    assert st["gate"]["passed"] is False and st["devices"] == {"reverted": 5, "skipped": 5}
    assert all(h.wanted(d) == "1.0.0" for d in ids)  # every device is told its previous version
    with h.c.db.read() as conn:
        v1 = h.c.store.variants(conn, "tiny", "1.0.0")["generic-cpu"]["sha256"]
    assert {h.desired[d].models["tiny"].sha256 for d in ids} == {v1}
    h.tick()
    assert h.state(rid) == "reverted"
    assert [t["to"] for t in h.status(rid)["transitions"]][-2:] == ["reverting", "reverted"]


def test_gate_passes_when_the_new_version_is_as_healthy(h: Harness) -> None:
    ids = h.add(4)
    finish_baseline(h, ids)
    h.serve(ids, requests=100, errors=1, p95=50.0, tps=40.0)
    h.c.clock.advance(60)
    h.c.publish_bundle(version="2.0.0")
    rid = h.create(waves=["50%", "100%"], soak_s=600)
    h.tick()
    h.follow(h.members(rid, "notified"))
    h.tick()
    h.serve(h.members(rid, "committed"), requests=100, errors=2, p95=55.0, tps=38.0)
    h.tick(advance=601)
    st = h.status(rid)
    assert st["state"] == "deploying" and st["gate"]["passed"] and st["gate"]["judged"]
    assert st["gate"]["old"]["error_rate"] == pytest.approx(0.01) and st["gate"]["new"]["error_rate"] == pytest.approx(0.02)


def test_too_many_failed_devices_halt_and_revert(h: Harness) -> None:
    ids = h.add(10)
    finish_baseline(h, ids)
    h.c.publish_bundle(version="2.0.0")
    rid = h.create(waves=["50%", "100%"], soak_s=60, max_failure_ratio=0.3, min_finished_for_ratio=3)
    h.tick()
    wave = h.members(rid, "notified")
    assert len(wave) == 5
    h.follow(wave[:1])
    h.fail(wave[1:2])
    h.tick()
    assert h.state(rid) == "deploying"  # 1 of 2 failed, but fewer than 3 have finished
    h.fail(wave[2:3], kind=EventKind.ROLLED_BACK)  # the device rolled itself back: a failure too
    h.tick()
    st = h.status(rid)
    assert st["state"] == "reverting" and "2 of 3 finished devices failed" in st["reason"]
    assert all(h.wanted(d) == "1.0.0" for d in ids)


def test_device_timeout_counts_as_failure_and_halts_without_auto_revert(h: Harness) -> None:
    ids = h.add(3)
    finish_baseline(h, ids)
    h.c.publish_bundle(version="2.0.0")
    rid = h.create(waves=["1", "100%"], device_timeout_s=300, auto_revert=False)
    h.tick()
    canary = h.members(rid, "notified")
    h.follow(canary, steps=(EventKind.DOWNLOAD_STARTED,))
    h.tick(advance=299)
    assert h.members(rid, "downloading") == canary
    h.tick(advance=2)
    st = h.status(rid)
    assert st["state"] == "halted" and st["failed"][0]["detail"] == "timed out before committing"
    assert h.wanted(canary[0]) == "2.0.0"  # halted, not reverted: the operator decides
    with pytest.raises(ConflictError, match="cannot resume a rollout that is halted"):
        h.c.engine.act(rid, E.RESUME)
    h.c.engine.act(rid, E.ROLLBACK)
    h.publish()
    assert h.wanted(canary[0]) == "1.0.0"


def test_pause_resume_abort_and_rollback(h: Harness) -> None:
    ids = h.add(10)
    finish_baseline(h, ids)
    h.c.publish_bundle(version="2.0.0")
    rid = h.create(waves=["1", "100%"], soak_s=600)
    h.tick()
    h.follow(h.members(rid, "notified"))
    h.tick()
    assert h.state(rid) == "soaking"
    h.c.clock.advance(100)
    h.c.engine.act(rid, E.PAUSE, "looking at a dashboard")
    h.tick(advance=10_000)  # time passes while paused: nothing moves
    st = h.status(rid)
    assert st["state"] == "paused" and st["devices"] == {"committed": 1, "queued": 9}
    h.c.engine.act(rid, E.RESUME)
    h.tick(advance=400)  # the soak clock stopped while paused: 100 + 400 < 600
    assert h.state(rid) == "soaking"
    h.tick(advance=101)
    assert h.state(rid) == "deploying" and len(h.members(rid, "notified")) == 9
    h.c.engine.act(rid, E.ABORT)
    assert h.state(rid) == "aborted"
    with pytest.raises(ConflictError, match="cannot pause a rollout that is aborted"):
        h.c.engine.act(rid, E.PAUSE)
    h.publish()
    assert all(h.wanted(d) == "2.0.0" for d in ids)  # abort leaves devices as they are
    h.c.engine.act(rid, E.ROLLBACK, "bad accuracy reports")
    h.tick()  # publishes the previous versions
    h.tick()  # every device's desired state was acknowledged: reverted
    st = h.status(rid)
    assert st["state"] == "reverted" and st["finished_at"]
    assert all(h.wanted(d) == "1.0.0" for d in ids)


def test_abort_skips_queued_devices(h: Harness) -> None:
    h.add(5)
    h.c.publish_bundle(version="2.0.0")
    rid = h.create(waves=["1", "100%"])
    h.tick()
    h.c.engine.act(rid, E.ABORT)
    assert h.status(rid)["devices"] == {"notified": 1, "skipped": 4}


def test_each_device_gets_the_variant_of_its_profile_or_is_refused(h: Harness) -> None:
    x86 = h.add(2, profile="x86-avx2", prefix="x")
    pi = h.add(2, profile="raspberry-pi-5", prefix="p")
    jetson = h.add(1, profile="jetson-orin-nano", prefix="j")
    b_x86 = h.c.publish_bundle(version="2.0.0", profile="x86-avx2", architecture="x86_64")
    b_pi = h.c.publish_bundle(version="2.0.0", profile="raspberry-pi-5", architecture="aarch64",
                              required_providers=("XnnpackExecutionProvider",))
    rid = h.create(waves=["100%"], allow_fallback=True)
    h.tick()
    st = h.status(rid)
    assert st["devices"] == {"notified": 4, "refused": 1}
    assert {h.desired[d].models["tiny"].sha256 for d in x86} == {b_x86["sha256"]}
    assert {h.desired[d].models["tiny"].sha256 for d in pi} == {b_pi["sha256"]}
    refused = st["refused"][0]
    assert refused["device_id"] == jetson[0] and "no variant for profile 'jetson-orin-nano'" in refused["detail"]
    assert "XnnpackExecutionProvider" in refused["detail"]  # why the aarch64 build does not fit either
    assert jetson[0] not in h.desired
    h.follow(x86 + pi)
    h.tick()
    h.tick(advance=601)
    assert h.state(rid) == "completed"  # refused devices do not hold the rollout back


def test_a_portable_variant_is_the_fallback_unless_forbidden(h: Harness) -> None:
    jetson = h.add(1, profile="jetson-orin-nano", prefix="j")
    portable = h.c.publish_bundle(version="2.0.0", profile="generic-cpu", architecture="any")
    rid = h.create(waves=["100%"], allow_fallback=False)
    h.tick()
    assert h.status(rid)["devices"] == {"refused": 1} and h.state(rid) == "pending"
    h.c.engine.act(rid, E.ABORT)
    rid = h.create(waves=["100%"])
    h.tick()
    assert h.desired[jetson[0]].models["tiny"].sha256 == portable["sha256"]


def test_refused_device_is_reconsidered_when_its_profile_changes(h: Harness) -> None:
    from tests.fleet.helpers import ingest

    dev = h.add(1, profile="jetson-orin-nano")[0]
    h.c.publish_bundle(version="2.0.0", profile="x86-avx2", architecture="x86_64")
    rid = h.create(waves=["100%"], allow_fallback=False)
    h.tick()
    assert h.members(rid, "refused") == [dev]
    ingest(h.ing, h.dev.birth(dev, 2, profile="x86-avx2"))  # re-flashed as an x86 box
    h.tick()
    h.tick()
    assert h.members(rid, "notified") == [dev]


def test_devices_joining_the_target_mid_rollout_get_the_right_version(h: Harness) -> None:
    lab = h.add(4, tags=["lab"])
    finish_baseline(h, lab)
    h.c.publish_bundle(version="2.0.0")
    rid = h.create(target={"kind": "tag", "value": "lab"}, waves=["1", "100%"], soak_s=600)
    h.tick()
    h.follow(h.members(rid, "notified"))
    h.tick()
    assert h.state(rid) == "soaking"
    early = h.add(1, tags=["lab"])[0]  # joins during the canary's soak
    leaver = next(d for d in lab if d in h.members(rid, "queued"))
    h.tick()
    # A new device gets the fleet's current version (1.0.0, from the completed baseline) while it
    # waits for its wave: not nothing, and not the version still under test.
    assert h.wanted(early) == "1.0.0" and early in h.members(rid, "queued")
    h.follow([early])
    h.tag([leaver], "lab", remove=True)  # leaves before its wave
    h.tick(advance=601)
    st = h.status(rid)
    assert st["state"] == "deploying" and h.wanted(early) == "2.0.0"
    assert leaver in h.members(rid, "skipped") and h.wanted(leaver) == "1.0.0"
    late = h.add(1, tags=["lab"])[0]  # joins during the last wave: gets the new version at once
    h.tick()
    assert h.wanted(late) == "2.0.0"
    h.follow(h.members(rid, "notified"))
    h.tick()
    h.tick(advance=601)
    assert h.state(rid) == "completed"
    after = h.add(1, tags=["lab"])[0]  # joins after completion: the completed rollout still serves
    h.tick()
    assert h.wanted(after) == "2.0.0" and after in h.members(rid)
    untagged = h.add(1)[0]
    h.tick()
    assert h.wanted(untagged) == "1.0.0"  # not in the lab: the all-devices baseline serves it


def test_download_now_activate_in_the_maintenance_window(h: Harness) -> None:
    ids = h.add(2)
    h.c.publish_bundle(version="2.0.0")
    activate_after = h.c.clock() + 1800
    rid = h.create(waves=["100%"], device_timeout_s=1800, maintenance_window="02:00-03:00",
                   activate_after=activate_after, max_failure_ratio=1.0)
    h.tick()  # 00:00 UTC
    want = h.desired[ids[0]].models["tiny"]
    assert want.maintenance_window == "02:00-03:00" and want.activate_after == activate_after
    h.follow(ids, steps=(EventKind.DOWNLOAD_STARTED, EventKind.DOWNLOADED, EventKind.VERIFIED))
    h.tick(advance=3600)  # 01:00: downloaded, waiting for the window; not timed out
    assert sorted(h.members(rid, "downloaded")) == ids and h.state(rid) == "deploying"
    h.tick(advance=3600 + 1700)  # 02:28: inside the window, still within window start + timeout
    assert h.state(rid) == "deploying"
    h.follow(ids[:1], steps=(EventKind.ACTIVATED, EventKind.COMMITTED))
    h.tick(advance=200)  # 02:31: past window start + timeout: the other device failed
    st = h.status(rid)
    assert st["devices"] == {"committed": 1, "failed": 1}


def test_rollout_state_survives_a_new_engine_on_the_same_database(h: Harness, tmp_path) -> None:
    from edge.fleet.artifacts import ArtifactStore
    from edge.fleet.db import open_database

    ids = h.add(6)
    h.c.publish_bundle(version="2.0.0")
    rid = h.create(waves=["1", "100%"], soak_s=300)
    h.tick()
    h.follow(h.members(rid, "notified"))
    h.tick()
    assert h.state(rid) == "soaking"
    # "Restart": new database engine, store and rollout engine; nothing carried over in memory.
    db2 = open_database(h.c.db.url, tmp_path)
    try:
        store2 = ArtifactStore(db2, h.c.store.root, h.c.store.trust, h.c.clock)
        h.c.engine = RolloutEngine(db2, store2, h.c.clock)
        h.tick(advance=301)
        assert h.state(rid) == "deploying"
        h.follow(h.members(rid, "notified"))
        h.tick()
        h.tick(advance=301)
        st = h.status(rid)
        assert st["state"] == "completed" and st["devices"] == {"committed": 6}
        assert all(h.wanted(d) == "2.0.0" for d in ids)
    finally:
        db2.dispose()


def test_create_refuses_unknown_versions_and_a_second_active_rollout(h: Harness) -> None:
    h.add(1)
    with pytest.raises(NotFoundError, match="no bundle of tiny@2.0.0"):
        h.create()
    h.c.publish_bundle(version="2.0.0")
    rid = h.create()
    with pytest.raises(ConflictError, match=f"rollout {rid} of tiny is still pending"):
        h.create()
    with pytest.raises(ConfigError, match="plan.waves"):
        parse_spec({"model": "tiny", "version": "2.0.0", "plan": {"waves": ["ten"]}})
    with pytest.raises(ConfigError, match="plan.colour"):
        parse_spec({"model": "tiny", "version": "2.0.0", "plan": {"colour": "red"}})
    with pytest.raises(ConfigError, match="maintenance window"):
        parse_spec({"model": "tiny", "version": "2.0.0", "plan": {"maintenance_window": "25:00-01:00"}})
    with pytest.raises(NotFoundError):
        h.c.engine.act("ro-nope", E.PAUSE)


def test_a_rollout_with_no_fitting_device_waits_in_pending(h: Harness) -> None:
    h.c.publish_bundle(version="2.0.0")
    rid = h.create(target={"kind": "group", "value": "empty"})
    h.tick()
    st = h.status(rid)
    assert st["state"] == "pending" and "waiting" in st["reason"]
    dev = h.add(1)[0]
    h.tag([dev], "empty", kind="group")
    h.tick()
    assert h.state(rid) == "deploying" and h.members(rid, "notified") == [dev]


# ---------------------------------------------------------------- pure logic


def _figures(requests: float, errors: float, p95: float | None, tps: float | None, device: str = "d"):
    from edge.fleet.health import Figures

    f = Figures()
    f.add(device, requests, errors, p95, tps)
    return f


@pytest.mark.parametrize(("new", "failure"), [
    ((100, 1, 52.0, 39.0), None),
    ((100, 9, 50.0, 40.0), "error rate rose from 0.010 to 0.090"),
    ((100, 30, 50.0, 40.0), "over the ceiling"),
    ((100, 1, 90.0, 40.0), "p95 latency rose from 50.0 ms to 90.0 ms"),
    ((100, 1, 50.0, 20.0), "tokens/s fell from 40.0 to 20.0"),
])
def test_gate_verdicts(new: tuple, failure: str | None) -> None:
    from edge.fleet.health import Gates, evaluate

    old = _figures(100, 1, 50.0, 40.0)
    fresh = _figures(*new)
    verdict = evaluate(Gates(), fresh, fresh, old)
    assert verdict.judged
    if failure is None:
        assert verdict.passed and not verdict.failures
    else:
        assert not verdict.passed and any(failure in f for f in verdict.failures), verdict.failures


def test_gate_without_enough_traffic_is_not_judged() -> None:
    from edge.fleet.health import Gates, evaluate

    verdict = evaluate(Gates(min_requests=50), _figures(10, 9, 500.0, 1.0), _figures(10, 9, 500.0, 1.0),
                       _figures(10, 0, 5.0, 100.0))
    assert verdict.passed and not verdict.judged and "not enough traffic" in verdict.notes[0]


def test_transition_table_is_closed_and_final_states_only_roll_back() -> None:
    for (state, event), target in TRANSITIONS.items():
        assert isinstance(state, RolloutState) and isinstance(event, RolloutEvent)
        assert target == "back" or isinstance(target, RolloutState)
    assert next_state(S.PAUSED, E.RESUME, "soaking") is S.SOAKING
    for final in (S.COMPLETED, S.ABORTED):
        allowed = {e for (s, e) in TRANSITIONS if s is final}
        assert allowed == {E.ROLLBACK}
    assert not any(s is S.REVERTED for (s, _) in TRANSITIONS)
    with pytest.raises(ConflictError, match="it can: nothing"):
        next_state(S.REVERTED, E.ROLLBACK)


def test_wave_sizes_and_windows() -> None:
    assert [wave_size(w, 20) for w in ("1", "10%", "50%", "100%")] == [1, 2, 10, 20]
    assert [wave_size(w, 3) for w in ("1", "10%", "50%", "100%")] == [1, 1, 2, 3]
    assert wave_size("25", 10) == 10 and wave_size("0.5%", 1000) == 5
    midnight = 1_767_225_600.0  # 2026-01-01T00:00Z
    assert next_window_start(None, midnight) == midnight
    assert next_window_start("02:00-03:00", midnight) == midnight + 7200
    assert next_window_start("02:00-03:00", midnight + 7200 + 60) == midnight + 7260  # inside
    assert next_window_start("02:00-03:00", midnight + 4 * 3600) == midnight + 86400 + 7200  # tomorrow
    assert next_window_start("22:00-02:00", midnight + 3600) == midnight + 3600  # wraps midnight: inside
    assert next_window_start("22:00-02:00", midnight + 3 * 3600) == midnight + 22 * 3600
