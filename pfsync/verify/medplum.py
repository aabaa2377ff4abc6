"""Quota-paced reads of Medplum for `pfsync verify` (and the few DELETEs of `--fix`).

docs/medplum.md "Quotas and 429": a search costs 20 points whatever it returns, a read 1, a history 10,
a write 100. So verify reads by *pages*: one paged search per type on our identifier system
(`Type?identifier=<system>|&_count=1000`) lists everything we ever synced in ceil(n/1000) searches;
batched identifier searches (the loader's `pfsync.medplum.lookup.find_identities`: up to 100 OR-ed per
search, commas escaped as `\\,`) only confirm what the pages did not show. Pacing and the quota
used come from the `RateLimit` header through the loader's `pfsync.net.pacing.Pacer`; a 429
`throttled` waits the OperationOutcome's `msBeforeNext` (there is no Retry-After) and is never a
failure. `_sort=_lastUpdated` makes Medplum page by cursor (offset paging stops at 10,000).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import httpx
import orjson

from pfsync.core.errors import HTTPError, TemporaryError
from pfsync.core.settings import HttpSettings
from pfsync.medplum.batch import wait_from_outcome
from pfsync.medplum.lookup import Found, Searcher, find_identities
from pfsync.net.http import (
    RETRYABLE_STATUS,
    Clock,
    RetryPolicy,
    SystemClock,
    next_link,
    raise_for_status,
    request_with_retry,
)
from pfsync.net.pacing import Pacer, parse_ratelimit

log = logging.getLogger("pfsync.verify")

Json = dict[str, Any]
Cost = Literal["search", "read", "history", "write"]

# docs/medplum.md "Quotas and 429": interaction costs, for the estimate when no RateLimit header is sent.
COSTS: dict[Cost, int] = {"search": 20, "read": 1, "history": 10, "write": 100}
MAX_PAGE = 1000  # Medplum's largest _count
IDS_PER_SEARCH = 100  # ids OR-ed per `_id` search: 20 points in total


@dataclass
class ReadStats:
    """What verify spent on Medplum: requests, 429s, seconds waited, and points (RateLimit deltas)."""

    requests: int = 0
    searches: int = 0
    throttled: int = 0
    waited: float = 0.0


class MedplumReader:
    """Medplum FHIR reads with quota pacing, paging and 429 waits. Single-threaded."""

    def __init__(
        self,
        client: httpx.Client,
        fhir_url: str,
        *,
        http: HttpSettings | None = None,
        clock: Clock | None = None,
        pacer: Pacer | None = None,
        page_size: int = MAX_PAGE,
        max_throttle_wait: float = 3600.0,
    ) -> None:
        self.client = client
        self.fhir_url = fhir_url if fhir_url.endswith("/") else fhir_url + "/"
        self.clock = clock or SystemClock()
        self.policy = RetryPolicy.from_settings(http or HttpSettings())
        self.pacer = pacer or Pacer()
        self.page_size = max(1, min(MAX_PAGE, page_size))
        self.max_throttle_wait = max_throttle_wait
        self.stats = ReadStats()

    @property
    def quota_used(self) -> int:
        """Points spent, measured from RateLimit deltas (estimated across window resets)."""
        return round(self.pacer.used)

    # ------------------------------------------------------------------ transport
    def send(self, method: str, url: str, cost: Cost) -> httpx.Response:
        """One request, paced from RateLimit; 429 waits `msBeforeNext` and tries again, always."""
        waited_429 = 0.0
        while True:
            wait = self.pacer.search_wait(self.clock.now()) if cost != "read" else 0.0
            if wait > 0:
                log.info("verify_pace waiting %.1fs for the Medplum quota window", wait)
                self._sleep(wait)

            def once() -> httpx.Response:
                self.stats.requests += 1
                return self.client.request(method, url, headers={"Accept": "application/fhir+json"})

            # 429 is handled below (never a failure); 408/5xx/network errors get bounded retries.
            response = request_with_retry(
                once,
                method=method,
                url=url,
                policy=self.policy,
                clock=self.clock,
                retry_status=RETRYABLE_STATUS - {429},
            )
            throttled = response.status_code == 429
            self._observe(response, cost, throttled)
            if not throttled:
                return response
            self.stats.throttled += 1
            pause = self._throttle_wait(response)
            waited_429 += pause
            if waited_429 > self.max_throttle_wait:
                raise TemporaryError(
                    f"Medplum kept answering 429 for {waited_429:.0f}s",
                    hint="the FHIR quota is spent by another client; run verify later",
                )
            log.info("verify_throttled waiting %.1fs (429 throttled)", pause)
            self.pacer.throttle(pause, self.clock.now())
            response.close()

    def _observe(self, response: httpx.Response, cost: Cost, throttled: bool) -> None:
        before = self.pacer.used
        self.pacer.observe(
            response.headers.get("RateLimit"),
            entries=1 if cost == "write" else 0,
            searches=1 if cost == "search" else 0,
            now=self.clock.now(),
            throttled=throttled,
        )
        if self.pacer.used == before:
            # Every interaction costs at least a point: no delta means it could not be measured (no
            # header, or a quota-off project whose counter sits at r=0: docs/medplum.md): use the cost table.
            self.pacer.used += COSTS[cost]
        if cost == "search":
            self.stats.searches += 1

    def _throttle_wait(self, response: httpx.Response) -> float:
        try:
            body = orjson.loads(response.content) if response.content else None
        except orjson.JSONDecodeError:
            body = None
        wait = wait_from_outcome(body)
        if wait is None:
            part = parse_ratelimit(response.headers.get("RateLimit")).get("fhirInteractions")
            wait = part[1] if part else self.policy.backoff(self.stats.throttled)
        return min(max(wait, 0.05), 120.0)

    def _sleep(self, seconds: float) -> None:
        self.stats.waited += seconds
        self.clock.sleep(seconds)

    def get_json(self, url: str, cost: Cost, what: str) -> Json:
        response = self.send("GET", url, cost)
        raise_for_status(response, what)
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise HTTPError(
                f"{what}: Medplum answered something that is not JSON", method="GET", url=url
            ) from None
        if not isinstance(body, dict):
            raise HTTPError(
                f"{what}: Medplum answered a JSON value that is not a resource", method="GET", url=url
            )
        return body

    def _next(self, bundle: dict[str, Any]) -> str | None:
        """The searchset's `next` link (Medplum pages with `_offset`/cursor links), on our base URL."""
        return next_link(bundle, self.fhir_url, "a Medplum search", rebase_on=self.fhir_url)

    # ------------------------------------------------------------------ searches
    def pages(self, url: str, what: str) -> Iterator[list[Json]]:
        """Follow a searchset's `next` links (docs/medplum.md, recorded case 33) and yield each page's resources.

        Callers drop a page before asking for the next one, so only one page is ever held."""
        next_url: str | None = url
        while next_url is not None:
            bundle = self.get_json(next_url, "search", what)
            resources = [
                e["resource"]
                for e in bundle.get("entry") or []
                if isinstance(e, dict) and isinstance(e.get("resource"), dict)
            ]
            next_url = self._next(bundle)
            del bundle  # one page in memory at a time: drop it before the next one is fetched
            if resources:
                yield resources
            del resources

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
        next_url: str | None = url
        while next_url is not None:
            bundle = self.get_json(next_url, "history", f"reading the history of {rtype}/{mid}")
            for entry in bundle.get("entry") or []:
                resource = entry.get("resource") if isinstance(entry, dict) else None
                meta = resource.get("meta") if isinstance(resource, dict) else None
                when = meta.get("lastUpdated") if isinstance(meta, dict) else None
                if isinstance(when, str) and (earliest is None or when < earliest):
                    earliest = when
            next_url = self._next(bundle)
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
    """The loader's Searcher interface over our reader, so lookups wait out every 429 (the issue:
    verify never fails on 429) while 5xx and network errors keep their bounded retries."""

    def __init__(self, reader: MedplumReader) -> None:
        super().__init__(reader.client, reader.pacer, reader.clock, reader.policy)
        self._reader = reader

    def get(self, url: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        absolute = url if "://" in url else self._reader.fhir_url + url
        full = str(httpx.URL(absolute, params=params)) if params else absolute  # next links: already rebased
        return self._reader.get_json(full, "search", "looking identities up in Medplum")

    @property
    def fhir_base(self) -> str:
        return self._reader.fhir_url
