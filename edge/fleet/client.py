"""A small client of the controller's REST API (used by `edge fleet` and the simulator).

Error responses come back as the same error classes the controller raised (by their stable
``code``), so the CLI prints them and exits with their codes as if they happened locally.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import httpx

from edge.errors import AuthError, ConnectError, EdgeError, TransportError, all_error_classes

# Reads answer in milliseconds; uploads of large bundles need longer, set per call.
TIMEOUT_S = 30.0
UPLOAD_TIMEOUT_S = 3600.0
# A 429 (the controller's rate limit) is retried after its Retry-After this many times, so a
# script that bursts slows down instead of failing; longer waits than RETRY_MAX_S are not worth it.
RETRIES = 5
RETRY_MAX_S = 30.0


def _error_from(response: httpx.Response) -> EdgeError:
    try:
        err = response.json()["error"]
        code, message, hint = err["code"], err["message"], err.get("hint")
    except (ValueError, KeyError, TypeError):
        return TransportError(f"controller answered HTTP {response.status_code}: {response.text[:200]}")
    for cls in all_error_classes():
        if cls.code == code:
            return cls(message, hint=hint)
    return EdgeError(message, hint=hint)


def _retry_after(response: httpx.Response) -> float | None:
    """Return the seconds to wait before retrying a 429, or None when it is not worth a retry."""
    if response.status_code != 429:
        return None
    try:
        wait = float(response.headers.get("retry-after", "1"))
    except ValueError:
        return None
    return wait if 0 <= wait <= RETRY_MAX_S else None


class ControllerClient:
    """Calls to one controller with one token."""

    def __init__(self, base_url: str, token: str | None, timeout: float = TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> "ControllerClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; return its JSON (None for 204), or raise the controller's error."""
        retries = 0 if "content" in kwargs else RETRIES  # a streamed body cannot be sent twice
        while True:
            response = self._send(method, path, **kwargs)
            wait = _retry_after(response)
            if wait is None or retries == 0:
                break
            retries -= 1
            time.sleep(wait)
        if response.status_code >= 400:
            err = _error_from(response)
            if isinstance(err, AuthError) and not self._http.headers.get("authorization"):
                err.hint = "set EDGE_FLEET_TOKEN (printed by `edge fleet serve` at first start) or pass --token"
            raise err
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ConnectError(f"the controller at {self.base_url} did not answer in time: {exc}") from exc
        except httpx.HTTPError as exc:
            raise ConnectError(f"cannot reach the controller at {self.base_url}: {exc}",
                               hint="is `edge fleet serve` running? set --controller or EDGE_CONTROLLER") from exc

    def get(self, path: str, **params: Any) -> Any:
        """GET with query parameters (None values left out)."""
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """POST a JSON body."""
        return self.request("POST", path, json=body or {})

    def upload(self, path: Path) -> Any:
        """Upload a bundle file (streamed)."""
        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as fh:
                yield from iter(lambda: fh.read(1 << 20), b"")
        if not Path(path).is_file():
            from edge.errors import NotFoundError

            raise NotFoundError(f"bundle {path} not found")
        return self.request("POST", "/api/v1/bundles", content=chunks(), timeout=UPLOAD_TIMEOUT_S,
                            headers={"content-type": "application/x-tar"})
