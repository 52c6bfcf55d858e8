"""Bundle format: pack, sign, verify every byte, extract safely, refuse hostile archives."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from edge.errors import BundleError, IntegrityError, SignatureError, UnsafePathError
from edge.protocol.bundle import BundleReader, describe_payload, resign_bundle, verify_bundle, write_bundle
from edge.protocol.manifest import FidelityReport, Manifest, Provenance, TensorSpec, version_key
from edge.protocol.signing import TrustStore, generate_keypair, load_signing_key


def make_manifest(payload: Path, **overrides) -> Manifest:
    """Return a manifest describing the files under ``payload``."""
    roles = {"model.onnx": "model"}
    fields = dict(
        name="tiny", version="1.0.0", task="generic", profile="generic-cpu", architecture="any",
        precision="fp32", required_providers=("CPUExecutionProvider",), min_ram_mb=64,
        model_file="model.onnx",
        inputs=(TensorSpec(name="x", dtype="float32", shape=("n", 4)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=("n", 2)),),
        files=tuple(describe_payload(payload, roles)),
        provenance=Provenance(source="test", source_format="onnx", exporter_version="0", created_at="2026-01-01T00:00:00+00:00"),
        fidelity=FidelityReport(passed=True, metrics={"cosine_mean": 1.0}, thresholds={"cosine_mean": 0.99}, samples=1),
        created_at="2026-01-01T00:00:00+00:00",
    )
    fields.update(overrides)
    return Manifest.model_validate(fields)


@pytest.fixture()
def payload(tmp_path: Path) -> Path:
    folder = tmp_path / "payload"
    (folder / "tok").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(os.urandom(300_000))
    (folder / "tok" / "tokenizer.json").write_text('{"x": 1}')
    return folder


@pytest.fixture()
def bundle(tmp_path: Path, payload: Path, signing_key) -> Path:
    return write_bundle(tmp_path / "tiny.edgebundle", make_manifest(payload), payload, signing_key)


def test_round_trip_verify_and_extract(tmp_path: Path, bundle: Path, payload: Path, trust, signing_key) -> None:
    result = verify_bundle(bundle, trust)
    assert result.key_id == signing_key.id
    target = tmp_path / "out"
    with BundleReader(bundle) as reader:
        reader.extract(target, trust)
    assert (target / "model.onnx").read_bytes() == (payload / "model.onnx").read_bytes()
    assert (target / "tok" / "tokenizer.json").read_text() == '{"x": 1}'
    assert not list(tmp_path.glob(".*tmp*"))


def test_pack_is_reproducible(tmp_path: Path, payload: Path, signing_key) -> None:
    m = make_manifest(payload)
    a = write_bundle(tmp_path / "a.edgebundle", m, payload, signing_key).read_bytes()
    b = write_bundle(tmp_path / "b.edgebundle", m, payload, signing_key).read_bytes()
    assert a == b


def test_unsigned_bundle_is_refused_then_signed(tmp_path: Path, payload: Path, trust, signing_key) -> None:
    path = write_bundle(tmp_path / "u.edgebundle", make_manifest(payload), payload, None)
    with pytest.raises(SignatureError, match="not signed"):
        verify_bundle(path, trust)
    resign_bundle(path, signing_key)
    assert verify_bundle(path, trust).key_id == signing_key.id


def test_wrong_and_revoked_keys_are_refused(tmp_path: Path, bundle: Path, signing_key) -> None:
    _, other_pub = generate_keypair(tmp_path / "k", "other")
    with pytest.raises(SignatureError, match="untrusted key"):
        verify_bundle(bundle, TrustStore.from_files([other_pub]))
    revoked = TrustStore.from_files([other_pub], revoked=frozenset({signing_key.id}))
    with pytest.raises(SignatureError, match="revoked"):
        verify_bundle(bundle, revoked)
    with pytest.raises(SignatureError, match="no trusted keys"):
        verify_bundle(bundle, TrustStore())


def _rewrite(src: Path, dest: Path, edit) -> Path:
    """Copy a bundle member by member, letting ``edit(name, data)`` change or drop members."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            out = edit(m.name, data)
            if out is None:
                continue
            info = tarfile.TarInfo(m.name)
            info.size = len(out)
            tout.addfile(info, io.BytesIO(out))
    return dest


def test_payload_swapped_after_signing_is_caught(tmp_path: Path, bundle: Path, trust) -> None:
    def flip(name: str, data: bytes) -> bytes:
        if name == "payload/model.onnx":
            return data[:-1] + bytes([data[-1] ^ 1])
        return data

    bad = _rewrite(bundle, tmp_path / "bad.edgebundle", flip)
    with pytest.raises(IntegrityError, match="model.onnx.*SHA-256"):
        verify_bundle(bad, trust)
    target = tmp_path / "x"
    with BundleReader(bad) as reader, pytest.raises(IntegrityError):
        reader.extract(target, trust)
    assert list(target.iterdir()) == []  # nothing half-written


def test_manifest_edited_after_signing_is_caught(tmp_path: Path, bundle: Path, trust) -> None:
    def edit(name: str, data: bytes) -> bytes:
        if name == "manifest.json":
            doc = json.loads(data)
            doc["version"] = "9.9.9"
            return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return data

    with pytest.raises(SignatureError, match="does not match the manifest"):
        verify_bundle(_rewrite(bundle, tmp_path / "m.edgebundle", edit), trust)


def test_missing_and_extra_payload_files(tmp_path: Path, bundle: Path, trust) -> None:
    drop = _rewrite(bundle, tmp_path / "d.edgebundle", lambda n, d: None if n == "payload/tok/tokenizer.json" else d)
    with pytest.raises(IntegrityError, match="missing"):
        verify_bundle(drop, trust)

    def add(name: str, data: bytes) -> bytes:
        return data

    extra = _rewrite(bundle, tmp_path / "e.edgebundle", add)
    with tarfile.open(extra, "a") as tar:
        info = tarfile.TarInfo("payload/evil.sh")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"rm\n"))
    with pytest.raises(IntegrityError, match="not listed"):
        verify_bundle(extra, trust)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("payload/../escape", None),
        ("/etc/passwd", None),
        ("payload//double", None),
        ("payload/./dot", None),
        ("other/file", None),
        ("payload/a\\b", None),
        ("payload/sym", tarfile.SYMTYPE),
        ("payload/hard", tarfile.LNKTYPE),
        ("payload/dev", tarfile.CHRTYPE),
        ("payload/fifo", tarfile.FIFOTYPE),
        ("payload/dir", tarfile.DIRTYPE),
    ],
)
def test_hostile_member_names_and_types_are_refused(tmp_path: Path, bundle: Path, trust, name, kind) -> None:
    bad = _rewrite(bundle, tmp_path / "h.edgebundle", lambda n, d: d)
    with tarfile.open(bad, "a") as tar:
        info = tarfile.TarInfo(name)
        if kind is not None:
            info.type = kind
            info.linkname = "/etc/passwd"
        info.size = 0 if kind is not None else 1
        tar.addfile(info, io.BytesIO(b"x") if kind is None else None)
    with pytest.raises(UnsafePathError):
        verify_bundle(bad, trust)
    assert not (tmp_path / "escape").exists()


def test_duplicate_members_are_refused(tmp_path: Path, bundle: Path, trust) -> None:
    bad = _rewrite(bundle, tmp_path / "dup.edgebundle", lambda n, d: d)
    with tarfile.open(bad, "a") as tar:
        info = tarfile.TarInfo("payload/model.onnx")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(UnsafePathError, match="twice"):
        verify_bundle(bad, trust)


def test_truncated_and_garbage_files(tmp_path: Path, bundle: Path, trust) -> None:
    data = bundle.read_bytes()
    cut = tmp_path / "cut.edgebundle"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError):
        verify_bundle(cut, trust)
    junk = tmp_path / "junk.edgebundle"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(BundleError):
        verify_bundle(junk, trust)
    with pytest.raises(BundleError, match="not found"):
        verify_bundle(tmp_path / "absent.edgebundle", trust)


def test_manifest_must_come_first(tmp_path: Path, bundle: Path, trust) -> None:
    with tarfile.open(bundle) as tin:
        members = [(m, tin.extractfile(m).read()) for m in tin.getmembers()]
    out = tmp_path / "order.edgebundle"
    with tarfile.open(out, "w") as tout:
        for m, d in reversed(members):
            tout.addfile(m, io.BytesIO(d))
    with pytest.raises(BundleError, match="first member"):
        verify_bundle(out, trust)


def test_unsafe_names_in_manifest_are_refused(payload: Path) -> None:
    with pytest.raises(Exception):
        make_manifest(payload, files=({"path": "a", "size": 1, "sha256": "0" * 64, "role": "model"},
                                      {"path": "A", "size": 1, "sha256": "0" * 64, "role": "model"}))


def test_extract_refuses_a_non_empty_target(tmp_path: Path, bundle: Path, trust) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep").write_text("mine")
    with BundleReader(bundle) as reader, pytest.raises(BundleError, match="not empty"):
        reader.extract(target, trust)
    assert (target / "keep").read_text() == "mine"


def test_versions_order_semantically() -> None:
    assert version_key("1.10.0") > version_key("1.9.9")
    assert version_key("2.0.0") > version_key("2.0.0-rc1")
    with pytest.raises(BundleError):
        version_key("1.0")


@pytest.mark.slow
def test_signature_covers_every_byte_of_a_file_over_2_gib(tmp_path: Path, signing_key, trust) -> None:
    """A >2 GiB sparse payload with its last byte changed after signing is caught."""
    payload = tmp_path / "big"
    payload.mkdir()
    big = payload / "model.onnx"
    size = (2 << 30) + 4096
    with open(big, "wb") as fh:
        fh.truncate(size)
    manifest = make_manifest(payload)
    path = write_bundle(tmp_path / "big.edgebundle", manifest, payload, signing_key)
    assert verify_bundle(path, trust).manifest.files[0].size == size
    with open(path, "r+b") as fh:  # flip one byte in the payload's tail, inside the tar data
        offset = path.stat().st_size - 1024 * 2 - 1  # before the two zero end-of-archive blocks
        fh.seek(offset - 512)
        fh.write(b"\x01")
    with pytest.raises(IntegrityError):
        verify_bundle(path, trust)
