"""How long to wait and the waiting itself: the injected Clock, Retry-After in both forms (and the
epoch values some servers send), Medplum's msBeforeNext and spent RateLimit window, and `wait`,
which ends early when the run is asked to stop (RUN_STOP, set on SIGTERM/SIGINT).

May import: pfsync.core, pfsync.net.pacing.
"""

from __future__ import annotations

import email.utils
import threading
import time
from typing import Any, Protocol

import httpx
import orjson

from pfsync.core.errors import InterruptedRunError
from pfsync.net.pacing import parse_ratelimit


class Clock(Protocol):
    def now(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """Wall-clock time (epoch seconds) and real sleeping."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date (RFC 9110 10.2.3).

    Some servers send epoch values (the SMART reference server sends epoch ms, then epoch s:
    docs/bulk-data.md "Retries and Retry-After"); a huge number that looks like an epoch is read as one.
    An absolute time that has already passed (clock skew, or an answer that took its time) asks for
    nothing: None, so that the caller's own backoff applies rather than an immediate retry.
    """
    if not value:
        return None
    value = value.strip()
    try:
        number = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            return None
    else:
        if number <= 1e9:
            return max(0.0, number)
        when = number / 1000.0 if number > 1e12 else number  # epoch milliseconds, else epoch seconds
    return when - now if when > now else None


def ratelimit_reset(response: httpx.Response) -> float | None:
    """Seconds until a spent request window resets, from Medplum's `RateLimit: "requests";r=0;t=N`
    (docs/medplum.md "Quotas and 429": a 429 carries no Retry-After). Only for a 429: a project with
    its quota off counts down to r=0 without refusing anything."""
    if response.status_code != 429:
        return None
    parts = parse_ratelimit(response.headers.get("RateLimit"))
    spent = [t for remaining, t in parts.values() if remaining <= 0]
    return max(spent) if spent else None


def wait_from_outcome(outcome: Any) -> float | None:
    """Seconds from a throttled OperationOutcome's diagnostics JSON (no Retry-After: docs/medplum.md)."""
    if not isinstance(outcome, dict):
        return None
    for issue in outcome.get("issue") or []:
        diag = issue.get("diagnostics") if isinstance(issue, dict) else None
        if not isinstance(diag, str) or not diag.startswith("{"):
            continue
        try:
            data = orjson.loads(diag)
        except orjson.JSONDecodeError:
            continue
        ms = data.get("msBeforeNext", data.get("_msBeforeNext")) if isinstance(data, dict) else None
        if isinstance(ms, int | float):
            return max(0.0, float(ms) / 1000.0)
    return None


def hinted_wait(response: httpx.Response, now: float) -> float | None:
    """What the server asks us to wait: Retry-After (either form), else on a 429 Medplum's
    throttled OperationOutcome (`msBeforeNext`) or its spent RateLimit window."""
    hinted = parse_retry_after(response.headers.get("Retry-After"), now)
    if hinted is not None or response.status_code != 429:
        return hinted
    try:
        body = orjson.loads(response.content) if response.content else None
    except (orjson.JSONDecodeError, httpx.HTTPError):
        body = None
    throttled = wait_from_outcome(body)
    return throttled if throttled is not None else ratelimit_reset(response)


# Set while the process is asked to stop (pfsync.sync.schedule.stop_on_signals: SIGTERM, SIGINT), so
# every retry wait ends early even where no stop event was handed down (token requests, reads).
RUN_STOP = threading.Event()


def wait(clock: Clock, seconds: float, stop: threading.Event | None, what: str = "the run") -> None:
    """Sleep `seconds` unless the run is asked to stop (`stop`, or RUN_STOP): then
    InterruptedRunError. Without `stop`: one sleep (on the real clock one that wakes on RUN_STOP);
    with it: slices of at most 0.5 s, checking it between them."""

    def stopped() -> bool:
        return (stop is not None and stop.is_set()) or RUN_STOP.is_set()

    def interrupted() -> InterruptedRunError:
        return InterruptedRunError(f"{what} interrupted while waiting to retry; the next run resumes")

    if stopped():
        raise interrupted()
    if stop is None:
        if type(clock) is SystemClock:
            RUN_STOP.wait(seconds)
        elif seconds > 0:
            clock.sleep(seconds)
        if stopped():
            raise interrupted()
        return
    deadline = clock.now() + seconds
    while (left := deadline - clock.now()) > 0:
        clock.sleep(min(left, 0.5))
        if stopped():
            raise interrupted()
