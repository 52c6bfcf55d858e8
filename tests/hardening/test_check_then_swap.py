"""The file checked is the file loaded: a swap between the check and the use is never served.

Each window is attacked at its exact moment, through a hook around the step that opens it:

* the bundle file is replaced by a tampered copy right after its signature was checked: the
  install reads on from the descriptor it opened, so the signed bytes are what gets installed;
* the bundle file is rewritten in place at that moment (in a payload larger than any read-ahead
  buffer, so the new bytes are the ones read): they fail their hash while they are written, and
  nothing is installed;
* a payload file in ``staging/`` is replaced (or rewritten) while the child process trial-loads
  it: its fingerprint no longer matches the one taken on the descriptor that hashed it, it is
  hashed again and the install is refused;
* a payload file of the active version is replaced after install by one of the same size (the
  cheap size check passes): the next start hashes it again, rolls back, and the agent serves the
  previous version;
* the control: a file whose fingerprint changed but whose bytes did not (a chmod) still loads.

The evil model in each case is a valid model of the same size that computes something else, so
a missing check would install and serve it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

import edge.agent.install as install_module
import edge.agent.validate_child as validate_module
from edge.agent.store import Store
from edge.cli.main import main
from edge.errors import IntegrityError
from edge.protocol.catalog import Catalog
from edge.protocol.signing import SigningKey, TrustStore
from tests.agent.server.conftest import AgentProcess
from tests.fixtures.bundles import expected_output, generic_model_bytes, make_generic_bundle, version_seed

PROFILE = "generic-cpu"
X = [[1.0, 2.0, 3.0, 4.0]]
EVIL = generic_model_bytes(version_seed("6.6.6"))  # a sound model, the same size, other answers


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, signing_key: SigningKey, trust: TrustStore,
             catalog: Catalog) -> Path:
    """A store serving tiny@1.0.0."""
    root = tmp_path_factory.mktemp("swap-template")
    with Store(root / "data", catalog.get(PROFILE), trust) as store:
        store.install(make_generic_bundle(root, signing_key))
    return root / "data"


@pytest.fixture()
def data(tmp_path: Path, template: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "data", symlinks=True))


@pytest.fixture()
def bundle(tmp_path: Path, signing_key: SigningKey) -> Path:
    return make_generic_bundle(tmp_path, signing_key, version="2.0.0")


def _payload_of(store: Store, version: str) -> bytes:
    return (store.version_dir("tiny", version) / "payload" / "model.onnx").read_bytes()


def test_the_evil_model_is_a_same_size_sound_model() -> None:
    good = generic_model_bytes(version_seed("2.0.0"))
    assert len(EVIL) == len(good) and EVIL != good


def _evil_copy(bundle: Path) -> tuple[bytes, int]:
    """Return the bundle's bytes with its model swapped for EVIL (signature untouched), and where."""
    raw = bundle.read_bytes()
    at = raw.index(generic_model_bytes(version_seed("2.0.0")))
    return raw[:at] + EVIL + raw[at + len(EVIL):], at


def test_a_bundle_replaced_after_its_check_installs_the_signed_bytes(data: Path, bundle: Path, tmp_path: Path,
                                                                    catalog: Catalog, trust: TrustStore,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    tampered = tmp_path / "tampered.edgebundle"
    tampered.write_bytes(_evil_copy(bundle)[0])
    check_validity, swapped = install_module.check_validity, []

    def swap_then_check(manifest, *args, **kw):  # runs right after the signature check
        os.replace(tampered, bundle)
        swapped.append(True)
        return check_validity(manifest, *args, **kw)

    monkeypatch.setattr(install_module, "check_validity", swap_then_check)
    with Store(data, catalog.get(PROFILE), trust) as store:
        assert store.install(bundle).version == "2.0.0"
        assert swapped and _payload_of(store, "2.0.0") == generic_model_bytes(version_seed("2.0.0"))
        assert store.verify("tiny").version == "2.0.0"
    assert EVIL in bundle.read_bytes()  # the path did name the evil bundle when the payload was read


def test_a_bundle_rewritten_in_place_after_its_check_is_refused(data: Path, tmp_path: Path, signing_key: SigningKey,
                                                               catalog: Catalog, trust: TrustStore,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A payload larger than any read-ahead buffer, so the rewritten bytes are the ones read.
    blob = os.urandom(4 << 20)
    bundle = make_generic_bundle(tmp_path, signing_key, version="2.0.0", extra_files={"blob.bin": blob})
    at = bundle.read_bytes().index(blob) + len(blob) - 1
    check_validity = install_module.check_validity

    def rewrite_then_check(manifest, *args, **kw):
        with open(bundle, "r+b") as fh:  # the very file the install holds open
            fh.seek(at)
            fh.write(bytes([blob[-1] ^ 0xFF]))
        return check_validity(manifest, *args, **kw)

    monkeypatch.setattr(install_module, "check_validity", rewrite_then_check)
    with Store(data, catalog.get(PROFILE), trust) as store:
        with pytest.raises(IntegrityError, match="'blob.bin' does not match its SHA-256"):
            store.install(bundle)
        assert [m.ref for m in store.active()] == ["tiny@1.0.0"] and store.versions("tiny") == ["1.0.0"]
    assert list((data / "staging").iterdir()) == []


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".evil")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o444)
    os.replace(tmp, path)


def _rewrite(path: Path, data: bytes) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.write(data)
    os.chmod(path, 0o444)


@pytest.mark.parametrize("swap", [_replace, _rewrite], ids=["replaced", "rewritten in place"])
def test_a_payload_file_swapped_in_staging_during_the_trial_load_is_refused(
        swap, data: Path, bundle: Path, catalog: Catalog, trust: TrustStore, monkeypatch: pytest.MonkeyPatch) -> None:
    validate_in_child, loaded = validate_module.validate_in_child, []

    def swap_then_load(folder: Path, *args, **kw):  # the staging folder, its payload hashed and sealed
        target = folder / "payload" / "model.onnx"
        assert oct(target.stat().st_mode & 0o777) == "0o444"  # read-only from the moment it was hashed
        swap(target, EVIL)
        report = validate_in_child(folder, *args, **kw)  # the child loads the evil model: it passes
        loaded.append(report)
        return report

    monkeypatch.setattr(validate_module, "validate_in_child", swap_then_load)
    with Store(data, catalog.get(PROFILE), trust) as store:
        with pytest.raises(IntegrityError, match=r"'model.onnx' does not match its SHA-256 \(it changed after it was "
                                                 r"verified\)"):
            store.install(bundle)
        assert loaded  # the swap happened and the trial load itself accepted the evil model
        assert [m.ref for m in store.active()] == ["tiny@1.0.0"] and store.versions("tiny") == ["1.0.0"]
    assert list((data / "staging").iterdir()) == [] and list((data / "journal").iterdir()) == []


def test_the_fingerprints_taken_at_hashing_are_recorded(data: Path, bundle: Path, catalog: Catalog,
                                                        trust: TrustStore) -> None:
    with Store(data, catalog.get(PROFILE), trust) as store:
        inst = store.install(bundle)
    meta = json.loads((inst.folder.parent / "install.json").read_text())
    st = os.stat(inst.folder / "model.onnx")
    assert meta["files"] == {"model.onnx": [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]}


def _infer(url: str) -> tuple[str, list[float]]:
    r = httpx.post(f"{url}/v2/models/tiny/infer", timeout=30,
                   json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": X[0]}]})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["model_version"], body["outputs"][0]["data"]


def test_an_installed_file_swapped_later_is_never_served(data: Path, bundle: Path, tmp_path: Path, catalog: Catalog,
                                                         trust: TrustStore, key_pair, capsys) -> None:
    with Store(data, catalog.get(PROFILE), trust) as store:
        store.install(bundle)  # 2.0.0 active, 1.0.0 previous
        target = store.version_dir("tiny", "2.0.0") / "payload" / "model.onnx"
    os.chmod(target.parent, 0o755)  # what an attacker with the store's own user can do
    _replace(target, EVIL)
    os.chmod(target.parent, 0o555)
    with Store(data, catalog.get(PROFILE), trust) as store:
        assert store.problem_of("tiny", "2.0.0") is None  # the cheap check cannot see it: same size
    agent = AgentProcess(data, tmp_path / "home", "--trusted-key", str(key_pair[1]))
    try:
        agent.wait_ready()
        version, answer = _infer(agent.url)
    finally:
        assert agent.stop() == 0, agent.stderr
    assert version == "1.0.0"
    np.testing.assert_allclose(answer, expected_output("1.0.0", np.array(X, np.float32)).ravel())
    assert main(["models", "list", "--data", str(data), "--json"]) == 0
    [tiny] = json.loads(capsys.readouterr().out)
    assert tiny["active"] == "1.0.0"
    failed = next(v["failed"] for v in tiny["versions"] if v["version"] == "2.0.0")
    assert "'model.onnx' does not match its SHA-256 (it changed after it was verified)" in failed


def test_a_changed_fingerprint_with_the_same_bytes_still_loads(data: Path, bundle: Path, catalog: Catalog,
                                                              trust: TrustStore) -> None:
    with Store(data, catalog.get(PROFILE), trust) as store:
        store.install(bundle)
        target = store.version_dir("tiny", "2.0.0") / "payload" / "model.onnx"
    os.chmod(target, 0o444)  # same mode: only the ctime changes
    with Store(data, catalog.get(PROFILE), trust) as store:
        assert store.begin_load("tiny").version == "2.0.0"
