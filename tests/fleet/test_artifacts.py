"""The bundle repository over real HTTP: signed uploads only, content-addressed, Range and ETag."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from edge.fleet.auth import sign_download
from tests.fixtures.bundles import make_generic_bundle, make_other_key, rewrite_bundle


def upload(api, path: Path, token: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token or api.admin}"}
    return httpx.post(f"{api.url}/api/v1/bundles", content=path.read_bytes(), headers=headers, timeout=30)


def test_signed_bundle_is_stored_by_content_hash_and_listed(api, tmp_path: Path, signing_key) -> None:
    bundle = make_generic_bundle(tmp_path, signing_key, version="2.0.0", profile="x86-avx2", architecture="x86_64")
    sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
    r = upload(api, bundle)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["sha256"] == sha and body["new"] and body["profile"] == "x86-avx2" and body["key_id"] == signing_key.id
    stored = api.controller.store.path_of(sha)
    assert stored.read_bytes() == bundle.read_bytes() and stored.stat().st_mode & 0o222 == 0  # read-only
    again = upload(api, bundle)
    assert again.status_code == 200 and again.json()["new"] is False
    listed = httpx.get(f"{api.url}/api/v1/bundles", headers={"authorization": f"Bearer {api.reader}"}).json()
    assert [b["sha256"] for b in listed["items"]] == [sha]
    manifest = httpx.get(f"{api.url}/api/v1/bundles/{sha}/manifest", headers={"authorization": f"Bearer {api.reader}"})
    assert manifest.status_code == 200 and manifest.json()["version"] == "2.0.0"
    assert not list((api.controller.store.root / "tmp").iterdir())


def test_unsigned_untrusted_and_tampered_bundles_are_refused(api, tmp_path: Path, signing_key) -> None:
    unsigned = make_generic_bundle(tmp_path, None, filename="unsigned.edgebundle")
    other_key, _ = make_other_key(tmp_path / "k")
    untrusted = make_generic_bundle(tmp_path, other_key, filename="untrusted.edgebundle")
    good = make_generic_bundle(tmp_path, signing_key, filename="good.edgebundle")
    tampered_payload = rewrite_bundle(good, tmp_path / "tampered-payload.edgebundle",
                                      lambda name, data: data[:-1] + bytes([data[-1] ^ 1]) if name == "payload/model.onnx" else data)
    tampered_manifest = rewrite_bundle(good, tmp_path / "tampered-manifest.edgebundle",
                                       lambda name, data: data.replace(b'"min_ram_mb":64', b'"min_ram_mb":65')
                                       if name == "manifest.json" else data)
    for path, code, words in [
        (unsigned, "signature_invalid", "not signed"),
        (untrusted, "signature_invalid", "untrusted key"),
        (tampered_payload, "bundle_integrity", "model.onnx"),
        (tampered_manifest, "signature_invalid", "does not match"),
    ]:
        r = upload(api, path)
        assert r.status_code == 422, (path.name, r.text)
        err = r.json()["error"]
        assert err["code"] == code and words in err["message"], (path.name, err)
    r = httpx.post(f"{api.url}/api/v1/bundles", content=b"", headers={"authorization": f"Bearer {api.admin}"})
    assert r.status_code == 422 and "empty" in r.json()["error"]["message"]
    with api.controller.db.read() as conn:
        assert api.controller.store.list(conn) == []
    assert not list((api.controller.store.root / "tmp").iterdir())
    assert not list((api.controller.store.root / "sha256").rglob("*/*"))


def test_a_variant_cannot_be_replaced_with_other_bytes(api, tmp_path: Path, signing_key) -> None:
    first = make_generic_bundle(tmp_path, signing_key, filename="a.edgebundle")
    second = make_generic_bundle(tmp_path, signing_key, filename="b.edgebundle", min_ram_mb=128)
    assert upload(api, first).status_code == 201
    r = upload(api, second)
    assert r.status_code == 409 and "versions are immutable" in r.json()["error"]["hint"]


def test_expired_bundles_are_refused(api, tmp_path: Path, signing_key) -> None:
    old = make_generic_bundle(tmp_path, signing_key, expires_at="2025-06-01T00:00:00+00:00")
    r = upload(api, old)
    assert r.status_code == 422 and "expired" in r.json()["error"]["message"]


def test_download_with_range_etag_and_signed_device_urls(api, tmp_path: Path, signing_key) -> None:
    bundle = make_generic_bundle(tmp_path, signing_key)
    data = bundle.read_bytes()
    sha = upload(api, bundle).json()["sha256"]
    url = f"{api.url}/api/v1/bundles/{sha}/download"
    auth = {"authorization": f"Bearer {api.reader}"}
    full = httpx.get(url, headers=auth)
    assert full.status_code == 200 and full.content == data
    assert full.headers["etag"] == f'"{sha}"' and full.headers["accept-ranges"] == "bytes"
    part = httpx.get(url, headers={**auth, "range": "bytes=100-1123"})
    assert part.status_code == 206 and part.content == data[100:1124]
    assert part.headers["content-range"] == f"bytes 100-1123/{len(data)}"
    tail = httpx.get(url, headers={**auth, "range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    resume = httpx.get(url, headers={**auth, "range": f"bytes={len(data) - 5}-"})
    assert resume.status_code == 206 and resume.content == data[-5:]
    beyond = httpx.get(url, headers={**auth, "range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(data)}"
    same = httpx.get(url, headers={**auth, "if-none-match": f'"{sha}"'})
    assert same.status_code == 304 and same.content == b""
    stale = httpx.get(url, headers={**auth, "range": "bytes=0-9", "if-range": '"somethingelse"'})
    assert stale.status_code == 200 and stale.content == data  # If-Range mismatch: the whole file
    head = httpx.head(url, headers=auth)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)

    sig = sign_download(api.controller.secret, sha, "dev-1")
    device = httpx.get(url, params={"device": "dev-1", "sig": sig}, headers={"range": "bytes=0-3"})
    assert device.status_code == 206 and device.content == data[:4]
    forged = httpx.get(url, params={"device": "dev-2", "sig": sig})
    assert forged.status_code == 401
    assert httpx.get(url).status_code == 401
    missing = httpx.get(f"{api.url}/api/v1/bundles/{'0' * 64}/download", headers=auth)
    assert missing.status_code == 404
    assert httpx.get(f"{api.url}/api/v1/bundles/..%2F..%2Fetc/download", headers=auth).status_code == 404


@pytest.mark.parametrize("token", ["reader", None, "bogus"])
def test_uploads_need_an_admin_token(api, tmp_path: Path, signing_key, token) -> None:
    bundle = make_generic_bundle(tmp_path, signing_key)
    headers = {"reader": {"authorization": f"Bearer {api.reader}"}, None: {},
               "bogus": {"authorization": "Bearer edge_nope"}}[token]
    r = httpx.post(f"{api.url}/api/v1/bundles", content=bundle.read_bytes(), headers=headers)
    assert r.status_code == (403 if token == "reader" else 401)
    assert r.json()["error"]["code"] == ("forbidden" if token == "reader" else "unauthorized")
