"""A lean fork server for crash campaigns: one spawned, single-threaded process with the agent's
modules imported forks each job (:mod:`tests.hardening.crash_jobs`), kills it when told, and
reports how it ended. A kill then costs a fork, not a Python start.

Its own process rather than multiprocessing's global forkserver: that one is shared by the
whole test session and keeps the preload list of whichever test started it first. Forking the
test process itself is not safe either (it runs broker clients and HTTP servers in threads).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

# Seconds a job may run before the driver gives up on it (reached only when something hangs).
JOB_TIMEOUT_S = 120.0


def _starts(log: Path) -> list[dict[str, Any]]:
    """Return the "start" records of a job log (a torn last line is ignored)."""
    out = []
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if record.get("phase") == "start":
            out.append(record)
    return out


def _fresh_install(record: dict[str, Any]) -> bool:
    """Return whether a store job's started operation installs a version not yet installed."""
    op = record.get("op")
    if not isinstance(op, list) or op[0] != "install":
        return False
    _, name, version = op
    return version not in record.get("before", {}).get(name, [None, None, []])[2]


def _child(job: str, args: dict[str, Any], fault: str | None) -> None:
    from tests.hardening.crash_jobs import JOBS

    if fault:
        os.environ["EDGE_FAULT_POINT"] = fault  # this forked process only
    else:
        os.environ.pop("EDGE_FAULT_POINT", None)
    try:
        JOBS[job](**args)
    except BaseException as exc:  # noqa: BLE001  (reported through the exit code and the log)
        import traceback

        Path(args["log"]).with_suffix(".error").write_text("".join(traceback.format_exception(exc)))
        os._exit(3)
    os._exit(0)


def run_one(ctx: Any, request: dict[str, Any]) -> dict[str, Any]:
    """Fork one job; kill it ``delay`` seconds after its n-th "start" record when asked; reap it."""
    log = Path(request["args"]["log"])
    kill = request.get("kill")
    proc = ctx.Process(target=_child, args=(request["job"], request["args"], request.get("fault")))
    began = time.monotonic()
    proc.start()
    killed = False
    if kill is not None:
        deadline = began + JOB_TIMEOUT_S
        while len(started := _starts(log)) < kill["starts"] and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.002)
        slow = len(started) >= kill["starts"] and _fresh_install(started[kill["starts"] - 1])
        time.sleep(kill.get("install_delay", kill["delay"]) if slow else kill["delay"])
        if proc.is_alive():
            proc.kill()
            killed = True
    proc.join(JOB_TIMEOUT_S)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        return {"exitcode": None, "killed": True, "seconds": time.monotonic() - began, "hung": True}
    return {"exitcode": proc.exitcode, "killed": killed, "seconds": time.monotonic() - began, "hung": False}


def serve(conn: Any) -> None:
    """Answer requests from ``conn`` until it sends None (the spawned driver's main loop)."""
    import tests.hardening.crash_jobs  # noqa: F401  (the preload every job inherits)

    ctx = multiprocessing.get_context("fork")
    conn.send("ready")
    try:
        while (request := conn.recv()) is not None:
            conn.send(run_one(ctx, request))
    except EOFError:  # the test process went away
        pass


class Driver:
    """The test's handle on the driver process."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, theirs = ctx.Pipe()
        # Not a daemon (those may not fork); it ends when this end of the pipe closes.
        self._proc = ctx.Process(target=serve, args=(theirs,), name="crash-driver")
        self._proc.start()
        if not self._conn.poll(JOB_TIMEOUT_S) or self._conn.recv() != "ready":
            raise RuntimeError("the crash driver did not start")

    def run(self, job: str, args: dict[str, Any], fault: str | None = None,
            kill: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run one job to its end (or its kill); return exitcode, killed, seconds, hung."""
        self._conn.send({"job": job, "args": args, "fault": fault, "kill": kill})
        if not self._conn.poll(JOB_TIMEOUT_S * 2 + 10):
            raise RuntimeError("the crash driver stopped answering")
        return self._conn.recv()

    def close(self) -> None:
        """Stop the driver."""
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
