"""Secrets out of logs and messages: one place that knows what a secret looks like.

:func:`redact_url` hides a URL's password and its credential-like query values (a broker URL's
``user:pass@``, a download URL's ``sig=``); :func:`redact` does the same anywhere in a text and
also hides bearer tokens, API tokens (``edge_...``) and session cookies. :class:`RedactingFilter`
applies :func:`redact` to every log record a handler writes, ours and third-party libraries'
alike (httpx logs each request's full URL at INFO), so a secret that slips into a message is
masked before it reaches a file or a terminal.
"""

from __future__ import annotations

import logging
import re

MASK = "***"

_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s]*):(?P<secret>[^@/?#\s]+)@")
# Query parameters whose values are credentials. ``key`` is left alone: in a broker URL it names a
# file (the TLS key's path), not a secret.
_QUERY = re.compile(r"(?P<head>[?&;](?:sig|signature|token|access_token|password|passwd|secret|api_key|apikey)=)"
                    r"(?P<secret>[^&;#\s'\"]+)", re.IGNORECASE)
_BEARER = re.compile(r"(?P<head>\bbearer\s+)(?P<secret>[A-Za-z0-9._~+/=-]+)", re.IGNORECASE)
# An API token is "edge_" and 43 URL-safe characters (edge.fleet.auth.new_token); the look-ahead
# for a capital or a digit keeps lower-case names such as metric names out.
_API_TOKEN = re.compile(r"(?P<head>\bedge_)(?P<secret>(?=[A-Za-z0-9_-]*[A-Z0-9])[A-Za-z0-9_-]{43})(?![A-Za-z0-9_-])")
_COOKIE = re.compile(r"(?P<head>\bedge_session=)(?P<secret>[^;,\s'\"]+)")
# A value right after a telling name: ``password='x'`` in a library's repr of a packet, ``"secret":
# "x"`` in JSON, ``token: x`` in text.
_KEYED = re.compile(r"(?P<head>\b(?:password|passwd|secret|token|api_key)[\"']?\s*[=:]\s*[\"']?)"
                    r"(?P<secret>(?!None\b|null\b)[^\"',\s&;)}\]]+)", re.IGNORECASE)
_PATTERNS = (_USERINFO, _QUERY, _BEARER, _API_TOKEN, _COOKIE, _KEYED)


def _mask(match: re.Match[str]) -> str:
    return match.group("head") + (":" if match.re is _USERINFO else "") + MASK + ("@" if match.re is _USERINFO else "")


def redact_url(url: str) -> str:
    """Return ``url`` with its password and credential query values masked (safe to log)."""
    for pattern in (_USERINFO, _QUERY):
        url = pattern.sub(_mask, url)
    return url


def redact(text: str) -> str:
    """Return ``text`` with every secret this module recognizes masked."""
    for pattern in _PATTERNS:
        text = pattern.sub(_mask, text)
    return text


class RedactingFilter(logging.Filter):
    """Mask secrets in a record's message and traceback before a handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drop it."""
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as it would
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Add a :class:`RedactingFilter` to every handler of ``logger`` (the root logger by default)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
