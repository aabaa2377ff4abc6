"""One batch Bundle on the wire: the POST a worker thread makes (synchronously, or as an async batch
job: pfsync.medplum.asyncbatch), which Bundles go async (`OversizeRoute`, the one piece that
remembers across Bundles: identities routed async stay so), what came back (`Sent`), the sender's
counters (`SenderStats`, `Retries`) and the reports of entries' ends (`Report`). The Bundle sender
(pfsync.medplum.upsert) decides what the answers mean.

May import: pfsync.core, pfsync.net, pfsync.medplum.batch, pfsync.medplum.client, pfsync.medplum.asyncbatch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx
import orjson

from pfsync.medplum.asyncbatch import AsyncBatchRunner, send_alone_async
from pfsync.medplum.batch import Entry, EntryResult, Kind
from pfsync.medplum.client import MedplumClient
from pfsync.net.http import Clock, outcome_text, wait_from_outcome

FHIR_JSON = "application/fhir+json"
MEDPLUM_BODY_LIMIT = 1_048_576  # docs/medplum.md: 1,048,577 bytes is refused


# The end of an entry in the sender, as reported to its caller (BatchSender.take_reports), in the
# words of the write path's vocabulary (pfsync.load.pending): every entry added ends in one report,
# except a Released one, which is the caller's again. One is made per entry, on the loader's thread:
# plain slotted classes, as a frozen dataclass's __init__ costs twice as much.


@dataclass(slots=True)
class Settled:
    """Its write has an outcome: `kind` (written, unchanged, deleted, or FAILED: for the quarantine)."""

    entry: Entry
    kind: Kind
    result: EntryResult


@dataclass(slots=True)
class Exhausted:
    """Its retries ran out (`result`: the last answer): for the retry queue."""

    entry: Entry
    result: EntryResult


@dataclass(slots=True)
class Recheck:
    """To route again from scratch: a stale Medplum id, or a create whose outcome is unknown."""

    entry: Entry


@dataclass(slots=True)
class Superseded:
    """A newer entry of its identity, added before this one was sent, replaced it."""

    entry: Entry


@dataclass(slots=True)
class Released:
    """A create that waited behind another write of its identity, which has ended: it left the
    sender unsent, since a second POST could be a second copy. The caller decides it again and adds
    it back (`BatchSender.requeue`), or ends it."""

    entry: Entry


Report = Settled | Exhausted | Recheck | Superseded | Released


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


@dataclass
class Retries:
    """Why the entries of one batch-response that are worth another try were refused: serialization
    conflicts (409), throttled (429, with the longest wait they asked for), or other errors. The
    sender paces and sizes its concurrency by these counts."""

    conflicts: int = 0
    throttled: int = 0
    errors: int = 0
    wait: float | None = None

    def count(self, result: EntryResult) -> None:
        if result.status == 409:
            self.conflicts += 1
        elif result.status == 429:
            self.throttled += 1
            self.wait = max(self.wait or 0.0, result.wait or 0.0)
        else:
            self.errors += 1


class OversizeRoute:
    """Which Bundles go as an async batch job: every one with load.async_batch (`runner` given); else
    a single resource too large for a synchronous Bundle, or one the server refused as too large by
    itself (docs/medplum.md "Size limits": a synchronous body may be at most 1 MiB, an async one up to
    maxBatchSize). An identity routed async stays routed for the run."""

    def __init__(self, client: MedplumClient, clock: Clock, runner: AsyncBatchRunner | None) -> None:
        self.always = runner is not None
        self.runner = runner or AsyncBatchRunner(client, clock, max_bytes=MEDPLUM_BODY_LIMIT)
        self.routed: set[tuple[str, str]] = set()

    def alone(self, bundle: list[Entry], body_bytes: int) -> bool:
        """Whether this Bundle of a synchronous load goes as an async job by itself."""
        if self.always or not send_alone_async(bundle, body_bytes, self.routed, MEDPLUM_BODY_LIMIT):
            return False
        self.routed.add(bundle[0].key)
        return True

    def route(self, key: tuple[str, str]) -> bool:
        """A single resource refused as too large: whether it goes again, async alone (not when it
        went async already, or when every Bundle does)."""
        if self.always or key in self.routed:
            return False
        self.routed.add(key)
        return True

    def runner_for(self, alone: bool) -> AsyncBatchRunner | None:
        """The async runner a Bundle goes through (None: a synchronous POST)."""
        return self.runner if self.always or alone else None


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
