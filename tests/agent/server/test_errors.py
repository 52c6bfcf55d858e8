"""Every error class maps to one HTTP status, in one table."""

from __future__ import annotations

import pytest

from edge import errors as e
from edge.agent.server.errors import STATUS, http_status


def test_every_error_class_has_a_status() -> None:
    for cls in e.all_error_classes():
        exc = cls("x")
        status = http_status(exc)
        assert 400 <= status < 600, cls
        assert cls in STATUS or any(base in STATUS for base in cls.__mro__[1:]), cls


@pytest.mark.parametrize(
    ("cls", "status"),
    [
        (e.RequestError, 400), (e.NotFoundError, 404), (e.ProfileError, 400), (e.ResourceError, 429),
        (e.UnavailableError, 503), (e.InferenceError, 500), (e.SignatureError, 400), (e.StoreError, 409),
        (e.CompatibilityError, 409), (e.EdgeError, 500),
    ],
)
def test_client_errors_are_4xx_and_ours_are_5xx(cls: type[e.EdgeError], status: int) -> None:
    assert http_status(cls("x")) == status
