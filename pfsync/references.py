"""Reference targets: resolution through the id map, resources held back, logical references.

A resource whose reference target has no Medplum id yet is held on disk (`deferred`) instead of
being written with a reference that would dangle; files may arrive in any order. At finish:
1. held resources whose targets now exist are written (rounds, until no progress);
2. targets the export left out (Practitioner, Organization, Location, Medication in Patient or
   Group exports) are fetched from the source with `GET {base}/{Type}?_id=a,b,c` and loaded;
3. what still cannot resolve is written with logical references (identifier of the target's
   system and source id, display kept) and remembered (`logical`);
4. remembered resources whose targets have arrived since (this run or an earlier one) are
   rewritten with literal references.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
import orjson

from pfsync.batch import Entry
from pfsync.idmap import Held, IdMap
from pfsync.transform import Prepared, Ref, Target, TransformContext, TransformError, collect_refs, prepare

if TYPE_CHECKING:
    from pfsync.writes import Writer

_FETCH_CHUNK = 50
_FETCH_ROUNDS = 3


class References:
    def __init__(
        self, writer: Writer, idmap: IdMap, ctx: TransformContext, source_client: httpx.Client | None
    ) -> None:
        self._writer = writer
        self._idmap = idmap
        self._ctx = ctx
        self._client = source_client
        self._urns: dict[str, Target] = {}
        self._has_deferred = idmap.held_count("deferred") > 0
        self._has_logical = idmap.held_count("logical") > 0
        self._tried: set[tuple[str, str]] = set()
        self.requests = 0

    def target(self, ref: Ref) -> Target | None:
        """What the id map knows of a reference target (None: its type cannot be known)."""
        if ref.type is not None:
            row = self._idmap.get(ref.type, ref.id)
            return Target(ref.type, row.mid if row is not None else None)
        cached = self._urns.get(ref.id)
        if cached is not None:
            return cached
        rows = self._idmap.types_of(ref.id)
        loaded = [r for r in rows if r[1] is not None]
        # fixtures README: ids are unique across types, so an id names one resource.
        pick = rows[0] if len(rows) == 1 else (loaded[0] if len(loaded) == 1 else None)
        if pick is None:
            return None
        target = Target(pick[0], pick[1])
        if target.mid is not None:
            self._urns[ref.id] = target
        return target

    def unresolved(self, p: Prepared) -> bool:
        for _, ref in p.refs:
            target = self.target(ref)
            if target is None or target.mid is None:
                return True
        return False

    def defer(self, p: Prepared, file: str | None, line: int | None, raw: bytes) -> None:
        self._idmap.hold("deferred", Held(p.type, p.sid, file, line, raw))
        self._has_deferred = True

    def released(self, rtype: str, sid: str) -> None:
        """An identity is being written: an older held copy must not overwrite it later."""
        if self._has_deferred:
            self._idmap.release("deferred", rtype, sid)

    def hold_logical(self, entry: Entry) -> None:
        self._idmap.hold("logical", Held(entry.type, entry.sid, entry.file, entry.line, entry.raw))
        self._has_logical = True

    def upgraded(self, rtype: str, sid: str) -> None:
        if self._has_logical:
            self._idmap.release("logical", rtype, sid)

    # -- finish
    def finish(self) -> None:
        self._rounds(final=False)
        if self._client is not None:
            for _ in range(_FETCH_ROUNDS):
                if not self._fetch_missing():
                    break
                self._rounds(final=False)
        self._rounds(final=True)
        self._upgrade()

    def _rounds(self, *, final: bool) -> None:
        while self._idmap.held_count("deferred"):
            before = self._idmap.held_count("deferred")
            for held in self._idmap.held("deferred"):
                resource = orjson.loads(held.raw)
                self._writer.ingest(resource, held.file, held.line, held.raw, final=final, first=False)
            self._writer.drain()
            if final or self._idmap.held_count("deferred") >= before:
                break

    def _upgrade(self) -> None:
        if not self._has_logical:
            return
        for held in self._idmap.held("logical"):
            try:
                p = prepare(orjson.loads(held.raw), self._ctx)
            except TransformError:
                continue
            if not self.unresolved(p):
                resource = orjson.loads(held.raw)
                self._writer.ingest(resource, held.file, held.line, held.raw, final=True, first=False)
        self._writer.drain()

    def _fetch_missing(self) -> bool:
        """Fetch the targets no input file holds from the source; -> whether any were asked for."""
        missing: dict[str, set[str]] = {}
        for held in self._idmap.held("deferred"):
            for ref in collect_refs(orjson.loads(held.raw), self._ctx):
                if ref.type is None or (ref.type, ref.id) in self._tried:
                    continue
                if self._idmap.get(ref.type, ref.id) is None:
                    missing.setdefault(ref.type, set()).add(ref.id)
        if not missing:
            return False
        for rtype, ids in sorted(missing.items()):
            ordered = sorted(ids)
            self._tried.update((rtype, i) for i in ordered)
            for i in range(0, len(ordered), _FETCH_CHUNK):
                for resource in self._fetch(rtype, ordered[i : i + _FETCH_CHUNK]):
                    self._writer.count(rtype, "fetched")
                    raw = orjson.dumps(resource)
                    self._writer.ingest(resource, f"{self._ctx.base}/{rtype}", 0, raw)
        self._writer.drain()
        return True

    def _fetch(self, rtype: str, ids: list[str]) -> list[dict[str, Any]]:
        assert self._client is not None
        url: str | None = f"{self._ctx.base}/{rtype}"
        params: dict[str, str] | None = {"_id": ",".join(ids), "_count": str(len(ids))}
        out: list[dict[str, Any]] = []
        while url:
            try:
                response = self._client.get(url, params=params, headers={"Accept": "application/fhir+json"})
            except httpx.TransportError:
                return out
            self.requests += 1
            if response.status_code != 200:
                return out + (self._fetch_each(rtype, ids) if not out else [])
            doc = orjson.loads(response.content)
            for entry in doc.get("entry") or []:
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if (
                    isinstance(resource, dict)
                    and resource.get("resourceType") == rtype
                    and resource.get("id") in ids
                ):
                    out.append(resource)
            url = next((ln.get("url") for ln in doc.get("link") or [] if ln.get("relation") == "next"), None)
            params = None
        return out

    def _fetch_each(self, rtype: str, ids: list[str]) -> list[dict[str, Any]]:
        """Servers without `_id` search: one read per id."""
        assert self._client is not None
        out = []
        for sid in ids:
            try:
                response = self._client.get(
                    f"{self._ctx.base}/{rtype}/{sid}", headers={"Accept": "application/fhir+json"}
                )
            except httpx.TransportError:
                continue
            self.requests += 1
            if response.status_code == 200:
                doc = orjson.loads(response.content)
                if isinstance(doc, dict) and doc.get("resourceType") == rtype:
                    out.append(doc)
        return out
