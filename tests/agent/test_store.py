"""The offline model store: install, activate, roll back, remove; every refusal leaves it unchanged.

Real bundles, real files, real child processes for the trial load. A store with tiny@1.0.0
and tiny@1.1.0 installed is built once per module and copied for each test that needs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge.agent.journal import TERMINAL, TRANSITIONS, InstallState
from edge.agent.store import MAX_LOAD_ATTEMPTS, Store
from edge.errors import (
    BundleError, CompatibilityError, ConfigError, IntegrityError, ModelValidationError, NotFoundError,
    ResourceError, SignatureError, StoreError, UnsafePathError,
)  # fmt: skip
from edge.protocol.catalog import Catalog
from edge.protocol.signing import SigningKey, TrustStore
from edge.runtime.model import load_model
from tests.fixtures.bundles import (
    expected_output, external_data_model_bytes, garbage_model_bytes, hanging_model_bytes,
    make_generic_bundle, make_llm_like_bundle, make_other_key, memory_hog_model_bytes, rewrite_bundle,
    tamper_payload,
)  # fmt: skip

X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Return every path under a store with its mode and content hash (the lock file aside)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel == "store.lock":
            continue
        st = os.lstat(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[rel] = (st.st_mode, digest)
    return out


def assert_clean(root: Path) -> None:
    """No install in flight, nothing half-deleted, no temporary file anywhere."""
    assert list((root / "staging").iterdir()) == []
    assert list((root / "journal").iterdir()) == []
    assert list((root / "trash").iterdir()) == []
    assert not [p for p in root.rglob(".tmp-*")]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, signing_key: SigningKey) -> dict[str, Path]:
    """Signed bundles of tiny (1.0.0, 1.1.0, 1.2.0) and of a second model, an LLM-shaped llm@1.0.0."""
    out = tmp_path_factory.mktemp("bundles")
    return {
        "tiny@1.0.0": make_generic_bundle(out, signing_key),
        "tiny@1.1.0": make_generic_bundle(out, signing_key, version="1.1.0"),
        "tiny@1.2.0": make_generic_bundle(out, signing_key, version="1.2.0"),
        "llm@1.0.0": make_llm_like_bundle(out, signing_key, min_ram_mb=512),
    }


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, bundles, catalog: Catalog, trust: TrustStore) -> Path:
    """A store with tiny@1.0.0 then tiny@1.1.0 installed and activated (1.1.0 active)."""
    root = tmp_path_factory.mktemp("template") / "data"
    with Store(root, catalog.get("generic-cpu"), trust) as store:
        store.install(bundles["tiny@1.0.0"])
        store.install(bundles["tiny@1.1.0"])
    return root


@pytest.fixture()
def data(tmp_path: Path, template: Path) -> Path:
    """A private copy of the template store."""
    return Path(shutil.copytree(template, tmp_path / "data", symlinks=True))


@pytest.fixture()
def store(data: Path, catalog: Catalog, trust: TrustStore):
    with Store(data, catalog.get("generic-cpu"), trust) as s:
        yield s


def test_install_verifies_extracts_read_only_and_activates(tmp_path: Path, bundles, catalog, trust, signing_key) -> None:
    with Store(tmp_path / "data", catalog.get("generic-cpu"), trust) as store:
        inst = store.install(bundles["tiny@1.0.0"])
        assert (inst.name, inst.version, inst.key_id) == ("tiny", "1.0.0", signing_key.id)
        root = tmp_path / "data" / "models" / "tiny" / "1.0.0"
        assert inst.folder == root / "payload"
        # The signed manifest bytes and the key id stay beside the version.
        from edge.protocol.bundle import BundleReader

        with BundleReader(bundles["tiny@1.0.0"]) as reader:
            assert (root / "manifest.json").read_bytes() == reader.manifest_bytes
            assert (root / "signature.json").read_bytes() == reader.signature_bytes
        meta = json.loads((root / "install.json").read_text())
        assert meta["key_id"] == signing_key.id and meta["validation"]["outputs"] == {"y": [1, 2]}
        for path in root.rglob("*"):
            if path.is_file():
                assert path.stat().st_mode & 0o777 == 0o444, path
        assert (root / "payload").stat().st_mode & 0o777 == 0o555
        assert [m.ref for m in store.active()] == ["tiny@1.0.0"]
        [status] = store.list()
        assert (status.name, status.active, status.previous) == ("tiny", "1.0.0", None)
        model = load_model(inst.folder, inst.manifest)
        np.testing.assert_allclose(model.infer({"x": X})["y"], expected_output("1.0.0", X))
    assert json.loads((tmp_path / "data" / "device.json").read_text())["profile"] == "generic-cpu"
    assert_clean(tmp_path / "data")


def test_new_version_keeps_the_previous_for_instant_rollback(store: Store) -> None:
    assert (store.get("tiny").version, store.list()[0].previous) == ("1.1.0", "1.0.0")
    back = store.rollback("tiny")
    assert back.version == "1.0.0"
    np.testing.assert_allclose(load_model(back.folder, back.manifest).infer({"x": X})["y"], expected_output("1.0.0", X))
    status = store.list()[0]
    assert (status.active, status.previous) == ("1.0.0", "1.1.0")
    assert store.rollback("tiny").version == "1.1.0"
    assert store.activate("tiny", "1.0.0").version == "1.0.0"
    assert [e["event"] for e in json.loads((store.model_dir("tiny") / "state.json").read_text())["history"]][-3:] == [
        "rolled back", "rolled back", "activated"]


def test_install_without_activation_and_two_models_active(store: Store, bundles, tmp_path: Path, signing_key) -> None:
    inst = store.install(bundles["tiny@1.2.0"], activate=False)
    assert inst.version == "1.2.0" and store.get("tiny").version == "1.1.0"
    assert [v.version for v in store.list()[-1].versions] == ["1.0.0", "1.1.0", "1.2.0"]
    llm = store.install(bundles["llm@1.0.0"])  # 512 MB promised beside tiny@1.1.0's 64 MB
    assert sorted(m.ref for m in store.active()) == ["llm@1.0.0", "tiny@1.1.0"]
    # The trial run drove the LLM through the device generator (KV cache and all): two tokens
    # scored over the 8-token vocabulary.
    outputs = json.loads((llm.folder.parent / "install.json").read_text())["validation"]["outputs"]
    assert outputs == {"logprobs": [2, 8]}
    assert_clean(store.root)
    # The memory budget counts what the other active models were promised.
    hungry = make_generic_bundle(tmp_path, signing_key, name="big", min_ram_mb=1600)
    with pytest.raises(ResourceError, match=r"1600 MB of RAM \(576 MB for the other active models\); "
                                            r"profile generic-cpu budgets 2048 MB"):
        store.install(hungry)


def test_remove_refuses_the_active_version_and_drops_the_previous(store: Store) -> None:
    with pytest.raises(StoreError, match="tiny@1.1.0 is the active version"):
        store.remove("tiny", "1.1.0")
    with pytest.raises(NotFoundError, match="installed versions: 1.0.0, 1.1.0"):
        store.remove("tiny", "9.9.9")
    store.remove("tiny", "1.0.0")
    assert not (store.root / "models" / "tiny" / "1.0.0").exists()
    status = store.list()[0]
    assert (status.active, status.previous, [v.version for v in status.versions]) == ("1.1.0", None, ["1.1.0"])
    with pytest.raises(StoreError, match="no previous version"):
        store.rollback("tiny")
    with pytest.raises(NotFoundError, match="not installed"):
        store.remove("nope", "1.0.0")
    assert_clean(store.root)


def test_same_bytes_again_is_a_no_op_other_bytes_are_refused(store: Store, bundles, tmp_path: Path, signing_key) -> None:
    before = snapshot(store.root)
    assert store.install(bundles["tiny@1.1.0"]).version == "1.1.0"
    assert snapshot(store.root) == before
    changed = make_generic_bundle(tmp_path, signing_key, version="1.1.0", min_ram_mb=65)
    with pytest.raises(StoreError, match="already installed with different content"):
        store.install(changed)
    assert snapshot(store.root) == before


def _other_arch() -> str:
    return "aarch64" if platform.machine() in ("x86_64", "AMD64") else "x86_64"


REFUSALS = {
    # case: (how the bundle differs, expected error, message fragment)
    "untrusted key": ({"key": "other"}, SignatureError, "untrusted key"),
    "unsigned": ({"key": None}, SignatureError, "not signed"),
    "expired": ({"expires_at": "2020-01-01T00:00:00Z"}, SignatureError, "expired at 2020-01-01"),
    "other profile": ({"profile": "x86-avx2"}, CompatibilityError, "built for profile x86-avx2"),
    "other architecture": ({"architecture": _other_arch()}, CompatibilityError, f"built for {_other_arch()}"),
    "absent provider": ({"required_providers": ("TensorrtExecutionProvider",)}, CompatibilityError,
                        "needs one of TensorrtExecutionProvider"),
    "unknown provider": ({"required_providers": ("MagicExecutionProvider",)}, CompatibilityError,
                         "unknown execution provider"),
    "too much RAM": ({"min_ram_mb": 1 << 20}, ResourceError, "MB of RAM"),
    "older version": ({"version": "0.9.0"}, CompatibilityError, "older than the installed tiny@1.1.0"),
    "model file not listed": ({"model_file": "other.onnx"}, BundleError, "lists no payload file 'other.onnx'"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_problem_and_leave_the_store_unchanged(case: str, store: Store, tmp_path: Path,
                                                                 signing_key) -> None:
    change, error, fragment = REFUSALS[case]
    change = dict(change)
    key = signing_key
    if "key" in change:
        key = make_other_key(tmp_path / "k")[0] if change.pop("key") == "other" else None
    version = change.pop("version", "2.0.0")
    profile = change.pop("profile", "generic-cpu")
    bundle = make_generic_bundle(tmp_path, key, version=version, profile=profile, **change)
    before = snapshot(store.root)
    with pytest.raises(error, match=fragment):
        store.install(bundle)
    assert snapshot(store.root) == before
    assert_clean(store.root)


def test_revoked_key_tampered_payload_and_hostile_names_are_refused(store: Store, data: Path, bundles, tmp_path: Path,
                                                                    catalog, trust, signing_key) -> None:
    before = snapshot(data)
    with Store(data, catalog.get("generic-cpu"), TrustStore(trust.keys, frozenset({signing_key.id}))) as revoking:
        with pytest.raises(SignatureError, match=f"revoked key {signing_key.id}"):
            revoking.install(bundles["tiny@1.2.0"])
    # The payload is hashed while it is written: the bad byte is found mid-extraction and the
    # staging folder goes away with it.
    with pytest.raises(IntegrityError, match="does not match its SHA-256"):
        store.install(tamper_payload(bundles["tiny@1.2.0"], tmp_path / "tampered.edgebundle"))
    hostile = rewrite_bundle(bundles["tiny@1.2.0"], tmp_path / "hostile.edgebundle", lambda n, b: b)
    import tarfile

    with tarfile.open(hostile, "a") as tar:
        info = tarfile.TarInfo("payload/../../escaped.txt")
        info.size = 3
        import io

        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(UnsafePathError):
        store.install(hostile)
    assert snapshot(data) == before
    assert not list(tmp_path.parent.rglob("escaped.txt"))
    assert_clean(data)


def test_disk_budget_counts_what_the_store_holds(data: Path, catalog, trust, tmp_path: Path, signing_key) -> None:
    small = catalog.get("generic-cpu").model_copy(update={"disk_mb": 2, "max_bundle_mb": 2})
    big = make_generic_bundle(tmp_path, signing_key, version="2.0.0", extra_files={"blob.bin": b"\0" * ((2 << 20) - 400)})
    before = snapshot(data)
    with Store(data, small, trust) as store:
        with pytest.raises(ResourceError, match="of disk; the store holds"):
            store.install(big)
    bigger = make_generic_bundle(tmp_path, signing_key, version="2.0.1", extra_files={"blob.bin": b"\0" * (3 << 20)})
    with Store(data, small, trust) as store:
        with pytest.raises(ResourceError, match="over the profile's max_bundle_mb 2"):
            store.install(bigger)
    assert snapshot(data) == before


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        (garbage_model_bytes(), "DecodeError"),
        (memory_hog_model_bytes(), "Failed to allocate memory"),  # the child's address-space cap
        (external_data_model_bytes("../../../etc/passwd"), "'..'"),
    ],
    ids=["garbage bytes", "over the memory cap", "external data outside the payload"],
)
def test_a_model_that_fails_its_trial_load_is_refused(model: bytes, fragment: str, store: Store, tmp_path: Path,
                                                      signing_key) -> None:
    bundle = make_generic_bundle(tmp_path, signing_key, name="crafted", model=model)  # correctly signed
    before = snapshot(store.root)
    with pytest.raises(ModelValidationError, match=fragment):
        store.install(bundle)
    assert snapshot(store.root) == before
    assert_clean(store.root)


def test_a_model_that_crashes_or_hangs_the_child_cannot_hurt_the_store(store: Store, tmp_path: Path, signing_key,
                                                                        monkeypatch) -> None:
    before = snapshot(store.root)
    monkeypatch.setenv("EDGE_FAULT_POINT", "validate-child")  # the child SIGSEGVs as a crashing ORT would
    with pytest.raises(ModelValidationError, match="killed the validation process with SIGSEGV"):
        store.install(make_generic_bundle(tmp_path, signing_key, name="crash"))
    monkeypatch.delenv("EDGE_FAULT_POINT")
    store.validate_timeout_s = 1.5  # the model loops forever: the timeout always wins
    with pytest.raises(ModelValidationError, match="did not load and run once within 1.5 s"):
        store.install(make_generic_bundle(tmp_path, signing_key, name="hang", model=hanging_model_bytes()))
    assert snapshot(store.root) == before
    assert_clean(store.root)


def test_a_deliberate_downgrade_is_signed_as_one(store: Store, tmp_path: Path, signing_key) -> None:
    older = make_generic_bundle(tmp_path, signing_key, version="0.9.0", allow_downgrade=True)
    assert store.install(older).version == "0.9.0"
    assert (store.get("tiny").version, store.list()[0].previous) == ("0.9.0", "1.1.0")


def test_unhealthy_version_rolls_back_once_and_never_loops(store: Store) -> None:
    back = store.mark_unhealthy("tiny", "1.1.0", "readiness probe failed")
    assert back is not None and back.version == "1.0.0"
    status = store.list()[0]
    assert (status.active, status.previous) == ("1.0.0", "1.1.0")
    assert status.versions[1].failed == "readiness probe failed"
    with pytest.raises(StoreError, match="failed before: readiness probe failed"):
        store.activate("tiny", "1.1.0")
    with pytest.raises(StoreError, match="failed before"):
        store.rollback("tiny")
    # 1.0.0 fails too: the failed 1.1.0 is never chosen again, nothing is served, no loop.
    assert store.mark_unhealthy("tiny", "1.0.0", "crashed") is None
    assert store.get("tiny").version == "1.0.0"
    assert store.begin_load("tiny") is None
    # An operator may insist.
    assert store.activate("tiny", "1.1.0", force=True).version == "1.1.0"
    assert store.begin_load("tiny").version == "1.1.0"


def test_loads_never_confirmed_roll_back_after_the_cap(data: Path, catalog, trust) -> None:
    profile = catalog.get("generic-cpu")
    for attempt in range(MAX_LOAD_ATTEMPTS):  # each "boot" counts, even if the agent then dies
        with Store(data, profile, trust) as store:
            assert store.begin_load("tiny").version == "1.1.0"
    with Store(data, profile, trust) as store:
        assert store.begin_load("tiny").version == "1.0.0"
        store.mark_healthy("tiny", "1.0.0")
        assert store.begin_load("tiny").version == "1.0.0"
        status = store.list()[0]
        assert status.versions[0].healthy and "not confirmed healthy" in status.versions[1].failed
        assert json.loads((store.model_dir("tiny") / "state.json").read_text())["attempts"] == {}


def test_a_revoked_key_blocks_activation_of_its_versions(data: Path, catalog, trust, signing_key) -> None:
    revoked = TrustStore(trust.keys, frozenset({signing_key.id}))
    with Store(data, catalog.get("generic-cpu"), revoked) as store:
        with pytest.raises(SignatureError, match="revoked key"):
            store.rollback("tiny")
        with pytest.raises(SignatureError, match="revoked key"):
            store.activate("tiny", "1.0.0")
        assert store.mark_unhealthy("tiny", "1.1.0", "bad") is None


def test_damage_is_found_at_open_and_by_verify(data: Path, catalog, trust) -> None:
    profile = catalog.get("generic-cpu")
    model = data / "models" / "tiny" / "1.1.0" / "payload" / "model.onnx"
    model.chmod(0o644)
    model.write_bytes(model.read_bytes()[:-1])  # a short file: the cheap check at open sees it
    with Store(data, profile, trust) as store:
        status = store.list()[0]
        assert (status.active, status.previous) == ("1.0.0", None)
        assert "is 161 bytes, manifest says 162" in status.versions[1].problem
        assert status.versions[1].failed.startswith("damaged")
        other = data / "models" / "tiny" / "1.0.0" / "payload" / "model.onnx"
        other.chmod(0o644)
        raw = bytearray(other.read_bytes())
        raw[-1] ^= 0xFF  # same size: only a full re-hash sees it
        other.write_bytes(bytes(raw))
        assert store.get("tiny").version == "1.0.0"
        with pytest.raises(IntegrityError, match="does not match its SHA-256"):
            store.verify("tiny")


def test_a_store_belongs_to_one_profile(data: Path, catalog, trust) -> None:
    with pytest.raises(ConfigError, match="belongs to profile generic-cpu, not x86-avx2"):
        Store(data, catalog.get("x86-avx2"), trust)


def test_a_corrupt_state_file_is_rebuilt_without_an_active_version(data: Path, catalog, trust) -> None:
    (data / "models" / "tiny" / "state.json").write_text("{not json")
    with Store(data, catalog.get("generic-cpu"), trust) as store:
        status = store.list()[0]
        assert status.active is None and [v.version for v in status.versions] == ["1.0.0", "1.1.0"]
        assert store.activate("tiny", "1.1.0").version == "1.1.0"


def test_install_state_machine_table() -> None:
    for state, targets in TRANSITIONS.items():
        if state in TERMINAL:
            assert state is InstallState.INSTALLED or not targets
        else:
            assert InstallState.FAILED in targets, state
    # Every state is reachable from RECEIVED.
    seen, todo = {InstallState.RECEIVED}, [InstallState.RECEIVED]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(InstallState)


def test_recovery_leaves_an_install_in_flight_alone(store: Store, data: Path, catalog, trust) -> None:
    with store.locked():  # an install in this process, as `edge flash` would hold one
        ticket = store.journal.begin(Path("elsewhere.edgebundle"), True)
    store.journal.advance(ticket, InstallState.VERIFIED, name="tiny", version="2.0.0", payload_bytes=10)
    (store.staging_dir / ticket.id).mkdir()
    with Store(data, catalog.get("generic-cpu"), trust):  # the agent starting meanwhile
        pass
    assert (store.staging_dir / ticket.id).is_dir()
    assert (store.journal.folder / f"{ticket.id}.json").exists()
    os.close(ticket.lock_fd)  # its owner dies without finishing
    with Store(data, catalog.get("generic-cpu"), trust) as reopened:
        assert reopened.get("tiny").version == "1.1.0"
    assert_clean(data)
