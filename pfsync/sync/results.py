"""How a sync ends: one `SourceResult` per source, the `SyncResult` of a run, and the exit code.

Several sources end in the worst outcome, in `SEVERITY` order (`worst_exit_code`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pfsync.core.counts import standard_row
from pfsync.core.errors import ExitCode
from pfsync.sync.engines import LoadSummary

# Worst first. Interrupted: the operator stopped us, say so. Config/auth/state/unexpected need a
# human. An export the source refused, then a temporary failure (the next run may well succeed),
# then locked (another run is doing the work), partial (landed, some quarantined), ok.
SEVERITY: tuple[int, ...] = (
    ExitCode.INTERRUPTED, ExitCode.CONFIG, ExitCode.AUTH, ExitCode.STATE, ExitCode.UNEXPECTED,
    ExitCode.USAGE, ExitCode.EXPORT_FAILED, ExitCode.TEMPORARY, ExitCode.LOCKED, ExitCode.PARTIAL, ExitCode.OK,
)  # fmt: skip


def worst_exit_code(codes: Iterable[int]) -> int:
    """The most severe of several exit codes (unknown codes rank just after UNEXPECTED)."""
    rank = {int(c): i for i, c in enumerate(SEVERITY)}
    default = rank[ExitCode.UNEXPECTED] + 0.5
    return min(codes, key=lambda c: rank.get(int(c), default), default=int(ExitCode.OK))


@dataclass(frozen=True)
class SourceResult:
    """How one source's run ended."""

    source: str
    outcome: str  # ok | partial | failed | interrupted | locked | skipped
    exit_code: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    duration: float = 0.0
    quota_used: int = 0
    transaction_time: str | None = None
    checkpoint_advanced: bool = False
    error: str | None = None
    hint: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "outcome": self.outcome, "exitCode": self.exit_code, "counts": self.counts,
                "durationSeconds": round(self.duration, 3), "quotaUsed": self.quota_used,
                "transactionTime": self.transaction_time, "checkpointAdvanced": self.checkpoint_advanced,
                "error": self.error, "hint": self.hint}  # fmt: skip


@dataclass(frozen=True)
class SyncResult:
    results: tuple[SourceResult, ...]
    duration: float = 0.0

    @property
    def exit_code(self) -> int:
        return worst_exit_code(r.exit_code for r in self.results)


def counts_of(summary: LoadSummary) -> dict[str, dict[str, int]]:
    """The load's per-type counts, every count key present (a run's state and result keep only these)."""
    return {rtype: standard_row(row) for rtype, row in summary.by_type.items()}
