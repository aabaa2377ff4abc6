"""One batch Bundle on the wire: the POST a worker thread makes (synchronously, or as an async batch
job: pfsync.medplum.asyncbatch), what came back (`Sent`), the sender's counters (`SenderStats`) and
the `Handler` that outcomes go to. The Bundle sender (pfsync.medplum.upsert) decides what the answers
mean; nothing here keeps state between Bundles.

May import: pfsync.core, pfsync.net, pfsync.medplum.batch, pfsync.medplum.client, pfsync.medplum.asyncbatch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import httpx
import orjson

from pfsync.medplum.asyncbatch import AsyncBatchRunner
from pfsync.medplum.batch import Entry, EntryResult, Kind
from pfsync.medplum.client import MedplumClient
from pfsync.net.http import outcome_text, wait_from_outcome

FHIR_JSON = "application/fhir+json"
MEDPLUM_BODY_LIMIT = 1_048_576  # docs/medplum.md: 1,048,577 bytes is refused


class Handler(Protocol):
    """Where outcomes go (the Loader)."""

    def settled(self, entry: Entry, kind: Kind, result: EntryResult) -> None: ...
    def exhausted(self, entry: Entry, result: EntryResult) -> None: ...
    def recheck(self, entry: Entry) -> None: ...
    def reroute(self, entry: Entry) -> Entry | None: ...


@dataclass
class Sent:
    """What came back for one Bundle (built on a worker thread)."""

    status: int | None  # None: network error
    content: bytes = b""
    ratelimit: str | None = None
    elapsed: float = 0.0
    text: str | None = None


@dataclass
class SenderStats:
    requests: int = 0
    bundles: int = 0
    retried_entries: int = 0
    throttled: int = 0
    conflicts: int = 0
    splits: int = 0
    max_slots: int = 1
    statuses: dict[int, int] = field(default_factory=dict)


def send_bundle(client: MedplumClient, body: bytes, runner: AsyncBatchRunner | None) -> Sent:
    """On a worker thread: one Bundle, synchronously, or as an async batch job through `runner`."""
    started = time.monotonic()
    if runner is not None:
        status, content, ratelimit, text = runner.run(body)
        return Sent(status, content, ratelimit, time.monotonic() - started, text)
    try:
        # One attempt: what a lost or failed Bundle means is decided per entry (BatchSender._complete).
        response = client.send_once("POST", "", content=body, headers={"Content-Type": FHIR_JSON})
    except httpx.TransportError as exc:
        return Sent(None, elapsed=time.monotonic() - started, text=f"{exc.__class__.__name__}: {exc}")
    text = outcome_text(response) if response.status_code >= 300 else None
    return Sent(response.status_code, response.content, response.headers.get("ratelimit"),
                time.monotonic() - started, text)  # fmt: skip


def wait_from_outcome_bytes(content: bytes) -> float | None:
    try:
        return wait_from_outcome(orjson.loads(content)) if content else None
    except orjson.JSONDecodeError:
        return None
