"""Quota-paced reads of Medplum for `pfsync verify` (and the few DELETEs of `--fix`).

docs/medplum.md "Quotas and 429": a search costs 20 points whatever it returns, a read 1, a history 10,
a write 100. So verify reads by *pages*: one paged search per type on our identifier system
(`Type?identifier=<system>|&_count=1000`) lists everything we ever synced in ceil(n/1000) searches;
batched identifier searches (the loader's `pfsync.medplum.lookup.find_identities`: up to 100 OR-ed per
search, commas escaped as `\\,`) only confirm what the pages did not show. Every request goes
through the one Medplum client (pfsync.medplum.client): pacing and the quota used come from the
`RateLimit` header; a 429 `throttled` waits the OperationOutcome's `msBeforeNext` (there is no
Retry-After) and is no failure for up to `max_throttle_wait` seconds. `_sort=_lastUpdated` makes Medplum page by cursor (offset paging stops at 10,000).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import quote

import httpx

from pfsync.medplum.client import COSTS, Cost, MedplumClient, MedplumStats
from pfsync.medplum.lookup import Found, Searcher, find_identities
from pfsync.net.http import raise_for_status
from pfsync.net.pacing import Pacer

log = logging.getLogger("pfsync.verify")

Json = dict[str, Any]
ReadStats = MedplumStats  # what verify spent on Medplum: requests, searches, 429s, seconds waited
__all__ = ["COSTS", "Cost", "MedplumReader", "ReadStats"]
MAX_PAGE = 1000  # Medplum's largest _count
IDS_PER_SEARCH = 100  # ids OR-ed per `_id` search: 20 points in total


class MedplumReader:
    """Medplum FHIR reads for verify over the one Medplum client (pacing, 429 waits, paging).
    Single-threaded."""

    def __init__(
        self,
        client: MedplumClient,
        *,
        pacer: Pacer | None = None,
        page_size: int = MAX_PAGE,
        max_throttle_wait: float = 3600.0,
    ) -> None:
        # verify's own view of the one client: a 429 is waited out for up to max_throttle_wait (verify
        # never fails on a spent quota), and every request counts at least its cost (the report's quota).
        self.medplum = client.sibling(
            pacer=pacer, throttle_patience=max_throttle_wait, estimate_unmeasured=True
        )
        self.client = self.medplum.http
        self.fhir_url = self.medplum.fhir_url
        self.clock = self.medplum.clock
        self.policy = self.medplum.policy
        self.pacer = self.medplum.pacer
        self.page_size = max(1, min(MAX_PAGE, page_size))
        self.stats = self.medplum.stats

    @property
    def quota_used(self) -> int:
        """Points spent, measured from RateLimit deltas (estimated across window resets)."""
        return round(self.pacer.used)

    def send(self, method: str, url: str, cost: Cost) -> httpx.Response:
        """One request through the Medplum client: paced, 429s waited out, 5xx retried."""
        return self.medplum.send(method, url, cost=cost)

    def get_json(self, url: str, cost: Cost, what: str) -> Json:
        return self.medplum.get_json(url, what, cost=cost)

    # ------------------------------------------------------------------ searches
    def pages(self, url: str, what: str) -> Iterator[list[Json]]:
        """Follow a searchset's `next` links (docs/medplum.md, recorded case 33) and yield each page's resources.

        Callers drop a page before asking for the next one, so only one page is ever held."""
        return self.medplum.pages(url, what)

    def scan(self, rtype: str, system: str, *, elements: str | None = None) -> Iterator[list[Json]]:
        """Every `rtype` carrying an identifier of `system` (FHIR token `system|` = any value).

        `_sort=_lastUpdated` makes Medplum page by cursor: offset paging stops at 10,000
        (Medplum docs, "Paginated Search"), and a type can hold far more than that."""
        query = f"identifier={quote(system + '|', safe=':/')}&_count={self.page_size}&_sort=_lastUpdated"
        if elements:
            query += f"&_elements={elements}"
        return self.pages(f"{self.fhir_url}{rtype}?{query}", f"listing {rtype} in Medplum")

    def by_ids(self, rtype: str, ids: Sequence[str]) -> Iterator[Json]:
        """Which of these Medplum ids of `rtype` exist (`_id=a,b,...`, 100 per search)."""
        for start in range(0, len(ids), IDS_PER_SEARCH):
            chunk = ids[start : start + IDS_PER_SEARCH]
            query = f"_id={quote(','.join(chunk), safe=',')}&_count={MAX_PAGE}&_elements=id"
            for page in self.pages(f"{self.fhir_url}{rtype}?{query}", f"checking {rtype} ids"):
                yield from page

    def first_version_time(self, rtype: str, mid: str) -> str | None:
        """When this resource was created: the earliest `meta.lastUpdated` of its history."""
        earliest: str | None = None
        url = f"{self.fhir_url}{rtype}/{quote(mid, safe='')}/_history?_count={MAX_PAGE}"
        for page in self.medplum.pages(url, f"reading the history of {rtype}/{mid}", cost="history"):
            for resource in page:
                meta = resource.get("meta")
                when = meta.get("lastUpdated") if isinstance(meta, dict) else None
                if isinstance(when, str) and (earliest is None or when < earliest):
                    earliest = when
        return earliest

    def delete(self, rtype: str, mid: str) -> None:
        """DELETE Type/<id>; deleting what is gone is 200 too (docs/medplum.md, recorded case 40)."""
        url = f"{self.fhir_url}{rtype}/{quote(mid, safe='')}"
        response = self.send("DELETE", url, "write")
        if response.status_code in (404, 410):
            return
        raise_for_status(response, f"deleting {rtype}/{mid}")

    def find(
        self,
        rtype: str,
        system: str,
        sids: Sequence[str],
        owns: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, list[Found]]:
        """sid -> Medplum resources with identifier `system|sid` (the loader's batched lookup);
        with `owns`, only those it accepts (pfsync.load.transform.owned)."""
        found = find_identities(_ReaderSearcher(self), rtype, system, sids, owns)
        return {sid: [f for f in matches if f.owned] for sid, matches in found.items()}


class _ReaderSearcher(Searcher):
    """The loader's Searcher over the reader's Medplum client (its 429 patience and quota report)."""

    def __init__(self, reader: MedplumReader) -> None:
        super().__init__(reader.medplum)
