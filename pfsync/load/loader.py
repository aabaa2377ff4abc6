"""The Medplum loader: NDJSON in, one Medplum resource per source resource out, references rewritten.

Public API (what `pfsync load` and `pfsync sync` call):

    with Loader(source, settings.load, medplum_client, state_dir=..., source_client=...) as loader:
        loader.retry_pending()            # the retry queue of earlier runs first
        loader.load_file(path)            # any order, as files land; or load_paths([dir])
        loader.apply_deleted(path)        # a Bulk Data `deleted` file
        result = loader.finish()          # deferred references, logical upgrades, summary

Each resource: `prepare` (identity, meta, normalisation: pfsync.load.transform) -> held back in the id
map on disk while a reference target still lacks a Medplum id (files arrive in any order) ->
`render` (references rewritten, content hash) -> skipped without a request when the hash equals
what was last written -> otherwise written (pfsync.load.writes). At `finish`, held resources are
written once their targets exist; targets missing from the export are fetched from the source
(load.fetch_missing_references); what still cannot resolve becomes a logical reference
(identifier + display) and is upgraded by a later run. Nothing is dropped silently: every input
resource ends in Medplum, the quarantine or the retry queue.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from pfsync.core import tuning
from pfsync.core.counts import CountKey, full_row, total
from pfsync.core.errors import InterruptedRunError
from pfsync.core.events import EventSink, NullSink
from pfsync.core.instants import parse_iso
from pfsync.core.ndjson import BadLine, is_output_name, iter_file, iter_paths
from pfsync.core.settings import HttpSettings, LoadSettings, SourceSettings
from pfsync.core.statedir import IDMAP_FILE, QUARANTINE_FILE, RETRY_FILE, source_dir
from pfsync.load.idmap import IdMap
from pfsync.load.order import dependency_order
from pfsync.load.quarantine import QUARANTINE, RETRY, WrappedLog, is_wrapped, iter_wrapped, pending, take
from pfsync.load.writes import Writer
from pfsync.medplum.client import MedplumClient
from pfsync.net.http import Clock, SystemClock
from pfsync.source.exportjob import export_files

UNREADABLE = "(unreadable)"


@dataclass(frozen=True)
class LoadResult:
    """What a load did. `by_type[type]` has every pfsync.core.counts.COUNT_KEYS key (and a dry run's
    would_* counts)."""

    by_type: dict[str, dict[str, int]]
    normalized: dict[str, int]
    quota_used: int
    requests: int
    duration: float
    dry_run: bool = False
    logical_references: int = 0  # this run's resources that still hold logical references
    logical_references_held: int = 0  # every resource in the id map that does (all runs)
    throttled: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    def total(self, key: str) -> int:
        return total(self.by_type, key)

    @property
    def quarantined(self) -> int:
        return self.total(CountKey.QUARANTINED)

    @property
    def retry_queued(self) -> int:
        return self.total(CountKey.RETRY_QUEUED)


class Loader:
    """Loads NDJSON into Medplum for one source. Not thread-safe: call it from one thread.

    `medplum` is the source's Medplum client (pfsync.medplum.client.MedplumClient.connect: auth, pacing,
    429 waits); the id map is keyed by its FHIR base. The loader does not close it.
    `source_client` (with the source's auth) fetches attachments and missing reference targets.
    `stop` interrupts between resources and Bundles (writes in flight settle first) with
    InterruptedRunError; a rerun resumes without duplicates. `mode` overrides load.upsert_mode.
    """

    def __init__(
        self,
        source: SourceSettings,
        settings: LoadSettings,
        medplum: MedplumClient,
        *,
        state_dir: Path,
        source_client: httpx.Client | None = None,
        http: HttpSettings | None = None,
        clock: Clock | None = None,
        events: EventSink | None = None,
        dry_run: bool = False,
        stop: threading.Event | None = None,
        mode: str | None = None,
    ) -> None:
        self.source = source
        self.settings = settings
        self.dry_run = dry_run
        self._stop = stop
        self._events = events or NullSink()
        self._dir = source_dir(state_dir, source.name)
        self._idmap = IdMap(
            self._dir / IDMAP_FILE, target=medplum.server_key, cache_bytes=settings.idmap_cache_bytes,
            sqlite_cache_bytes=settings.idmap_sqlite_cache_bytes,
        )  # fmt: skip
        self.quarantine = WrappedLog(self._dir / QUARANTINE_FILE, QUARANTINE)
        self.retry_queue = WrappedLog(self._dir / RETRY_FILE, RETRY)
        self._counts: dict[str, Counter[str]] = {}
        self._writer = Writer(
            source, settings, medplum, self._idmap, self._counts, self.quarantine, self.retry_queue,
            http=http or HttpSettings(), clock=clock or SystemClock(), events=self._events, dry_run=dry_run,
            stop=stop, source_client=source_client, mode=mode or settings.upsert_mode,
        )  # fmt: skip
        self._consumed: list[Path] = []
        self._started = time.monotonic()
        self._closed = False
        tuning.relax()  # pfsync.core.tuning: the collector's pace and thread switching during a load

    # -- context manager
    def __enter__(self) -> Loader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the id map, the queue files and the worker threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.close()
        finally:
            tuning.restore()
            self._idmap.close()
            self.quarantine.close()
            self.retry_queue.close()

    # -- loading
    def load_paths(self, paths: Sequence[Path]) -> None:
        """Load files and directories, referenced types first (derived from the data)."""
        files = list(iter_paths(list(paths)))
        if len(files) > 1:
            # Whether Medplum holds any resource of a type new to the id map is asked as the scan
            # finds the type, while the server is idle, not when the type's first resource is read
            # (then the answer waits behind our own Bundles, and every resource of the type with it).
            files = dependency_order(
                files, self._idmap, self._writer.context, self._check_stop, self._writer.probe_ahead
            )
            if not any(is_wrapped(f) for f in files):
                # The scan noted every identity of the input: a target it did not see will not
                # arrive, so it is fetched from the source as soon as something names it.
                self.expect_types(())
        for path in files:
            self.load_file(path)

    def load_file(self, path: Path) -> None:
        """Load one NDJSON file (plain or gzip; an export file, any NDJSON, or a quarantine/retry file).

        Safe to call repeatedly as files arrive, in any order: resources whose reference targets
        have no Medplum id yet are held on disk until they do (at the latest, until `finish`)."""
        wrapped = is_wrapped(path)
        if wrapped and path.resolve() in (self.quarantine.path.resolve(), self.retry_queue.path.resolve()):
            # Replaying our own queue: move it aside so new failures start a fresh file; the
            # copy aside is deleted only once everything in it has landed (finish).
            aside = take(path)
            if aside is None:
                return
            self._consumed.append(aside)
            path = aside
        items = iter_wrapped(path) if wrapped else iter_file(path)
        self._events.emit("load_file_start", file=str(path))
        n = 0
        for item in items:
            n += 1
            if n % 256 == 0:
                self._check_stop()
            if isinstance(item, BadLine):
                self._writer.quarantine_line(item)
                continue
            self._writer.ingest(item.resource, str(item.path), item.line, item.raw)
        self._writer.settle()
        self._events.emit("load_file_complete", file=str(path), resources=n)

    def expect_types(self, types: Iterable[str] | None) -> None:
        """Hint: from now on the input brings only resources of these types (calls add up; None:
        unknown again). A reference target of another type that no input has named is then fetched
        from the source right away, batched per type, instead of at `finish`. Without the hint
        nothing is fetched before `finish`; either way each resource is written once.
        For an export, pass `pfsync.load.references.export_types(level, types)`."""
        refs = self._writer.refs
        if types is None:
            refs.expected = None
        else:
            refs.expected = (refs.expected or set()) | set(types)

    def refresh_referenced(self, delivered: Iterable[str] | None, last_whole: str | None = None) -> None:
        """Hint from `pfsync sync`: the export delivers only these types (None: cannot tell). Reference
        targets of other types that Medplum already holds are re-read from the source when a
        resource of this run names them, and all of them when `last_whole` (the time of the last
        such whole-set pass, kept in the sync state) is older than `refresh_referenced_after`
        (pfsync.load.references, "Refresh"); unchanged ones cost no write. After `finish`,
        `referenced_refreshed_at` tells when this run's whole-set pass started (None: none ran)."""
        if delivered is None or not self.settings.fetch_missing_references or self.dry_run:
            return
        last = parse_iso(last_whole) if last_whole else None
        self._writer.refs.refresh_outside(delivered, self.settings.refresh_referenced_after, last)

    @property
    def referenced_refreshed_at(self) -> float | None:
        return self._writer.refs.whole_refreshed_at

    def flush(self) -> None:
        """Make everything given so far durable; returns when every resource of every `load_file`,
        `retry_pending` and `apply_deleted` call so far is one of:

        - written to Medplum, its Medplum id committed to the id map (idmap.sqlite);
        - in the quarantine or the retry queue file (flushed);
        - held in the id map (`deferred`, committed) because a reference target has no Medplum id
          yet: the next `finish` of any Loader on the same state directory and Medplum server
          writes it (this run's, or a later run's after a crash).

        Costs one full drain of the Bundles in flight (concurrency drops to zero once), so call it
        at file boundaries, not per resource. Held resources whose targets have arrived are written
        first. Durable against a crash of the process (SQLite WAL, synchronous=NORMAL; an OS crash
        may lose the last commit, which only costs searches: the id map is a cache). If the state
        directory is lost, so are the held resources: keep file marks in the same id map
        (`mark_loaded`) so both are lost together."""
        self._check_stop()
        self._writer.flush()

    def mark_loaded(self, key: str) -> None:
        """Record (in the id map, with the held resources) that an input file is done: call it with
        e.g. the file's sha256 right after `flush()` returned. `is_loaded(key)` tells a resumed run
        it may skip that file; a lost or reset id map forgets the marks with the held resources."""
        self._idmap.mark_loaded(key)
        self._idmap.commit()

    def is_loaded(self, key: str) -> bool:
        """Whether `mark_loaded(key)` was recorded on this state directory (for this Medplum)."""
        return self._idmap.is_loaded(key)

    def apply_deleted(self, path: Path) -> None:
        """Apply a Bulk Data `deleted` file (Bundles of DELETE entries, `request.url = Type/id`)
        as load.deletes says: apply (delete in Medplum), tag, or ignore."""
        for item in iter_file(path):
            self._check_stop()
            if isinstance(item, BadLine):
                self._writer.quarantine_line(item)
                continue
            self._writer.delete_request(item.resource, str(item.path), item.line, item.raw)
        self._writer.settle()

    def retry_pending(self) -> None:
        """Load the retry queue left by earlier runs (before anything newer)."""
        for aside in pending(self.retry_queue.path):
            self._replay(aside)
        fresh = take(self.retry_queue.path)
        if fresh is not None:
            self._replay(fresh)

    def _replay(self, aside: Path) -> None:
        self._consumed.append(aside)
        for item in iter_wrapped(aside):
            self._check_stop()
            if isinstance(item, BadLine):
                self._writer.quarantine_line(item)
            else:
                self._writer.ingest(item.resource, str(item.path), item.line, item.raw)
        self._writer.settle()

    def finish(self) -> LoadResult:
        """Write everything held back, resolve what can be resolved, and return the summary."""
        self._check_stop()
        self._writer.finish()
        for aside in self._consumed:
            aside.unlink(missing_ok=True)
        self._consumed.clear()
        self.quarantine.close()
        self.retry_queue.close()
        result = self._result()
        self._events.emit(
            "load_complete",
            created=result.total("created"), updated=result.total("updated"),
            unchanged=result.total("unchanged"), deleted=result.total("deleted"),
            quarantined=result.quarantined, retry_queued=result.retry_queued,
            quota_used=result.quota_used, requests=result.requests, seconds=round(result.duration, 3),
        )  # fmt: skip
        return result

    def _result(self) -> LoadResult:
        by_type = {t: full_row(c) for t, c in sorted(self._counts.items())}
        w = self._writer
        return LoadResult(
            by_type=by_type, normalized=dict(w.fixes), quota_used=int(w.quota_used()), requests=w.requests(),
            duration=time.monotonic() - self._started, dry_run=self.dry_run,
            logical_references=len(w.refs.logical_this_run),
            logical_references_held=self._idmap.holds.count("logical"), throttled=w.throttled(), stats=w.stats(),
        )  # fmt: skip

    def _check_stop(self) -> None:
        if self._stop is not None and self._stop.is_set():
            raise InterruptedRunError("load stopped; a rerun resumes without duplicates")


def load(loader: Loader, paths: Iterable[Path], *, retry_first: bool = False) -> LoadResult:
    """`pfsync load`: the given files or directories, then finish (quarantine files are recognised)."""
    if retry_first:
        loader.retry_pending()
    paths = list(paths)
    # An export directory's `deleted` files are applied after every resource file (as sync does),
    # and a deleted.<n>.ndjson named on the command line is applied, never loaded as resources.
    deleted = [
        p for p in paths if p.is_file() and p.name.startswith("deleted.") and not is_output_name(p.name)
    ]
    for directory in (p for p in paths if p.is_dir()):
        deleted.extend(export_files(directory).deleted)
    loader.load_paths([p for p in paths if p not in deleted])
    for path in deleted:
        loader.apply_deleted(path)
    return loader.finish()
