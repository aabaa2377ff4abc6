"""`pfsync sync`: for each source, export what changed, load it as it lands, then advance the checkpoint.

One source's run (`sync_source`), under its run lock:

1. Read the state. The next `_since` is the last landed export's `transactionTime` minus
   export.since_overlap (docs/bulk-data.md "Incremental sync": never the local clock; the overlap is
   harmless because loading is idempotent). No checkpoint: a full export (or, opt-in, the `lastSyncTime` of
   the Medplum Practice Fusion bot integration, which pfsync replaces: sync.adopt_seed_checkpoint).
2. Retry the loader's retry queue first, so older changes land before newer ones.
3. Group exports: read each group's members (`Group/{id}` `member[]`, or, where the server leaves
   them out as Practice Fusion does, a `_type=Patient` export of the group without `_since`),
   compare with the members recorded at the last success, and export the whole group again without
   `_since` when someone joined (docs/bulk-data.md: a `_since` export misses their history). The loader's
   unchanged-hash skip means only the new members' resources are written.
4. Record the in-flight run (its directory) in the state BEFORE kicking off; each export request
   gets `{run dir}/{request fingerprint}/` whose job.json lets the next run resume the same job.
5. Load every output file as soon as it lands (download and load overlap), apply `deleted` files
   after all outputs. Each loaded file is flushed and marked in the loader's id map; a resumed run
   skips the marked files and loads the rest (see `_export_and_load`).
6. Advance the checkpoint to the (smallest) export `transactionTime` ONLY when nothing went to the
   retry queue. Decision: with retry-queued resources the checkpoint stays put, so the next run
   re-exports the same window (cheap: unchanged resources cost no write) and drains the queue first.
   This holds even when the queue file is lost (stateless pods): nothing is ever lost. Quarantined
   resources have landed with a reason (exit 6) and do not hold the checkpoint back.

Exit code of several sources: the worst outcome (pfsync.sync.results). What a run talks to is
pfsync.sync.engines; the lease heartbeat is pfsync.sync.lock.Heartbeat.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from pfsync.core.counts import CountKey, add_counts, total
from pfsync.core.errors import (
    ExitCode,
    ExportError,
    InterruptedRunError,
    LockedError,
    PfsyncError,
    TemporaryError,
)
from pfsync.core.events import EventSink, NullSink
from pfsync.core.instants import iso, parse_iso
from pfsync.core.redact import redact
from pfsync.core.settings import Settings, SourceSettings
from pfsync.core.statedir import EXPORTS_DIR, source_dir
from pfsync.load.references import export_types
from pfsync.net.http import Clock, SystemClock, protocol_error, server_text
from pfsync.net.tokens import begin_run
from pfsync.source.bulk import ExportRequest, requests_for
from pfsync.source.exportjob import ExportDir, LandedFile
from pfsync.sync.engines import EngineFactory, Engines, LoadSummary, SyncLoader
from pfsync.sync.holders import Holder, RunLock
from pfsync.sync.lock import Heartbeat
from pfsync.sync.results import SourceResult, SyncResult, counts_of
from pfsync.sync.state import InFlight, LastRun, StateStore, SyncState

log = logging.getLogger("pfsync.sync")


# ---- one source ----------------------------------------------------------------------------------
@dataclass
class _Run:
    """Mutable bookkeeping of one source's run (the orchestrator thread and on_file callbacks)."""

    store: StateStore
    state: SyncState
    lock: RunLock
    mutex: threading.Lock = field(default_factory=threading.Lock)

    def save(self, **changes: Any) -> None:
        with self.mutex:
            self.state = replace(self.state, **changes)
            self.store.save(self.state)


def _since(state: SyncState, overlap: float) -> str | None:
    if state.transaction_time is None:
        return None
    return iso(parse_iso(state.transaction_time) - overlap)


def sync_source(
    settings: Settings,
    source: SourceSettings,
    store: StateStore,
    engines: Callable[[], Engines],
    *,
    stop: threading.Event,
    clock: Clock | None = None,
    events: EventSink | None = None,
    renew_every: float | None = None,
) -> SourceResult:
    """One run of one source. Never raises a PfsyncError: the result carries the outcome.

    `engines` builds the run's engines: it is called only once the lock is held, and what it
    built is closed at the end. Decision: a source that another run holds reports "locked" (exit 8)
    even when its engines could not be built (say a config error in its key file): building them
    costs token requests (Medplum allows 160 auth calls/min/IP) and the run holding the lock
    reports that error anyway.
    `renew_every`: seconds between lease renewals (default: the lock's own `renew_every`).
    """
    clock = clock or SystemClock()
    events = events or NullSink()
    started = clock.now()
    name = source.name
    events.emit("sync_source_start", source=name)
    try:
        lock = store.acquire(name, Holder.me(started))
    except LockedError as exc:
        events.emit("sync_locked", source=name, holder=exc.holder)
        return SourceResult(name, "locked", int(exc.exit_code), error=exc.message, hint=exc.hint)
    except PfsyncError as exc:
        return SourceResult(name, "failed", int(exc.exit_code), error=exc.message, hint=exc.hint)
    try:
        run = _Run(store, SyncState(source=name), lock)
        result = _run_holding(settings, source, run, engines, stop=stop, clock=clock, events=events,
                              started=started, renew_every=renew_every)  # fmt: skip
    finally:
        try:
            lock.release()
        except PfsyncError as exc:  # losing the release only delays the next run by the lease TTL
            log.warning("could not release the lock of %s: %s", name, exc.message)
    events.emit("sync_source_complete", **result.to_json())
    return result


def _run_holding(
    settings: Settings, source: SourceSettings, run: _Run, engines: Callable[[], Engines], *,
    stop: threading.Event, clock: Clock, events: EventSink, started: float, renew_every: float | None,
) -> SourceResult:  # fmt: skip
    """The run once its lock is held: any failure is recorded in the state and returned."""
    loaded = False
    ready: Engines | None = None
    heartbeat: Heartbeat | None = None
    try:
        run.state = run.store.load(source.name)
        loaded = True
        run.save(last_attempt=iso(started))
        ready = engines()  # now that the lock is ours (a failure is recorded in the state)
        ready.prove_credentials()  # every run, before any work
        interval = renew_every if renew_every is not None else run.lock.renew_every
        if interval:
            heartbeat = Heartbeat(run.lock, run.mutex, float(interval), source.name)
        return _run_locked(
            settings, source, run, ready, stop=stop, clock=clock, events=events, started=started
        )
    except (PfsyncError, httpx.HTTPError) as caught:
        # An httpx failure no layer below turned into a PfsyncError still gets a documented code.
        failure = caught if isinstance(caught, PfsyncError) else protocol_error(caught)
        outcome = "interrupted" if isinstance(failure, InterruptedRunError) else "failed"
        result = SourceResult(source.name, outcome, int(failure.exit_code), duration=clock.now() - started,
                              error=redact(failure.message), hint=failure.hint)  # fmt: skip
        refused = isinstance(failure, ExportError) and not isinstance(failure, TemporaryError)
        if loaded:
            _record_failure(run, result, drop_flight=refused)
        return result
    except Exception as exc:  # a bug must not stop the other sources; logged with its traceback
        log.exception("unexpected error while syncing %s", source.name)
        result = SourceResult(source.name, "failed", int(ExitCode.UNEXPECTED), duration=clock.now() - started,
                              error=f"{exc.__class__.__name__}: {server_text(str(exc))}")  # fmt: skip
        if loaded:
            _record_failure(run, result, drop_flight=False)
        return result
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if ready is not None:
            ready.close()


def _record_failure(run: _Run, result: SourceResult, *, drop_flight: bool) -> None:
    try:
        changes: dict[str, Any] = {"last_outcome": result.outcome, "last_error": result.error,
                                   "last_run": LastRun({}, result.duration, 0, result.exit_code)}  # fmt: skip
        if drop_flight:  # a refused export is not resumable: the next run kicks off afresh
            changes["in_flight"] = None
        run.save(**changes)
    except PfsyncError as exc:
        log.error("could not record the failure of %s: %s", result.source, exc.message)


def _check_stop(stop: threading.Event) -> None:
    if stop.is_set():
        raise InterruptedRunError("interrupted, resumable: progress is saved and the next run resumes")


def _run_locked(
    settings: Settings, source: SourceSettings, run: _Run, engines: Engines, *,
    stop: threading.Event, clock: Clock, events: EventSink, started: float,
) -> SourceResult:  # fmt: skip
    """Steps 1-6 of the module docstring, with the lock held and the engines built."""
    _adopt_seed(settings, run, engines, events, source.name)
    requests = requests_for(source, settings.export, since=None)
    with engines.loader() as loader:
        loader.retry_pending()  # older changes first (see module docstring)
        _check_stop(stop)
        flight, members = _plan_flight(settings, source, run, engines, requests, stop=stop, events=events,
                                       started=started)  # fmt: skip
        run.save(in_flight=flight)  # BEFORE any kick-off: a killed run resumes these jobs
        run_dir = source_dir(settings.state_dir, source.name) / flight.export_dir
        todo = requests_for(source, settings.export, since=flight.since)
        # The backfill: the same group request without _since (its fingerprint differs from the _since one).
        todo += [replace(requests[0], group_id=g, since=None) for g in flight.backfill_groups]
        transaction_times: list[str] = []
        for req in todo:
            _check_stop(stop)
            tt = _export_and_load(req, run_dir / req.fingerprint(), run, engines, loader, stop)
            if tt:
                transaction_times.append(tt)
        _check_stop(stop)
        summary = loader.finish()
        refreshed_at = loader.referenced_refreshed_at
    result = _conclude(run, source.name, summary, transaction_times, refreshed_at, members,
                       duration=clock.now() - started, now=clock.now())  # fmt: skip
    shutil.rmtree(run_dir, ignore_errors=True)  # every file landed (or is queued): disk stays flat
    return result


def _adopt_seed(settings: Settings, run: _Run, engines: Engines, events: EventSink, name: str) -> None:
    """First run, opt-in: start from the bot integration's lastSyncTime instead of a full export."""
    state = run.state
    if state.transaction_time is None and state.in_flight is None and settings.sync.adopt_seed_checkpoint:
        seed = engines.seed_checkpoint()
        if seed:
            events.emit("sync_adopt_seed_checkpoint", source=name, transactionTime=seed)
            run.save(transaction_time=seed)


def _plan_flight(
    settings: Settings, source: SourceSettings, run: _Run, engines: Engines, requests: list[ExportRequest], *,
    stop: threading.Event, events: EventSink, started: float,
) -> tuple[InFlight, dict[str, frozenset[str]] | None]:  # fmt: skip
    """The run's in-flight record (resumed or new), and each group's members for a group export
    (None otherwise). A group that gained members since the last success is backfilled."""
    flight = run.state.in_flight
    if flight is None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started))
        flight = InFlight(kind="incremental" if run.state.transaction_time else "full",
                          export_dir=f"{EXPORTS_DIR}/run-{stamp}-{uuid.uuid4().hex[:6]}",
                          since=_since(run.state, settings.export.since_overlap), started_at=iso(started))  # fmt: skip
    if not requests or requests[0].level != "group":
        return flight, None
    run_dir = source_dir(settings.state_dir, source.name) / flight.export_dir
    members: dict[str, frozenset[str]] = {}
    for req in requests:
        assert req.group_id is not None  # a group-level request always names its group
        members[req.group_id] = engines.group_members(req.group_id, run_dir / f"members-{req.group_id}")
        _check_stop(stop)
    if flight.since is not None:
        new = [g for g, m in members.items() if m - set(run.state.group_members.get(g, ()))]
        if new:
            events.emit("sync_group_backfill", source=source.name, groups=new)
        flight = replace(flight, backfill_groups=tuple(sorted(set(flight.backfill_groups) | set(new))))
    return flight, members


def _conclude(
    run: _Run, name: str, summary: LoadSummary, transaction_times: list[str], refreshed_at: float | None,
    members: dict[str, frozenset[str]] | None, *, duration: float, now: float,
) -> SourceResult:  # fmt: skip
    """The outcome of a run whose exports all landed, saved: the checkpoint advances only when
    nothing waits in the retry queue (step 6 of the module docstring)."""
    counts, quota = counts_of(summary), summary.quota_used
    queued, quarantined = total(counts, CountKey.RETRY_QUEUED), total(counts, CountKey.QUARANTINED)
    new_tt = min(transaction_times, key=parse_iso) if transaction_times else None
    advance = queued == 0 and new_tt is not None
    if queued:
        outcome, code = "failed", int(ExitCode.TEMPORARY)
        error: str | None = f"{queued} resources wait in the retry queue; checkpoint kept"
    elif quarantined:
        outcome, code, error = "partial", int(ExitCode.PARTIAL), f"{quarantined} resources quarantined"
    else:
        outcome, code, error = "ok", int(ExitCode.OK), None
    changes: dict[str, Any] = {
        "in_flight": None, "last_outcome": outcome, "last_error": error,
        "last_run": LastRun(counts, duration, quota, code, new_tt), "totals": add_counts(run.state.totals, counts),
    }  # fmt: skip
    if refreshed_at is not None:
        changes["referenced_refreshed_at"] = iso(refreshed_at)
    if advance:
        changes.update(transaction_time=new_tt, last_success=iso(now))
        if members is not None:
            changes["group_members"] = {g: tuple(sorted(m)) for g, m in members.items()}
    run.save(**changes)
    return SourceResult(name, outcome, code, counts, duration, quota, new_tt, advance, error)


def _export_and_load(
    req: ExportRequest, out_dir: Path, run: _Run, engines: Engines, loader: SyncLoader, stop: threading.Event
) -> str | None:
    deleted: list[LandedFile] = []
    load_mutex = threading.Lock()  # downloads may land in parallel; the loader takes one file at a time
    # Files handed to the loader in THIS run (a resumed export may announce a file twice).
    offered: set[str] = set()
    # Files done in an earlier, interrupted attempt of this run are skipped: `Loader.load_file`
    # returning does not mean its resources are in Medplum (Bundles keep filling across files), so a
    # file is marked only after `flush()` made everything given so far durable (written, queued, or
    # held in the id map, which the next finish writes); the mark lives in the same id map, so a
    # lost id map forgets both. The key names this run's export directory: a later run's identical
    # file is offered again (cheap: unchanged hashes cost no write) and retries what it quarantined.

    def on_file(landed: LandedFile) -> None:
        if landed.kind == "deleted":
            deleted.append(landed)  # applied after every output file of the export
            return
        if landed.kind != "output":
            return
        with load_mutex:
            if landed.sha256 in offered or stop.is_set():
                return
            key = f"{out_dir.parent.name}/{out_dir.name}:{landed.sha256}"
            if loader.is_loaded(key):
                offered.add(landed.sha256)
                return
            loader.load_file(landed.path)
            loader.flush()
            loader.mark_loaded(key)
            offered.add(landed.sha256)

    # Lets the loader fetch targets this export cannot deliver (Practitioner, Organization... of
    # a Patient-level export) as soon as a resource names them, instead of at finish.
    loader.expect_types(export_types(req.level, req.types))
    # What the export cannot deliver never changes through it: re-read the ones named (and now
    # and then all of them) so a changed Practitioner or Organization reaches Medplum too.
    loader.refresh_referenced(export_types(req.level, req.types), run.state.referenced_refreshed_at)
    tt = engines.run_export(req, out_dir, on_file)
    _check_stop(stop)
    # A resumed export may not announce files that landed before the kill: sweep the manifest.
    for landed in sorted(ExportDir(out_dir).manifest.files.values(), key=lambda f: f.path.name):
        if landed.kind == "deleted" and all(d.sha256 != landed.sha256 for d in deleted):
            deleted.append(landed)
        elif landed.kind == "output":
            on_file(landed)
        _check_stop(stop)
    for landed in deleted:  # re-applying a deletion is harmless (a resumed run may)
        loader.apply_deleted(landed.path)
        _check_stop(stop)
    return tt


# ---- many sources --------------------------------------------------------------------------------
def sync_all(
    settings: Settings,
    sources: Sequence[SourceSettings],
    store: StateStore,
    make_engines: EngineFactory,
    *,
    stop: threading.Event,
    clock: Clock | None = None,
    events: EventSink | None = None,
) -> SyncResult:
    """Every given source, `sync.parallel_sources` at a time; one failing never stops the others."""
    clock = clock or SystemClock()
    events = events or NullSink()
    started = clock.now()
    if not settings.sync.enabled:
        events.emit("sync_disabled")
        return SyncResult(())
    begin_run()  # every run proves its credentials once (pfsync.source.auth.CachedToken.prove)

    def one(src: SourceSettings) -> SourceResult:
        if not src.enabled:
            return SourceResult(src.name, "skipped", int(ExitCode.OK), error="source is disabled")
        if stop.is_set():
            return SourceResult(
                src.name, "interrupted", int(ExitCode.INTERRUPTED), error="not started: stopping"
            )
        # The lock is taken before the engines are built (see sync_source).
        return sync_source(settings, src, store, lambda: make_engines(src, stop), stop=stop, clock=clock,
                           events=events)  # fmt: skip

    workers = max(1, min(settings.sync.parallel_sources, len(sources)))
    if workers == 1:
        results = [one(s) for s in sources]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pfsync-source") as pool:
            results = list(pool.map(one, sources))
    result = SyncResult(tuple(results), clock.now() - started)
    events.emit("sync_summary", exitCode=result.exit_code, durationSeconds=round(result.duration, 3),
                sources=[r.to_json() for r in results])  # fmt: skip
    return result
