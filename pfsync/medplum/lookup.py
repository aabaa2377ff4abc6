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

from pfsync.core.marks import escape_token, resource_hash_from_meta
from pfsync.medplum.client import MedplumClient

LOOKUP_BATCH = 100
_MAX_URL = 7000


@dataclass(frozen=True)
class Found:
    mid: str
    vid: str | None
    hash: str | None
    owned: bool = True  # provably the searching source's (pfsync.load.transform.owned)


class Searcher:
    """Medplum searches for the loader, through the one Medplum client (pacing, 429 waits, paging)."""

    def __init__(self, client: MedplumClient) -> None:
        self.client = client

    @property
    def requests(self) -> int:
        return self.client.stats.requests

    def fetch(self, url: str, params: dict[str, str] | None = None) -> httpx.Response:
        """Only the HTTP GET, no bookkeeping: safe on a worker thread. Hand the future to
        `get_prefetched` on the loader's thread."""
        return self.client.fetch(url, params)

    def get(self, url: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        return self.client.get_json(url, "a Medplum search", params=params)

    def get_prefetched(
        self, url: str, params: dict[str, str] | None, prefetched: Future[httpx.Response] | None
    ) -> dict[str, Any]:
        """A search answer; `prefetched`: the first attempt, already sent by `fetch` on a thread."""
        first = prefetched.result if prefetched is not None else None
        return self.client.get_json(url, "a Medplum search", params=params, first=first)

    @property
    def fhir_base(self) -> str:
        """The FHIR base URL searches are relative to, and `next` links are kept on."""
        return self.client.fhir_url

    def search_all(self, url: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """Every resource of a search, following `next` links."""
        return self.client.search_all(url, params)


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
