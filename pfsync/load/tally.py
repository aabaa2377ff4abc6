"""Outcomes that are not writes: counts per type, the quarantine and the retry queue.

Every resource the loader is given ends in Medplum, in the quarantine with its reason, or in the
retry queue (README, "How `pfsync sync` works"); this records the last two and counts all three.
"""

from __future__ import annotations

from collections import Counter

from pfsync.core.events import EventSink
from pfsync.core.ndjson import BadLine
from pfsync.load.pending import Pending
from pfsync.load.quarantine import WrappedLog
from pfsync.load.references import References


class Tally:
    """Counts (`counts[type][key]`), quarantine and retry queue of one load."""

    def __init__(
        self, counts: dict[str, Counter[str]], quarantine: WrappedLog, retry_queue: WrappedLog,
        *, pending: Pending, refs: References, events: EventSink, dry_run: bool,
    ) -> None:  # fmt: skip
        self._counts = counts
        self._qlog = quarantine
        self._retry_queue = retry_queue
        self._pending = pending
        self._refs = refs
        self._events = events
        self._dry_run = dry_run

    def count(self, rtype: str, key: str, n: int = 1) -> None:
        self._counts.setdefault(rtype, Counter())[key] += n

    def quarantine_line(self, bad: BadLine) -> None:
        rtype = bad.type_label
        self.count(rtype, "quarantined")
        self._events.emit(
            "load_quarantined", type=rtype, id=None, file=str(bad.path), line=bad.line, reason=bad.reason
        )
        if not self._dry_run:
            self._qlog.add(file=str(bad.path), line=bad.line, reason=bad.reason, raw=bad.raw)

    def quarantine(self, rtype: str, sid: str | None, file: str | None, line: int | None, raw: bytes,
                   reason: str, status: int | None = None) -> None:  # fmt: skip
        """Quarantined with its reason: it settles, and it is not fetched from the source again."""
        self.count(rtype, "quarantined")
        if sid is not None:
            self._refs.failed(rtype, sid)
            self._pending.settle((rtype, sid))
        self._events.emit("load_quarantined", type=rtype, id=sid, file=file, line=line, reason=reason)
        if not self._dry_run:
            self._qlog.add(file=file, line=line, reason=reason, raw=raw, status=status, rtype=rtype, sid=sid)

    def retry(self, rtype: str, sid: str, file: str | None, line: int | None, raw: bytes,
              reason: str, status: int | None = None) -> None:  # fmt: skip
        """In the retry queue (the next run tries again): it settles."""
        self._pending.settle((rtype, sid))
        self.count(rtype, "retry_queued")
        self._retry_queue.add(
            file=file, line=line, reason=reason, raw=raw, status=status, rtype=rtype, sid=sid
        )
