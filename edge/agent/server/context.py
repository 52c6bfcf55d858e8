"""What every route needs: the server's limits, the registry, the metrics, and body reading."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import Request

from edge.errors import EdgeError, NotFoundError, RequestError

if TYPE_CHECKING:
    from edge.agent.server.metrics import Metrics
    from edge.agent.server.registry import Registry, ServedModel

# Largest request body: a 1080p float32 image tensor is ~25 MB; anything bigger is refused
# before it is read, so a client cannot make the agent buffer gigabytes.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """Limits and knobs of the inference server (from the command line, validated once)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Raw-tensor calls running at once per model: 2 overlaps one call's Python work with the
    # other's ORT run; more only splits the same cores.
    infer_concurrency: int = 2
    # Raw-tensor requests waiting per model before 429.
    infer_queue: int = 64
    batch_max_size: int = 32
    batch_max_wait_s: float = 0.002
    batch_max_queue: int = 1024
    llm_max_active: int = 4
    llm_max_queue: int = 64
    # Inputs per embeddings request; OpenAI's own limit.
    embeddings_max_inputs: int = 2048
    server_name: str = "edge"

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "infer_concurrency", "batch_max_size", "batch_max_queue",
                     "llm_max_active", "embeddings_max_inputs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("infer_queue", "llm_max_queue", "batch_max_wait_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


@dataclass
class Context:
    """Shared state of one running server."""

    config: ServerConfig
    registry: "Registry"
    metrics: "Metrics"
    started: float = field(default_factory=time.time)

    def fail(self, endpoint: str, name: str, served: "ServedModel | None", exc: BaseException) -> None:
        """Count a failed request under its model (under model="" when the model is unknown)."""
        if isinstance(exc, EdgeError):
            code = exc.code
        elif isinstance(exc, HTTPException):
            code = f"http_{exc.status_code}"
        else:
            code = "internal_error"
        if served is not None:
            model, version = served.name, served.version
        elif isinstance(exc, NotFoundError) or not self.registry.knows(name):
            model, version = "", ""
        else:
            model, version = name, ""
        self.metrics.observe_failure(model, version, endpoint, code)


# zlib window bits per Content-Encoding tritonclient may send (request_compression_algorithm).
_DECODERS = {"gzip": 16 + 15, "deflate": 15}


async def read_body(request: Request, limit: int) -> bytes:
    """Read the request body, refusing (413) one larger than ``limit`` before buffering it.

    A gzip or deflate body is inflated with the same limit on its inflated size.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise HTTPException(413, f"request body is {size} bytes, over the {limit}-byte limit "
                                     f"(raise it with --max-body-mb)")
        body = await request.body()
    else:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise HTTPException(413, f"request body is over the {limit}-byte limit (raise it with --max-body-mb)")
            chunks.append(chunk)
        body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in _DECODERS:
        raise HTTPException(415, f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    return _inflate(body, encoding, limit)


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    import zlib

    inflater = zlib.decompressobj(_DECODERS[encoding])
    try:
        out = inflater.decompress(body, limit + 1)  # bounded: a small bomb cannot fill memory
    except zlib.error as exc:
        raise RequestError(f"request body is not valid {encoding}: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise HTTPException(413, f"inflated request body is over the {limit}-byte limit")
    return out


def parse_json(raw: bytes, what: str = "request body") -> Any:
    """Parse JSON, refusing malformed input with a message that says where it broke."""
    if not raw.strip():
        raise RequestError(f"{what} is empty; expected JSON")
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise RequestError(f"{what} is not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise RequestError(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise RequestError(f"{what} is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise RequestError(f"{what} is not usable JSON: {exc}") from None


def check_text(data: Any, what: str = "request body") -> None:
    """Refuse strings that are not encodable text (lone surrogate escapes such as "\\ud800")."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{what} has a string with a lone surrogate escape; send valid Unicode text") from None
