"""What Medplum holds of a type: the per-type probe and the searches of a run whose id map is new.

A probe asks Medplum, on a worker thread, whether it holds any resource of a type with our
identifier system (once per type and run, 20 points: docs/medplum.md, "Quota costs"); if not, no
identity of that type can exist there and the per-identity searches are skipped. Probes are asked
lazily (a resync whose identities are all in the id map asks nothing) and concurrently. Creates
of this run are in the id map; a create whose outcome is unknown is marked ambiguous and always
searched again (pfsync.load.writes).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import httpx

from pfsync.core.errors import HTTPError
from pfsync.core.marks import LOGICAL_TAG
from pfsync.load.transform import TransformContext
from pfsync.medplum.lookup import Searcher

_PROBE_THREADS = 4


class Probes:
    """The probes of one load; `empty(type)` is the answer once it is taken in (`answers`)."""

    def __init__(self, searcher: Searcher, ctx: TransformContext, *, dry_run: bool) -> None:
        self._searcher = searcher
        self._ctx = ctx
        self._dry_run = dry_run
        self._empty: dict[str, bool] = {}
        self._asked: dict[str, Future[httpx.Response]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def empty(self, rtype: str) -> bool | None:
        """Whether Medplum held no resource of this type (None: not answered, or not asked)."""
        return self._empty.get(rtype)

    @property
    def waiting(self) -> bool:
        """Whether a probe was asked and its answer not taken in yet."""
        return bool(self._asked)

    def ask(self, rtype: str) -> None:
        """Start the probe of this type, unless it was asked already."""
        if rtype in self._asked or rtype in self._empty:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=_PROBE_THREADS, thread_name_prefix="pfsync-probe")
        self._asked[rtype] = self._pool.submit(self._searcher.fetch, rtype, self._params(rtype))

    def _params(self, rtype: str) -> dict[str, str]:
        return {"identifier": f"{self._ctx.system(rtype)}|", "_count": "1", "_elements": "identifier"}

    def answers(self, *, block: bool) -> list[str]:
        """Take in the answered probes (every one asked: `block`); -> their types."""
        out = []
        for rtype, future in list(self._asked.items()):
            if not block and not future.done():
                continue
            del self._asked[rtype]
            try:
                found = self._searcher.get_prefetched(rtype, self._params(rtype), future)
            except HTTPError as exc:
                if exc.temporary:
                    raise
                found = {"entry": ["unknown"]}  # a server without `system|` search: search per identity
            self._empty[rtype] = not found.get("entry")
            out.append(rtype)
        return out

    def medplum_ids(self, rtype: str) -> list[str]:
        """Source ids of every resource of this type Medplum holds with our identifier system
        (`identifier=<system>|`: any value), for a run whose id map is new."""
        system = self._ctx.system(rtype)
        return self._source_ids(
            rtype, {"identifier": f"{system}|", "_elements": "identifier", "_count": "1000"}
        )

    def tagged_ids(self, rtype: str) -> list[str]:
        """Source ids of the resources of this type that Medplum holds with logical references
        (the tag pfsync.load.transform.render puts on them), for a run whose id map has lost them."""
        tag = f"{LOGICAL_TAG['system']}|{LOGICAL_TAG['code']}"
        return self._source_ids(rtype, {"_tag": tag, "_elements": "identifier", "_count": "1000"})

    def _source_ids(self, rtype: str, params: dict[str, str]) -> list[str]:
        if self._empty.get(rtype) or self._dry_run:
            return []  # Medplum held none of this type before this run (what it wrote is known)
        system = self._ctx.system(rtype)
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
