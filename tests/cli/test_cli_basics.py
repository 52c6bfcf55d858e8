"""The `edge` command: profiles, keys and bundle verbs, --json, errors and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge.cli.main import main
from edge.errors import NotFoundError, ProfileError, SignatureError
from tests.protocol.test_bundle import make_manifest
from edge.protocol.bundle import write_bundle


def run_json(capsys, *argv: str):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_help_everywhere(capsys) -> None:
    for argv in ([], ["profiles"], ["keys"], ["bundle"], ["export", "--help"], ["profiles", "detect", "--help"]):
        code = main([*argv] if argv and argv[-1] == "--help" else [*argv, "--help"])
        assert code == 0
        assert "Usage" in capsys.readouterr().out


def test_profiles_list_show_detect_json(capsys) -> None:
    names = {p["name"] for p in run_json(capsys, "profiles", "list")}
    assert {"x86-avx2", "jetson-orin-nano", "generic-cpu"} <= names
    shown = run_json(capsys, "profiles", "show", "raspberry-pi-5")
    assert shown["architecture"] == "aarch64" and shown["execution_providers"][0]["name"] == "XnnpackExecutionProvider"
    detected = run_json(capsys, "profiles", "detect")
    assert detected["profile"] in names
    assert any(v["fits"] for v in detected["verdicts"]) and detected["machine"]["providers"]


def test_profiles_check_reports_the_key(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "my-box.yaml"
    bad.write_text("schema_version: 1\nname: my-box\ndescription: x\narchitecture: x86_64\n"
                   "execution_providers: [{name: CPUExecutionProvider}]\nmodels: {}\nmemory_mb: 1\n"
                   "disk_mb: 1\nmax_bundle_mb: 1\nopset: 17\ncolour: red\n")
    assert main(["profiles", "check", str(bad)]) == ProfileError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "my-box.yaml" in err and "colour" in err and "models.encoder" in err
    assert main(["profiles", "show", "x86-avx3"]) == NotFoundError.exit_code
    assert "did you mean 'x86-avx2'" in capsys.readouterr().err


def test_keys_and_bundle_sign_verify_inspect(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("EDGE_HOME", str(tmp_path / "home"))
    keys = run_json(capsys, "keys", "generate")
    assert Path(keys["private"]).exists() and len(keys["key_id"]) == 16
    assert main(["keys", "generate"]) != 0  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err

    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "model.onnx").write_bytes(b"\x08\x07" * 100)
    bundle = write_bundle(tmp_path / "t.edgebundle", make_manifest(payload), payload, None)
    inspected = run_json(capsys, "bundle", "inspect", str(bundle))
    assert inspected["name"] == "tiny" and inspected["_signed"] is False
    assert main(["bundle", "verify", str(bundle)]) == SignatureError.exit_code
    assert "not signed" in capsys.readouterr().err
    assert main(["bundle", "sign", str(bundle)]) == 0
    capsys.readouterr()
    verified = run_json(capsys, "bundle", "verify", str(bundle), "--trusted-key", keys["public"])
    assert verified["valid"] and verified["key_id"] == keys["key_id"]

    other = run_json(capsys, "keys", "generate", "--name", "other")
    assert main(["bundle", "verify", str(bundle), "--trusted-key", other["public"]]) == SignatureError.exit_code
    assert "untrusted" in capsys.readouterr().err


def test_debug_shows_traceback_and_console_script(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "edge.cli.main", "--debug", "profiles", "show", "nope"],
                         capture_output=True, text=True)
    assert out.returncode == NotFoundError.exit_code
    assert "Traceback" in out.stderr and "Error: unknown device profile 'nope'" in out.stderr
    edge = Path(sys.executable).parent / "edge"
    out = subprocess.run([str(edge), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip()


@pytest.mark.parametrize("argv", [["export", "/nonexistent/model", "--profile", "generic-cpu"],
                                  ["export", "org/does-not-exist-anywhere", "--profile", "x86-avx2"]])
def test_export_of_a_missing_model_is_a_clear_error(tmp_path: Path, capsys, monkeypatch, argv) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["keys", "generate"]) == 0
    capsys.readouterr()
    code = main([*argv, "-o", str(tmp_path / "out")])
    assert code != 0
    err = capsys.readouterr().err
    assert err.startswith("Error: ")
    assert not any((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True
