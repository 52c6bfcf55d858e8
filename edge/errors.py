"""The one exception tree of Edge.

Every error carries a stable string ``code`` (it also travels in status and event messages)
and an ``exit_code`` for the CLI, which is the one place that catches them::

    EdgeError                       edge_error            1
    ├── ConfigError                 config_invalid        2
    │   ├── ProfileError            profile_invalid       2
    │   └── NotFoundError           not_found             2
    ├── ModelSourceError            model_source_invalid  3
    │   └── UnsupportedModelError   model_unsupported     3
    ├── ExportError                 export_failed         4
    │   └── FidelityError           fidelity_failed       4
    ├── BundleError                 bundle_invalid        5
    │   ├── UnsafePathError         bundle_unsafe_path    5
    │   ├── IntegrityError          bundle_integrity      5
    │   ├── SignatureError          signature_invalid     5
    │   └── ModelValidationError    model_invalid         5
    ├── CompatibilityError          incompatible          6
    ├── StoreError                  store_error           7
    ├── ResourceError               resource_exhausted    8
    │   └── OverloadError           overloaded            8
    ├── InferenceError              inference_failed      9
    │   ├── RequestError            request_invalid       9
    │   └── UnavailableError        model_unavailable     9
    ├── TransportError              transport_error      10
    │   ├── ConnectError            transport_connect    10
    │   ├── BrokerAuthError         transport_auth       10
    │   ├── TlsError                transport_tls        10
    │   ├── ProtocolError           transport_protocol   10
    │   ├── PublishError            transport_publish    10
    │   └── DownloadError           download_failed      10
    ├── ConflictError               conflict             11
    └── AuthError                   unauthorized         12
        └── ForbiddenError          forbidden            12

Third-party errors are translated once, at the boundary, with ``raise ... from exc``.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base of every error Edge raises on purpose."""

    code = "edge_error"
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def to_dict(self) -> dict[str, str]:
        """Describe the error for JSON output and status messages."""
        out = {"code": self.code, "message": self.message}
        if self.hint:
            out["hint"] = self.hint
        return out


class ConfigError(EdgeError):
    """Configuration, a command-line option or a YAML file is invalid."""

    code = "config_invalid"
    exit_code = 2


class ProfileError(ConfigError):
    """A device profile is invalid or impossible."""

    code = "profile_invalid"


class NotFoundError(ConfigError):
    """A named thing (profile, model, key, bundle) does not exist."""

    code = "not_found"


class ModelSourceError(EdgeError):
    """The model given to the exporter is missing, corrupt or unreadable."""

    code = "model_source_invalid"
    exit_code = 3


class UnsupportedModelError(ModelSourceError):
    """The model's architecture or task is not one Edge can export."""

    code = "model_unsupported"


class ExportError(EdgeError):
    """Export, optimization or quantization failed."""

    code = "export_failed"
    exit_code = 4


class FidelityError(ExportError):
    """The exported model does not match the source model closely enough."""

    code = "fidelity_failed"


class BundleError(EdgeError):
    """A bundle is malformed."""

    code = "bundle_invalid"
    exit_code = 5


class UnsafePathError(BundleError):
    """A bundle names a path that would escape its folder, or a link or device file."""

    code = "bundle_unsafe_path"


class IntegrityError(BundleError):
    """A payload file does not match the size or hash its manifest declares."""

    code = "bundle_integrity"


class SignatureError(BundleError):
    """A bundle is unsigned, signed by an untrusted or revoked key, or its signature is bad."""

    code = "signature_invalid"


class ModelValidationError(BundleError):
    """A bundle's model failed its trial load in a child process (crash, error, timeout, memory)."""

    code = "model_invalid"


class CompatibilityError(EdgeError):
    """A bundle does not fit this device (profile, architecture, providers, budgets)."""

    code = "incompatible"
    exit_code = 6


class StoreError(EdgeError):
    """The on-device model store cannot perform an operation."""

    code = "store_error"
    exit_code = 7


class ResourceError(EdgeError):
    """Out of disk, memory or another budget."""

    code = "resource_exhausted"
    exit_code = 8


class OverloadError(ResourceError):
    """Too many requests from one client, or in flight at once: retry after ``retry_after_s``."""

    code = "overloaded"

    def __init__(self, message: str, *, hint: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, hint=hint)
        self.retry_after_s = retry_after_s


class InferenceError(EdgeError):
    """Running a model failed."""

    code = "inference_failed"
    exit_code = 9


class RequestError(InferenceError):
    """An inference request is malformed (wrong shape, dtype, too long, unknown model)."""

    code = "request_invalid"


class UnavailableError(InferenceError):
    """A model is still loading, unloaded or failed to load: retrying later may succeed."""

    code = "model_unavailable"


class TransportError(EdgeError):
    """The MQTT connection, a message on it, or a bundle download failed."""

    code = "transport_error"
    exit_code = 10


class ConnectError(TransportError):
    """The broker cannot be reached, refused the connection, or the connection was lost."""

    code = "transport_connect"


class BrokerAuthError(TransportError):
    """The broker refused the credentials or the client is not authorized for an operation."""

    code = "transport_auth"


class TlsError(TransportError):
    """The TLS handshake with the broker failed (CA, certificate, key or host name)."""

    code = "transport_tls"


class ProtocolError(TransportError):
    """The broker and the client disagree on MQTT (version, malformed or unexpected packet)."""

    code = "transport_protocol"


class PublishError(TransportError):
    """A message could not be published (too large, queue full, refused by the broker)."""

    code = "transport_publish"


class DownloadError(TransportError):
    """Downloading a bundle over HTTP failed; ``transient`` says whether retrying may help."""

    code = "download_failed"

    def __init__(self, message: str, *, hint: str | None = None, transient: bool = True) -> None:
        super().__init__(message, hint=hint)
        self.transient = transient


class ConflictError(EdgeError):
    """The request conflicts with the current state (a finished rollout, a version re-uploaded with other bytes)."""

    code = "conflict"
    exit_code = 11


class AuthError(EdgeError):
    """An API token is missing, unknown, or lacks the role the request needs."""

    code = "unauthorized"
    exit_code = 12


class ForbiddenError(AuthError):
    """The API token is valid but its role does not allow the request."""

    code = "forbidden"


def all_error_classes() -> list[type[EdgeError]]:
    """List every class of the tree, root first."""
    seen: list[type[EdgeError]] = []
    stack: list[type[EdgeError]] = [EdgeError]
    while stack:
        cls = stack.pop(0)
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return seen
