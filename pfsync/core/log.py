"""Logging: human lines on stderr through rich, or one JSON object per line; always redacted.

Results go to stdout (the CLI's job); everything diagnostic goes through the `pfsync` logger to
stderr. Every record passes `RedactFilter`, which scrubs secrets from the message, its arguments
and any exception text (pfsync.core.redact), so no code path can log a token by accident.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import traceback
from typing import IO, Any

import orjson
from rich.console import Console
from rich.logging import RichHandler

from pfsync.core.redact import redact

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
            text = "".join(traceback.format_exception(*record.exc_info))
            record.exc_text = redact(text)
            record.exc_info = None
        for key, value in list(vars(record).items()):
            if key not in _RESERVED and isinstance(value, str):
                setattr(record, key, redact(value))
        return True


_EVENT_WORD = re.compile(r"^([a-z]+(?:_[a-z]+)+)(?:\s|$)")


def event_of(record: logging.LogRecord) -> str:
    """The record's stable `event` name: the one it was logged with; else a leading snake_case word
    of its message (`auth_token ...`); else `<module>_<level>` (e.g. `download_warning`)."""
    event = getattr(record, "event", None)
    if isinstance(event, str) and event:
        return event
    match = _EVENT_WORD.match(record.getMessage())
    if match:
        return match.group(1)
    module = record.name.rsplit(".", 1)[-1] if record.name != LOGGER_NAME else "pfsync"
    return f"{module}_{record.levelname.lower()}"


def json_value(value: Any) -> str:
    """A value as text in JSON terms (null, true, 3), strings as they are."""
    if isinstance(value, str):
        return value
    return orjson.dumps(value, default=str).decode()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, `event`, message, and the record's extra fields
    (`eventDetail`, `exportId`, counts...) so cron and Kubernetes collectors can parse them.
    An event's details are in `eventDetail` only; its `message` is the event name, not a copy."""

    def format(self, record: logging.LogRecord) -> str:
        event = event_of(record)
        has_detail = isinstance(getattr(record, "eventDetail", None), dict)
        payload: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": event,
            "message": event if has_detail else record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_") and key != "event":
                payload[key] = value
        if record.exc_text:
            payload["exception"] = record.exc_text
        return redact(orjson.dumps(payload, default=str).decode())


_FORMAT: str | None = None


def current_format() -> str | None:
    """human or json once setup_logging has run, else None."""
    return _FORMAT


def make_console(stream: IO[str] | None = None, *, stderr: bool = True) -> Console:
    """A rich console that honours NO_COLOR and TERM=dumb and uses no colour when not a TTY."""
    return Console(file=stream, stderr=stderr if stream is None else False, highlight=False, soft_wrap=True)


def setup_logging(fmt: str, verbosity: int, *, stream: IO[str] | None = None) -> logging.Logger:
    """Configure the `pfsync` logger. fmt: human|json|auto; verbosity: -1 quiet, 0 normal, 1+ verbose."""
    global _FORMAT
    out = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "human" if out.isatty() else "json"
    _FORMAT = fmt
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(out)
        handler.setFormatter(JsonFormatter())
    elif not out.isatty():
        # Human lines to a file or a pipe: one line per record, never wrapped at 80 columns.
        handler = logging.StreamHandler(out)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
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


# Events that report a problem, at warning level; the rest are info (or debug when quiet).
WARNING_EVENTS = frozenset({"load_quarantined", "load_attachment_left", "sync_locked"})
_OUTCOME_LEVEL = {"failed": logging.ERROR, "interrupted": logging.WARNING, "locked": logging.WARNING,
                  "partial": logging.WARNING}  # fmt: skip


def level_of(event: str, detail: dict[str, Any], default: int = logging.INFO) -> int:
    """The log level of an event: a failure is an error, a partial result or a retry a warning,
    so an alert on level >= warning (or error) sees it."""
    if event.endswith("_error") or event in WARNING_EVENTS:
        return logging.WARNING
    if event == "sync_source_complete":
        return _OUTCOME_LEVEL.get(str(detail.get("outcome")), default)
    if event == "sync_summary":
        code = detail.get("exitCode")
        return default if code in (0, None) else logging.WARNING if code in (6, 8, 130) else logging.ERROR
    if event == "load_complete" and (detail.get("quarantined") or detail.get("retry_queued")):
        return logging.WARNING
    if event == "export_complete" and detail.get("problems"):
        return logging.WARNING
    if event == "verify_complete" and detail.get("ok") is False:
        return logging.WARNING
    return default


class LogSink:
    """An EventSink that writes events as log records (`event` field set), at a level that says
    whether something went wrong (see `level_of`); `quiet_events` are at DEBUG."""

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        quiet_events: frozenset[str] = frozenset(),
        info_as_debug: bool = False,
    ) -> None:
        """`info_as_debug`: every event that reports no problem goes to DEBUG (a live progress
        display shows them on a terminal)."""
        self._logger = logger or logging.getLogger(LOGGER_NAME)
        self._quiet = quiet_events
        self._info_as_debug = info_as_debug

    def emit(self, event: str, /, **detail: Any) -> None:
        quiet = self._info_as_debug or event in self._quiet
        level = level_of(event, detail, logging.DEBUG if quiet else logging.INFO)
        summary = " ".join(
            f"{k}={json_value(v)}" for k, v in detail.items() if not isinstance(v, dict | list)
        )
        self._logger.log(level, f"{event} {summary}".strip(), extra={"event": event, "eventDetail": detail})
