"""Reading resources by id from the source, for reference targets the export left out.

One `_id` search per chunk of ids (`GET {base}/{Type}?_id=a,b,c`, paged), or one read per id
from a server that does not support the search. A type the source refuses (401/403: no read
scope) is remembered, so it is not asked again in the run.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from pfsync.core.errors import HTTPError
from pfsync.net.http import Clock, RetryPolicy, json_object, next_link, request_with_retry


class SourceReader:
    """Reads by id with the source's client; `failed` turns True when a request fails for good."""

    def __init__(self, client: httpx.Client, base: str, *, clock: Clock, retry: RetryPolicy) -> None:
        self._client = client
        self._base = base
        self._clock = clock
        self._retry = retry
        self.refused: set[str] = set()  # types the source refuses to read
        self.failed = False
        self.requests = 0

    def _get(self, url: str, params: dict[str, str] | None) -> httpx.Response | None:
        client = self._client
        try:
            response = request_with_retry(
                lambda: client.get(url, params=params, headers={"Accept": "application/fhir+json"}),
                method="GET", url=url, policy=self._retry, clock=self._clock,
            )  # fmt: skip
        except HTTPError:
            self.failed = True
            return None  # the source is unwell: these targets stay logical until a later run
        self.requests += 1
        return response

    def read(self, rtype: str, ids: list[str]) -> list[dict[str, Any]]:
        """The resources of `ids` the source has: one `_id` search (paged), per-id reads if refused."""
        url: str | None = f"{self._base}/{rtype}"
        params: dict[str, str] | None = {"_id": ",".join(ids), "_count": str(len(ids))}
        wanted = set(ids)
        out: list[dict[str, Any]] = []
        while url:
            response = self._get(url, params)
            if response is None:
                return out
            if response.status_code in (401, 403):
                self.refused.add(rtype)  # no read scope for the type: reads would be refused too
                return out
            if response.status_code != 200:
                return out + (self._read_each(rtype, ids) if not out else [])
            doc = json_object(response, f"the source's {rtype} search by _id")
            entries = doc.get("entry")
            for entry in entries if isinstance(entries, list) else []:
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if (
                    isinstance(resource, dict)
                    and resource.get("resourceType") == rtype
                    and resource.get("id") in wanted
                ):
                    wanted.discard(resource["id"])
                    out.append(resource)
            nxt = next_link(doc, str(response.request.url), f"the source's {rtype} search by _id")
            url = nxt if wanted and entries else None
            params = None
        return out

    def _read_each(self, rtype: str, ids: list[str]) -> list[dict[str, Any]]:
        """Servers without `_id` search: one read per id."""
        out = []
        for sid in ids:
            response = self._get(f"{self._base}/{rtype}/{sid}", None)
            if response is not None and response.status_code == 200:
                doc = orjson.loads(response.content)
                if isinstance(doc, dict) and doc.get("resourceType") == rtype:
                    out.append(doc)
        return out
