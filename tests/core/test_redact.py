"""Secrets never reach output: the Secret type, the redaction filter and JSON/human logs."""

from __future__ import annotations

import io
import logging

import orjson
import pytest

from pfsync.core.log import JsonFormatter, setup_logging
from pfsync.core.redact import MASK, Secret, redact, register

JWT = "eyJhbGciOiJSUzM4NCJ9.eyJpc3MiOiJhIn0.c2lnbmF0dXJlLXZhbHVl"


def test_secret_never_shows_its_value() -> None:
    s = Secret("hunter2-is-secret")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and "hunter2" not in f"{s} {s!r}"
    assert s.reveal() == "hunter2-is-secret"


@pytest.mark.parametrize(
    ("text", "leak"),
    [
        (f"token is {JWT}", JWT),
        ("Authorization: Bearer abcdefghijklmnop", "abcdefghijklmnop"),
        ("authorization: basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
        ('{"access_token":"opaque-token-123","expires_in":3600}', "opaque-token-123"),
        ("client_secret=abc123xyz&grant_type=client_credentials", "abc123xyz"),
        ("client_assertion=eyJabc.def", "eyJabc.def"),
        ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkq\n-----END PRIVATE KEY-----", "MIIEvQIBADANBgkq"),
        ("-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIO", "MHcCAQEEIO"),
    ],
)
def test_redact_masks_secret_shapes(text: str, leak: str) -> None:
    out = redact(text)
    assert leak not in out
    assert MASK in out


def test_redact_masks_registered_values_anywhere() -> None:
    register("plain-opaque-value-42")
    assert redact("url?x=plain-opaque-value-42&y") == f"url?x={MASK}&y"


def test_redact_leaves_ordinary_text_alone() -> None:
    text = "GET https://api.example/fhir/Patient answered 404: Not found (Patient?_count=1)"
    assert redact(text) == text


def test_redact_shows_urls_without_their_query() -> None:
    # Issue 15: signed storage and status URLs carry signatures in the query; no URL is shown with one.
    text = 'GET https://s3.example/f.ndjson?X-Amz-Signature=abc&x=1: 403 {"u":"http://h/s?t=z\\"q"}'
    assert redact(text) == 'GET https://s3.example/f.ndjson: 403 {"u":"http://h/s\\"q"}'


def _capture(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    logger = setup_logging(fmt, 1, stream=stream)
    return logger, stream


@pytest.mark.parametrize("fmt", ["human", "json"])
def test_logging_redacts_messages_args_extras_and_tracebacks(fmt: str) -> None:
    secret = Secret("very-secret-client-secret")
    logger, stream = _capture(fmt)
    logger.info("using %s and %s", secret.reveal(), JWT, extra={"detail": f"Bearer {JWT}"})
    try:
        raise RuntimeError(f"boom {secret.reveal()}")
    except RuntimeError:
        logger.exception("failed")
    out = stream.getvalue()
    assert "very-secret-client-secret" not in out
    assert JWT not in out
    assert "failed" in out


def test_json_log_format_is_one_object_per_line() -> None:
    logger, stream = _capture("json")
    logger.info("kickoff", extra={"event": "kickoff", "exportId": "abc"})
    logger.warning("second")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first = orjson.loads(lines[0])
    assert first["event"] == "kickoff" and first["exportId"] == "abc" and first["level"] == "info"
    assert first["timestamp"].endswith("Z") and first["message"] == "kickoff"
    assert orjson.loads(lines[1])["level"] == "warning"


def test_json_formatter_redacts_even_without_the_filter() -> None:
    record = logging.LogRecord("pfsync", logging.INFO, __file__, 1, "token %s", (JWT,), None)
    assert JWT not in JsonFormatter().format(record)


def test_quiet_logging_drops_info() -> None:
    stream = io.StringIO()
    logger = setup_logging("json", -1, stream=stream)
    logger.info("hidden")
    logger.warning("shown")
    assert "hidden" not in stream.getvalue() and "shown" in stream.getvalue()
