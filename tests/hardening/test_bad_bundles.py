"""The bad-bundle matrix: every hostile bundle is refused by the device store, harmlessly.

Each case (:mod:`tests.hardening.bad_bundle_cases`) builds one hostile bundle, or serves one
badly over HTTP, and installs it the way a real install goes: :meth:`Store.install` (after
:func:`edge.agent.downloader.download` for the download cases, as the deployer does), and
for a subset also ``edge flash`` through :func:`edge.cli.main.main`. Every case must:

* fail with exactly its error class and a message naming the reason;
* leave the store byte for byte as it was: it still serves the verified tiny@1.0.0, nothing is
  staged, journaled, trashed or half-written;
* write nothing outside the store: the sandbox around it is snapshotted before and after
  (every path, mode, size, link count and, for small files, content), and the places that
  traversal, absolute-path and link members aim at must not exist anywhere.

One test's sandbox::

    sandbox/
        data/        the store: a copy of a template that serves tiny@1.0.0
        bundles/     the hostile bundle
        w.bin        real weights that an external-data reference points at from outside
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from edge.agent.downloader import download
from edge.agent.store import Store
from edge.cli.main import main
from edge.errors import EdgeError
from edge.protocol.catalog import Catalog
from edge.protocol.signing import SigningKey
from tests.fixtures.bundles import make_generic_bundle, make_other_key
from tests.fixtures.hostile_bundles import HostileServer, file_entry, signed_members
from tests.hardening.bad_bundle_cases import ACCEPTED, CASES, FLASH, SLOW, Case, Ctx, Keys

PROFILE = "generic-cpu"
# Files in the sandbox larger than this are compared by size, inode and times, not content:
# the sparse bundles read as gigabytes of zeros.
HASHED_MAX = 16 << 20


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory, signing_key: SigningKey, key_pair: tuple[Path, Path]) -> Keys:
    folder = tmp_path_factory.mktemp("matrix-keys")
    revoked, revoked_pub = make_other_key(folder, "revoked")
    other, _ = make_other_key(folder, "other")
    return Keys(signing_key, key_pair[1], revoked, revoked_pub, other)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, keys: Keys, catalog: Catalog) -> Path:
    """A store serving tiny@1.0.0, signed by the trusted key and installed the normal way."""
    root = tmp_path_factory.mktemp("matrix-template")
    bundle = make_generic_bundle(root, keys.trusted)
    with Store(root / "data", catalog.get(PROFILE), keys.trust()) as store:
        store.install(bundle)
    return root / "data"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Path:
    """A sound tiny@2.0.0, signed by the trusted key: the starting point of most cases."""
    return make_generic_bundle(tmp_path_factory.mktemp("matrix-good"), keys.trusted, version="2.0.0")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileServer]:
    s = HostileServer(tmp_path_factory.mktemp("matrix-www"))
    yield s
    s.close()


@pytest.fixture()
def ctx(tmp_path: Path, template: Path, keys: Keys, good: Path, server: HostileServer) -> Ctx:
    sandbox = tmp_path / "sandbox"
    (sandbox / "bundles").mkdir(parents=True)
    shutil.copytree(template, sandbox / "data", symlinks=True)
    # The weights of the external-data model (w of the generic model, seed 0), outside the store:
    # were any loader to follow a reference out of the payload, that model would load and pass.
    (sandbox / "w.bin").write_bytes((np.arange(8, dtype=np.float32).reshape(4, 2)).tobytes())
    return Ctx(sandbox, keys, good, server)


def _params(ids: list[str]) -> list[Any]:
    return [pytest.param(i, id=i, marks=[pytest.mark.slow] if i in SLOW else []) for i in ids]


# ------------------------------------------------------------------------------------ checks


def store_snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Return every path of the store with its mode and content hash (lock file and downloads aside)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel == "store.lock" or rel == "fleet" or rel.startswith("fleet/"):
            continue
        st = os.lstat(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else "-"
        out[rel] = (st.st_mode, digest)
    return out


def outside_snapshot(sandbox: Path) -> dict[str, tuple[Any, ...]]:
    """Return every path of the sandbox outside the store: type, mode, size, links, content."""
    out: dict[str, tuple[Any, ...]] = {}
    for path in sorted(sandbox.rglob("*")):
        rel = path.relative_to(sandbox).as_posix()
        if rel == "data" or rel.startswith("data/"):
            continue
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and st.st_size <= HASHED_MAX:
            content: Any = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        else:
            content = (st.st_ino, st.st_mtime_ns)
        out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size, st.st_nlink, content)
    return out


def assert_clean(root: Path) -> None:
    """No install in flight, nothing half-deleted, no temporary or partial file in the store."""
    for folder in ("staging", "journal", "trash"):
        assert list((root / folder).iterdir()) == [], folder
    assert not list(root.rglob(".tmp-*"))
    assert not [p for p in root.rglob("*.part") if "downloads" not in p.parts]


def assert_serves_only_the_verified_version(ctx: Ctx) -> None:
    """The store still serves tiny@1.0.0, whose every byte matches its signed hash."""
    with Store(ctx.data, _profile_of(ctx), ctx.keys.trust()) as store:
        assert [m.ref for m in store.active()] == ["tiny@1.0.0"]
        assert store.versions("tiny") == ["1.0.0"] and store.names() == ["tiny"]
        assert store.verify("tiny").version == "1.0.0"
        assert store.begin_load("tiny").version == "1.0.0"  # what the agent would load now


def _profile_of(ctx: Ctx, overrides: dict[str, Any] | None = None):
    from edge.protocol.catalog import load_catalog

    profile = load_catalog().get(PROFILE)
    return profile.model_copy(update=overrides) if overrides else profile


def attempt(ctx: Ctx, case: Case, bundle: Path, store: Store) -> None:
    """Install ``bundle`` the way the device would: download it first for the download cases."""
    if case.download is None:
        store.install(bundle)
        return
    served = ctx.server.root / f"{ctx.sandbox.parent.name}-{bundle.name}"
    shutil.copyfile(bundle, served)
    dest = ctx.data / "fleet" / "deployments" / "downloads" / "tiny-2.0.0.edgebundle"
    good = ctx.good.read_bytes()
    path = served.name if case.download == "wrong" else f"{case.download}/{served.name}"
    fetched = download(f"{ctx.server.url}/{path}", dest, sha256=hashlib.sha256(good).hexdigest(), size=len(good))
    store.install(fetched)  # never reached: each download case fails before


def assert_downloads(ctx: Ctx, case: Case) -> None:
    """A failed download leaves no bundle; only a truncated one keeps its bytes, for a Range resume."""
    folder = ctx.data / "fleet" / "deployments" / "downloads"
    left = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    if case.download == "short":
        assert left == ["tiny-2.0.0.edgebundle.part"]
        part = (folder / left[0]).read_bytes()
        assert 0 < len(part) < ctx.good.stat().st_size and ctx.good.read_bytes().startswith(part)
    else:
        assert left == []


def check_refusal(exc: BaseException, case: Case) -> None:
    assert type(exc) is case.error, f"{type(exc).__name__}: {exc}"
    assert re.search(case.reason, str(exc)), str(exc)


def assert_nothing_outside(ctx: Ctx, case: Case, before: dict[str, tuple[Any, ...]]) -> None:
    assert outside_snapshot(ctx.sandbox) == before
    for name in case.targets:
        assert not os.path.lexists(ctx.sandbox / name)
        assert not [p for p in ctx.sandbox.parent.parent.rglob(name)], f"{name} was created"


# ------------------------------------------------------------------------------------ tests


def test_the_matrix_is_large_and_covers_every_listed_attack() -> None:
    assert len(CASES) >= 30
    for name in ("unsigned", "signed by an untrusted key", "signed by a revoked key", "payload swapped after signing",
                 "manifest edited after signing", "other profile", "other architecture",
                 "older version (rollback attack)", "signature expired", "truncated download", "endless download",
                 "path traversal", "absolute path", "symlink out of the store", "hardlink to a file outside",
                 "ONNX external data via ../", "payload over 2 GiB with a modified tail"):
        assert name in CASES
    assert set(FLASH) <= set(CASES)


@pytest.mark.parametrize("case_id", _params(list(CASES)))
def test_the_store_refuses_a_bad_bundle_harmlessly(case_id: str, ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[case_id]
    bundle = case.build(ctx)
    before_store, before_outside = store_snapshot(ctx.data), outside_snapshot(ctx.sandbox)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    with Store(ctx.data, _profile_of(ctx, case.profile), ctx.keys.trust()) as store:
        with pytest.raises(EdgeError) as info:
            attempt(ctx, case, bundle, store)
    for name in case.env:
        monkeypatch.delenv(name)
    check_refusal(info.value, case)
    assert store_snapshot(ctx.data) == before_store
    assert_clean(ctx.data)
    if case.download:
        assert_downloads(ctx, case)
    assert_nothing_outside(ctx, case, before_outside)
    assert_serves_only_the_verified_version(ctx)


@pytest.mark.parametrize("case_id", _params(FLASH))
def test_edge_flash_refuses_a_bad_bundle_harmlessly(case_id: str, ctx: Ctx, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[case_id]
    bundle = case.build(ctx)
    before_store, before_outside = store_snapshot(ctx.data), outside_snapshot(ctx.sandbox)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    rc = main(["flash", str(bundle), "--data", str(ctx.data), "--trusted-key", str(ctx.keys.trusted_pub),
               "--trusted-key", str(ctx.keys.revoked_pub), "--revoked-key", str(ctx.keys.revoked_pub)])
    for name in case.env:
        monkeypatch.delenv(name)
    err = capsys.readouterr().err
    assert rc == case.error.exit_code, err
    line = next(ln for ln in err.splitlines() if ln.startswith("Error: "))
    assert re.search(case.reason, line), err
    assert store_snapshot(ctx.data) == before_store
    assert_clean(ctx.data)
    assert_nothing_outside(ctx, case, before_outside)
    assert_serves_only_the_verified_version(ctx)


@pytest.mark.parametrize("case_id", list(ACCEPTED))
def test_the_same_checks_accept_a_sound_bundle(case_id: str, ctx: Ctx) -> None:
    bundle = ACCEPTED[case_id](ctx)
    before_outside = outside_snapshot(ctx.sandbox)
    with Store(ctx.data, _profile_of(ctx), ctx.keys.trust()) as store:
        inst = store.install(bundle)
        assert store.get("tiny").version == inst.version != "1.0.0"
        assert store.verify("tiny").version == inst.version
    assert_clean(ctx.data)
    assert outside_snapshot(ctx.sandbox) == before_outside


def test_file_entry_matches_what_the_packer_writes(ctx: Ctx) -> None:
    """The hostile builders write what write_bundle writes when asked for a sound bundle."""
    rebuilt = ctx.write(signed_members(ctx.doc, ctx.files, ctx.keys.trusted))
    with Store(ctx.data, _profile_of(ctx), ctx.keys.trust()) as store:
        assert store.install(rebuilt).version == "2.0.0"
    assert file_entry("model.onnx", ctx.files["model.onnx"], "model") == ctx.doc["files"][0]
