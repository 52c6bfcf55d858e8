"""Reading JSON request bodies of the controller (REST API and dashboard) as untrusted input.

A declared ``Content-Length`` over the limit is refused before a byte is read, a chunked body is
cut off at the limit (both :class:`~edge.errors.ResourceError`, 413), and whatever ``json.loads``
would turn into a crash further in is refused here with a clear
:class:`~edge.errors.ConfigError` (400): integers past Python's digit limit, nesting past its
recursion limit, lone surrogate escapes (no database or log can store them as UTF-8), and
NaN/Infinity (no field of ours means them; JSON itself has no such numbers).
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

from starlette.requests import Request

from edge.errors import ConfigError, ResourceError


async def read_body(request: Request, limit: int) -> bytes:
    """Return the request body, refusing (ResourceError) one over ``limit`` bytes before buffering it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ConfigError(f"Content-Length {declared[:40]!r} is not a number") from None
        if size > limit:
            raise ResourceError(f"request body of {size} bytes is over the {limit}-byte limit")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ResourceError(f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constant(name: str) -> NoReturn:
    raise ConfigError(f"request body has the number {name}, which JSON does not allow",
                      hint="send finite numbers only")


def parse_object(body: bytes) -> dict[str, Any]:
    """Parse a JSON object from untrusted bytes ({} when empty); raise ConfigError on anything else."""
    if not body.strip():
        return {}
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError("request body is nested too deeply") from None
    except ValueError as exc:  # an integer over Python's 4,300-digit limit
        raise ConfigError(f"request body is not usable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("request body must be a JSON object")
    try:
        json.dumps(data, ensure_ascii=False, allow_nan=False).encode()
    except UnicodeEncodeError:
        raise ConfigError("request body has a string with a lone surrogate escape (e.g. \\ud800)",
                          hint="send valid Unicode text") from None
    except ValueError:  # 1e999: a finite literal that parses to infinity
        _no_constant("Infinity")
    return data


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """Read and parse the JSON object body of a request (at most ``limit`` bytes)."""
    return parse_object(await read_body(request, limit))
