"""The README's main command, `edge demo`, end to end: real models, a real controller with its
embedded broker, three real agents, a rollout in waves and an answer from a device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_edge_demo_runs_the_whole_chain(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "edge.cli.main", "demo", "--dir", str(tmp_path / "demo"), "--no-keep"],
                         capture_output=True, text=True, timeout=2400, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in text
    assert "online: demo-1, demo-2, demo-3" in text
    assert "minilm@1.0.0: completed, wave 1, devices {'committed': 3}" in text
    assert "smollm2@1.0.0: completed, wave 1, devices {'committed': 3}" in text
    assert "embeddings (3, 384)" in text
    assert "Paris" in text.split("What is the capital of France?")[-1]
    assert "dashboard: http://127.0.0.1:" in text
