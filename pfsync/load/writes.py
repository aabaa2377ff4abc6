"""The loader's write path: a resource from read to written, through the pending states.

Each resource is prepared (pfsync.load.transform), then waits while a reference target has no Medplum
id yet (parked in memory while the target is coming, deferred on disk otherwise: pfsync.load.pending
names these states and holds them; pfsync.load.references decides what a resource waits for), has its
attachments copied (pfsync.load.attachments), is rendered with its references rewritten, and is routed
to a request (pfsync.load.routing) that the sender sends in Bundles (pfsync.medplum.upsert). Collaborators
answer questions and return decisions; the writer alone moves resources from state to state. The settle
points (`settle` at the end of a file, `flush`, `finish`) take back what was deferred and commit the id map.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import orjson

from pfsync.core.events import EventSink
from pfsync.core.ndjson import BadLine
from pfsync.core.settings import HttpSettings, LoadSettings, SourceSettings
from pfsync.load.attachments import Attachments
from pfsync.load.emit import Emitter
from pfsync.load.holds import Held
from pfsync.load.idmap import IdMap
from pfsync.load.parking import Leave, Parking
from pfsync.load.pending import Pending, Waiting
from pfsync.load.quarantine import WrappedLog
from pfsync.load.references import References
from pfsync.load.routing import Router
from pfsync.load.tally import Tally
from pfsync.load.transform import TransformContext, TransformError, prepare
from pfsync.medplum.asyncbatch import AsyncBatchRunner
from pfsync.medplum.client import MedplumClient
from pfsync.medplum.lookup import Searcher
from pfsync.medplum.upsert import BatchSender
from pfsync.net.http import Clock, RetryPolicy

_FLUSH_ROUNDS = 20
_FETCH_ROUNDS = 5  # rounds of fetches of missing targets at finish (each may name new ones)
_NUDGE_EVERY = 50


class Writer:
    """Owned by Loader; see pfsync.load.loader for the public API."""

    def __init__(
        self, source: SourceSettings, settings: LoadSettings, medplum: MedplumClient, idmap: IdMap,
        counts: dict[str, Counter[str]], quarantine: WrappedLog, retry_queue: WrappedLog, *,
        http: HttpSettings, clock: Clock, events: EventSink, dry_run: bool, stop: threading.Event | None,
        source_client: httpx.Client | None, mode: str,
    ) -> None:  # fmt: skip
        if mode not in ("direct", "conditional"):
            raise ValueError(f"unknown upsert mode {mode!r}")
        self.context = TransformContext(source, normalize=settings.normalize)
        self._park_max_bytes = settings.park_max_bytes  # what parked resources may hold in memory
        self._idmap = idmap
        self._events = events
        self._dry_run = dry_run
        self.fixes: Counter[str] = Counter()
        policy = RetryPolicy.from_settings(http)
        # The source's one Medplum client: its Pacer is spent by searches and Bundles alike (this load's from here).
        self.medplum = medplum
        self.pacer = self.medplum.pacer
        self._used_before = self.pacer.used
        self._searcher = Searcher(self.medplum)
        self.refs = References(idmap, self.context, source_client if settings.fetch_missing_references else None,
                               clock=clock, retry=policy)  # fmt: skip
        self._pending = Pending()
        self._tally = Tally(counts, quarantine, retry_queue, pending=self._pending, refs=self.refs,
                            events=events, dry_run=dry_run)  # fmt: skip
        self._sender: BatchSender | None = None  # called through the router, which takes its reports
        if not dry_run:
            runner = None
            if settings.async_batch:
                runner = AsyncBatchRunner(self.medplum, clock, max_bytes=settings.async_max_bytes)
            self._sender = BatchSender(
                self.medplum, max_bytes=settings.async_max_bytes if runner else settings.bundle_max_bytes,
                max_entries=10 * settings.bundle_max_entries if runner else settings.bundle_max_entries,
                max_concurrency=settings.max_concurrency, clock=clock, retry=policy,
                events=events, stop=stop, async_runner=runner,
            )  # fmt: skip
        self._router = Router(self.context, idmap, self._searcher, pending=self._pending, refs=self.refs,
                              tally=self._tally, events=events, mode=mode, deletes=settings.deletes,
                              dry_run=dry_run, sender=self._sender)  # fmt: skip
        attachments = (Attachments(self.medplum, source_client, idmap, settings, self.context, clock=clock,
                                   dry_run=dry_run) if settings.attachments else None)  # fmt: skip
        self._emitter = Emitter(self.context, attachments, pending=self._pending, refs=self.refs, router=self._router,
                                tally=self._tally, pacer=self.pacer, events=events)  # fmt: skip
        self._parking = Parking(self._pending, self.refs, sending=self._sender is not None)

    # -- per resource
    def quarantine_line(self, bad: BadLine) -> None:
        self._tally.quarantine_line(bad)

    def ingest(self, resource: dict[str, Any], file: str | None, line: int | None, raw: bytes) -> None:
        """One source resource, as read."""
        due = self._take(resource, file, line, raw)
        if due is not None:
            self._follow(due)

    def _take(self, resource: dict[str, Any], file: str | None, line: int | None, raw: bytes,
              *, final: bool = False, first: bool = True, fetched: bool = False) -> Due:  # fmt: skip
        """One resource into the write path. `final`: write now even if targets lack ids (logical
        refs); `first`: as read (not a deferred one taken back); `fetched`: fetched by reference
        (noted in the id map for `pfsync verify`). -> which queued fetches from the source are due
        now (the caller fetches them: a resource taken in during a fetch never starts another)."""
        rtype = str(resource.get("resourceType"))
        sid = resource.get("id")
        try:
            p = prepare(resource, self.context)
        except TransformError as exc:
            self._tally.quarantine(rtype, sid if isinstance(sid, str) else None, file, line, raw, str(exc))
            return None
        if first and p.fixes:
            self.fixes[p.type] += p.fixes
        if fetched and not self._dry_run:
            self._idmap.note_fetched(p.type, p.sid)
        row = self._idmap.get(p.type, p.sid)
        if row is None:
            self._idmap.seen(p.type, p.sid)
        if (row is None or row.mid is None) and self._router.probes_needed:
            # Asked as soon as the type is read, not when its first resource can be written: by
            # then it would wait behind our Bundles on the critical path of every dependent type.
            self._router.probes.ask(p.type)
        self._take_outcomes()
        self._pending.replace((p.type, p.sid))  # this newer copy replaces a parked or copying one
        if final or self._dry_run:
            self._emitter.emit(Waiting(p, file, line, raw))
            return None
        return self._wait_or_emit(Waiting(p, file, line, raw))

    def _take_outcomes(self) -> None:
        """Take in what came back meanwhile (probes, Bundles, copies) and act on it: while a file
        of dependants is read (and parked) the targets' ids arrive and the server gets the next
        Bundle, not only when a Bundle fills."""
        if self._router.probes.waiting:
            self._router.probed(block=False)  # what waits for an answered probe must not wait
        if self._sender is not None:
            self._router.poll()
            if self._emitter.copying:
                self._emitter.copied(block=False)
            if self._pending.woke:
                self._unpark()  # what waited for the outcomes just taken in

    def _wait_or_emit(self, item: Waiting) -> Due:
        """Written once, when its targets have ids (pfsync.load.references), not now and again later.
        Targets that are coming come back within a Bundle or two: it is parked for them (bounded);
        anything else waits on disk (deferred)."""
        waits = self.refs.waits(item.p)
        if not waits:
            self._emitter.emit(item)
            return None
        if self._pending.parked_bytes < self._park_max_bytes and all(self._parking.coming(k) for k in waits):
            parked = self._pending.park(item, waits[0])
            if parked % _NUDGE_EVERY == 1 and self._sender is not None:
                # Targets to fetch from the source are fetched now, not when a full request's
                # worth is queued (a Patient-level export names only a few Organizations:
                # everything would wait behind them on disk until the end), and a partial Bundle
                # of targets must not sit in the buffer.
                return "nudge"
            return None
        self.refs.defer(item.p, item.file, item.line, item.raw, waits)
        self._pending.settle(item.key)  # not coming any more: what is parked for it looks again
        return "full"

    def _follow(self, due: Due) -> None:
        """Do what a resource taken in asked for (see `Due`)."""
        if due is None or self._dry_run:
            return
        self._fetch_queued(full_only=due == "full")
        if due == "nudge":
            self._router.nudge()

    def _fetch_queued(self, *, full_only: bool) -> bool:
        """Fetch the queued missing targets (`full_only`: only types with a full request's worth)
        and take them in; -> whether anything was fetched."""
        fetched = False
        while types := self.refs.fetch_types(full_only=full_only):
            for rtype in types:
                chunk = self.refs.take_chunk(rtype)
                if chunk:
                    self._fetch(rtype, chunk)
                    fetched = True
        return fetched

    def _fetch(self, rtype: str, ids: list[str]) -> None:
        """Fetch these targets from the source and take them in; those the source did not have
        settle (what is parked for them is written with logical references now)."""
        missing = set(ids)
        self._pending.fetching = {(rtype, i) for i in ids}
        try:
            for resource in self.refs.fetch(rtype, ids):
                self._tally.count(rtype, "fetched")
                sid = resource["id"]
                missing.discard(sid)
                raw = orjson.dumps(resource)
                due = self._take(resource, f"{self.context.base}/{rtype}", 0, raw, fetched=True)
                if due == "nudge":
                    # The fetches it asks for are the caller's loop; a partial Bundle goes out now.
                    self._router.nudge()
                self._pending.fetching.discard((rtype, sid))  # written, parked or deferred by now
        finally:
            self._pending.fetching = set()
        self.refs.not_found(rtype, sorted(missing))
        for sid in sorted(missing):
            self._pending.settle((rtype, sid))  # will not come: what is parked for it looks again

    def _unpark(self, *, at_drain: bool = False) -> None:
        """Carry out what the parking decides for the woken parked resources (`at_drain`: for
        every parked one first, pfsync.load.parking)."""
        if self._sender is None:
            return
        if at_drain:
            self._leave(self._parking.at_drain())
        self._leave(self._parking.woken())

    def _leave(self, decisions: Iterator[Leave]) -> None:
        """Parked resources out of memory: written if they wait for nothing, else deferred (and
        what is parked for them looks again)."""
        for item, waits in decisions:
            if waits:
                self.refs.defer(item.p, item.file, item.line, item.raw, waits)
                self._pending.settle(item.key)
            else:
                self._emitter.emit(item)

    def probe_ahead(self, rtype: str) -> None:
        """Start the probe of this type now, if probes are needed at all."""
        if self._router.probes_needed:
            self._router.probes.ask(rtype)

    def delete_request(self, doc: dict[str, Any], file: str, line: int, raw: bytes) -> None:
        self._router.delete_request(doc, file, line, raw)

    def drain(self) -> None:
        """Until nothing is pending in memory: search what waits for a lookup, send every queued
        entry, take in every outcome; parked resources are written or deferred."""
        while True:
            if self._emitter.copying:
                self._router.nudge()  # what is queued goes out while the copies end, not after
            while self._emitter.copying:
                self._emitter.copied(block=True)
            if not self._dry_run:
                # Parked resources may wait for targets queued for a fetch: fetch them now, so
                # every parked one either gets written or is deferred below.
                self._fetch_queued(full_only=False)
            self._router.probed(block=True)
            for rtype in self._pending.lookup_types():
                self._router.flush_lookup(rtype)
            self._send_all()
            if self._pending.parked and self._drain_parked():
                continue
            again = self._pending.take_rechecks()
            for entry in again:
                self._router.route(entry)
            if again:
                continue
            if not self._pending.looking_up and not self._pending.probing and not self._emitter.copying:
                break
        self._idmap.commit()

    def _drain_parked(self) -> bool:
        """At a drain: the parked resources are written, kept parked for targets on their way, or
        deferred when nothing moved; -> whether anything is still pending in memory."""
        parked = self._pending.parked
        before = len(parked)
        self._unpark(at_drain=True)
        sending = self._pending.in_flight > 0
        stuck = not sending and not self._pending.looking_up and not self._emitter.copying
        if parked and stuck and len(parked) >= before:
            self._leave(self._parking.all_but())  # nothing moved and nothing is on its way: defer them
        return self._pending.looking_up or sending or bool(parked) or self._emitter.copying

    def _send_all(self) -> None:
        """Send everything queued and wait for every outcome; what the outcomes unpark (and the
        copies that end meanwhile) join the queue as they come, not after the last outcome (every
        level of references would otherwise wait for the whole previous level)."""
        while self._router.step():
            self._emitter.copied(block=False)
            self._unpark()

    def settle(self) -> None:
        """A settle point (end of a file): fetch the missing targets queued so far, take back the
        deferred resources whose targets have arrived, commit the id map. Bundles keep flowing."""
        if self._router.probes.waiting:
            self._router.probed(block=False)
        self._emitter.copied(block=False)
        if not self._dry_run:
            self._fetch_queued(full_only=False)
            self._release_ready()
            if self._sender is not None and self._pending.parked:
                self._router.nudge()
                self._unpark()
        self._idmap.commit()

    def flush(self) -> None:
        """Everything given so far settled: written (id map committed), quarantined, retry-queued or
        deferred (pfsync.load.loader.Loader.flush)."""
        for _ in range(_FLUSH_ROUNDS):
            self.drain()
            if self._dry_run:
                break
            before = self._idmap.holds.count("deferred")
            fetched = self._fetch_queued(full_only=False)
            if not (self._release_ready() or fetched):
                break
            if not fetched and self._idmap.holds.count("deferred") >= before:
                break
        self.drain()

    def finish(self) -> None:
        self.drain()
        if not self._dry_run:
            self._finish_references()
        self.drain()

    def _release_ready(self) -> int:
        """Write the deferred resources whose targets all have Medplum ids now; -> how many were taken."""
        taken = 0
        while True:
            before = self.refs.deferred()
            batch = self.refs.ready()
            if not batch:
                return taken
            for held in batch:
                self._reingest(held, final=False)
            taken += len(batch)
            if self.refs.deferred() >= before:
                return taken  # deferred again (nothing new resolved): no progress to make here

    def _finish_references(self) -> None:
        """Everything deferred gets written (pfsync.load.references, module docstring): refreshed and
        lost targets are fetched, missing targets are fetched and what waits for them written as
        they arrive, then what waits only for targets outside this run is written with logical
        references; finally remembered logical references that resolve now are upgraded."""
        for rtype, chunk in self.refs.whole_set(self._router.probes.medplum_ids):
            self._fetch(rtype, chunk)
        for rtype, chunk in self.refs.lost_logical(self._router.probes.tagged_ids):
            self._fetch(rtype, chunk)
        rounds = 0
        while True:
            self.drain()
            if rounds < _FETCH_ROUNDS:
                self.refs.queue_missing()
                if self._fetch_queued(full_only=False):
                    rounds += 1
                    continue
            before = self.refs.deferred()
            if not before:
                break
            if self._release_ready() and self.refs.deferred() < before:
                continue
            # Nothing more will arrive: write what waits only for targets outside this run.
            for held in self.refs.last_resort():
                self._reingest(held, final=True)
        for held in self.refs.upgradable():
            self.refs.released(held.type, held.sid)
            self._reingest(held, final=True)

    def _reingest(self, held: Held, *, final: bool) -> None:
        """A deferred resource taken back (already out of the id map's `deferred` rows)."""
        resource = orjson.loads(held.raw)
        self._follow(self._take(resource, held.file, held.line, held.raw, final=final, first=False))

    # -- figures
    def quota_used(self) -> float:
        return self.pacer.used - self._used_before

    def requests(self) -> int:
        n = self._searcher.requests + self.refs.requests + self._emitter.requests
        return n + (self._sender.stats.requests if self._sender else 0)

    def throttled(self) -> int:
        return self._sender.stats.throttled if self._sender else 0

    def stats(self) -> dict[str, Any]:
        if self._sender is None:
            return {}
        s = self._sender.stats
        return {"bundles": s.bundles, "retried_entries": s.retried_entries, "conflicts": s.conflicts,
                "splits": s.splits, "max_concurrency": s.max_slots, "statuses": {str(k): v for k, v in s.statuses.items()},
                "write_cost": round(self.pacer.cost, 1), "held_on_disk": self.refs.held,
                "referenced_refreshed": self.refs.refreshed}  # fmt: skip

    def close(self) -> None:
        self._router.probes.close()
        if self._sender is not None:
            self._sender.close()
        self._emitter.close()


# What a resource taken in asks of its caller (Writer._take): fetch the queued targets of every
# type and send a partial Bundle ("nudge"), fetch the types with a full request's worth ("full").
Due = Literal["nudge", "full"] | None
