"""Registry: background loading, strict readiness, failures reported to the store, lookups."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from edge.agent.server.registry import ModelState, Registry
from edge.errors import InferenceError, NotFoundError, StoreError, UnavailableError
from edge.runtime.model import load_model
from tests.agent.server.tiny import ListSource, make_installed


def test_live_at_once_ready_only_after_every_model_loaded(tmp_path: Path) -> None:
    source = ListSource([make_installed(tmp_path, "a"), make_installed(tmp_path, "b")])
    gate = threading.Event()

    def slow_loader(folder, manifest, profile, threads):
        gate.wait(30)
        return load_model(folder, manifest, profile, threads)

    reg = Registry(source, loader=slow_loader)
    reg.start()
    try:
        assert reg.live()
        ready, reason = reg.readiness()
        assert not ready and "still loading" in reason
        with pytest.raises(UnavailableError, match="not ready"):
            reg.resolve("a")
        gate.set()
        assert reg.wait_loaded(30)
        assert reg.readiness() == (True, "")
        assert {s.name for s in reg.served()} == {"a", "b"}
        assert reg.resolve("a").provider == "CPUExecutionProvider"
        assert source.healthy == [("a", "1.0.0"), ("b", "1.0.0")]
    finally:
        gate.set()
        reg.close()


def test_a_failed_load_keeps_the_agent_unready_and_tells_the_store(tmp_path: Path) -> None:
    source = ListSource([make_installed(tmp_path, "good"), make_installed(tmp_path, "bad")])

    def loader(folder, manifest, profile, threads):
        if manifest.name == "bad":
            raise InferenceError("onnxruntime cannot load model.onnx: broken")
        return load_model(folder, manifest, profile, threads)

    reg = Registry(source, loader=loader)
    reg.start()
    assert reg.wait_loaded(30)
    ready, reason = reg.readiness()
    assert not ready and "bad@1.0.0 is FAILED: onnxruntime cannot load" in reason
    assert source.unhealthy == [("bad", "1.0.0", "onnxruntime cannot load model.onnx: broken")]
    with pytest.raises(UnavailableError, match="FAILED"):
        reg.resolve("bad")
    assert reg.resolve("good").name == "good"
    rows = {r["name"]: r for r in reg.index()}
    assert rows["bad"]["state"] == "UNAVAILABLE" and "broken" in rows["bad"]["reason"]
    assert rows["good"]["state"] == "READY"
    reg.unload("bad")  # taking the broken model out on purpose makes the agent ready again
    assert reg.readiness() == (True, "")
    reg.close()


def test_lookups_explain_what_is_missing(tmp_path: Path) -> None:
    inactive = dataclasses.replace(make_installed(tmp_path, "embedder", "1.1.0"), active=False)
    reg = Registry(ListSource([make_installed(tmp_path, "embedder"), inactive]))
    reg.start()
    assert reg.wait_loaded(30)
    assert [(r["version"], r["state"], r.get("reason")) for r in reg.index()] == [
        ("1.0.0", "READY", None), ("1.1.0", "UNAVAILABLE", "installed, not active")]
    with pytest.raises(NotFoundError, match="did you mean 'embedder'"):
        reg.resolve("embeder")
    with pytest.raises(NotFoundError, match="no loaded version '2.0.0'"):
        reg.resolve("embedder", "2.0.0")
    with pytest.raises(NotFoundError, match="not installed"):
        reg.load("other")
    assert reg.resolve("embedder", "1.0.0") is reg.resolve("embedder")
    reg.close()
    empty = Registry(None)
    empty.start()
    assert empty.wait_loaded(5) and empty.readiness() == (True, "") and empty.index() == []
    with pytest.raises(NotFoundError, match="no models are installed"):
        empty.resolve("x")


def test_transitions_outside_the_table_are_refused(tmp_path: Path) -> None:
    reg = Registry(ListSource([make_installed(tmp_path)]))
    reg.start()
    assert reg.wait_loaded(30)
    entry = next(e for e in reg._all() if e.name == "tiny")
    assert entry.state is ModelState.READY
    with pytest.raises(StoreError, match="cannot go from READY to FAILED"):
        entry.move(ModelState.FAILED)
    reg.close()


def test_the_native_runtime_is_imported_before_the_loader_thread_starts() -> None:
    """numpy imported by two threads at once can be found half-initialized: import it first."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, threading
        from edge.agent.server.registry import Registry
        from tests.agent.server.tiny import ListSource
        seen = {}
        start = threading.Thread.start
        def recording_start(self):
            if self.name == "edge-model-loader":
                seen["imported"] = {"numpy", "onnxruntime"} <= set(sys.modules)
            start(self)
        threading.Thread.start = recording_start
        assert "onnxruntime" not in sys.modules, "the registry module must not import it by itself"
        import tempfile
        from pathlib import Path
        from tests.agent.server.tiny import make_installed
        idle = Registry(ListSource([]))
        idle.start()
        idle.wait_loaded(30)
        idle.close()
        assert "onnxruntime" not in sys.modules, "an agent without models must not load the runtime"
        reg = Registry(ListSource([make_installed(Path(tempfile.mkdtemp()), "a")]))
        reg.start()
        reg.wait_loaded(30)
        reg.close()
        print(seen)
    """)
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "{'imported': True}"
