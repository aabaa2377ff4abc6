"""Quota pacing from Medplum's RateLimit header, and adaptive (AIMD) concurrency of Bundles.

docs/medplum.md "Quotas and 429": every response carries
`RateLimit: "requests";r=..;t=.., "fhirInteractions";r=..;t=..`; over the quota the answer (or the
rest of a batch) is 429 with `msBeforeNext` in the OperationOutcome diagnostics and no Retry-After.
A project with the quota turned off counts `fhirInteractions` down to r=0 and refuses nothing, so
r=0 alone is not throttling: when the budget looks spent and we do not know yet whether the quota
is enforced, the next Bundle is the probe, one at a time (enforced: its tail answers 429 and is
re-sent after the reset; off: it is accepted).
docs/medplum.md "Measured on a real server": concurrent creating Bundles conflict (409) and get slower. Concurrency
starts at load.max_concurrency (a project without an enforced quota is fastest at full concurrency
from the first Bundle; starting at 1 and growing cost a third of a small load), halves on
conflicts, 429s or 5xx, backs off when parallel Bundles (the median of a window of them, not one)
get slower than one at a time would be, and grows back while Bundles come back clean and fast.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field

_PART_RE = re.compile(r'"?([A-Za-z]+)"?\s*;\s*r\s*=\s*(\d+)\s*;\s*t\s*=\s*(\d+(?:\.\d+)?)')
DEFAULT_WRITE_COST = 140.0  # docs/medplum.md: a conditional PUT create inside a batch costs about 140
SEARCH_COST = 20.0
_SLOWER = 2.0  # per-entry latency this much above `inflight` x the best seen: throughput fell
_LATENCY_MIN_ENTRIES = 50  # Bundles smaller than this are not compared for latency
_LATENCY_WINDOW = 5  # Bundles whose median latency is judged at once


def parse_ratelimit(header: str | None) -> dict[str, tuple[int, float]]:
    """`"requests";r=1;t=5, "fhirInteractions";r=0;t=5` -> {name: (remaining, seconds to reset)}."""
    if not header:
        return {}
    return {m.group(1): (int(m.group(2)), float(m.group(3))) for m in _PART_RE.finditer(header)}


@dataclass
class Pacer:
    """Spends the FHIR interaction budget the server reports, without overrunning it.

    Single-threaded: the loader's main thread calls every method. `now` values come from the
    injected Clock, so tests drive it with a fake clock.
    """

    cost: float = DEFAULT_WRITE_COST  # points per write entry, learnt from RateLimit deltas
    remaining: int | None = None
    reset_at: float = 0.0
    limit: int | None = None  # largest remaining seen: the window's size, roughly
    enforced: bool | None = None  # None: not known yet
    not_before: float = 0.0
    used: float = 0.0  # points spent, from header deltas (estimated across window resets)
    probe_out: bool = False  # a probe past the budget awaits its answer (the sender clears it)

    def observe(
        self, header: str | None, *, entries: int, searches: int, now: float, throttled: bool
    ) -> None:
        """Learn from a response: its RateLimit header, the writes/searches it carried, any 429."""
        if throttled:
            self.enforced = True
        part = parse_ratelimit(header).get("fhirInteractions")
        if part is None:
            self.used += entries * self.cost + searches * SEARCH_COST
            return
        r, t = part
        reset_at = now + t
        same_window = self.remaining is not None and abs(reset_at - self.reset_at) <= 2.0
        if same_window and r == 0 and self.remaining == 0 and not throttled:
            # A counter that ran out (a quota-off project counts down to 0 and stays there,
            # docs/medplum.md "Quotas and 429") tells nothing more: estimate, as across windows.
            self.used += entries * self.cost + searches * SEARCH_COST
        elif same_window and self.remaining is not None and r <= self.remaining:
            delta = self.remaining - r
            self.used += delta
            if entries and delta > 0 and not throttled:
                spent = (delta - searches * SEARCH_COST) / entries
                self.cost = min(500.0, max(50.0, 0.7 * self.cost + 0.3 * spent))
        elif not same_window:
            self.used += entries * self.cost + searches * SEARCH_COST
        if (
            not throttled
            and self.enforced is None
            and r == 0
            and self.remaining is not None
            and self.remaining < self.cost * max(entries, 1)
        ):
            # We spent past the budget and nothing was refused: the quota is off (docs/medplum.md).
            self.enforced = False
        if r > 0:
            self.limit = max(self.limit or 0, r)
        self.remaining = r
        self.reset_at = reset_at

    def throttle(self, seconds: float, now: float) -> None:
        """Hold every request for `seconds` (a 429's msBeforeNext, or a backoff)."""
        self.not_before = max(self.not_before, now + max(0.0, seconds))

    def budget(self, now: float) -> float | None:
        """Points we may still spend in this window (None: unlimited or unknown)."""
        if self.enforced is False or self.remaining is None:
            return None
        if now >= self.reset_at:
            return float(self.limit) if self.limit else None
        return float(self.remaining)

    def allowance(self, now: float, inflight_entries: int, want: int = 1) -> tuple[int | None, float]:
        """(most write entries to send now, or None for no cap; seconds to wait first). `want`: the
        entries of the next Bundle, if nothing holds it back."""
        if now < self.not_before:
            return 0, self.not_before - now
        budget = self.budget(now)
        if budget is None:
            return None, 0.0
        free = budget - inflight_entries * self.cost
        n = int(free // self.cost)
        if self.enforced is None and n < want:
            # Not known yet whether the quota is enforced, and the budget looks spent: the next
            # Bundle is the probe, whole, one at a time. Enforced: its tail answers 429 and those
            # entries are re-sent after the reset (a refused entry is not run, nothing is spent
            # twice). Off: it is accepted at r=0 (docs/medplum.md). Shrinking Bundles to fit the budget
            # first (and probing with one entry after a drain) cost quota-off loads a round trip
            # per step and gained nothing when the quota is on.
            if self.probe_out:
                return 0, 0.0
            self.probe_out = True
            return None, 0.0
        if n >= 1:
            return n, 0.0
        return 0, max(0.05, self.reset_at - now + 0.05)

    def search_wait(self, now: float) -> float:
        """Seconds to wait before a search (20 points) may be sent."""
        if now < self.not_before:
            return self.not_before - now
        budget = self.budget(now)
        if budget is None or budget >= SEARCH_COST or self.enforced is None:
            return 0.0
        return max(0.05, self.reset_at - now + 0.05)


@dataclass
class Concurrency:
    """AIMD over the number of Bundles in flight, between 1 and `maximum` (starts at `maximum`)."""

    maximum: int
    limit: float = 0.0  # 0: start at `maximum`
    best_per_entry: float | None = None  # fastest seconds per entry seen (median of a window)
    recent: list[tuple[float, int]] = field(default_factory=list)  # (seconds per entry, in flight)

    def __post_init__(self) -> None:
        if self.limit <= 0:
            self.limit = float(max(1, self.maximum))

    @property
    def slots(self) -> int:
        return max(1, min(self.maximum, int(self.limit)))

    def clean(self, entries: int, elapsed: float, inflight: int) -> None:
        """A Bundle came back without conflicts or 429s: grow, unless latency grew with it.
        `inflight`: the most Bundles in flight (this one included) while it was."""
        if entries < _LATENCY_MIN_ENTRIES:
            # A small Bundle's time is mostly per-request overhead: its per-entry latency says
            # nothing about load (a 1-entry nudge looked 100x slower and halved the concurrency).
            self.limit = (
                min(float(self.maximum), self.limit + 1.0 / self.limit) if entries > 0 else self.limit
            )
            return
        self.recent.append((elapsed / entries, inflight))
        if len(self.recent) < _LATENCY_WINDOW:
            return
        # One Bundle's time says little: on a busy server it moves 5x between neighbours (it waits
        # behind the others, entries differ in size), and the fastest single Bundle made a
        # yardstick that an ordinary one crossed now and then, halving concurrency for nothing.
        # The median of a window is judged against the best median seen.
        per = statistics.median(p for p, _ in self.recent)
        inflight = round(statistics.median(n for _, n in self.recent))
        self.recent.clear()
        if self.best_per_entry is None or per < self.best_per_entry:
            self.best_per_entry = per
        if inflight > 1 and per > self.best_per_entry * inflight * _SLOWER:
            # Parallel Bundles made the server slower than one Bundle at a time would be: back off.
            # Not when they merely gained nothing (a server that works through Bundles one by one
            # takes `inflight` times as long for each): Bundles waiting there keep it busy while
            # we prepare the next one, which is what a full concurrency buys.
            self.limit = max(1.0, self.limit * 0.75)
        else:
            self.limit = min(float(self.maximum), self.limit + _LATENCY_WINDOW / self.limit)

    def congested(self) -> None:
        """Conflicts, 429s or server errors: halve."""
        self.limit = max(1.0, self.limit / 2.0)
        self.recent.clear()  # latency measured at the old concurrency
