"""Counters of the target sandbox, for tests and benchmarks to assert on (never on timing)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any


class Stats:
    """token_requests, requests per (method, kind), writes (new versions), noops, batch entries by status."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.token_requests = 0
        self.requests: Counter[tuple[str, str]] = Counter()
        self.writes = 0
        self.noops = 0
        self.entries: Counter[str] = Counter()
        self.faults_fired: Counter[str] = Counter()

    def request(self, method: str, kind: str) -> None:
        with self._lock:
            self.requests[(method, kind)] += 1
            if kind == "token":
                self.token_requests += 1

    def write(self, changed: bool) -> None:
        with self._lock:
            if changed:
                self.writes += 1
            else:
                self.noops += 1

    def entry(self, status: str) -> None:
        with self._lock:
            self.entries[status] += 1

    def fault(self, name: str) -> None:
        with self._lock:
            self.faults_fired[name] += 1

    def reset(self) -> None:
        with self._lock:
            self.token_requests = self.writes = self.noops = 0
            self.requests.clear()
            self.entries.clear()
            self.faults_fired.clear()

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "token_requests": self.token_requests,
                "requests": {f"{m} {k}": n for (m, k), n in sorted(self.requests.items())},
                "writes": self.writes,
                "noops": self.noops,
                "entries": dict(self.entries),
                "faults_fired": dict(self.faults_fired),
            }
