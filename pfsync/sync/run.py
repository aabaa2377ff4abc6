"""`pfsync sync`: for each source, export what changed, load it as it lands, then advance the checkpoint.

One source's run (`sync_source`), under its run lock:

1. Read the state. The next `_since` is the last landed export's `transactionTime` minus
   export.since_overlap (docs/bulk-data.md "Incremental sync": never the local clock; the overlap is
   harmless because loading is idempotent). No checkpoint: a full export (or, opt-in, the seed
   integration's `lastSyncTime`: sync.adopt_seed_checkpoint).
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

Exit code of several sources: the worst outcome, in `SEVERITY` order (see `worst_exit_code`).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import httpx

from pfsync.core.errors import (
    ExitCode,
    ExportError,
    InterruptedRunError,
    LockedError,
    PfsyncError,
    TemporaryError,
    UsageError,
)
from pfsync.core.events import EventSink, NullSink
from pfsync.core.redact import redact
from pfsync.core.settings import Settings, SourceSettings
from pfsync.load.references import export_types
from pfsync.net.http import Clock, SystemClock, protocol_error, server_text
from pfsync.source.auth import begin_run
from pfsync.source.bulk import ExportRequest, requests_for
from pfsync.source.exportjob import ExportDir, LandedFile
from pfsync.sync.state import (
    Holder,
    InFlight,
    LastRun,
    StateStore,
    SyncState,
    add_counts,
    iso,
    parse_iso,
    source_dir,
)

log = logging.getLogger("pfsync.sync")

# Worst first. Interrupted: the operator stopped us, say so. Config/auth/state/unexpected need a
# human. An export the source refused, then a temporary failure (the next run may well succeed),
# then locked (another run is doing the work), partial (landed, some quarantined), ok.
SEVERITY: tuple[int, ...] = (
    ExitCode.INTERRUPTED, ExitCode.CONFIG, ExitCode.AUTH, ExitCode.STATE, ExitCode.UNEXPECTED,
    ExitCode.USAGE, ExitCode.EXPORT_FAILED, ExitCode.TEMPORARY, ExitCode.LOCKED, ExitCode.PARTIAL, ExitCode.OK,
)  # fmt: skip
COUNT_KEYS = ("created", "updated", "unchanged", "deleted", "quarantined", "retry_queued")


def worst_exit_code(codes: Iterable[int]) -> int:
    """The most severe of several exit codes (unknown codes rank just after UNEXPECTED)."""
    rank = {int(c): i for i, c in enumerate(SEVERITY)}
    default = rank[ExitCode.UNEXPECTED] + 0.5
    return min(codes, key=lambda c: rank.get(int(c), default), default=int(ExitCode.OK))


# ---- the engines one run needs (real ones in pfsync.sync.live; fakes in tests) ------------------
class LoaderLike(Protocol):
    def retry_pending(self) -> Any: ...
    def load_file(self, path: Path) -> Any: ...
    def apply_deleted(self, path: Path) -> Any: ...
    def finish(self) -> Any: ...


@runtime_checkable
class FileMarks(Protocol):
    """A loader that can make a file durable and remember it (pfsync.load.loader.Loader; optional)."""

    def flush(self) -> Any: ...
    def mark_loaded(self, key: str) -> Any: ...
    def is_loaded(self, key: str) -> bool: ...


class Engines(Protocol):
    """What a run of one source talks to. `close()` releases clients."""

    def run_export(
        self, request: ExportRequest, out_dir: Path, on_file: Callable[[LandedFile], None]
    ) -> str | None:
        """Run (or resume) one export into out_dir; returns the manifest's transactionTime."""
        ...

    def loader(self) -> AbstractContextManager[LoaderLike]: ...
    def group_members(self, group_id: str, scratch: Path) -> frozenset[str]: ...
    def seed_checkpoint(self) -> str | None: ...
    def close(self) -> None: ...


EngineFactory = Callable[[SourceSettings, threading.Event], Engines]


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


def counts_of(load_result: Any) -> tuple[dict[str, dict[str, int]], int]:
    """Per-type counts and quota used from the loader's LoadResult."""
    raw = getattr(load_result, "by_type", None) or getattr(load_result, "counts", None) or {}
    counts: dict[str, dict[str, int]] = {}
    for rtype, c in dict(raw).items():
        get = c.get if isinstance(c, dict) else (lambda k, _c=c: getattr(_c, k, 0))
        counts[str(rtype)] = {k: int(get(k, 0) or 0) for k in COUNT_KEYS}
    return counts, int(getattr(load_result, "quota_used", 0) or 0)


def _total(counts: dict[str, dict[str, int]], key: str) -> int:
    return sum(c.get(key, 0) for c in counts.values())


# ---- selecting sources ---------------------------------------------------------------------------
def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` with 0 <= I < N (0-based: Kubernetes' JOB_COMPLETION_INDEX runs 0..N-1)."""
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise UsageError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text}: need 0 <= I < N")
    return i, n


def shard_of(name: str, n: int) -> int:
    """Stable across runs, machines and Python versions (not `hash()`): sha256 of the name, mod N."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % n


def select_sources(
    settings: Settings, name: str | None = None, shard: str | None = None
) -> list[SourceSettings]:
    if not settings.sources:
        settings.source(None)  # raises the one clear "no source is configured" ConfigError
    chosen = [settings.source(name)] if name else list(settings.sources)
    if shard:
        i, n = parse_shard(shard)
        chosen = [s for s in chosen if shard_of(s.name, n) == i]
    return chosen


# ---- one source ----------------------------------------------------------------------------------
@dataclass
class _Run:
    """Mutable bookkeeping of one source's run (the orchestrator thread and on_file callbacks)."""

    store: StateStore
    state: SyncState
    lock: Any
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
    engines: Engines | Callable[[], Engines],
    *,
    stop: threading.Event,
    clock: Clock | None = None,
    events: EventSink | None = None,
    renew_every: float | None = None,
) -> SourceResult:
    """One run of one source. Never raises a PfsyncError: the result carries the outcome.

    `engines` may be a factory: it is then called only once the lock is held, and closed at the
    end. Decision: a source that another run holds reports "locked" (exit 8) even when its engines
    could not be built (say a config error in its key file): building them costs token requests
    (Medplum allows 160 auth calls/min/IP) and the run holding the lock reports that error anyway.
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
    run: _Run | None = None
    built: Engines | None = None
    heartbeat: _Heartbeat | None = None
    try:
        run = _Run(store, store.load(name), lock)
        run.save(last_attempt=iso(started))
        if hasattr(engines, "run_export"):
            ready = cast(Engines, engines)
        else:  # a factory: build the engines now that the lock is ours (a failure is recorded)
            ready = built = engines()
        prove = getattr(ready, "prove_credentials", None)
        if callable(prove):
            prove()  # pfsync.sync.live.LiveEngines.prove_credentials: every run, before any work
        interval = renew_every if renew_every is not None else getattr(lock, "renew_every", None)
        if interval:
            heartbeat = _Heartbeat(run, float(interval), name)
        result = _run_locked(
            settings, source, run, ready, stop=stop, clock=clock, events=events, started=started
        )
    except (PfsyncError, httpx.HTTPError) as caught:
        # An httpx failure no layer below turned into a PfsyncError still gets a documented code.
        failure = caught if isinstance(caught, PfsyncError) else protocol_error(caught)
        outcome = "interrupted" if isinstance(failure, InterruptedRunError) else "failed"
        result = SourceResult(
            name,
            outcome,
            int(failure.exit_code),
            duration=clock.now() - started,
            error=redact(failure.message),
            hint=failure.hint,
        )
        if run is not None:
            _record_failure(
                run,
                result,
                drop_flight=isinstance(failure, ExportError) and not isinstance(failure, TemporaryError),
            )
    except Exception as exc:  # a bug must not stop the other sources; logged with its traceback
        log.exception("unexpected error while syncing %s", name)
        result = SourceResult(name, "failed", int(ExitCode.UNEXPECTED), duration=clock.now() - started,
                              error=f"{exc.__class__.__name__}: {server_text(str(exc))}")  # fmt: skip
        if run is not None:
            _record_failure(run, result, drop_flight=False)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if built is not None:
            built.close()
        try:
            lock.release()
        except PfsyncError as exc:  # losing the release only delays the next run by the lease TTL
            log.warning("could not release the lock of %s: %s", name, exc.message)
    events.emit("sync_source_complete", **result.to_json())
    return result


class _Heartbeat:
    """Renews the run's lease every `interval` seconds on its own thread, for as long as the run lasts.

    Per-file renewal is not enough: one large file (or a slow export poll, or a Medplum Bundle
    waiting on the quota) can outlast the lease TTL, and another pod would then take over a source
    that is still being written. Renewal shares the run's mutex with state saves, so a renewal never
    writes an older state over a newer one (both go through the same If-Match chain).
    """

    def __init__(self, run: _Run, interval: float, source: str) -> None:
        self._run, self._interval, self._source = run, interval, source
        self._done = threading.Event()
        self.renewals = 0
        self._thread = threading.Thread(target=self._loop, name=f"pfsync-lease-{source}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._done.wait(self._interval):
            try:
                with self._run.mutex:
                    self._run.lock.renew()
                self.renewals += 1
            except PfsyncError as exc:  # the next state save reports a lost lease as LockedError
                log.warning("could not renew the lease of %s: %s", self._source, exc.message)
            except Exception:  # a renewal bug must not kill the thread silently
                log.exception("lease renewal of %s failed", self._source)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=max(5.0, self._interval))


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
    name, sdir = source.name, source_dir(settings.state_dir, source.name)
    state = run.state
    if state.transaction_time is None and state.in_flight is None and settings.sync.adopt_seed_checkpoint:
        seed = engines.seed_checkpoint()
        if seed:
            events.emit("sync_adopt_seed_checkpoint", source=name, transactionTime=seed)
            run.save(transaction_time=seed)
    requests = requests_for(source, settings.export, since=None)
    group_level = bool(requests) and requests[0].level == "group"
    with engines.loader() as loader:
        loader.retry_pending()  # older changes first (see module docstring)
        _check_stop(stop)
        flight = run.state.in_flight
        if flight is None:
            flight = InFlight(kind="incremental" if run.state.transaction_time else "full",
                              export_dir=f"exports/run-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(started))}-"
                                         f"{uuid.uuid4().hex[:6]}",
                              since=_since(run.state, settings.export.since_overlap), started_at=iso(started))  # fmt: skip
        run_dir = sdir / flight.export_dir
        members: dict[str, frozenset[str]] = {}
        if group_level:
            for req in requests:
                assert req.group_id is not None
                members[req.group_id] = engines.group_members(
                    req.group_id, run_dir / f"members-{req.group_id}"
                )
                _check_stop(stop)
            if flight.since is not None:
                new = [g for g, m in members.items() if m - set(run.state.group_members.get(g, ()))]
                if new:
                    events.emit("sync_group_backfill", source=name, groups=new)
                flight = replace(
                    flight, backfill_groups=tuple(sorted(set(flight.backfill_groups) | set(new)))
                )
        run.save(in_flight=flight)  # BEFORE any kick-off: a killed run resumes these jobs
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
        load_result = loader.finish()
        refreshed_at = getattr(loader, "referenced_refreshed_at", None)
    counts, quota = counts_of(load_result)
    duration = clock.now() - started
    queued, quarantined = _total(counts, "retry_queued"), _total(counts, "quarantined")
    new_tt = min(transaction_times, key=parse_iso) if transaction_times else None
    advance = queued == 0 and new_tt is not None
    if queued:
        outcome, code, error = (
            "failed",
            int(ExitCode.TEMPORARY),
            f"{queued} resources wait in the retry queue; checkpoint kept",
        )
    elif quarantined:
        outcome, code, error = "partial", int(ExitCode.PARTIAL), f"{quarantined} resources quarantined"
    else:
        outcome, code, error = "ok", int(ExitCode.OK), None
    changes: dict[str, Any] = {
        "in_flight": None, "last_outcome": outcome, "last_error": error,
        "last_run": LastRun(counts, duration, quota, code, new_tt),
    }  # fmt: skip
    changes["totals"] = add_counts(run.state.totals, counts)
    if isinstance(refreshed_at, int | float):
        changes["referenced_refreshed_at"] = iso(refreshed_at)
    if advance:
        changes.update(transaction_time=new_tt, last_success=iso(clock.now()))
        if group_level:
            changes["group_members"] = {g: tuple(sorted(m)) for g, m in members.items()}
    run.save(**changes)
    shutil.rmtree(run_dir, ignore_errors=True)  # every file landed (or is queued): disk stays flat
    return SourceResult(name, outcome, code, counts, duration, quota, new_tt, advance, error)


def _export_and_load(
    req: ExportRequest, out_dir: Path, run: _Run, engines: Engines, loader: LoaderLike, stop: threading.Event
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
    marks = loader if isinstance(loader, FileMarks) else None

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
            if marks is not None and marks.is_loaded(key):
                offered.add(landed.sha256)
                return
            loader.load_file(landed.path)
            if marks is not None:
                marks.flush()
                marks.mark_loaded(key)
            offered.add(landed.sha256)

    expect = getattr(loader, "expect_types", None)
    if callable(expect):
        # Lets the loader fetch targets this export cannot deliver (Practitioner, Organization... of
        # a Patient-level export) as soon as a resource names them, instead of at finish.
        expect(export_types(req.level, req.types))
    refresh = getattr(loader, "refresh_referenced", None)
    if callable(refresh):
        # What the export cannot deliver never changes through it: re-read the ones named (and now
        # and then all of them) so a changed Practitioner or Organization reaches Medplum too.
        refresh(export_types(req.level, req.types), run.state.referenced_refreshed_at)
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
