"""Which request writes an entry: skip, search, create or update, from what the id map knows.

Two upsert modes (docs/medplum.md, "Quota costs"):
- "direct" (default): identities the id map does not know are searched in Medplum first (100
  per search, 20 points), then created with POST (100 points) or updated with PUT Type/<id>;
  about 100.2 points per created resource against 140 for batched conditional PUTs. Any POST
  whose outcome is unknown (lost response, timeout, 5xx) is searched again before it is re-sent,
  so a create that did commit never becomes a second copy; a PUT by id that answers 404/410 (the
  map was stale) goes back to the search too.
- "conditional": `PUT Type?identifier=system|value` for everything (always safe, 120-140 points);
  Medplum is searched only when the id map is new (to rebuild it and skip unchanged resources).
Resources whose content hash equals the one last written are skipped without any request.

The router is the sender's one caller: it hands every entry it sends to the pending ledger (in
flight, pfsync.load.pending), and right after every call to the sender (the writer's too: `poll`,
`nudge`, `step`) it takes in the sender's reports, on the loader's thread, for the id map, the tally
and the ledger; a released create it decides again and gives back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, assert_never

import orjson

from pfsync.core.events import EventSink
from pfsync.core.marks import identifier_query
from pfsync.load.idmap import IdMap
from pfsync.load.pending import Pending
from pfsync.load.probes import Probes
from pfsync.load.references import References
from pfsync.load.tally import Tally
from pfsync.load.transform import TransformContext, owned
from pfsync.medplum.batch import Entry, EntryResult, Kind
from pfsync.medplum.bundlesend import Exhausted, Recheck, Released, Settled, Superseded
from pfsync.medplum.lookup import Found, Searcher, find_identities
from pfsync.medplum.upsert import BatchSender

_LOOKUP_FLUSH = 100
DELETED_TAG = {"system": "https://pfsync.dev/source-status", "code": "deleted"}


class Router:
    """Routes entries to the sender (or counts them, in a dry run) and takes in their outcomes."""

    def __init__(
        self, ctx: TransformContext, idmap: IdMap, searcher: Searcher, *, pending: Pending, refs: References,
        tally: Tally, events: EventSink, mode: str, deletes: str, dry_run: bool, sender: BatchSender | None,
    ) -> None:  # fmt: skip
        self._ctx = ctx
        self._idmap = idmap
        self._searcher = searcher
        self._pending = pending
        self._refs = refs
        self._tally = tally
        self._events = events
        self._mode = mode
        self._deletes = deletes
        self._dry_run = dry_run
        self.probes = Probes(searcher, ctx, dry_run=dry_run)
        self._sender = sender  # None in a dry run

    def route(self, entry: Entry) -> None:
        """Skip, search, create or update, from what the id map knows of this identity."""
        row = self._idmap.get(entry.type, entry.sid)
        if row is not None and row.mid is not None:
            if entry.purpose == "upsert" and row.hash is not None and row.hash == entry.hash:
                self._tally.count(entry.type, "unchanged")
                if entry.logical:
                    self._refs.remember_logical(entry)
                return
            entry.known_vid = row.vid
            if entry.purpose == "delete":
                entry.retarget("DELETE", f"{entry.type}/{row.mid}")
            elif self._mode == "direct":
                entry.retarget("PUT", f"{entry.type}/{row.mid}")
            else:
                entry.retarget("PUT", self._conditional_url(entry))
            self._send(entry, create=False)
            return
        # A delete of an identity the map does not know is always searched first, in both modes:
        # `DELETE Type?identifier=` cannot tell our resource from a stranger carrying our identifier.
        needs_search = self.probes_needed or entry.purpose == "delete"
        if needs_search and not entry.looked_up and not entry.ambiguous:
            empty = self.probes.empty(entry.type)
            if empty is None:
                # Wait for the type's probe without stopping the input (pfsync.load.probes).
                self.probes.ask(entry.type)
                self._pending.await_probe(entry)
                return
            needs_search = not empty
        if needs_search and not entry.looked_up:
            if self._pending.await_lookup(entry) >= _LOOKUP_FLUSH:
                self.flush_lookup(entry.type)
            return
        if entry.purpose == "delete":
            entry.retarget("DELETE", self._conditional_url(entry))
        elif self._mode == "direct":
            entry.retarget("POST", entry.type)
        else:
            entry.retarget("PUT", self._conditional_url(entry))
        self._send(entry, create=True)

    def _conditional_url(self, entry: Entry) -> str:
        return f"{entry.type}?{identifier_query(self._ctx.system(entry.type), entry.sid)}"

    @property
    def probes_needed(self) -> bool:
        return self._mode == "direct" or self._idmap.cold or self._dry_run

    def probed(self, *, block: bool) -> None:
        """Take in the answered probes (all of them: `block`) and route the entries that waited."""
        for rtype in self.probes.answers(block=block):
            for entry in self._pending.probed(rtype):
                self.route(entry)

    def _send(self, entry: Entry, *, create: bool) -> None:
        if self._dry_run or self._sender is None:
            key = "deleted" if entry.purpose != "upsert" else ("created" if create else "updated")
            self._tally.count(entry.type, key)
            return
        self._pending.hand(entry.key)
        self._calling(self._sender, self._sender.add, entry)

    def flush_lookup(self, rtype: str) -> None:
        """Search the entries of this type that wait for a lookup, and route them on."""
        queue = self._pending.take_lookup(rtype)
        if not queue:
            return
        system = self._ctx.system(rtype)
        found = find_identities(self._searcher, rtype, system, list(queue), self._owns)
        for sid, entry in queue.items():
            matches = self._own_matches(rtype, sid, found.get(sid, []))
            entry.looked_up = True
            if self._mode == "conditional" and len(matches) < len(found.get(sid, [])):
                # `PUT Type?identifier=` would land on the stranger: never send it.
                text = (f"a Medplum {rtype} that is not this source's carries identifier "
                        f"{system}|{sid}; upsert_mode=direct writes beside it")  # fmt: skip
                self._tally.quarantine(rtype, sid, entry.file, entry.line, entry.raw, text, 412)
                continue
            if len(matches) > 1:
                text = f"{len(matches)} Medplum resources carry identifier {system}|{sid}"
                self._tally.quarantine(rtype, sid, entry.file, entry.line, entry.raw, text, 412)
                continue
            if matches:
                m = matches[0]
                if not self._dry_run:
                    self._idmap.record(rtype, sid, m.mid, m.vid, m.hash)
                elif m.hash == entry.hash:
                    self._tally.count(rtype, "unchanged")
                    continue
                else:
                    self._tally.count(rtype, "deleted" if entry.purpose != "upsert" else "updated")
                    continue
            elif entry.purpose == "delete":
                self._tally.count(rtype, "deleted")  # nothing to delete: already absent
                continue
            self.route(entry)

    def _owns(self, resource: dict[str, Any]) -> bool:
        return owned(resource, self._ctx)

    def _own_matches(self, rtype: str, sid: str, matches: list[Found]) -> list[Found]:
        """Only the matches that are provably this source's: a resource of another source (or of
        another writer) that carries our identifier is never updated, adopted or deleted; ours is
        created beside it, and the stranger is reported."""
        mine = [m for m in matches if m.owned]
        if len(mine) < len(matches):
            self._tally.count(rtype, "foreign_matches", len(matches) - len(mine))
            self._events.emit("load_foreign_match", type=rtype, sid=sid,
                              ids=[f"{rtype}/{m.mid}" for m in matches if not m.owned])  # fmt: skip
        return mine

    # -- deletes
    def delete_request(self, doc: dict[str, Any], file: str, line: int, raw: bytes) -> None:
        """A Bulk Data `deleted` entry (a Bundle of DELETE requests, or one resource), as
        load.deletes says: apply (delete in Medplum), tag, or ignore."""
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
                self._tally.quarantine(
                    "Bundle", None, file, line, orjson.dumps(item), f"not a deletion: {url!r}"
                )
                continue
            rtype, sid = parts[-2], parts[-1]
            self._idmap.holds.release("deferred", rtype, sid)
            self._idmap.holds.release("logical", rtype, sid)
            if self._deletes == "ignore":
                self._tally.count(rtype, "delete_ignored")
                continue
            entry = Entry(rtype, sid, "DELETE", "", None, None, file, line, orjson.dumps(item))
            entry.purpose = "delete" if self._deletes == "apply" else "delete-tag"
            if self._deletes == "tag":
                self._tag_deleted(entry)
            else:
                self.route(entry)

    def _tag_deleted(self, entry: Entry) -> None:
        """load.deletes = tag: keep the resource, mark it with a stable tag (hash cleared)."""
        row = self._idmap.get(entry.type, entry.sid)
        if row is None or row.mid is None:
            found = find_identities(
                self._searcher, entry.type, self._ctx.system(entry.type), [entry.sid], self._owns
            )
            matches = self._own_matches(entry.type, entry.sid, found.get(entry.sid, []))
            if len(matches) != 1:
                self._tally.count(entry.type, "deleted")
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

    # -- the sender: each call is followed by taking in its reports, even when it raises (a stop,
    # or Medplum refusing our credentials): what was written before is recorded all the same
    def poll(self) -> None:
        """Take in the answered Bundles, if any came back (pfsync.medplum.upsert.BatchSender.poll)."""
        if self._sender is not None:
            self._calling(self._sender, self._sender.poll)

    def nudge(self) -> None:
        """Send what is queued, a partial Bundle too, without waiting (BatchSender.nudge)."""
        if self._sender is not None:
            self._calling(self._sender, self._sender.nudge)

    def step(self) -> bool:
        """One round of sending everything queued (BatchSender.step); False once nothing is queued,
        in flight or given back to the sender."""
        return self._sender is not None and self._calling(self._sender, self._sender.step)

    def _calling(self, sender: BatchSender, call: Callable[..., bool | None], *args: Entry) -> bool:
        """`call(*args)` on the sender, then its reports taken in, even when the call raised;
        -> what the call returned, or whether a released create went back to the sender."""
        try:
            more = call(*args)
        finally:
            requeued = self._answer(sender)
        return bool(more) or requeued

    def _answer(self, sender: BatchSender) -> bool:
        """Take in the sender's reports, in order: each answers its entry in the ledger, except a
        released create, decided again here; -> whether one went back to the sender."""
        requeued = False
        while reports := sender.take_reports():  # a create given back can supersede a queued entry
            for report in reports:  # (isinstance: one per entry, and a match statement costs more)
                if isinstance(report, Settled):
                    self._settled(report.entry, report.kind, report.result)
                elif isinstance(report, Exhausted):
                    self._exhausted(report.entry, report.result)
                elif isinstance(report, Recheck):
                    self._recheck(report.entry)
                elif isinstance(report, Superseded):
                    self._pending.answered(report.entry.key)  # its newer entry is still coming
                elif isinstance(report, Released):
                    if self._redecide(report.entry):
                        sender.requeue(report.entry)
                        requeued = True
                else:
                    assert_never(report)
        return requeued

    def _settled(self, entry: Entry, kind: Kind, result: EntryResult) -> None:
        self._pending.answered(entry.key)
        self._pending.settle(entry.key)
        if kind is Kind.FAILED:
            reason = result.text or f"HTTP {result.status}"
            self._tally.quarantine(
                entry.type, entry.sid, entry.file, entry.line, entry.raw, reason, result.status
            )
            return
        self._idmap.begin()
        if kind is Kind.DELETED:
            self._idmap.forget(entry.type, entry.sid)
            self._tally.count(entry.type, "deleted")
            return
        if result.mid is not None:
            content_hash = entry.hash if entry.purpose == "upsert" else None
            self._idmap.record(entry.type, entry.sid, result.mid, result.vid, content_hash)
        self._tally.count(entry.type, "deleted" if entry.purpose == "delete-tag" else kind.value)
        if entry.logical:
            self._refs.remember_logical(entry)
        else:
            self._refs.upgraded(entry.type, entry.sid)

    def _exhausted(self, entry: Entry, result: EntryResult) -> None:
        self._pending.answered(entry.key)
        reason = f"retries exhausted: {result.text or f'HTTP {result.status}'}"
        self._tally.retry(entry.type, entry.sid, entry.file, entry.line, entry.raw, reason, result.status)

    def _recheck(self, entry: Entry) -> None:
        self._pending.answered(entry.key)
        self._pending.settle(entry.key)
        if entry.method == "PUT" and "?" not in entry.url:
            self._idmap.forget(entry.type, entry.sid)  # a stale id: Medplum no longer has it
        entry.looked_up = False
        entry.ambiguous = True
        entry.known_vid = None
        self._pending.recheck(entry)

    def _redecide(self, entry: Entry) -> bool:
        """A released create (its identity was written meanwhile): an update by id now (-> True: it
        stays in flight, for the sender again), nothing if the content is the same, or routed
        again from scratch (the other write failed)."""
        self._pending.settle(entry.key)
        row = self._idmap.get(entry.type, entry.sid)
        if row is None or row.mid is None:
            self._pending.answered(entry.key)
            self._pending.recheck(entry)
            return False
        if row.hash is not None and row.hash == entry.hash:
            self._pending.answered(entry.key)
            self._tally.count(entry.type, "unchanged")
            if entry.logical:
                self._refs.remember_logical(entry)
            return False
        entry.known_vid = row.vid
        entry.retarget("PUT", f"{entry.type}/{row.mid}")
        return True
