"""Injectable faults of the target sandbox, armed from Python or from `/_sandbox/faults/...`.

Each "next N" fault applies to the next N FHIR requests (not the token endpoint, not control routes).
The serialization-conflict fault imitates docs/medplum.md, recorded case 30: a seeded share of the create entries of a
batch answer 409 `conflict`, optionally only while more than one batch is in flight (as on PostgreSQL).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Counters:
    throttle: int = 0  # outer 429 throttled
    errors: list[int] = field(default_factory=list)  # outer 500/503, one status per request
    resets: int = 0  # connection reset
    too_large: int = 0  # 400 "File too large"


class Faults:
    """Thread-safe fault switches. Methods return self so tests can chain them."""

    def __init__(
        self, conflict_rate: float = 0.0, seed: int = 0, on_expire_tokens: Callable[[], None] | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._c = _Counters()
        self.conflict_rate = conflict_rate
        self.conflict_only_concurrent = False
        self._rng = random.Random(seed)
        self._in_flight = 0
        self._on_expire_tokens = on_expire_tokens

    # ------------------------------------------------------------------ arming
    def throttle_next(self, n: int = 1) -> Faults:
        """The next n FHIR requests answer 429 throttled, like an exhausted quota (docs/medplum.md, recorded case 29)."""
        with self._lock:
            self._c.throttle += n
        return self

    def error_next(self, n: int = 1, status: int = 500) -> Faults:
        """The next n FHIR requests answer `status` (500 or 503) with an exception OperationOutcome."""
        if status not in (500, 502, 503, 504):
            raise ValueError(f"error status must be a 5xx gateway/server status, not {status}")
        with self._lock:
            self._c.errors.extend([status] * n)
        return self

    def reset_next(self, n: int = 1) -> Faults:
        """The next n FHIR requests are cut off with a TCP reset before any response byte."""
        with self._lock:
            self._c.resets += n
        return self

    def too_large_next(self, n: int = 1) -> Faults:
        """The next n FHIR requests answer 400 "File too large" whatever their size (docs/medplum.md, recorded case 27)."""
        with self._lock:
            self._c.too_large += n
        return self

    def expire_tokens(self) -> Faults:
        """Every access token issued so far is rejected (401) from now on; clients must fetch a new one."""
        if self._on_expire_tokens is not None:
            self._on_expire_tokens()
        return self

    def set_conflicts(self, rate: float, *, only_concurrent: bool = False, seed: int | None = None) -> Faults:
        """A share (0.0-1.0) of batch create entries answer 409 conflict (docs/medplum.md, recorded case 30)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("conflict rate must be between 0.0 and 1.0")
        with self._lock:
            self.conflict_rate = rate
            self.conflict_only_concurrent = only_concurrent
            if seed is not None:
                self._rng = random.Random(seed)
        return self

    def clear(self) -> Faults:
        with self._lock:
            self._c = _Counters()
            self.conflict_rate = 0.0
            self.conflict_only_concurrent = False
        return self

    # ------------------------------------------------------------------ firing (used by the server)
    def take(self) -> tuple[str, int] | None:
        """The fault to apply to this FHIR request, if any: ("reset"|"error"|"throttle"|"too_large", status)."""
        with self._lock:
            if self._c.resets:
                self._c.resets -= 1
                return "reset", 0
            if self._c.errors:
                return "error", self._c.errors.pop(0)
            if self._c.throttle:
                self._c.throttle -= 1
                return "throttle", 429
            if self._c.too_large:
                self._c.too_large -= 1
                return "too_large", 400
        return None

    def batch_started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def batch_finished(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def conflict(self) -> bool:
        """Should this create entry fail with a serialization conflict?"""
        with self._lock:
            if self.conflict_rate <= 0.0:
                return False
            if self.conflict_only_concurrent and self._in_flight < 2:
                return False
            return self._rng.random() < self.conflict_rate

    def pending(self) -> dict[str, object]:
        with self._lock:
            return {
                "throttle": self._c.throttle,
                "errors": list(self._c.errors),
                "resets": self._c.resets,
                "too_large": self._c.too_large,
                "conflict_rate": self.conflict_rate,
                "conflict_only_concurrent": self.conflict_only_concurrent,
            }
