"""Identity lookups in Medplum: many identifiers OR-ed per search, paced by the quota.

docs/medplum.md "Ids and identity" and "Measured on a real server": one search with 100 identifiers OR-ed by commas
costs 20 points (a write costs 100), commas inside a value are escaped as `\\,`; docs/medplum.md, recorded case 32:
`_elements` subsets the result (meta stays, so our content-hash tag comes back too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from pfsync.core.errors import HTTPError
from pfsync.load.transform import escape_token, resource_hash_from_meta
from pfsync.medplum.batch import wait_from_outcome
from pfsync.net.http import Clock, RetryPolicy, is_temporary, json_object, next_link, outcome_text
from pfsync.net.pacing import Pacer
from pfsync.net.policy import shown_url

LOOKUP_BATCH = 100
_MAX_URL = 7000


@dataclass(frozen=True)
class Found:
    mid: str
    vid: str | None
    hash: str | None
    owned: bool = True  # provably the searching source's (pfsync.load.transform.owned)


class Searcher:
    """GETs against the Medplum FHIR base with quota pacing and bounded retries."""

    def __init__(
        self, client: httpx.Client, pacer: Pacer, clock: Clock, retry: RetryPolicy,
        on_response: Callable[[str | None, int, int, bool], None] | None = None,
    ) -> None:  # fmt: skip
        self._client = client
        self._pacer = pacer
        self._clock = clock
        self._retry = retry
        self._on_response = on_response
        self.requests = 0

    def fetch(self, url: str, params: dict[str, Any] | None = None) -> httpx.Response:
        """Only the HTTP GET, no bookkeeping: safe on a worker thread. Hand the response (or the
        TransportError) to `get(..., prefetched=)` on the loader's thread."""
        return self._client.get(url, params=params, headers={"Accept": "application/fhir+json"})

    def get(self, url: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.get_prefetched(url, params, None)

    def get_prefetched(
        self, url: str, params: dict[str, Any] | None, prefetched: Future[httpx.Response] | None
    ) -> dict[str, Any]:
        """A search answer; `prefetched`: the first attempt, already sent by `fetch` on a thread."""
        attempt = 0
        while True:
            try:
                if prefetched is not None:
                    first, prefetched = prefetched, None
                    response = first.result()
                else:
                    self._clock.sleep(self._pacer.search_wait(self._clock.now()))
                    response = self.fetch(url, params)
            except httpx.TransportError as exc:
                attempt += 1
                if attempt > self._retry.retries:
                    raise HTTPError(
                        f"GET {shown_url(url)} failed: {exc.__class__.__name__}", method="GET", url=url
                    ) from None
                self._clock.sleep(self._retry.backoff(attempt))
                continue
            self.requests += 1
            throttled = response.status_code == 429
            self._pacer.observe(response.headers.get("ratelimit"), entries=0, searches=1, now=self._clock.now(),
                                throttled=throttled)  # fmt: skip
            if self._on_response is not None:
                self._on_response(response.headers.get("ratelimit"), 0, 1, throttled)
            if is_temporary(response):
                attempt += 1
                if attempt > self._retry.retries:
                    raise HTTPError(f"GET {shown_url(url)} answered {response.status_code}", method="GET", url=url,
                                    status=response.status_code, outcome=outcome_text(response))  # fmt: skip
                wait = wait_from_outcome(_json(response.content)) if throttled else None
                self._pacer.throttle(
                    wait if wait is not None else self._retry.backoff(attempt), self._clock.now()
                )
                continue
            if response.status_code != 200:
                raise HTTPError(
                    f"GET {shown_url(url)} answered {response.status_code}: {outcome_text(response) or ''}",
                    method="GET", url=url, status=response.status_code, outcome=outcome_text(response),
                )  # fmt: skip
            # Not a JSON object: a proxy's page, a broken server. Taking it as "no match" would
            # create duplicates, so the run stops (exit 5) and the next one retries.
            return json_object(response, "a Medplum search")

    @property
    def fhir_base(self) -> str:
        """The FHIR base URL searches are relative to, and `next` links are kept on."""
        return str(self._client.base_url)

    def search_all(self, url: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Every resource of a search, following `next` links."""
        out: list[dict[str, Any]] = []
        base = self.fhir_base
        current = str(httpx.URL(base).join(url)) if base else url
        doc = self.get(url, params)
        while True:
            entries = doc.get("entry")
            for entry in entries if isinstance(entries, list) else []:
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if isinstance(resource, dict):
                    out.append(resource)
            nxt = next_link(doc, current, "a Medplum search", rebase_on=base or None)
            if nxt is None or not entries:
                return out
            doc, current = self.get(nxt), nxt


def identifier_groups(system: str, sids: Sequence[str]) -> list[list[str]]:
    """Split source ids into groups of at most LOOKUP_BATCH whose OR-ed search fits in a URL."""
    groups: list[list[str]] = []
    cur: list[str] = []
    length = 0
    for sid in sids:
        piece = len(system) + len(sid) + 8
        if cur and (len(cur) >= LOOKUP_BATCH or length + piece > _MAX_URL):
            groups.append(cur)
            cur, length = [], 0
        cur.append(sid)
        length += piece
    if cur:
        groups.append(cur)
    return groups


def find_identities(
    searcher: Searcher, rtype: str, system: str, sids: Sequence[str],
    owns: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, list[Found]]:  # fmt: skip
    """sid -> the Medplum resources carrying identifier system|sid (normally zero or one); each
    marked `owned` as `owns` judges it from its meta (all of them without `owns`)."""
    result: dict[str, list[Found]] = {sid: [] for sid in sids}
    for group in identifier_groups(system, sids):
        value = ",".join(f"{system}|{escape_token(sid)}" for sid in group)
        params = {
            "identifier": value,
            "_count": str(min(1000, 2 * len(group) + 10)),
            "_elements": "identifier,meta",
        }
        for resource in searcher.search_all(rtype, params):
            mid = resource.get("id")
            if not isinstance(mid, str):
                continue
            meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
            vid = meta.get("versionId") if isinstance(meta, dict) else None
            found = Found(mid, vid if isinstance(vid, str) else None, resource_hash_from_meta(resource),
                          owns is None or owns(resource))  # fmt: skip
            for ident in resource.get("identifier") or []:
                if isinstance(ident, dict) and ident.get("system") == system and ident.get("value") in result:
                    bucket = result[ident["value"]]
                    if all(f.mid != mid for f in bucket):
                        bucket.append(found)
    return result


def _json(content: bytes) -> Any:
    try:
        return orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        return None
