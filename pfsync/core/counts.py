"""What happened to each resource of a run, counted per type: the one list of count keys.

A run's counts are `{resource type: {count key: n}}` (`CountsByType`). The loader produces them,
`pfsync sync` keeps them in the state (last run, and totals over every completed run), and
`pfsync status`, the metrics and the CLI tables show them, always in `COUNT_KEYS` order.
Imports nothing of pfsync, so every layer may use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Final, TypeAlias


class CountKey(StrEnum):
    """Where a resource ended (a str: `counts["created"]` and `counts[CountKey.CREATED]` agree)."""

    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"  # skipped by content hash: no request
    DELETED = "deleted"
    QUARANTINED = "quarantined"  # landed in the quarantine file with its reason
    RETRY_QUEUED = "retry_queued"  # sent again by the next run; holds the checkpoint back


COUNT_KEYS: Final[tuple[CountKey, ...]] = tuple(CountKey)

CountsByType: TypeAlias = Mapping[str, Mapping[str, int]]


def full_row(row: Mapping[str, int]) -> dict[str, int]:
    """Every count key in order (0 when absent), then any other keys the row has (dry-run `would_*`)."""
    return {k.value: int(row.get(k, 0)) for k in COUNT_KEYS} | {
        k: int(v) for k, v in row.items() if k not in COUNT_KEYS
    }


def standard_row(row: Mapping[str, int]) -> dict[str, int]:
    """Exactly the count keys, in order (0 when absent)."""
    return {k.value: int(row.get(k, 0)) for k in COUNT_KEYS}


def total(counts: CountsByType, key: str) -> int:
    """One count key summed over every type."""
    return sum(int(row.get(key, 0)) for row in counts.values())


def add_counts(totals: CountsByType, counts: CountsByType) -> dict[str, dict[str, int]]:
    """`totals` plus one run's per-type counts (for the cumulative totals in the sync state)."""
    out = {t: dict(c) for t, c in totals.items()}
    for rtype, row in counts.items():
        into = out.setdefault(rtype, {})
        for key, value in row.items():
            into[key] = into.get(key, 0) + int(value)
    return out
