"""Broker URLs: ``mqtt://[user[:password]@]host[:port]`` and ``mqtts://...`` with TLS options.

TLS files may come from the query string (``?ca=PATH&cert=PATH&key=PATH``) or from a
:class:`TlsOptions` passed beside the URL; the explicit options win. Credentials may come from
the URL (percent-encoded) or from explicit arguments; the explicit arguments win, so a password
need not sit in a command line or a process list.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from edge.errors import ConfigError
from edge.redact import redact_url

# IANA ports for MQTT over TCP and over TLS.
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
QUERY_KEYS = ("ca", "cert", "key", "insecure")


@dataclass(frozen=True)
class TlsOptions:
    """TLS settings: a CA bundle (system CAs when None), an optional client certificate and key."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # Skip host name verification (a test broker with a certificate for another name). The
    # certificate chain is still verified against ``ca_file``.
    insecure: bool = False

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("a client certificate needs both a certificate and a key file",
                              hint="pass both --tls-cert and --tls-key (or ?cert=...&key=...)")
        for what, path in (("CA", self.ca_file), ("certificate", self.cert_file), ("key", self.key_file)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"TLS {what} file {path} does not exist")


@dataclass(frozen=True)
class BrokerUrl:
    """A parsed broker address."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: TlsOptions | None = None

    def __str__(self) -> str:
        """Return the URL without the password (safe to log)."""
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}"


def parse_broker_url(
    url: str,
    *,
    tls: TlsOptions | None = None,
    username: str | None = None,
    password: str | None = None,
) -> BrokerUrl:
    """Parse a broker URL, merging explicit TLS options and credentials; raise ConfigError."""
    shown = redact_url(url)  # errors quote the URL, never its password
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid broker URL {shown!r}: {exc}", hint="use mqtt://HOST:PORT or mqtts://HOST:PORT") from exc
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ConfigError(f"unsupported broker URL scheme {parts.scheme!r} in {shown!r}",
                          hint="use mqtt://HOST:PORT or mqtts://HOST:PORT")
    if not parts.hostname:
        raise ConfigError(f"broker URL {shown!r} has no host", hint="use mqtt://HOST:PORT")
    if parts.path not in ("", "/") or parts.fragment:
        raise ConfigError(f"broker URL {shown!r} has a path or fragment; a broker URL names a host and port only")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(query) - set(QUERY_KEYS))
    if unknown:
        raise ConfigError(f"unknown broker URL option(s) {', '.join(unknown)}", hint=f"valid: {', '.join(QUERY_KEYS)}")
    if any(len(v) > 1 for v in query.values()):
        raise ConfigError(f"broker URL {shown!r} repeats an option")
    opt = {k: v[0] for k, v in query.items()}
    if scheme == "mqtt" and (tls is not None or opt):
        raise ConfigError(f"TLS options given for a plain mqtt:// URL {shown!r}", hint="use mqtts:// for TLS")
    tls_options = None
    if scheme == "mqtts":
        from_url = TlsOptions(
            ca_file=_opt_path(opt.get("ca")),
            cert_file=_opt_path(opt.get("cert")),
            key_file=_opt_path(opt.get("key")),
            insecure=_opt_bool(opt.get("insecure")),
        )
        tls_options = _merge_tls(from_url, tls) if tls is not None else from_url
    user = username if username is not None else (unquote(parts.username) if parts.username else None)
    secret = password if password is not None else (unquote(parts.password) if parts.password else None)
    if secret is not None and not user:
        raise ConfigError(f"broker URL {shown!r} has a password but no user name")
    return BrokerUrl(scheme, parts.hostname, port or DEFAULT_PORTS[scheme], user or None, secret, tls_options)


def _opt_path(raw: str | None) -> Path | None:
    return Path(unquote(raw)).expanduser() if raw else None


def _opt_bool(raw: str | None) -> bool:
    if raw is None or raw == "":
        return raw == ""  # "?insecure" alone means true
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise ConfigError(f"broker URL option insecure={raw!r} is not a boolean", hint="use insecure=true or false")


def _merge_tls(base: TlsOptions, explicit: TlsOptions) -> TlsOptions:
    return replace(
        base,
        ca_file=explicit.ca_file or base.ca_file,
        cert_file=explicit.cert_file or base.cert_file,
        key_file=explicit.key_file or base.key_file,
        insecure=explicit.insecure or base.insecure,
    )
