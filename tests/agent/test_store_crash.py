"""Crash safety: SIGKILL the store at every named step and at random moments, then reopen it.

After every kill the reopened store must serve exactly one sound version per model, whose
files match their signed hashes, keep its previous version whole, and hold no staging,
journal, trash or temporary leftovers. The random run also checks the outcome against what
the killed process was doing: the operation in flight either happened or did not.

Workers are forked from a multiprocessing forkserver that has the store imported, so a kill
costs a fork rather than a Python start. ``EDGE_CRASH_RUNS`` (default 50) and
``EDGE_CRASH_SEED`` set the number of random kills and the seed.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.agent.faults import STORE_POINTS
from edge.agent.store import Store
from edge.errors import EdgeError
from edge.protocol.catalog import load_catalog
from edge.protocol.signing import TrustStore
from tests.fixtures.bundles import expected_output, make_generic_bundle

RUNS = int(os.environ.get("EDGE_CRASH_RUNS", "50"))
SEED = int(os.environ.get("EDGE_CRASH_SEED", "20261128"))
# Random kill delays, measured from the start of the operation chosen as the target: a new
# version's install is mostly its trial load (the steps after it have their own fault points),
# every other operation is a few fsyncs long.
INSTALL_KILL_WINDOW_S = 1.0
OTHER_KILL_WINDOW_S = 0.06
# Bound on the extra kills the random test may add to land in every kind of operation.
MAX_RUNS_FACTOR = 4
PROFILE = "generic-cpu"


# ---------------------------------------------------------------------------- the worker


_PROFILES: dict[str, Any] = {}


def _open(data: str, trusted_pub: str) -> Store:
    if PROFILE not in _PROFILES:  # parsed once per process (forked workers inherit it)
        _PROFILES[PROFILE] = load_catalog().get(PROFILE)
    return Store(Path(data), _PROFILES[PROFILE], TrustStore.from_files([Path(trusted_pub)]))


def _summary(store: Store) -> dict[str, list[Any]]:
    return {m.name: [m.active, m.previous, [v.version for v in m.versions]] for m in store.list()}


def _perform(store: Store, op: list[str], bundles: dict[str, str]) -> None:
    kind, name, version = op
    if kind == "install":
        store.install(Path(bundles[f"{name}@{version}"]))
    elif kind == "activate":
        store.activate(name, version)
    elif kind == "rollback":
        store.rollback(name)
    elif kind == "remove":
        store.remove(name, version)


def _choose(rng: random.Random, store: Store, bundles: dict[str, str]) -> list[str]:
    models = {m.name: m for m in store.list()}
    roll = rng.random()
    if roll < 0.3 or len(models) < 2:
        name, version = rng.choice(sorted(bundles)).split("@")
        return ["install", name, version]
    name = rng.choice(sorted(models))
    m = models[name]
    if roll < 0.65:
        return ["activate", name, rng.choice([v.version for v in m.versions])]
    if roll < 0.85 and m.previous:
        return ["rollback", name, m.previous]
    idle = [v.version for v in m.versions if not v.active]
    if idle:
        return ["remove", name, rng.choice(idle)]
    return ["activate", name, m.versions[-1].version]


def worker(data: str, trusted_pub: str, bundles: dict[str, str], seed: int, log_path: str,
           fault: str | None = None, script: list[list[str]] | None = None) -> None:
    """Run store operations (a script, or random ones forever), logging each before and after."""
    if fault:
        os.environ["EDGE_FAULT_POINT"] = fault  # this forked process only
    store = _open(data, trusted_pub)
    rng = random.Random(seed)
    log = open(log_path, "a", encoding="utf-8")

    def note(**record: Any) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()
        os.fsync(log.fileno())

    ops = iter(script) if script is not None else None
    while True:
        op = next(ops, None) if ops is not None else _choose(rng, store, bundles)
        if op is None:
            os._exit(0)
        note(phase="start", op=op, before=_summary(store))
        try:
            _perform(store, op, bundles)
        except EdgeError as exc:  # a refusal is an outcome too; it must leave the store as it was
            note(phase="done", op=op, error=str(exc), after=_summary(store))
            continue
        note(phase="done", op=op, after=_summary(store))


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def forkserver() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, signing_key) -> dict[str, str]:
    """tiny 1.0.0-1.2.0 and embed 1.0.0-1.1.0, installable in any order (allow_downgrade)."""
    out = tmp_path_factory.mktemp("crash-bundles")
    made = {}
    for name, versions in (("tiny", ("1.0.0", "1.1.0", "1.2.0")), ("embed", ("1.0.0", "1.1.0"))):
        for v in versions:
            made[f"{name}@{v}"] = str(make_generic_bundle(out, signing_key, name=name, version=v, allow_downgrade=True))
    return made


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory, bundles, key_pair) -> dict[str, Path]:
    """Stores to copy: "one" holds tiny@1.0.0 active; "two" adds tiny@1.1.0 active."""
    base = tmp_path_factory.mktemp("crash-templates")
    with _open(str(base / "one"), str(key_pair[1])) as store:
        store.install(Path(bundles["tiny@1.0.0"]))
    shutil.copytree(base / "one", base / "two", symlinks=True)
    with _open(str(base / "two"), str(key_pair[1])) as store:
        store.install(Path(bundles["tiny@1.1.0"]))
    return {"one": base / "one", "two": base / "two"}


def run_worker(ctx, *args: Any, timeout: float = 120) -> int:
    """Run a worker to its end; return its exit code (-9 when a fault point killed it)."""
    proc = ctx.Process(target=worker, args=args)
    proc.start()
    proc.join(timeout)
    assert proc.exitcode is not None, "worker did not end"
    return proc.exitcode


def _started(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if record["phase"] == "start":
            out.append(record)
    return out


def kill_randomly(ctx, rng: random.Random, args: tuple, log: Path) -> None:
    """Start a random worker, wait until it starts a randomly chosen operation, kill it inside."""
    target = rng.randrange(2)
    proc = ctx.Process(target=worker, args=args)
    proc.start()
    deadline = time.monotonic() + 60
    while len(started := _started(log)) <= target and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.002)
    fresh_install = False
    if len(started) > target:
        kind, name, version = started[target]["op"]
        fresh_install = kind == "install" and version not in started[target]["before"].get(name, [0, 0, []])[2]
    time.sleep(rng.uniform(0, INSTALL_KILL_WINDOW_S if fresh_install else OTHER_KILL_WINDOW_S))
    proc.kill()
    proc.join(30)
    assert proc.exitcode == -9, f"the worker ended on its own with {proc.exitcode}"


# ---------------------------------------------------------------------------- checks


def check_store(data: Path, trusted_pub: str) -> dict[str, list[Any]]:
    """Reopen the store (recovery runs) and check every invariant; return its summary."""
    with _open(str(data), trusted_pub) as store:
        for leftover in ("staging", "journal", "trash"):
            assert list((data / leftover).iterdir()) == [], f"{leftover} not cleaned"
        assert not list(data.rglob(".tmp-*"))
        for m in store.list():
            assert m.active is not None, f"{m.name} has versions but none active"
            for v in m.versions:
                assert v.problem is None, v.problem  # whole versions only: renamed in, renamed out
            store.verify(m.name, m.active)  # full SHA-256 of the served version
            if m.previous is not None:
                store.verify(m.name, m.previous)
            assert m.active != m.previous
        assert sorted(a.name for a in store.active()) == sorted(m.name for m in store.list())
        return _summary(store)


def check_outcome(log_path: Path, now: dict[str, list[Any]]) -> str:
    """Compare the store with the last operation the killed worker logged; return its kind."""
    records = []
    for line in log_path.read_text().splitlines() if log_path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # torn last line: that operation had not started
            break
    if not records:
        return "none"
    last = records[-1]
    if last["phase"] == "done":
        assert now == last["after"], (last, now)
        return "between operations"
    kind, name, version = last["op"]
    before = last["before"]
    for other in set(before) | set(now):
        if other != name:
            assert now.get(other) == before.get(other), (last, now)
    was = before.get(name, [None, None, []])
    active, previous, versions = now.get(name, [None, None, []])
    if kind in ("install", "activate"):
        assert active in (was[0], version), (last, now)
        if active != was[0]:
            assert previous == was[0], (last, now)
    elif kind == "rollback":
        assert [active, previous] in (was[:2], [was[1], was[0]]), (last, now)
    elif kind == "remove":
        assert active == was[0] and previous in (was[1], None), (last, now)
        assert set(versions) in (set(was[2]), set(was[2]) - {version}), (last, now)
    assert set(versions) <= set(was[2]) | ({version} if kind == "install" else set()), (last, now)
    return f"during {kind}"


# ---------------------------------------------------------------------------- deterministic points

INSTALL_POINTS = {  # install tiny@1.1.0 over tiny@1.0.0: undone before VALIDATED, finished from it on
    "after-journal": "1.0.0", "after-verify": "1.0.0", "after-extract": "1.0.0", "after-validate": "1.1.0",
    "before-rename": "1.1.0", "after-rename": "1.1.0", "after-installed": "1.1.0",
}  # fmt: skip
ACTIVATE_POINTS = {  # activate tiny@1.0.0 while 1.1.0 serves: one rename decides
    "before-state-write": "1.1.0", "mid-state-write": "1.1.0", "after-state-write": "1.0.0",
}  # fmt: skip
REMOVE_POINTS = {  # remove tiny@1.0.0 (the previous) while 1.1.0 serves: whole or gone
    "before-state-write": ["1.0.0", "1.1.0"], "after-state-write": ["1.0.0", "1.1.0"],
    "before-trash": ["1.0.0", "1.1.0"], "after-trash": ["1.1.0"],
}  # fmt: skip


def test_every_fault_point_is_exercised() -> None:
    covered = set(INSTALL_POINTS) | set(ACTIVATE_POINTS) | set(REMOVE_POINTS) | {"validate-child"}  # test_store
    assert covered == set(STORE_POINTS)  # the other areas: tests/hardening


@pytest.mark.parametrize("point", list(INSTALL_POINTS))
def test_kill_during_install(point: str, forkserver, templates, bundles, key_pair, tmp_path: Path) -> None:
    data = Path(shutil.copytree(templates["one"], tmp_path / "data", symlinks=True))
    code = run_worker(forkserver, str(data), str(key_pair[1]), bundles, 0, str(tmp_path / "log"), point,
                      [["install", "tiny", "1.1.0"]])
    assert code == -9, f"the worker was not killed at {point}"
    summary = check_store(data, str(key_pair[1]))
    active = INSTALL_POINTS[point]
    if active == "1.0.0":
        assert summary == {"tiny": ["1.0.0", None, ["1.0.0"]]}
    else:  # validated and sealed: recovery finishes it, including the activation it asked for
        assert summary == {"tiny": ["1.1.0", "1.0.0", ["1.0.0", "1.1.0"]]}


@pytest.mark.parametrize("point", list(ACTIVATE_POINTS))
@pytest.mark.parametrize("op", [["activate", "tiny", "1.0.0"], ["rollback", "tiny", "1.0.0"]],
                         ids=["activate", "rollback"])
def test_kill_during_activation(point: str, op: list[str], forkserver, templates, bundles, key_pair,
                                tmp_path: Path) -> None:
    data = Path(shutil.copytree(templates["two"], tmp_path / "data", symlinks=True))
    code = run_worker(forkserver, str(data), str(key_pair[1]), bundles, 0, str(tmp_path / "log"), point, [op])
    assert code == -9
    summary = check_store(data, str(key_pair[1]))
    assert summary["tiny"][0] == ACTIVATE_POINTS[point]
    assert summary["tiny"][1] == ({"1.0.0", "1.1.0"} - {ACTIVATE_POINTS[point]}).pop()


@pytest.mark.parametrize("point", list(REMOVE_POINTS))
def test_kill_during_removal(point: str, forkserver, templates, bundles, key_pair, tmp_path: Path) -> None:
    data = Path(shutil.copytree(templates["two"], tmp_path / "data", symlinks=True))
    code = run_worker(forkserver, str(data), str(key_pair[1]), bundles, 0, str(tmp_path / "log"), point,
                      [["remove", "tiny", "1.0.0"]])
    assert code == -9
    summary = check_store(data, str(key_pair[1]))
    assert summary["tiny"][0] == "1.1.0" and summary["tiny"][2] == REMOVE_POINTS[point]
    expected_previous = "1.0.0" if point == "before-state-write" else None
    assert summary["tiny"][1] == expected_previous


# ---------------------------------------------------------------------------- random kills


def test_random_kills_during_installs_and_activations(forkserver, bundles, key_pair, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    data, log = tmp_path / "data", tmp_path / "ops.jsonl"
    seen: dict[str, int] = {}
    runs = 0
    # At least RUNS kills, and more (up to MAX_RUNS_FACTOR times) until kills have landed both
    # inside an install and inside an activation: a loaded machine stretches installs, so a
    # fixed count may by chance miss the short activations.
    while runs < RUNS or not (seen.get("during install") and seen.get("during activate")):
        if runs >= RUNS * MAX_RUNS_FACTOR:
            break
        kill_randomly(forkserver, rng, (str(data), str(key_pair[1]), bundles, SEED + runs, str(log)), log)
        now = check_store(data, str(key_pair[1]))
        where = check_outcome(log, now)
        seen[where] = seen.get(where, 0) + 1
        log.unlink(missing_ok=True)
        runs += 1
    # The store still serves: every active model answers with the weights of its version.
    with _open(str(data), str(key_pair[1])) as store:
        from edge.runtime.model import load_model

        x = np.ones((1, 4), np.float32)
        active = store.active()
        for inst in active:
            np.testing.assert_allclose(load_model(inst.folder, inst.manifest).infer({"x": x})["y"],
                                       expected_output(inst.version, x))
    print(f"{runs} kills, seed {SEED}: {dict(sorted(seen.items()))}")
    assert sorted(i.name for i in active) == ["embed", "tiny"]
    assert seen.get("during install", 0) and seen.get("during activate", 0)
