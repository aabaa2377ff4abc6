"""Fault injection and request counters of the source sandbox.

Each fault is armed for the next `times` matching requests (`times=None`: always) and disarmed by
`clear()`. Faults mimic what docs/bulk-data.md and docs/practice-fusion.md warn clients about: 429 with either
Retry-After form, 5xx, slow exports with X-Progress, connection resets, truncated or malformed files,
pretty-printed JSON instead of NDJSON, unrequested types, failed exports, expired jobs, files on another
origin, and tokens that die mid-export.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

WHERE = ("token", "kickoff", "status", "download")


@dataclass
class _Armed:
    name: str
    remaining: int | None
    params: dict[str, Any]


class Faults:
    """Arm faults per test. Names (also accepted by `arm(name, **params)` and the control API):

    - `rate_limit(where, times=1, retry_after=1, http_date=False)`: 429 with Retry-After in seconds,
      or as an HTTP-date when `http_date` (where: token, kickoff, status, download)
    - `server_error(where, times=1, status=500)`: 500/503 with an OperationOutcome
    - `slow_export(polls=3, times=1, retry_after=None)`: N polls answer 202 with X-Progress
    - `reset_download(times=1, after_bytes=None, type=None)`: connection reset mid-file
    - `truncate_download(times=1, type=None)`: the file ends in the middle of a line
    - `malformed_line(times=1, type=None)`: one line of the file is not JSON
    - `pretty_json(times=1, bundle=False, type=None)`: the file is one pretty-printed
      `application/json` resource (or a Bundle of all of them), as PF's docs show
    - `unrequested_type(times=1, type="Location")`: the manifest lists a type nobody asked for
    - `export_fails(times=1, status=500)`: the status URL answers an error OperationOutcome
    - `expired_status(times=1)`: the status URL (and files) answer 404, as an expired job
    - `foreign_storage(times=1)`: file URLs point at another origin (see `SourceSandbox.foreign_url`)
    - `revoke_tokens_after_kickoff(times=1)`: every token is revoked right after the kick-off
    - `busy_export(seconds=15, retry_after=1, transient=False)`: the job takes `seconds` on the
      sandbox clock; until then polls answer 202 with X-Progress (and Retry-After unless None), or,
      with `transient`, 500 with an OperationOutcome of code `transient` (the reference server's
      `transient_error` simulation: on every poll until the job completes)
    - `wrong_count(times=1, type=None, delta=1000)`: the manifest announces `delta` more lines than
      the file holds (the reference server's offset bug in a deleted-data file)
    - `failed_files(times=1, types=("Condition",))`: those types' files become `error[]` entries
      carrying the would-be `count`, each one OperationOutcome without a trailing newline
      (`some_file_generation_failed`, docs/bulk-data.md, recorded case 52)
    - `file_expired(times=1)`: a kick-off whose files all answer 410 (`file_expired`, docs/bulk-data.md, recorded case 53)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: list[_Armed] = []

    def arm(self, name: str, times: int | None = 1, **params: Any) -> None:
        if not hasattr(self, name) or name.startswith("_") or name in ("arm", "take", "clear", "active"):
            raise ValueError(f"unknown fault {name!r}")
        with self._lock:
            self._armed.append(_Armed(name, times, params))

    def take(self, name: str, **match: Any) -> dict[str, Any] | None:
        """Consume one use of an armed fault whose params match (`None` params match anything)."""
        with self._lock:
            for armed in self._armed:
                if armed.name != name:
                    continue
                if any(armed.params.get(k) not in (None, v) for k, v in match.items()):
                    continue
                if armed.remaining is not None:
                    armed.remaining -= 1
                    if armed.remaining <= 0:
                        self._armed.remove(armed)
                return dict(armed.params)
        return None

    def clear(self) -> None:
        with self._lock:
            self._armed.clear()

    def active(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"name": a.name, "remaining": a.remaining, **a.params} for a in self._armed]

    # Named arming helpers: one per fault, so tests read like the list above.
    def rate_limit(
        self, where: str, times: int | None = 1, retry_after: int = 1, http_date: bool = False
    ) -> None:
        assert where in WHERE, where
        self.arm("rate_limit", times, where=where, retry_after=retry_after, http_date=http_date)

    def server_error(self, where: str, times: int | None = 1, status: int = 500) -> None:
        assert where in WHERE, where
        self.arm("server_error", times, where=where, status=status)

    def slow_export(self, polls: int = 3, times: int | None = 1, retry_after: int | None = None) -> None:
        self.arm("slow_export", times, polls=polls, retry_after=retry_after)

    def reset_download(
        self, times: int | None = 1, after_bytes: int | None = None, type: str | None = None
    ) -> None:
        self.arm("reset_download", times, after_bytes=after_bytes, type=type)

    def truncate_download(self, times: int | None = 1, type: str | None = None) -> None:
        self.arm("truncate_download", times, type=type)

    def malformed_line(self, times: int | None = 1, type: str | None = None) -> None:
        self.arm("malformed_line", times, type=type)

    def pretty_json(self, times: int | None = 1, bundle: bool = False, type: str | None = None) -> None:
        self.arm("pretty_json", times, bundle=bundle, type=type)

    def unrequested_type(self, times: int | None = 1, type: str = "Location") -> None:
        self.arm("unrequested_type", times, type=type)

    def export_fails(self, times: int | None = 1, status: int = 500) -> None:
        self.arm("export_fails", times, status=status)

    def expired_status(self, times: int | None = 1) -> None:
        self.arm("expired_status", times)

    def foreign_storage(self, times: int | None = 1) -> None:
        self.arm("foreign_storage", times)

    def revoke_tokens_after_kickoff(self, times: int | None = 1) -> None:
        self.arm("revoke_tokens_after_kickoff", times)

    def busy_export(
        self,
        seconds: float = 15.0,
        retry_after: int | None = 1,
        transient: bool = False,
        times: int | None = 1,
    ) -> None:
        self.arm("busy_export", times, seconds=seconds, retry_after=retry_after, transient=transient)

    def wrong_count(self, times: int | None = 1, type: str | None = None, delta: int = 1000) -> None:
        self.arm("wrong_count", times, type=type, delta=delta)

    def file_expired(self, times: int | None = 1) -> None:
        self.arm("file_expired", times)

    def failed_files(self, times: int | None = 1, types: tuple[str, ...] = ("Condition",)) -> None:
        self.arm("failed_files", times, types=list(types))


class RateLimiter:
    """The SMART reference server's limiter (docs/bulk-data.md "Retries and Retry-After"): each route allows
    `limit` requests a minute; past that it answers 429 for `block` seconds, with a Retry-After that
    is an absolute time, in epoch milliseconds on the first 429 and epoch seconds after that. Keyed
    by route only: every client of the sandbox has the same (loopback) address."""

    def __init__(self, limit: int, block: float = 300.0, window: float = 60.0) -> None:
        self.limit, self.block, self.window = limit, block, window
        self._lock = threading.Lock()
        self._hits: dict[str, deque[float]] = {}
        self._blocked: dict[str, tuple[float, bool]] = {}  # route -> (until, first 429 sent)

    def check(self, route: str, now: float) -> str | None:
        """None when the request may pass, else the Retry-After value of the 429."""
        with self._lock:
            until, told = self._blocked.get(route, (0.0, False))
            if now < until:
                self._blocked[route] = (until, True)
                return str(math.ceil(until)) if told else str(math.ceil(until * 1000))
            hits = self._hits.setdefault(route, deque())
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            if len(hits) >= self.limit:
                hits.clear()
                self._blocked[route] = (now + self.block, True)
                return str(math.ceil((now + self.block) * 1000))
            hits.append(now)
            return None


@dataclass(frozen=True)
class Seen:
    """One request as the sandbox saw it."""

    kind: str  # token, kickoff, status, download, delete, read, metadata, control, foreign, attachment
    method: str
    url: str
    status: int
    authorization: bool


@dataclass
class Stats:
    """Request counters: `count(kind)`, `authorization_sent(url_prefix)`, `log` of recent requests."""

    log: deque[Seen] = field(default_factory=lambda: deque(maxlen=50_000))
    counts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, seen: Seen) -> None:
        with self.lock:
            self.log.append(seen)
            self.counts[seen.kind] += 1

    def count(self, kind: str) -> int:
        return self.counts[kind]

    def requests(self, kind: str | None = None) -> list[Seen]:
        with self.lock:
            return [s for s in self.log if kind is None or s.kind == kind]

    def authorization_sent(self, url_prefix: str) -> bool:
        """Did any request to a URL starting with `url_prefix` carry an Authorization header?"""
        return any(s.authorization for s in self.requests() if s.url.startswith(url_prefix))

    def clear(self) -> None:
        with self.lock:
            self.log.clear()
            self.counts.clear()

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {
                "counts": dict(self.counts),
                "requests": [s.__dict__ for s in list(self.log)[-1000:]],
            }
