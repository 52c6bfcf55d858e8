"""`edge agent run` as a process: serves an empty store, stops cleanly on SIGTERM."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai

from edge.cli.main import main
from tests.agent.server.conftest import AgentProcess


def test_an_empty_store_serves_and_sigterm_stops_cleanly(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "data", tmp_path / "home")
    try:
        agent.wait_ready()
        assert httpx.get(agent.url + "/v2/health/live").status_code == 200
        assert httpx.post(agent.url + "/v2/repository/index").json() == []
        assert openai.OpenAI(base_url=agent.url + "/v1", api_key="-").models.list().data == []
        r = httpx.post(agent.url + "/v1/chat/completions",
                       json={"model": "any", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and "no models are installed" in r.json()["error"]["message"]
        assert "process_resident_memory_bytes" in httpx.get(agent.url + "/metrics").text
    finally:
        rc = agent.stop()
    assert rc == 0, agent.stderr
    assert "Traceback" not in agent.stderr
    assert "stopped on SIGTERM" in agent.stderr


def test_bad_options_exit_with_a_message(tmp_path: Path, capsys) -> None:
    assert main(["agent", "run", "--device-id", "a/b", "--data", str(tmp_path), "--profile", "generic-cpu"]) == 2
    assert "invalid device id" in capsys.readouterr().err
    assert main(["agent", "run", "--device-id", "d", "--data", str(tmp_path), "--http", "nope"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert main(["agent", "run", "--device-id", "d", "--data", str(tmp_path), "--profile", "no-such"]) == 2
    assert "unknown device profile" in capsys.readouterr().err
