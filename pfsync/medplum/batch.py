"""Batch Bundle entries and per-entry outcomes, in the shapes the real Medplum server uses.

docs/medplum.md "Batch Bundles": responses come back in request order, each
`{response: {status: "201", outcome, location: "Type/<id>"}, resource}`; errors are per entry
(docs/medplum.md, recorded cases 14-19, 27-30, 39). 429 entries carry the limiter state as JSON in `diagnostics`
(`_msBeforeNext`, docs/medplum.md, recorded case 28).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson

from pfsync.net.http import BATCH_ENTRY_RULES, decide, outcome_from_json, wait_from_outcome

BUNDLE_HEAD = b'{"resourceType":"Bundle","type":"batch","entry":['
BUNDLE_TAIL = b"]}"


@dataclass
class Entry:
    """One write of a Bundle, with where its resource came from (for quarantine and retry)."""

    type: str
    sid: str
    method: str  # PUT (conditional or by id), POST, DELETE
    url: str
    body: bytes | None
    hash: str | None = None
    file: str | None = None
    line: int | None = None
    raw: bytes = b""  # the source line, as read
    attempts: int = 0
    known_vid: str | None = None  # version in the id map before this write: tells a no-op apart
    looked_up: bool = False  # Medplum was searched for this identity since the last ambiguity
    ambiguous: bool = False  # an earlier write of it may have committed unseen: always search first
    logical: tuple[tuple[str, str], ...] = ()  # targets the body names logically (upgrade later)
    purpose: str = "upsert"  # upsert | delete | delete-tag
    _encoded: bytes | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.type, self.sid)

    def retarget(self, method: str, url: str) -> None:
        self.method, self.url, self._encoded = method, url, None

    @property
    def update_id(self) -> str | None:
        """The Medplum id of an update by id (`PUT Type/<id>`), else None."""
        if self.method != "PUT" or "?" in self.url:
            return None
        _, _, rid = self.url.rpartition("/")
        return rid or None

    def encoded(self) -> bytes:
        """This entry as Bundle JSON bytes (built once: Bundles are sized by these lengths)."""
        if self._encoded is None:
            request = orjson.dumps({"method": self.method, "url": self.url})
            if self.body is None:
                self._encoded = b'{"request":' + request + b"}"
            else:
                self._encoded = b'{"resource":' + self.request_body() + b',"request":' + request + b"}"
        return self._encoded

    def request_body(self) -> bytes:
        """The body as sent. An update by id carries that id in the body, since Medplum refuses one
        whose body id differs from the URL's, a missing id included (docs/medplum.md, "Updates by
        id"); every other request sends the body without an id (a conditional PUT with an id that
        matches nothing is refused too)."""
        assert self.body is not None
        rid = self.update_id
        if rid is None:
            return self.body
        return with_id(self.body, rid)


def with_id(body: bytes, rid: str) -> bytes:
    """`body` (a JSON resource) with `id` set to `rid`, placed after `resourceType`."""
    resource = orjson.loads(body)
    resource.pop("id", None)
    rtype = resource.pop("resourceType", None)
    return orjson.dumps({"resourceType": rtype, "id": rid, **resource})


def bundle_bytes(entries: list[Entry]) -> bytes:
    return BUNDLE_HEAD + b",".join(e.encoded() for e in entries) + BUNDLE_TAIL


def bundle_size(sizes: int, count: int) -> int:
    return len(BUNDLE_HEAD) + len(BUNDLE_TAIL) + sizes + max(0, count - 1)


class Kind(Enum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    DELETED = "deleted"
    RETRY = "retry"
    STALE = "stale"  # PUT Type/<id> of an id Medplum no longer has: look the identity up again
    FAILED = "failed"


@dataclass(frozen=True)
class EntryResult:
    status: int  # 0 when the response had no entry for it
    mid: str | None = None
    vid: str | None = None
    text: str | None = None
    wait: float | None = None  # seconds, from a 429's msBeforeNext


def _status(value: Any) -> int:
    try:
        return int(str(value).split()[0])
    except (ValueError, IndexError):
        return 0


def parse_entry(entry: Any) -> EntryResult:
    if not isinstance(entry, dict):
        return EntryResult(0, text="no response entry")
    response = entry.get("response") or {}
    status = _status(response.get("status"))
    resource = entry.get("resource")
    mid = vid = None
    location = response.get("location")
    if isinstance(location, str) and "/" in location:
        parts = location.split("?")[0].split("/")
        # "Patient/<id>" or an absolute ".../Patient/<id>/_history/<vid>"
        if "_history" in parts:
            i = parts.index("_history")
            mid, vid = parts[i - 1], (parts[i + 1] if i + 1 < len(parts) else None)
        else:
            mid = parts[-1]
    if isinstance(resource, dict):
        mid = mid or resource.get("id")
        meta = resource.get("meta")
        if isinstance(meta, dict) and isinstance(meta.get("versionId"), str):
            vid = meta["versionId"]
    outcome = response.get("outcome")
    text = outcome_from_json(outcome) if status >= 300 or status == 0 else None
    return EntryResult(status, mid, vid, text, wait_from_outcome(outcome) if status == 429 else None)


def parse_batch(content: bytes, count: int) -> list[EntryResult]:
    """Per-entry results of a batch-response; entries it lacks come back as status 0 (retried)."""
    try:
        doc = orjson.loads(content)
    except orjson.JSONDecodeError:
        doc = None
    entries = doc.get("entry") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        entries = []
    results = [parse_entry(e) for e in entries[:count]]
    results += [EntryResult(0, text="missing from the batch-response")] * (count - len(results))
    return results


def classify(entry: Entry, result: EntryResult) -> Kind:
    """What a per-entry result means for this entry (docs/medplum.md tables; recorded cases 14-19, 28, 30)."""
    status = result.status
    if entry.method == "DELETE" and status in (200, 204, 404, 410):
        return Kind.DELETED  # docs/medplum.md, recorded cases 40/41: deleting what is gone is 200 too
    if entry.method != "DELETE" and status == 201:
        return Kind.CREATED
    if entry.method != "DELETE" and status == 200:
        # docs/medplum.md "Conditional update": a no-op returns 200 with the old versionId.
        if entry.known_vid is not None and result.vid == entry.known_vid:
            return Kind.UNCHANGED
        return Kind.UPDATED
    # Which other answers are worth re-sending is the classifier's table (pfsync.net.http.BATCH_ENTRY_RULES).
    if decide(status, BATCH_ENTRY_RULES, lambda: (None, result.text)) == "retry":
        return Kind.RETRY
    if status in (404, 410) and entry.method == "PUT" and "?" not in entry.url:
        return Kind.STALE
    return Kind.FAILED


def is_too_large(status: int, text: str | None) -> bool:
    """docs/medplum.md "Size limits": 413 from the body parser, or 400 "File too large" on the real server."""
    return status == 413 or (status == 400 and bool(text) and "too large" in (text or "").lower())
