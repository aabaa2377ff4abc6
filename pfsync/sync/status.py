"""`pfsync status`: what the last runs of each source did, and whether the source is healthy.

Healthy means: the source (and sync as a whole) is enabled, its last run succeeded (outcome ok or
partial: the checkpoint advanced, quarantined resources are counted separately), and its last
success is not older than sync.stale_after. Monitors use `--json` and the exit code (9 when any
reported source is unhealthy), so it can be a liveness or alerting probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pfsync.core.errors import StateError
from pfsync.core.instants import parse_iso
from pfsync.core.settings import Settings
from pfsync.core.statedir import QUARANTINE_FILE, source_dir
from pfsync.sync.state import InFlight, StateStore, SyncState

SUCCESS_OUTCOMES = ("ok", "partial")


@dataclass(frozen=True)
class SourceStatus:
    """One source's status row (also the `--json` object and the metrics' input)."""

    source: str
    enabled: bool
    healthy: bool
    reasons: tuple[str, ...]
    transaction_time: str | None
    last_attempt: str | None
    last_success: str | None
    last_attempt_age: float | None
    last_success_age: float | None
    last_outcome: str | None
    last_error: str | None
    in_flight: str | None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    duration_seconds: float | None = None
    quota_used: int | None = None
    quarantine_size: int = 0
    retry_queue_size: int = 0
    lock_holder: str | None = None
    totals: dict[str, dict[str, int]] = field(default_factory=dict)  # cumulative (metrics counter)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source, "enabled": self.enabled, "healthy": self.healthy, "reasons": list(self.reasons),
            "transactionTime": self.transaction_time, "lastAttempt": self.last_attempt,
            "lastSuccess": self.last_success, "lastAttemptAgeSeconds": self.last_attempt_age,
            "lastSuccessAgeSeconds": self.last_success_age, "lastOutcome": self.last_outcome,
            "lastError": self.last_error, "inFlight": self.in_flight, "counts": self.counts,
            "durationSeconds": self.duration_seconds, "quotaUsed": self.quota_used,
            "quarantineSize": self.quarantine_size, "retryQueueSize": self.retry_queue_size,
            "lockHolder": self.lock_holder, "totals": self.totals,
        }  # fmt: skip

    @property
    def last_success_epoch(self) -> float | None:
        return parse_iso(self.last_success) if self.last_success else None


def count_lines(path: Path) -> int:
    """Non-empty lines of an NDJSON file (0 when absent), read in chunks: files can be large."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from None
    count, last = 0, b"\n"
    with fh:
        while chunk := fh.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (0 if last == b"\n" else 1)


def _in_flight_text(flight: InFlight) -> str:
    """ "full export in exports/run-1, started ..." ("since" is kept for the export's _since)."""
    window = f" of changes since {flight.since}" if flight.since else ""
    return f"{flight.kind} export{window} in {flight.export_dir}, started {flight.started_at}"


def _age(when: str | None, now: float) -> float | None:
    """Whole seconds since `when` (a status is read by people and probes, not timed)."""
    if not when:
        return None
    try:
        return float(round(max(0.0, now - parse_iso(when))))
    except StateError:
        return None


def _duration(seconds: float) -> float:
    """A run's duration to the millisecond: as the README states for `status --json`."""
    return round(seconds, 3)


def source_status(settings: Settings, store: StateStore, name: str, now: float) -> SourceStatus:
    """The status of one configured source (reads its state, queue files and lock)."""
    src = settings.source(name)
    state: SyncState = store.load(name)
    enabled = src.enabled and settings.sync.enabled
    reasons: list[str] = []
    if not settings.sync.enabled:
        reasons.append("sync is disabled (sync.enabled=false)")
    elif not src.enabled:
        reasons.append("source is disabled")
    if state.last_outcome is None:
        reasons.append("never ran")
    elif state.last_outcome not in SUCCESS_OUTCOMES:
        reasons.append(
            f"last run {state.last_outcome}" + (f": {state.last_error}" if state.last_error else "")
        )
    success_age = _age(state.last_success, now)
    if state.last_outcome is not None and success_age is None:
        reasons.append("never succeeded")
    elif success_age is not None and success_age > settings.sync.stale_after:
        reasons.append(
            f"stale: last success {success_age / 3600:.1f} h ago (limit {settings.sync.stale_after / 3600:.1f} h)"
        )
    directory = source_dir(settings.state_dir, name)
    holder = store.holder(name)
    run = state.last_run
    return SourceStatus(
        source=name, enabled=enabled, healthy=not reasons, reasons=tuple(reasons),
        transaction_time=state.transaction_time, last_attempt=state.last_attempt,
        last_success=state.last_success, last_attempt_age=_age(state.last_attempt, now),
        last_success_age=success_age, last_outcome=state.last_outcome, last_error=state.last_error,
        in_flight=None if state.in_flight is None else _in_flight_text(state.in_flight),
        counts={t: dict(c) for t, c in run.counts.items()} if run else {},
        duration_seconds=_duration(run.duration_seconds) if run else None, quota_used=run.quota_used if run else None,
        quarantine_size=count_lines(directory / QUARANTINE_FILE),
        retry_queue_size=count_lines(directory / state.retry_queue),
        lock_holder=holder.describe() if holder else None,
        totals={t: dict(c) for t, c in state.totals.items()},
    )  # fmt: skip


def collect_status(
    settings: Settings, store: StateStore, names: Sequence[str], now: float
) -> list[SourceStatus]:
    return [source_status(settings, store, name, now) for name in names]
