"""Test doubles for the product's small interfaces (they never ship in the package).

`MemoryStateStore` stands in for a `pfsync.sync.state.StateStore`, `ListSink` for a
`pfsync.core.events.EventSink`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from pfsync.core.errors import LockedError
from pfsync.sync.holders import Holder, RunLock
from pfsync.sync.state import SyncState


@dataclass
class ListSink:
    """Keeps events in memory, in the order they were emitted (thread-safe)."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def emit(self, event: str, /, **detail: Any) -> None:
        with self._lock:
            self.events.append((event, detail))

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def of(self, name: str) -> list[dict[str, Any]]:
        return [detail for n, detail in self.events if n == name]


@dataclass
class _MemoryLock:
    """The lock a MemoryStateStore hands out: counts renewals, frees the source on release."""

    store: MemoryStateStore
    source: str
    renew_every: float | None

    def renew(self) -> None:
        self.store.renewals += 1

    def release(self) -> None:
        self.store.held.pop(self.source, None)


@dataclass
class MemoryStateStore:
    """A StateStore with state in a dict and an in-process lock."""

    backend: str = "memory"
    states: dict[str, SyncState] = field(default_factory=dict)
    held: dict[str, Holder] = field(default_factory=dict)
    saves: int = 0
    renewals: int = 0
    renew_every: float | None = None  # set to make sync renew this fake lease on a timer

    def load(self, source: str) -> SyncState:
        return self.states.get(source) or SyncState(source=source)

    def save(self, state: SyncState) -> None:
        self.saves += 1
        self.states[state.source] = state

    def acquire(self, source: str, holder: Holder) -> RunLock:
        if source in self.held:
            other = self.held[source]
            raise LockedError(f"source {source!r} is locked by {other.describe()}", holder=other.describe())
        self.held[source] = holder
        return _MemoryLock(self, source, self.renew_every)

    def holder(self, source: str) -> Holder | None:
        return self.held.get(source)


class FakeClock:
    """Time that only moves when someone sleeps: waits cost nothing and are recorded in `slept`."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds
