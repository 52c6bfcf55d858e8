"""Download a bundle over HTTP: resumable (Range), bandwidth-capped, hashed while streaming.

The size and SHA-256 come from the desired state, so the download is bounded (a server that
sends more bytes than declared is cut off: TUF's "endless data" attack) and checked before
anything reads it. Bytes land in ``<dest>.part``; an interrupted download resumes from there
with ``Range: bytes=N-`` (the bytes already on disk are re-hashed first, so a resumed file is
checked end to end), and the finished file is renamed to ``dest`` only when it matches.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable

import httpx

from edge.errors import DownloadError, IntegrityError, ResourceError

log = logging.getLogger(__name__)

# Smallest burst of the rate cap: one socket read's worth, so the cap never stalls a read.
CHUNK = 64 * 1024
# Seconds to connect, and the longest silence while reading, before the attempt fails (and is
# resumed later from what arrived).
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class Cancelled(Exception):
    """The download was cancelled (a newer desired state superseded it, or the agent stops).

    Control flow, not a failure: the partial file stays for a later resume.
    """


class TokenBucket:
    """A bandwidth cap: ``rate`` bytes per second on average, bursts up to ``burst`` bytes."""

    def __init__(self, rate: float, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], bool] | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate, CHUNK))
        self._tokens = self.burst
        self._clock = clock
        self._sleep = sleep or (lambda s: (time.sleep(s), False)[1])
        self._last = clock()

    def consume(self, n: int) -> bool:
        """Wait until ``n`` bytes may pass; return False when the sleep was interrupted."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            interrupted = self._sleep(-self._tokens / self.rate)
            return not interrupted
        return True


def download(
    url: str,
    dest: Path,
    *,
    sha256: str,
    size: int,
    rate: float | None = None,
    headers: dict[str, str] | None = None,
    cancel: threading.Event | None = None,
    client: httpx.Client | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Fetch ``url`` into ``dest``, resuming a partial download; return ``dest`` once verified.

    Raises :class:`DownloadError` (``transient`` says whether a retry may help; the partial file
    is kept for it), :class:`IntegrityError` when the bytes do not match, :class:`Cancelled`
    when ``cancel`` is set.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and dest.stat().st_size == size and _hash_file(dest) == sha256:
        return dest
    own = client is None
    http = client or httpx.Client(timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
                                  follow_redirects=True)
    try:
        try:
            return _fetch(http, url, part, dest, sha256, size, rate, headers or {}, cancel, progress)
        except _Restart:
            # The server's bytes changed under our partial file, or it misreported a range.
            part.unlink(missing_ok=True)
        try:
            return _fetch(http, url, part, dest, sha256, size, rate, headers or {}, cancel, progress)
        except _Restart:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{url}: the server does not serve a consistent file", transient=True) from None
    finally:
        if own:
            http.close()


class _Restart(Exception):
    """The partial file cannot be resumed: start from byte 0 once."""


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(http: httpx.Client, url: str, part: Path, dest: Path, sha256: str, size: int, rate: float | None,
           headers: dict[str, str], cancel: threading.Event | None,
           progress: Callable[[int, int], None] | None) -> Path:
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    h = hashlib.sha256()
    if have:
        with open(part, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    resumed = have
    if have < size:
        have, h = _stream(http, url, part, h, have, size, rate, headers, cancel, progress)
    if have < size:
        raise DownloadError(f"{url}: the connection ended after {have} of {size} bytes", transient=True)
    if h.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        if resumed:
            log.warning("%s: resumed download does not match its SHA-256; starting over", url)
            raise _Restart()
        raise IntegrityError(f"{url}: downloaded bytes do not match the SHA-256 of the desired state",
                             hint="the artifact changed on the server, or was tampered with")
    os.replace(part, dest)
    return dest


def _stream(http: httpx.Client, url: str, part: Path, h: "hashlib._Hash", have: int, size: int,
            rate: float | None, headers: dict[str, str], cancel: threading.Event | None,
            progress: Callable[[int, int], None] | None) -> tuple[int, "hashlib._Hash"]:
    bucket = TokenBucket(rate, sleep=(cancel.wait if cancel is not None else None)) if rate else None
    request_headers = {"Accept-Encoding": "identity", **headers}
    if have:
        request_headers["Range"] = f"bytes={have}-"
    try:
        with http.stream("GET", url, headers=request_headers) as resp:
            mode = _check_response(resp, url, have, size)
            if mode == "wb":  # a full body follows: hash from byte 0
                h, have = hashlib.sha256(), 0
            try:
                out = open(part, mode)
            except OSError as exc:
                raise ResourceError(f"cannot write {part}: {exc}") from exc
            with out:
                for chunk in resp.iter_bytes():  # as received: an abort loses no buffered bytes
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(f"download of {url} cancelled")
                    if have + len(chunk) > size:
                        out.close()
                        part.unlink(missing_ok=True)
                        raise DownloadError(f"{url} sends more than the {size} bytes the desired state declares",
                                            transient=False, hint="an endless or wrong artifact: refused")
                    if bucket is not None and not bucket.consume(len(chunk)):
                        raise Cancelled(f"download of {url} cancelled")
                    out.write(chunk)
                    h.update(chunk)
                    have += len(chunk)
                    if progress is not None:
                        progress(have, size)
                out.flush()
                os.fsync(out.fileno())
    except httpx.TimeoutException as exc:
        raise DownloadError(f"{url}: timed out after {have} of {size} bytes ({type(exc).__name__})",
                            transient=True) from exc
    except httpx.HTTPError as exc:
        raise DownloadError(f"{url}: {type(exc).__name__}: {exc} (after {have} of {size} bytes)",
                            transient=True) from exc
    except OSError as exc:
        raise ResourceError(f"cannot write {part}: {exc}", hint="free disk space") from exc
    return have, h


def _check_response(resp: httpx.Response, url: str, have: int, size: int) -> str:
    """Return the file mode to write with ("ab" resumes, "wb" restarts), or raise."""
    code = resp.status_code
    if code == 206 and have:
        m = CONTENT_RANGE.match(resp.headers.get("content-range", ""))
        if not m or int(m.group(1)) != have:
            raise _Restart()
        if m.group(3) != "*" and int(m.group(3)) != size:
            raise DownloadError(f"{url} is {m.group(3)} bytes, the desired state says {size}", transient=False)
        return "ab"
    if code == 200:
        length = resp.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) != size and "content-encoding" not in resp.headers:
            raise DownloadError(f"{url} is {length} bytes, the desired state says {size}", transient=False)
        return "wb"
    if code == 416:  # our partial file is at or past the end: something changed
        raise _Restart()
    transient = code >= 500 or code in (404, 408, 425, 429)  # 404: the controller may not have it yet
    raise DownloadError(f"{url}: HTTP {code} {resp.reason_phrase}", transient=transient)
