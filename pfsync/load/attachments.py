"""Attachments -> Medplum Binary: which to copy, and the copies' turns (docs/medplum.md "Binary and attachments").

An Attachment (any object with `url` and `contentType`: DocumentReference.content.attachment,
DiagnosticReport.presentedForm, ...) whose `url` points at the source origin, or at a source
`Binary/<id>`, is copied into a Medplum Binary (pfsync.load.binaries downloads and uploads) and
rewritten to `Binary/<id>` with `size` and `hash` (base64 SHA-1, per FHIR). This module owns the
decisions: what needs no copy (a source Binary already loaded, a `hash` the id map knows: not even
downloaded), what is copied, and when. Over load.attachment_max_bytes or outside
load.attachment_content_types, the attachment is left as it is.

Copies run on worker threads (`plan`, `start` / `finished`), a few resources at a time (more wait
their turn in memory, up to an eighth of load.park_max_bytes), so a practice with thousands of
documents does not copy them one after another on the loader's thread while every Bundle waits:
the resource is written once its attachments are copied. Downloads are limited apart (pfsync.load.binaries); uploads, which wait behind our
Bundles at Medplum, run beside them on the other workers.

Memory: each running copy streams its attachment through a spool (pfsync.load.spool) holding at
most load.attachment_memory_bytes in memory, the rest in a private scratch file; so the copies
hold at most `_COPY_THREADS` x load.attachment_memory_bytes (8 x 1 MiB by default), whatever
load.attachment_max_bytes allows (a source answering with FHIR Binary JSON aside: pfsync.load.binaries).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from pfsync.core.settings import LoadSettings
from pfsync.load.binaries import AttachmentError, Binaries, Copied, Job
from pfsync.load.idmap import IdMap
from pfsync.load.pending import Waiting
from pfsync.load.transform import Prepared, TransformContext
from pfsync.medplum.client import MedplumClient
from pfsync.medplum.donequeue import DoneQueue
from pfsync.net.http import Clock

_COPY_THREADS = 8  # workers: each downloads (at most pfsync.load.binaries' limit at once), then
# uploads; an upload waits behind our Bundles at Medplum, so with one pool of four the copies fell
# behind the Bundles and the load ended waiting for them
_MAX_COPIES = 12  # handed to the workers at once (a worker never waits for the loader's thread to
# hand it the next); only the running ones hold bytes (a spool each)
# Resources waiting for a copy slot are held in memory (their line, parsed and prepared: Waiting.cost)
# up to this share of load.park_max_bytes; past it the loader waits for copies to end. The queue only
# has to keep the workers busy while the loader reads on, so it is small beside the parked ones.
_WAITING_SHARE = 8


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class Attachments:
    """Decides which attachments to copy and runs the copies on workers (the loader's thread calls it)."""

    def __init__(
        self, medplum: MedplumClient, source_client: httpx.Client | None, idmap: IdMap, settings: LoadSettings,
        ctx: TransformContext, *, clock: Clock, dry_run: bool,
    ) -> None:  # fmt: skip
        # Spools go beside the id map: the source's state directory, which IdMap made private (0700).
        self._binaries = Binaries(
            medplum, source_client, idmap, settings, spool_dir=idmap.path.parent, dry_run=dry_run
        )
        self._copies_possible = source_client is not None and not dry_run
        self._idmap = idmap
        self._ctx = ctx
        self._origin = _origin(ctx.base) if ctx.base else None
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[Future[list[Copied | None]], Copying] = {}
        self._done = DoneQueue()
        self._waiting: deque[tuple[Copying, list[Job]]] = deque()
        self._waiting_bytes = 0
        self._max_waiting_bytes = max(1, settings.park_max_bytes // _WAITING_SHARE)

    @property
    def requests(self) -> int:
        return self._binaries.requests

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._binaries.close()

    def load_binary(self, p: Prepared) -> str:
        """An exported Binary resource (pfsync.load.binaries.Binaries.load_binary)."""
        return self._binaries.load_binary(p)

    # -- on the loader's thread
    def start(self, item: Waiting, jobs: list[Job]) -> None:
        """Start copying a resource's attachments (`plan`) on a worker; `finished` hands it back."""
        self._waiting.append((Copying(item), jobs))
        self._waiting_bytes += item.cost
        self._launch()

    def _launch(self) -> None:
        """Start waiting copies while fewer than _MAX_COPIES run (the loader reads on meanwhile)."""
        while self._waiting and len(self._futures) < _MAX_COPIES:
            copy, jobs = self._waiting.popleft()
            self._waiting_bytes -= copy.item.cost
            if copy.item.superseded:
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=_COPY_THREADS, thread_name_prefix="pfsync-attach")
            future = self._pool.submit(self._binaries.copy, jobs)
            self._futures[future] = copy
            self._done.watch(future)

    @property
    def full(self) -> bool:
        """Resources waiting for a copy slot hold their share of load.park_max_bytes."""
        return self._waiting_bytes >= self._max_waiting_bytes

    @property
    def pending(self) -> int:
        return len(self._futures) + len(self._waiting)

    def finished(self, *, block: bool) -> list[Copying]:
        """Resources whose copies ended (`block`: wait for at least one if any is running), with
        their attachments rewritten, or `error` set; superseded ones are dropped."""
        self._launch()
        if not self._futures:
            return []
        out: list[Copying] = []
        for future in self._done.take(block=block):
            copy = self._futures.pop(future)
            try:
                results = future.result()
                copy.left = results.count(None)
                copy.uploaded = self._apply(results)
            except AttachmentError as exc:
                copy.error = exc
            if not copy.item.superseded:
                out.append(copy)
        self._launch()
        return out

    def plan(self, p: Prepared) -> list[Job]:
        """Rewrite what needs no copy; -> the attachments to copy (none: nothing to `start`)."""
        jobs: list[Job] = []
        for att in _attachments(p.resource):
            url = att["url"]
            source_binary = self._source_binary_id(url)
            if source_binary is not None:
                row = self._idmap.get("Binary", source_binary)
                if row is not None and row.mid is not None:
                    att["url"] = f"Binary/{row.mid}"
                    continue
            if not self._is_source_url(url) and source_binary is None:
                continue
            known = att.get("hash")
            if isinstance(known, str) and (mid := self._idmap.binary(known)) is not None:
                att["url"] = f"Binary/{mid}"  # same content as before: no download, no upload
                continue
            if not self._copies_possible:
                continue
            jobs.append((att, url if "://" in url else f"{self._ctx.base}/{url}", att.get("contentType")))
        return jobs

    def _apply(self, copied: list[Copied | None]) -> int:
        uploaded = 0
        for item in copied:
            if item is None:
                continue  # over the size cap or outside the allowed types: left as it is
            if item.uploaded:
                self._idmap.record_binary(item.digest, item.mid, item.size)
                uploaded += 1
            item.att["url"] = f"Binary/{item.mid}"
            item.att["size"] = item.size
            item.att["hash"] = item.digest
        return uploaded

    def _source_binary_id(self, url: str) -> str | None:
        rel = url
        if "://" in url:
            if not self._ctx.base or not url.startswith(self._ctx.base + "/"):
                return None
            rel = url[len(self._ctx.base) + 1 :]
        parts = rel.split("/")
        return parts[1] if len(parts) == 2 and parts[0] == "Binary" and parts[1] else None

    def _is_source_url(self, url: str) -> bool:
        return self._origin is not None and "://" in url and _origin(url) == self._origin


@dataclass
class Copying:
    """A resource whose attachments are being copied, and how that ended."""

    item: Waiting
    uploaded: int = 0
    left: int = 0  # attachments left pointing at the source: over the size cap or a type not allowed
    error: AttachmentError | None = None


def _attachments(node: Any) -> list[dict[str, Any]]:
    """Every Attachment-shaped object (url + contentType) in a resource."""
    found: list[dict[str, Any]] = []
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            if isinstance(cur.get("url"), str) and "contentType" in cur:
                found.append(cur)
            stack.extend(v for v in cur.values() if isinstance(v, dict | list))
        elif isinstance(cur, list):
            stack.extend(v for v in cur if isinstance(v, dict | list))
    return found
