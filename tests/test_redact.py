"""edge.redact: what a secret looks like, and the log filter that masks it."""

from __future__ import annotations

import io
import logging

import pytest

from edge.fleet.auth import new_token
from edge.redact import MASK, RedactingFilter, redact, redact_url

TOKEN = new_token()


@pytest.mark.parametrize(("text", "secret", "kept"), [
    ("mqtts://dev-1:s3cr3t%40x@broker:8883?ca=/etc/ca.pem&key=/etc/dev.key", "s3cr3t", "/etc/dev.key"),
    ("mqtt://:lonely-pw@broker", "lonely-pw", "broker"),
    ("postgresql://edge:pg-pass@db:5432/fleet", "pg-pass", "db:5432/fleet"),
    ("GET http://ctl/api/v1/bundles/ab/download?device=d1&sig=0123456789abcdef", "0123456789abcdef", "device=d1"),
    ("https://x/y?token=abc123&page=2", "abc123", "page=2"),
    (f"authorization: Bearer {TOKEN}", TOKEN[5:], "authorization"),
    (f"created token {TOKEN} for ci", TOKEN[5:], "for ci"),
    ("Set-Cookie: edge_session=Zm9vYmFy; Path=/; HttpOnly", "Zm9vYmFy", "Path=/"),
    ("ConnectPayload(client_id='c', username='u', password='hunter2')", "hunter2", "username='u'"),
    ('{"name": "admin", "password": "hunter2"}', "hunter2", '"name": "admin"'),
])
def test_secrets_are_masked_and_the_rest_is_kept(text: str, secret: str, kept: str) -> None:
    out = redact(text)
    assert secret not in out and MASK in out and kept in out, out


@pytest.mark.parametrize("text", [
    "edge_inference_request_success_total", "tokens_per_s: 12.5", "token=None", "mqtt://broker:1883",
    "http://ctl/api/v1/devices?limit=10", "password=None",
])
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == text


def test_redact_url_masks_only_credentials() -> None:
    assert redact_url("mqtt://u:p@h:1883") == f"mqtt://u:{MASK}@h:1883"
    assert redact_url("http://h/x?sig=s&a=1") == f"http://h/x?sig={MASK}&a=1"


def test_the_filter_masks_messages_arguments_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("edge.test.redact")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("connecting to %s", "mqtt://u:pw-in-args@h")
        try:
            raise ValueError("bad URL mqtts://u:pw-in-traceback@h")
        except ValueError:
            logger.exception("failed")
        logger.warning("plain %d%%", 5)
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "pw-in-args" not in out and "pw-in-traceback" not in out, out
    assert f"mqtt://u:{MASK}@h" in out and "ValueError" in out and "plain 5%" in out
