"""Bundle downloads from a real HTTP server: Range resume, checksum while streaming, bounds, rate cap."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from edge.agent.downloader import Cancelled, TokenBucket, download
from edge.errors import DownloadError, IntegrityError
from tests.agent.fleet.helpers import ArtifactServer, Cut


@pytest.fixture()
def server(tmp_path: Path):
    root = tmp_path / "www"
    root.mkdir()
    s = ArtifactServer(root)
    yield s
    s.close()


def _artifact(server: ArtifactServer, name: str = "b.edgebundle", size: int = 300_000) -> tuple[bytes, str]:
    data = os.urandom(size)
    (server.root / name).write_bytes(data)
    return data, hashlib.sha256(data).hexdigest()


def test_download_checks_size_and_hash(server: ArtifactServer, tmp_path: Path) -> None:
    data, digest = _artifact(server)
    dest = download(f"{server.url}/b.edgebundle", tmp_path / "dl" / "b", sha256=digest, size=len(data))
    assert dest.read_bytes() == data
    assert not dest.with_name("b.part").exists()
    assert server.requests[-1]["range"] == ""


def test_an_interrupted_download_resumes_with_range(server: ArtifactServer, tmp_path: Path) -> None:
    data, digest = _artifact(server)
    server.cuts.append(Cut("/b.edgebundle", after=100_000))
    dest = tmp_path / "dl" / "b"
    with pytest.raises(DownloadError) as info:
        download(f"{server.url}/b.edgebundle", dest, sha256=digest, size=len(data))
    assert info.value.transient
    part = dest.with_name("b.part")
    assert 0 < part.stat().st_size < len(data)
    have = part.stat().st_size
    download(f"{server.url}/b.edgebundle", dest, sha256=digest, size=len(data))
    assert dest.read_bytes() == data
    assert server.requests[-1]["range"] == f"bytes={have}-"


def test_a_wrong_checksum_leaves_nothing_behind(server: ArtifactServer, tmp_path: Path) -> None:
    data, _ = _artifact(server)
    dest = tmp_path / "dl" / "b"
    with pytest.raises(IntegrityError, match="SHA-256"):
        download(f"{server.url}/b.edgebundle", dest, sha256="0" * 64, size=len(data))
    assert not dest.exists() and not dest.with_name("b.part").exists()


def test_a_corrupt_partial_file_is_detected_and_fetched_again(server: ArtifactServer, tmp_path: Path) -> None:
    data, digest = _artifact(server)
    dest = tmp_path / "dl" / "b"
    dest.parent.mkdir(parents=True)
    dest.with_name("b.part").write_bytes(b"\0" * 1000)  # not the server's first 1000 bytes
    download(f"{server.url}/b.edgebundle", dest, sha256=digest, size=len(data))
    assert dest.read_bytes() == data
    assert [r["range"] for r in server.requests] == ["bytes=1000-", ""]


def test_more_bytes_than_declared_are_refused(server: ArtifactServer, tmp_path: Path) -> None:
    data, digest = _artifact(server)
    dest = tmp_path / "dl" / "b"
    with pytest.raises(DownloadError, match="says 1000") as info:
        download(f"{server.url}/b.edgebundle", dest, sha256=digest, size=1000)
    assert not info.value.transient
    assert not dest.with_name("b.part").exists()


def test_http_errors_say_whether_a_retry_may_help(server: ArtifactServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download(f"{server.url}/missing", tmp_path / "x", sha256="0" * 64, size=10)
    assert info.value.transient  # the controller may not have published it yet
    with pytest.raises(DownloadError) as refused:
        download("http://127.0.0.1:9/none", tmp_path / "y", sha256="0" * 64, size=10)
    assert refused.value.transient


def test_a_cancelled_download_keeps_its_partial_file(server: ArtifactServer, tmp_path: Path) -> None:
    data, digest = _artifact(server, size=400_000)
    cancel = threading.Event()
    dest = tmp_path / "dl" / "b"

    def progress(have: int, size: int) -> None:
        if have >= 128 * 1024:
            cancel.set()

    from edge.agent import downloader

    with pytest.raises(Cancelled):
        downloader.download(f"{server.url}/b.edgebundle", dest, sha256=digest, size=len(data), cancel=cancel,
                            progress=progress)
    assert dest.with_name("b.part").stat().st_size >= 128 * 1024


def test_token_bucket_spaces_bytes_at_the_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> bool:
        slept.append(s)
        now[0] += s
        return False

    bucket = TokenBucket(1000, burst=1000, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        assert bucket.consume(1000)
    # The burst covers the first 1000 bytes; the next 4000 need 4 seconds at 1000 B/s.
    assert sum(slept) == pytest.approx(4.0)


def test_a_capped_download_still_completes(server: ArtifactServer, tmp_path: Path) -> None:
    data, digest = _artifact(server, size=100_000)
    dest = download(f"{server.url}/b.edgebundle", tmp_path / "b", sha256=digest, size=len(data), rate=400_000)
    assert dest.read_bytes() == data
