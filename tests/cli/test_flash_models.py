"""`edge flash` and `edge models`: offline installs into a store folder, the same checks as the agent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge.agent.device import stored_profile_name
from edge.cli.main import main
from edge.errors import CompatibilityError, ConfigError, IntegrityError, NotFoundError, SignatureError, StoreError
from edge.protocol.catalog import load_catalog
from edge.runtime.detect import detect_profile
from tests.fixtures.bundles import make_generic_bundle, make_other_key, tamper_payload

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, signing_key) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("cli-bundles")
    return {
        "tiny@1.0.0": make_generic_bundle(out, signing_key),
        "tiny@1.1.0": make_generic_bundle(out, signing_key, version="1.1.0"),
        "embedder@1.0.0": make_generic_bundle(out, signing_key, name="embedder"),
    }


def flash(bundle: Path, data: Path, pub: Path, *extra: str) -> int:
    return main(["flash", str(bundle), "--data", str(data), "--trusted-key", str(pub), *extra])


def test_flash_then_list_rollback_activate_remove_verify(tmp_path: Path, bundles, key_pair, capsys) -> None:
    for argv in (["flash", "--help"], ["models", "--help"], ["models", "list", "--help"]):
        assert main(argv) == 0 and "Usage" in capsys.readouterr().out
    data, pub = tmp_path / "sdcard", key_pair[1]
    assert flash(bundles["tiny@1.0.0"], data, pub, "--profile", "generic-cpu", "--json") == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["name"], first["version"], first["active"], first["profile"]) == ("tiny", "1.0.0", True, "generic-cpu")
    assert stored_profile_name(data) == "generic-cpu"
    assert flash(bundles["tiny@1.1.0"], data, pub) == 0  # the store's profile is reused
    assert "installed tiny@1.1.0 (active, previous 1.0.0)" in capsys.readouterr().out

    assert main(["models", "list", "--data", str(data), "--json"]) == 0
    [tiny] = json.loads(capsys.readouterr().out)
    assert (tiny["active"], tiny["previous"]) == ("1.1.0", "1.0.0")
    assert [v["version"] for v in tiny["versions"]] == ["1.0.0", "1.1.0"]
    assert main(["models", "list", "--data", str(data)]) == 0
    table = capsys.readouterr().out
    assert "tiny" in table and "active" in table and "previous" in table

    assert main(["models", "rollback", "tiny", "--data", str(data)]) == 0
    assert "tiny@1.0.0 is active" in capsys.readouterr().out
    assert main(["models", "activate", "tiny@1.1.0", "--data", str(data)]) == 0
    capsys.readouterr()
    assert main(["models", "remove", "tiny@1.1.0", "--data", str(data)]) == StoreError.exit_code
    assert "Error: tiny@1.1.0 is the active version" in capsys.readouterr().err
    assert main(["models", "remove", "tiny", "--data", str(data)]) == ConfigError.exit_code
    assert "is not NAME@VERSION" in capsys.readouterr().err
    assert main(["models", "remove", "tiny@1.0.0", "--data", str(data)]) == 0
    assert main(["models", "verify", "tiny", "--data", str(data), "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["version"] == "1.1.0"
    assert main(["models", "rollback", "tiny", "--data", str(data)]) == StoreError.exit_code
    assert "no previous version" in capsys.readouterr().err
    assert main(["models", "list", "--data", str(tmp_path / "empty")]) == NotFoundError.exit_code
    assert "holds no model store" in capsys.readouterr().err


def test_flash_refuses_with_the_agents_checks(tmp_path: Path, bundles, key_pair, signing_key, capsys) -> None:
    data, pub = tmp_path / "sdcard", key_pair[1]
    _, other_pub = make_other_key(tmp_path / "keys")
    assert flash(bundles["tiny@1.0.0"], data, other_pub, "--profile", "generic-cpu") == SignatureError.exit_code
    assert "untrusted key" in capsys.readouterr().err
    tampered = tamper_payload(bundles["tiny@1.0.0"], tmp_path / "tampered.edgebundle")
    assert flash(tampered, data, pub) == IntegrityError.exit_code
    assert "does not match its SHA-256" in capsys.readouterr().err
    avx2 = make_generic_bundle(tmp_path, signing_key, profile="x86-avx2", architecture="x86_64")
    assert flash(avx2, data, pub) == CompatibilityError.exit_code
    assert "built for profile x86-avx2, this device is generic-cpu" in capsys.readouterr().err
    assert flash(avx2, data, pub, "--profile", "x86-avx2") == ConfigError.exit_code
    assert "belongs to profile generic-cpu, not x86-avx2" in capsys.readouterr().err
    assert main(["models", "list", "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_flash_without_profile_binds_a_new_store_to_the_detected_one(tmp_path: Path, signing_key, key_pair, capsys) -> None:
    detected = detect_profile(load_catalog())[0].name
    other = "x86-avx2" if detected == "generic-cpu" else "generic-cpu"
    bundle = make_generic_bundle(tmp_path, signing_key, profile=other, architecture="any")
    assert flash(bundle, tmp_path / "data", key_pair[1]) == CompatibilityError.exit_code
    assert f"built for profile {other}, this device is {detected}" in capsys.readouterr().err
    assert stored_profile_name(tmp_path / "data") == detected


def test_two_processes_flash_the_same_store_at_once(tmp_path: Path, bundles, key_pair, capsys) -> None:
    data = tmp_path / "data"
    jobs = [bundles["tiny@1.0.0"], bundles["embedder@1.0.0"]]
    procs = [
        subprocess.Popen([sys.executable, "-m", "edge.cli.main", "flash", str(b), "--data", str(data),
                          "--profile", "generic-cpu", "--trusted-key", str(key_pair[1]), "--json"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for b in jobs
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
    assert sorted(json.loads(out)["name"] for out, _ in results) == ["embedder", "tiny"]
    assert main(["models", "list", "--data", str(data), "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    served = {n: (m["active"], len(m["versions"])) for n, m in listed.items()}
    assert served == {"embedder": ("1.0.0", 1), "tiny": ("1.0.0", 1)}
    for leftover in ("staging", "journal", "trash"):
        assert list((data / leftover).iterdir()) == []
