"""Logging: human lines on stderr through rich, or one JSON object per line; always redacted.

Results go to stdout (the CLI's job); everything diagnostic goes through the `pfsync` logger to
stderr. Every record passes `RedactFilter`, which scrubs secrets from the message, its arguments
and any exception text (pfsync.redact), so no code path can log a token by accident.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

import orjson
from rich.console import Console
from rich.logging import RichHandler

from pfsync.redact import redact

LOGGER_NAME = "pfsync"
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class RedactFilter(logging.Filter):
    """Render the message now, scrub it, and drop args so handlers cannot re-render raw values."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not kill the run
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        if record.exc_info:
            import traceback

            text = "".join(traceback.format_exception(*record.exc_info))
            record.exc_text = redact(text)
            record.exc_info = None
        for key, value in list(vars(record).items()):
            if key not in _RESERVED and isinstance(value, str):
                setattr(record, key, redact(value))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, and the record's extra fields
    (`event`, `exportId`, counts...) so cron and Kubernetes collectors can parse them."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                payload[key] = value
        if record.exc_text:
            payload["exception"] = record.exc_text
        return redact(orjson.dumps(payload, default=str).decode())


def make_console(stream: IO[str] | None = None, *, stderr: bool = True) -> Console:
    """A rich console that honours NO_COLOR and TERM=dumb and uses no colour when not a TTY."""
    return Console(file=stream, stderr=stderr if stream is None else False, highlight=False, soft_wrap=True)


def setup_logging(fmt: str, verbosity: int, *, stream: IO[str] | None = None) -> logging.Logger:
    """Configure the `pfsync` logger. fmt: human|json|auto; verbosity: -1 quiet, 0 normal, 1+ verbose."""
    out = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "human" if out.isatty() else "json"
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(out)
        handler.setFormatter(JsonFormatter())
    else:
        handler = RichHandler(
            console=make_console(out),
            show_time=out.isatty(),
            show_path=False,
            rich_tracebacks=False,  # tracebacks with locals could print secrets
            markup=False,
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RedactFilter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


class LogSink:
    """An EventSink that writes events as log records (`event` field set) at INFO or DEBUG."""

    def __init__(
        self, logger: logging.Logger | None = None, *, quiet_events: frozenset[str] = frozenset()
    ) -> None:
        self._logger = logger or logging.getLogger(LOGGER_NAME)
        self._quiet = quiet_events

    def emit(self, event: str, /, **detail: Any) -> None:
        level = logging.DEBUG if event in self._quiet else logging.INFO
        if event.endswith("_error"):
            level = logging.WARNING
        summary = " ".join(f"{k}={v}" for k, v in detail.items() if not isinstance(v, dict | list))
        self._logger.log(level, f"{event} {summary}".strip(), extra={"event": event, "eventDetail": detail})
