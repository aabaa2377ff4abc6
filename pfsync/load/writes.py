"""The loader's write path: identity state -> skip, lookup, create or update; outcomes -> id map.

Two upsert modes (docs/medplum.md "Quota costs"):
- "direct" (default): identities the id map does not know are searched in Medplum first (100
  per search, 20 points), then created with POST (100 points) or updated with PUT Type/<id>;
  about 100.2 points per created resource against 140 for batched conditional PUTs. Any POST
  whose outcome is unknown (lost response, timeout, 5xx) is searched again before it is re-sent,
  so a create that did commit never becomes a second copy; a PUT by id that answers 404/410 (the
  map was stale) goes back to the search too.
- "conditional": `PUT Type?identifier=system|value` for everything (always safe, 120-140 points);
  Medplum is searched only when the id map is new (to rebuild it and skip unchanged resources).
Resources whose content hash equals the one last written are skipped without any request.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from pfsync.core.errors import HTTPError
from pfsync.core.events import EventSink
from pfsync.core.marks import LOGICAL_TAG, identifier_query
from pfsync.core.ndjson import BadLine
from pfsync.core.settings import HttpSettings, LoadSettings, SourceSettings
from pfsync.load.attachments import Attachments
from pfsync.load.idmap import IdMap
from pfsync.load.quarantine import WrappedLog
from pfsync.load.references import References
from pfsync.load.transform import (
    Prepared,
    TransformContext,
    TransformError,
    owned,
    prepare,
    render,
)
from pfsync.medplum.asyncbatch import AsyncBatchRunner
from pfsync.medplum.batch import Entry, EntryResult, Kind
from pfsync.medplum.client import as_medplum_client
from pfsync.medplum.lookup import Found, Searcher, find_identities
from pfsync.medplum.upsert import BatchSender
from pfsync.net.http import Clock, RetryPolicy
from pfsync.net.pacing import Pacer

_LOOKUP_FLUSH = 100
_PROGRESS_EVERY = 500
_FLUSH_ROUNDS = 20
_NUDGE_EVERY = 50
_PROBE_THREADS = 4
# What a parked resource costs in memory, per byte of its NDJSON line: the line plus the parsed and
# prepared resource (7-8x the line for datagen's types, measured with tracemalloc).
_PARK_BYTES_PER_RAW_BYTE = 8
DELETED_TAG = {"system": "https://pfsync.dev/source-status", "code": "deleted"}


class Writer:
    """Owned by Loader; see pfsync.load.loader for the public API."""

    def __init__(
        self, source: SourceSettings, settings: LoadSettings, medplum: httpx.Client, idmap: IdMap,
        counts: dict[str, Counter[str]], quarantine: WrappedLog, retry_queue: WrappedLog, *,
        http: HttpSettings, clock: Clock, events: EventSink, dry_run: bool, stop: threading.Event | None,
        source_client: httpx.Client | None, mode: str,
    ) -> None:  # fmt: skip
        if mode not in ("direct", "conditional"):
            raise ValueError(f"unknown upsert mode {mode!r}")
        self.context = TransformContext(source, normalize=settings.normalize)
        self._settings = settings
        self._idmap = idmap
        self._counts = counts
        self._qlog = quarantine
        self._retry_queue = retry_queue
        self._clock = clock
        self._events = events
        self._dry_run = dry_run
        self._mode = mode
        self.fixes: Counter[str] = Counter()
        policy = RetryPolicy.from_settings(http)
        # The one Medplum client of this load: its Pacer is spent by searches and Bundles alike.
        self.medplum = as_medplum_client(medplum, pacer=Pacer(), clock=clock, policy=policy, stop=stop)
        self.pacer = self.medplum.pacer
        self._searcher = Searcher(self.medplum)
        self._sender: BatchSender | None = None
        if not dry_run:
            runner = None
            if settings.async_batch:
                runner = AsyncBatchRunner(self.medplum, clock, max_bytes=settings.async_max_bytes)
            self._sender = BatchSender(
                self.medplum, self, max_bytes=settings.async_max_bytes if runner else settings.bundle_max_bytes,
                max_entries=10 * settings.bundle_max_entries if runner else settings.bundle_max_entries,
                max_concurrency=settings.max_concurrency, clock=clock, retry=policy,
                events=events, stop=stop, async_runner=runner,
            )  # fmt: skip
        if self._sender is not None:
            # Resources parked for a target are written as soon as its outcome is in, also while
            # the sender drains (at the end of a load every level of references would otherwise
            # wait for the whole previous level: a full stop per level).
            self._sender.on_reaped = self._reaped
        self._attachments = (
            Attachments(self.medplum, source_client, idmap, settings, self.context, clock=clock, dry_run=dry_run)
            if settings.attachments else None
        )  # fmt: skip
        self.refs = References(
            self,
            idmap,
            self.context,
            source_client if settings.fetch_missing_references else None,
            clock=clock,
            retry=policy,
        )
        self._lookups: dict[str, dict[str, Entry]] = {}
        self._rechecks: list[Entry] = []
        self._empty: dict[str, bool] = {}
        self._probes: dict[str, Future[httpx.Response]] = {}
        self._probing: dict[str, dict[str, Entry]] = {}  # entries waiting for their type's probe
        self._probe_pool: ThreadPoolExecutor | None = None
        self._done = 0
        self._parked: dict[tuple[str, str], _Parked] = {}
        self._parked_bytes = 0  # estimated, bounded by load.park_max_bytes
        self._unparking = False
        self._waiters: dict[tuple[str, str], list[tuple[str, str]]] = {}  # target -> parked keys
        self._woken: list[tuple[str, str]] = []  # identities whose write settled (or will not come)

    # -- per resource
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
        self.count(rtype, "quarantined")
        if sid is not None:
            self.refs.failed(rtype, sid)
            self._wake((rtype, sid))
        self._events.emit("load_quarantined", type=rtype, id=sid, file=file, line=line, reason=reason)
        if not self._dry_run:
            self._qlog.add(file=file, line=line, reason=reason, raw=raw, status=status, rtype=rtype, sid=sid)

    def ingest(self, resource: dict[str, Any], file: str | None, line: int | None, raw: bytes,
               *, final: bool = False, first: bool = True, fetched: bool = False) -> None:  # fmt: skip
        """One source resource, as read. `final`: write now even if targets lack ids (logical refs);
        `fetched`: fetched by reference (noted in the id map for `pfsync verify`)."""
        rtype = str(resource.get("resourceType"))
        sid = resource.get("id")
        try:
            p = prepare(resource, self.context)
        except TransformError as exc:
            self.quarantine(rtype, sid if isinstance(sid, str) else None, file, line, raw, str(exc))
            return
        if first and p.fixes:
            self.fixes[p.type] += p.fixes
        if fetched and not self._dry_run:
            self._idmap.note_fetched(p.type, p.sid)
        row = self._idmap.get(p.type, p.sid)
        if row is None:
            self._idmap.seen(p.type, p.sid)
        if (row is None or row.mid is None) and p.type not in self._empty and self._probes_needed:
            # Asked as soon as the type is read, not when its first resource can be written: by
            # then it would wait behind our Bundles on the critical path of every dependent type.
            self._probe(p.type)
        if self._probes:
            self._probed(block=False)  # what waits for an answered probe must not wait for a route
        if self._sender is not None:
            # Answers are read as they come, not only when a Bundle fills: while a file of
            # dependants is read (and parked) the targets' ids arrive and the server gets the next
            # Bundle (a Patient Bundle's answer sat unread for 54 ms of an Encounter file).
            self._sender.poll()
        if self._attachments is not None and self._attachments.pending:
            self._attachments.supersede((p.type, p.sid))  # this newer copy replaces one being copied
            self._copied(block=False)
        if self._parked:
            old = self._parked.pop((p.type, p.sid), None)  # this newer copy replaces a parked one
            if old is not None:
                self._parked_bytes -= _park_cost(old)
            self._unpark()
        if not final and not self._dry_run:
            waits = self.refs.waits(p)
            if waits:
                # Written once, when its targets have ids (pfsync.load.references), not now and again
                # later. Targets whose writes are in flight come back within a Bundle or two: wait
                # for them in memory (bounded); anything else waits on disk.
                if self._parked_bytes < self._settings.park_max_bytes and all(self._coming(k) for k in waits):
                    self._park((p.type, p.sid), _Parked(p, file, line, raw), waits[0])
                    if len(self._parked) % _NUDGE_EVERY == 1 and self._sender is not None:
                        # Targets to fetch from the source are fetched now, not when a full
                        # request's worth is queued (a Patient-level export names only a few
                        # Organizations: everything would wait behind them on disk until the end).
                        self.refs.fetch_queued(full_only=False)
                        self._sender.nudge()  # a partial Bundle of targets must not sit in the buffer
                    return
                self.refs.defer(p, file, line, raw, waits)
                self._wake((p.type, p.sid))  # not coming any more: its waiters look again
                self.refs.fetch_queued(full_only=True)
                return
        self._emit(p, file, line, raw)

    def _coming(self, key: tuple[str, str], *, parked: bool = True) -> bool:
        """Whether a write of this identity is queued, in flight or parked, or the identity is
        queued for a fetch from the source (its id is on its way)."""
        if self._sender is None or not key[0]:
            return False
        if self._sender.holds(key) or (parked and key in self._parked) or self.refs.queued(key):
            return True
        if self._attachments is not None and self._attachments.holds(key):
            return True
        probing = self._probing.get(key[0])
        return probing is not None and key[1] in probing

    def not_coming(self, key: tuple[str, str]) -> None:
        """A target queued for a fetch that the source did not have."""
        self._wake(key)

    def _wake(self, key: tuple[str, str]) -> None:
        """This identity's write settled or will not come: what waits for it looks again."""
        if key in self._waiters:
            self._woken.append(key)

    def _park(self, key: tuple[str, str], item: _Parked, target: tuple[str, str]) -> None:
        """Wait in memory; looked at again when `target` (one it waits for) settles (`_woken`)."""
        self._parked[key] = item
        self._parked_bytes += _park_cost(item)
        self._waiters.setdefault(target, []).append(key)

    def _unpark(self, *, settle_all: bool = False) -> None:
        """Write the parked resources whose targets have ids now; the ones waiting for a target
        whose write ended without an id go to the disk hold (`settle_all`, at a drain: every parked
        one is looked at, see _unpark_all).

        Only the resources waiting for an identity that settled are looked at (`_waiters`): looking
        at every parked one after every Bundle was quadratic (thousands wait at the start of a
        first load: a third of the main thread)."""
        if self._unparking or self._sender is None:
            return
        if not settle_all and not self._woken:
            return
        self._unparking = True
        try:
            if settle_all:
                self._unpark_all()
            while self._woken:
                woken, self._woken = self._woken, []
                for target in woken:
                    for key in self._waiters.pop(target, ()):
                        item = self._parked.get(key)
                        if item is not None:
                            self._look_again(key, item)
        finally:
            self._unparking = False

    def _unpark_all(self) -> None:
        """At a drain: write every parked resource whose targets all have ids, keep parked those
        whose targets are (through other parked ones) on their way in the sender, and hold the rest
        on disk: a parked cycle, or targets whose writes ended without an id.

        Looking at each one once and holding on disk whatever waited for another parked one sent
        hundreds of resources to disk at the end of every load (read and parsed twice, written in
        a late burst) although their targets were about to be written."""
        moving: set[tuple[str, str]] = set()  # parked, and every target is in the sender or moving
        changed = True
        while changed:
            changed = False
            for key, item in list(self._parked.items()):
                if key in moving or key not in self._parked:
                    continue
                waits = self.refs.waits(item.p, queue=False)
                if not waits:
                    self._release_parked(key, item, waits)
                    changed = True
                elif all(k in moving or self._coming(k, parked=False) for k in waits):
                    moving.add(key)
                    self._waiters.setdefault(waits[0], []).append(key)
                    changed = True
        self._hold_parked(keep=moving)

    def _copying(self) -> bool:
        return self._attachments is not None and self._attachments.pending > 0

    def _hold_parked(self, keep: frozenset[tuple[str, str]] | set[tuple[str, str]] = frozenset()) -> None:
        """Parked resources (but `keep`) are written if their targets have ids, else held on disk."""
        for key, item in list(self._parked.items()):
            if key not in keep:
                self._release_parked(key, item, self.refs.waits(item.p, queue=False))

    def _look_again(self, key: tuple[str, str], item: _Parked) -> None:
        waits = self.refs.waits(item.p, queue=False)
        if waits and all(self._coming(k) for k in waits):
            self._waiters.setdefault(waits[0], []).append(key)
        else:
            self._release_parked(key, item, waits)

    def _release_parked(self, key: tuple[str, str], item: _Parked, waits: list[tuple[str, str]]) -> None:
        """Out of memory: written if it waits for nothing, else held on disk (and what waits for it
        looks again)."""
        del self._parked[key]
        self._parked_bytes -= _park_cost(item)
        if waits:
            self.refs.defer(item.p, item.file, item.line, item.raw, waits)
            self._wake(key)
        else:
            self._emit(item.p, item.file, item.line, item.raw)

    def _emit(self, p: Prepared, file: str | None, line: int | None, raw: bytes) -> None:
        self.refs.released(p.type, p.sid)
        if self._attachments is not None and b'"contentType"' in raw:  # cheap: most resources have none
            while self._attachments.full:
                self._copied(block=True)
            if self._attachments.start(p, file, line, raw):
                return  # written once its attachments are copied (_copied)
        if p.type == "Binary" and self._attachments is not None:
            self._attachments.load_binary(p, file, line, raw, self)
            return
        self._write(p, file, line, raw)

    def _reaped(self) -> None:
        self._copied(block=False)
        self._unpark()

    def _copied(self, *, block: bool) -> None:
        """Write the resources whose attachment copies ended (`block`: wait for one at least)."""
        if self._attachments is None or not self._copying():
            return
        for c in self._attachments.finished(block=block):
            if c.error is None:
                if c.uploaded:
                    self.count(c.p.type, "binary_uploaded")
                self._write(c.p, c.file, c.line, c.raw)
            elif c.error.retryable:
                self._wake((c.p.type, c.p.sid))
                self.count(c.p.type, "retry_queued")
                self._retry_queue.add(
                    file=c.file, line=c.line, reason=str(c.error), raw=c.raw, rtype=c.p.type, sid=c.p.sid
                )
            else:
                self.quarantine(c.p.type, c.p.sid, c.file, c.line, c.raw, str(c.error))

    def _write(self, p: Prepared, file: str | None, line: int | None, raw: bytes) -> None:
        try:
            rendered = render(p, self.refs.target, self.context)
        except TransformError as exc:
            self.quarantine(p.type, p.sid, file, line, raw, str(exc))
            return
        if rendered.unknown:
            self.count(p.type, "unresolved_references", len(rendered.unknown))
        entry = Entry(p.type, p.sid, "PUT", "", rendered.body, rendered.hash, file, line, raw)
        entry.logical = tuple((r.type, r.id) for r in rendered.logical if r.type is not None)
        self.route(entry)
        self._done += 1
        if self._done % _PROGRESS_EVERY == 0:
            self._events.emit("load_progress", type=p.type, done=self._done, quota_remaining=self.pacer.remaining,
                              pending=self._sender.pending if self._sender else 0)  # fmt: skip

    def _conditional_url(self, entry: Entry) -> str:
        return f"{entry.type}?{identifier_query(self.context.system(entry.type), entry.sid)}"

    def route(self, entry: Entry) -> None:
        """Skip, search, create or update, from what the id map knows of this identity."""
        row = self._idmap.get(entry.type, entry.sid)
        if row is not None and row.mid is not None:
            if entry.purpose == "upsert" and row.hash is not None and row.hash == entry.hash:
                self.count(entry.type, "unchanged")
                if entry.logical:
                    self.refs.hold_logical(entry)
                return
            entry.known_vid = row.vid
            if entry.purpose == "delete":
                url = f"{entry.type}/{row.mid}"
                entry.retarget("DELETE", url)
            elif self._mode == "direct":
                entry.retarget("PUT", f"{entry.type}/{row.mid}")
            else:
                entry.retarget("PUT", self._conditional_url(entry))
            self._send(entry, create=False)
            return
        # A delete of an identity the map does not know is always searched first, in both modes:
        # `DELETE Type?identifier=` cannot tell our resource from a stranger carrying our identifier.
        needs_search = (
            self._mode == "direct" or self._idmap.cold or self._dry_run or entry.purpose == "delete"
        )
        if needs_search and not entry.looked_up and not entry.ambiguous:
            if self._probes:
                self._probed(block=False)
            empty = self._empty.get(entry.type)
            if empty is None:
                # Wait for the type's probe without stopping the input (pfsync.load.writes._probe).
                self._probe(entry.type)
                queue = self._probing.setdefault(entry.type, {})
                queue.pop(entry.sid, None)
                queue[entry.sid] = entry
                return
            needs_search = not empty
        if needs_search and not entry.looked_up:
            queue = self._lookups.setdefault(entry.type, {})
            queue.pop(entry.sid, None)
            queue[entry.sid] = entry
            if len(queue) >= _LOOKUP_FLUSH:
                self._flush_lookup(entry.type)
            return
        if entry.purpose == "delete":
            entry.retarget("DELETE", self._conditional_url(entry))
        elif self._mode == "direct":
            entry.retarget("POST", entry.type)
        else:
            entry.retarget("PUT", self._conditional_url(entry))
        self._send(entry, create=True)

    def probe_ahead(self, rtype: str) -> None:
        """Start the probe of this type now, if probes are needed at all."""
        if self._probes_needed:
            self._probe(rtype)

    @property
    def _probes_needed(self) -> bool:
        return self._mode == "direct" or self._idmap.cold or self._dry_run

    def _probe(self, rtype: str) -> None:
        """Ask Medplum, on a worker thread, whether it holds any resource of this type with our
        identifier system (once per type and run, 20 points): if not, no identity of it can exist
        there and the per-identity searches are skipped. Asked lazily (a resync whose identities
        are all in the id map asks nothing) and concurrently: one after another on this thread the
        probes were a fifth of a small load. Creates of this run are in the id map; a create whose
        outcome is unknown is marked ambiguous and always searched again."""
        if rtype in self._probes or rtype in self._empty:
            return
        if self._probe_pool is None:
            self._probe_pool = ThreadPoolExecutor(
                max_workers=_PROBE_THREADS, thread_name_prefix="pfsync-probe"
            )
        self._probes[rtype] = self._probe_pool.submit(self._searcher.fetch, rtype, self._probe_params(rtype))

    def _probe_params(self, rtype: str) -> dict[str, str]:
        return {"identifier": f"{self.context.system(rtype)}|", "_count": "1", "_elements": "identifier"}

    def _probed(self, *, block: bool) -> None:
        """Take in the answered probes (all of them: `block`) and route the entries that waited."""
        for rtype, future in list(self._probes.items()):
            if not block and not future.done():
                continue
            if self._probes.pop(rtype, None) is None:
                continue  # taken in by a nested call (route below comes back here)
            try:
                found = self._searcher.get_prefetched(rtype, self._probe_params(rtype), future)
            except HTTPError as exc:
                if exc.temporary:
                    raise
                found = {"entry": ["unknown"]}  # a server without `system|` search: search per identity
            self._empty[rtype] = not found.get("entry")
            # One at a time out of the queue: an entry stays "coming" (_coming) until it is in
            # the sender, or what waits for it would be held on disk meanwhile.
            queue = self._probing.get(rtype, {})
            while queue:
                self.route(queue.pop(next(iter(queue))))
            self._probing.pop(rtype, None)

    def known_in_medplum(self, rtype: str) -> list[str]:
        """Source ids of every resource of this type Medplum holds with our identifier system
        (`identifier=<system>|`: any value), for a run whose id map is new."""
        system = self.context.system(rtype)
        return self._source_ids(
            rtype, {"identifier": f"{system}|", "_elements": "identifier", "_count": "1000"}
        )

    def _source_ids(self, rtype: str, params: dict[str, str]) -> list[str]:
        if self._empty.get(rtype) or self._dry_run:
            return []  # Medplum held none of this type before this run (what it wrote is known)
        system = self.context.system(rtype)
        try:
            found = self._searcher.search_all(rtype, params)
        except HTTPError:
            return []  # nothing is lost: the next run looks again
        return sorted(
            str(ident["value"])
            for resource in found
            for ident in resource.get("identifier") or []
            if isinstance(ident, dict)
            and ident.get("system") == system
            and isinstance(ident.get("value"), str)
        )

    def logical_in_medplum(self, rtype: str) -> list[str]:
        """Source ids of the resources of this type that Medplum holds with logical references
        (the tag pfsync.load.transform.render puts on them), for a run whose id map has lost them."""
        return self._source_ids(rtype, {"_tag": f"{LOGICAL_TAG['system']}|{LOGICAL_TAG['code']}",
                                        "_elements": "identifier", "_count": "1000"})  # fmt: skip

    def _send(self, entry: Entry, *, create: bool) -> None:
        if self._dry_run or self._sender is None:
            key = "deleted" if entry.purpose != "upsert" else ("created" if create else "updated")
            self.count(entry.type, key)
            return
        self._sender.add(entry)

    def _flush_lookup(self, rtype: str) -> None:
        queue = self._lookups.pop(rtype, None)
        if not queue:
            return
        found = find_identities(self._searcher, rtype, self.context.system(rtype), list(queue), self._owns)
        for sid, entry in queue.items():
            matches = self._own_matches(rtype, sid, found.get(sid, []))
            entry.looked_up = True
            if self._mode == "conditional" and len(matches) < len(found.get(sid, [])):
                # `PUT Type?identifier=` would land on the stranger: never send it.
                text = (f"a Medplum {rtype} that is not this source's carries identifier "
                        f"{self.context.system(rtype)}|{sid}; upsert_mode=direct writes beside it")  # fmt: skip
                self.quarantine(rtype, sid, entry.file, entry.line, entry.raw, text, 412)
                continue
            if len(matches) > 1:
                text = f"{len(matches)} Medplum resources carry identifier {self.context.system(rtype)}|{sid}"
                self.quarantine(rtype, sid, entry.file, entry.line, entry.raw, text, 412)
                continue
            if matches:
                m = matches[0]
                if not self._dry_run:
                    self._idmap.record(rtype, sid, m.mid, m.vid, m.hash)
                elif m.hash == entry.hash:
                    self.count(rtype, "unchanged")
                    continue
                else:
                    self.count(rtype, "deleted" if entry.purpose != "upsert" else "updated")
                    continue
            elif entry.purpose == "delete":
                self.count(rtype, "deleted")  # nothing to delete: already absent
                continue
            self.route(entry)

    def _owns(self, resource: dict[str, Any]) -> bool:
        return owned(resource, self.context)

    def _own_matches(self, rtype: str, sid: str, matches: list[Found]) -> list[Found]:
        """Only the matches that are provably this source's: a resource of another source (or of
        another writer) that carries our identifier is never updated, adopted or deleted; ours is
        created beside it, and the stranger is reported."""
        mine = [m for m in matches if m.owned]
        if len(mine) < len(matches):
            self.count(rtype, "foreign_matches", len(matches) - len(mine))
            self._events.emit("load_foreign_match", type=rtype, sid=sid,
                              ids=[f"{rtype}/{m.mid}" for m in matches if not m.owned])  # fmt: skip
        return mine

    def drain(self, *, partial: bool = False) -> None:
        """Search what waits for a lookup, send every queued entry, settle every outcome.

        `partial` (end of a file): only commit; Bundles keep flowing into the next file and a
        resource waits for an in-flight target only when it references one."""
        if partial:
            self._idmap.commit()
            return
        while True:
            if self._copying() and self._sender is not None:
                self._sender.nudge()  # what is queued goes out while the copies end, not after
            while self._copying():
                self._copied(block=True)
            if not self._dry_run:
                # Parked resources may wait for targets queued for a fetch: fetch them now, so
                # every parked one either gets written or goes to the disk hold below.
                self.refs.fetch_queued(full_only=False)
            self._probed(block=True)
            for rtype in list(self._lookups):
                self._flush_lookup(rtype)
            if self._sender is not None:
                self._sender.flush()
            if self._parked:
                before = len(self._parked)
                self._unpark(settle_all=True)
                pending = self._sender is not None and self._sender.pending
                stuck = not pending and not self._lookups and not self._copying()
                if self._parked and stuck and len(self._parked) >= before:
                    self._hold_parked()  # nothing moved and nothing is on its way: hold them on disk
                if self._lookups or pending or self._parked or self._copying():
                    continue
            if self._rechecks:
                again, self._rechecks = self._rechecks, []
                for entry in again:
                    self.route(entry)
                continue
            if not self._lookups and not self._probing and not self._copying():
                break
        self._idmap.commit()

    def settle(self) -> None:
        """A settle point (end of a file): fetch the missing targets queued so far, write the held
        resources whose targets have arrived, commit the id map. Bundles keep flowing."""
        if self._probes:
            self._probed(block=False)
        self._copied(block=False)
        if not self._dry_run:
            self.refs.fetch_queued(full_only=False)
            self.refs.release_ready()
            if self._sender is not None and self._parked:
                self._sender.nudge()
                self._unpark()
        self._idmap.commit()

    def flush(self) -> None:
        """Everything given so far settled: written (id map committed), quarantined, retry-queued or
        held in the id map on disk (pfsync.load.loader.Loader.flush)."""
        for _ in range(_FLUSH_ROUNDS):
            self.drain()
            if self._dry_run:
                break
            before = self._idmap.held_count("deferred")
            fetched = self.refs.fetch_queued(full_only=False)
            if not (self.refs.release_ready() or fetched):
                break
            if not fetched and self._idmap.held_count("deferred") >= before:
                break
        self.drain()

    def finish(self) -> None:
        self.drain()
        if not self._dry_run:
            self.refs.finish()
        self.drain()

    # -- deletes
    def delete_request(self, doc: dict[str, Any], file: str, line: int, raw: bytes) -> None:
        entries = (
            doc.get("entry")
            if doc.get("resourceType") == "Bundle"
            else [{"request": {"method": "DELETE", "url": f"{doc.get('resourceType')}/{doc.get('id')}"}}]
        )
        for item in entries or []:
            request = item.get("request") if isinstance(item, dict) else None
            url = request.get("url") if isinstance(request, dict) else None
            parts = url.split("?")[0].strip("/").split("/") if isinstance(url, str) else []
            if len(parts) < 2 or not parts[-2][:1].isupper():
                self.quarantine("Bundle", None, file, line, orjson.dumps(item), f"not a deletion: {url!r}")
                continue
            rtype, sid = parts[-2], parts[-1]
            self._idmap.release("deferred", rtype, sid)
            self._idmap.release("logical", rtype, sid)
            mode = self._settings.deletes
            if mode == "ignore":
                self.count(rtype, "delete_ignored")
                continue
            entry = Entry(rtype, sid, "DELETE", "", None, None, file, line, orjson.dumps(item))
            entry.purpose = "delete" if mode == "apply" else "delete-tag"
            if mode == "tag":
                self._tag_deleted(entry)
            else:
                self.route(entry)

    def _tag_deleted(self, entry: Entry) -> None:
        """load.deletes = tag: keep the resource, mark it with a stable tag (hash cleared)."""
        row = self._idmap.get(entry.type, entry.sid)
        if row is None or row.mid is None:
            found = find_identities(
                self._searcher, entry.type, self.context.system(entry.type), [entry.sid], self._owns
            )
            matches = self._own_matches(entry.type, entry.sid, found.get(entry.sid, []))
            if len(matches) != 1:
                self.count(entry.type, "deleted")
                return
            mid = matches[0].mid
        else:
            mid = row.mid
        resource = self._searcher.get(f"{entry.type}/{mid}")
        meta = resource.setdefault("meta", {})
        tags = [t for t in meta.get("tag") or [] if t != DELETED_TAG]
        meta["tag"] = [*tags, DELETED_TAG]
        for key in ("versionId", "lastUpdated", "author", "project", "compartment"):
            meta.pop(key, None)
        entry.body = orjson.dumps(resource)
        entry.retarget("PUT", f"{entry.type}/{mid}")
        self._send(entry, create=False)

    # -- outcomes (called by BatchSender on this thread)
    def settled(self, entry: Entry, kind: Kind, result: EntryResult) -> None:
        self._wake(entry.key)
        if kind is Kind.FAILED:
            reason = result.text or f"HTTP {result.status}"
            self.quarantine(entry.type, entry.sid, entry.file, entry.line, entry.raw, reason, result.status)
            return
        self._idmap.begin()
        if kind is Kind.DELETED:
            self._idmap.forget(entry.type, entry.sid)
            self.count(entry.type, "deleted")
            return
        if result.mid is not None:
            content_hash = entry.hash if entry.purpose == "upsert" else None
            self._idmap.record(entry.type, entry.sid, result.mid, result.vid, content_hash)
        self.count(entry.type, "deleted" if entry.purpose == "delete-tag" else kind.value)
        if entry.logical:
            self.refs.hold_logical(entry)
        else:
            self.refs.upgraded(entry.type, entry.sid)

    def exhausted(self, entry: Entry, result: EntryResult) -> None:
        self._wake(entry.key)
        self.count(entry.type, "retry_queued")
        reason = f"retries exhausted: {result.text or f'HTTP {result.status}'}"
        self._retry_queue.add(file=entry.file, line=entry.line, reason=reason, raw=entry.raw,
                              status=result.status, rtype=entry.type, sid=entry.sid)  # fmt: skip

    def recheck(self, entry: Entry) -> None:
        self._wake(entry.key)
        if entry.method == "PUT" and "?" not in entry.url:
            self._idmap.forget(entry.type, entry.sid)  # a stale id: Medplum no longer has it
        entry.looked_up = False
        entry.ambiguous = True
        entry.known_vid = None
        self._rechecks.append(entry)

    def reroute(self, entry: Entry) -> Entry | None:
        """A queued create whose identity was written meanwhile: an update by id now, nothing if the
        content is the same, or routed again from scratch (the other write failed)."""
        self._wake(entry.key)
        row = self._idmap.get(entry.type, entry.sid)
        if row is None or row.mid is None:
            self._rechecks.append(entry)
            return None
        if row.hash is not None and row.hash == entry.hash:
            self.count(entry.type, "unchanged")
            if entry.logical:
                self.refs.hold_logical(entry)
            return None
        entry.known_vid = row.vid
        entry.retarget("PUT", f"{entry.type}/{row.mid}")
        return entry

    # -- figures
    def quota_used(self) -> float:
        return self.pacer.used

    def requests(self) -> int:
        n = self._searcher.requests + self.refs.requests
        if self._attachments is not None:
            n += self._attachments.requests
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
        if self._probe_pool is not None:
            self._probe_pool.shutdown(wait=True, cancel_futures=True)
        if self._sender is not None:
            self._sender.close()
        if self._attachments is not None:
            self._attachments.close()


@dataclass
class _Parked:
    p: Prepared
    file: str | None
    line: int | None
    raw: bytes


def _park_cost(item: _Parked) -> int:
    return _PARK_BYTES_PER_RAW_BYTE * len(item.raw)
