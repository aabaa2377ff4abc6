"""Medplum's FHIR interaction quota and the RateLimit header (docs/medplum.md "Quotas and 429").

Fixed windows like rate-limiter-flexible: the window starts with the first point; every consume adds
its points even when refused (docs/medplum.md, recorded case 29: 50,040 -> 50,060 -> 50,080); over the limit the request
or the rest of a batch gets 429 `throttled` with the limiter state as `diagnostics`, no Retry-After.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import orjson

from pfsync.sandbox.target.common import FhirError, outcome

# docs/medplum.md "Quotas and 429": default FHIR interaction quota per user per minute, per-IP request limit,
# and the auth endpoints' small per-IP limit (docs/medplum.md "Surprises in the recordings", item 1).
DEFAULT_POINTS = 50_000
REQUESTS_PER_MINUTE = 60_000
AUTH_REQUESTS_PER_MINUTE = 160

# docs/medplum.md "Quota costs".
COST_READ = 1
COST_SEARCH = 20
COST_HISTORY = 10
COST_WRITE = 100

Clock = Callable[[], float]


class Window:
    """One fixed-window counter."""

    def __init__(self, limit: int, seconds: float, clock: Clock = time.monotonic) -> None:
        self.limit = limit
        self.seconds = seconds
        self._clock = clock
        self._start: float | None = None
        self.consumed = 0
        self._lock = threading.Lock()

    def _roll(self) -> float:
        now = self._clock()
        if self._start is None or now - self._start >= self.seconds:
            self._start = now
            self.consumed = 0
        return now

    def add(self, points: int) -> tuple[int, float]:
        """Add points; -> (consumed after, ms before the window resets)."""
        with self._lock:
            now = self._roll()
            self.consumed += points
            assert self._start is not None
            return self.consumed, max(0.0, (self._start + self.seconds - now) * 1000)

    def state(self) -> tuple[int, int]:
        """-> (remaining points, whole seconds to reset) for the RateLimit header."""
        with self._lock:
            now = self._roll()
            assert self._start is not None
            left = max(0.0, self._start + self.seconds - now)
            return max(0, self.limit - self.consumed), max(0, math.ceil(left))


def throttled_error(consumed: int, ms_before_next: float, limit: int) -> FhirError:
    # docs/medplum.md, recorded case 29: diagnostics is the limiter's JSON, keys in this order.
    diag = orjson.dumps(
        {
            "_remainingPoints": max(0, limit - consumed),
            "_msBeforeNext": int(ms_before_next),
            "_consumedPoints": consumed,
            "_isFirstInDuration": False,
            "limit": limit,
        }
    ).decode()
    return FhirError(
        429, outcome("error", "throttled", "Too Many Requests", oo_id="too-many-requests", diagnostics=diag)
    )


class Quota:
    """A client's FHIR interaction quota. `enforce=False` counts (the header goes down to r=0) but refuses
    nothing: docs/medplum.md "Quotas and 429"."""

    def __init__(self, limit: int | None, seconds: float, clock: Clock = time.monotonic) -> None:
        self.enforce = limit is not None
        self.window = Window(limit if limit is not None else DEFAULT_POINTS, seconds, clock)

    def consume(self, points: int) -> None:
        consumed, ms = self.window.add(points)
        if self.enforce and consumed > self.window.limit:
            raise throttled_error(consumed, ms, self.window.limit)

    def header_part(self) -> str:
        remaining, reset = self.window.state()
        return f'"fhirInteractions";r={remaining};t={reset}'


class RequestLimit:
    """The per-IP request counters. The general one only shows in the header; the auth endpoints'
    limit (docs/medplum.md "Quotas and 429": 160 a minute per client address, defaultAuthRateLimit) is
    enforced like the real server's: over it a token request gets 429 `throttled`, and refused
    requests count too. `set_auth_limit` changes it (None: not enforced); `reset` starts a new window."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.fhir = Window(REQUESTS_PER_MINUTE, 60.0, clock)
        self.auth = Window(AUTH_REQUESTS_PER_MINUTE, 60.0, clock)
        self.enforce_auth = True

    def set_auth_limit(self, limit: int | None, seconds: float = 60.0) -> None:
        self.enforce_auth = limit is not None
        self.auth = Window(limit if limit is not None else AUTH_REQUESTS_PER_MINUTE, seconds, self._clock)

    def reset(self) -> None:
        self.set_auth_limit(self.auth.limit if self.enforce_auth else None, self.auth.seconds)

    def hit(self, auth: bool) -> str:
        window = self.auth if auth else self.fhir
        window.add(1)
        remaining, reset = window.state()
        return f'"requests";r={remaining};t={reset}'

    def auth_refused(self) -> bool:
        """After `hit(True)`: is this auth request over the limit?"""
        return self.enforce_auth and self.auth.consumed > self.auth.limit
