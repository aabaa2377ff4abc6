"""Attachments and exported Binary resources -> Medplum Binary (docs/medplum.md "Binary and attachments").

An Attachment (any object with `url` and `contentType`: DocumentReference.content.attachment,
DiagnosticReport.presentedForm, ...) whose `url` points at the source origin, or at a source
`Binary/<id>`, is downloaded with the source client (the only client holding the source token),
uploaded with `POST Binary` (raw bytes, real Content-Type) and rewritten to `Binary/<id>` with
`size` and `hash` (base64 SHA-1, per FHIR). Binary has no identifier, so the link to the source is
the SHA-1: the same content is never uploaded twice (id map `binaries`), and an attachment that
already carries a known `hash` is not even downloaded. Over load.attachment_max_bytes or outside
load.attachment_content_types, the attachment is left as it is (reported).

Copies run on worker threads (`start` / `finished`), a few resources at a time (more wait their
turn in memory), so a practice with thousands of documents does not copy them one after another
on the loader's thread while every Bundle waits: the resource is written once its attachments
are copied. At most `_DOWNLOADS` downloads run at once (the EHR's politeness rule); uploads, which
wait behind our Bundles at Medplum, run beside them on the other workers, so at most
`_COPY_THREADS` attachments' bytes are in memory (each under load.attachment_max_bytes).
The id map belongs to the loader's thread; workers read earlier runs' Binaries through their own
read-only SQLite connection and share this run's uploads through `_promises` (the same content
is uploaded once even when two workers download it at the same time).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import sqlite3
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import orjson

from pfsync.core.errors import HTTPError, ProtocolError
from pfsync.core.netpolicy import shown_url
from pfsync.core.settings import LoadSettings
from pfsync.load.idmap import IdMap
from pfsync.load.transform import Prepared, TransformContext
from pfsync.medplum.client import THROTTLED_ONLY, MedplumClient
from pfsync.medplum.donequeue import DoneQueue
from pfsync.net.http import (
    ACCEPT_ENCODING,
    PIN_ORIGIN,
    STREAMED,
    Clock,
    is_temporary,
    iter_decoded,
    protocol_error,
)

if TYPE_CHECKING:
    from pfsync.load.writes import Writer


# docs/practice-fusion.md "Defaults, identifiers and politeness": be polite, at most a few parallel downloads
_DOWNLOADS = 4
_COPY_THREADS = 8  # workers: each downloads (at most _DOWNLOADS at once), then uploads; an upload
# waits behind our Bundles at Medplum, so with one pool of four the copies fell behind the Bundles
# and the load ended waiting for them
_MAX_COPIES = 12  # handed to the workers at once (a worker never waits for the loader's thread to
# hand it the next); only the running ones hold bytes in memory
_MAX_WAITING = 2000  # resources waiting for a copy slot (their parsed JSON only)


class AttachmentError(Exception):
    """An attachment could not be copied; `retryable` sends the resource to the retry queue."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class Attachments:
    def __init__(
        self, medplum: MedplumClient, source_client: httpx.Client | None, idmap: IdMap, settings: LoadSettings,
        ctx: TransformContext, *, clock: Clock, dry_run: bool,
    ) -> None:  # fmt: skip
        self._medplum = medplum
        self._source = source_client
        self._idmap = idmap
        self._settings = settings
        self._ctx = ctx
        self._dry_run = dry_run
        self._origin = _origin(ctx.base) if ctx.base else None
        self._requests = 0
        self.skipped = 0
        self._owner = threading.current_thread()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._downloads = threading.Semaphore(_DOWNLOADS)
        self._readers: list[sqlite3.Connection] = []
        self._promises: dict[str, Future[str]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[Future[list[Copied | None]], Copying] = {}
        self._done = DoneQueue()
        self._copying: dict[tuple[str, str], Copying] = {}
        self._waiting: deque[tuple[Copying, list[tuple[dict[str, Any], str, Any]]]] = deque()

    @property
    def requests(self) -> int:
        return self._requests

    def _count_request(self) -> None:
        with self._lock:
            self._requests += 1

    def _count_skip(self) -> None:
        with self._lock:
            self.skipped += 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for conn in self._readers:
            conn.close()

    # -- on the loader's thread
    def start(self, p: Prepared, file: str | None, line: int | None, raw: bytes) -> bool:
        """Start copying the resource's attachments on a worker; False: nothing to copy (the
        attachments that could be rewritten without a copy are). `finished` hands it back."""
        jobs = self._plan(p)
        if not jobs:
            return False
        copy = Copying(p, file, line, raw)
        old = self._copying.get((p.type, p.sid))
        if old is not None:
            old.superseded = True  # a newer version of the resource arrived: the older is dropped
        self._copying[(p.type, p.sid)] = copy
        self._waiting.append((copy, jobs))
        self._launch()
        return True

    def _launch(self) -> None:
        """Start waiting copies while fewer than _MAX_COPIES run (the loader reads on meanwhile)."""
        while self._waiting and len(self._futures) < _MAX_COPIES:
            copy, jobs = self._waiting.popleft()
            if copy.superseded:
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=_COPY_THREADS, thread_name_prefix="pfsync-attach")
            future = self._pool.submit(self._copy, jobs)
            self._futures[future] = copy
            self._done.watch(future)

    @property
    def full(self) -> bool:
        return len(self._waiting) >= _MAX_WAITING

    @property
    def pending(self) -> int:
        return len(self._futures) + len(self._waiting)

    def holds(self, key: tuple[str, str]) -> bool:
        """Whether this resource waits for its attachments (its write is on its way)."""
        return key in self._copying

    def supersede(self, key: tuple[str, str]) -> None:
        copy = self._copying.pop(key, None)
        if copy is not None:
            copy.superseded = True

    def finished(self, *, block: bool) -> list[Copying]:
        """Resources whose copies ended (`block`: wait for at least one if any is running), with
        their attachments rewritten, or `error` set."""
        self._launch()
        if not self._futures:
            return []
        out: list[Copying] = []
        for future in self._done.take(block=block):
            copy = self._futures.pop(future)
            if self._copying.get((copy.p.type, copy.p.sid)) is copy:
                del self._copying[(copy.p.type, copy.p.sid)]
            try:
                copy.uploaded = self._apply(future.result())
            except AttachmentError as exc:
                copy.error = exc
            if not copy.superseded:
                out.append(copy)
        self._launch()
        return out

    def _plan(self, p: Prepared) -> list[tuple[dict[str, Any], str, Any]]:
        """Rewrite what needs no copy; -> the attachments to copy (attachment, URL, declared type)."""
        jobs: list[tuple[dict[str, Any], str, Any]] = []
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
            if self._source is None or self._dry_run:
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

    # -- on a worker
    def _copy(self, jobs: list[tuple[dict[str, Any], str, Any]]) -> list[Copied | None]:
        out: list[Copied | None] = []
        for att, url, declared in jobs:
            with self._downloads:
                fetched = self._download(url, declared)
            if fetched is None:
                out.append(None)
                continue
            data, content_type = fetched
            digest = base64.b64encode(hashlib.sha1(data).digest()).decode()
            mid, uploaded = self._mid_for(digest, data, content_type)
            out.append(Copied(att, digest, mid, len(data), uploaded))
        return out

    def _mid_for(self, digest: str, data: bytes, content_type: str) -> tuple[str, bool]:
        """The Medplum Binary of this content: known (earlier run, or this one), or uploaded now."""
        with self._lock:
            promise = self._promises.get(digest)
            owner = promise is None
            if promise is None:
                promise = self._promises[digest] = Future()
        if not owner:
            return promise.result(), False
        try:
            mid = self._earlier_binary(digest)
            uploaded = mid is None
            if mid is None:
                mid = self._upload(data, content_type)
        except BaseException as exc:
            with self._lock:
                del self._promises[digest]  # a later copy of the same content tries again
            promise.set_exception(exc)
            raise
        promise.set_result(mid)
        return mid, uploaded

    def _earlier_binary(self, sha1: str) -> str | None:
        """A Binary an earlier run uploaded (committed in the id map), read on this thread."""
        if threading.current_thread() is self._owner:
            return self._idmap.binary(sha1)
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(f"file:{self._idmap.path}?mode=ro", uri=True, check_same_thread=False)
            self._local.conn = conn
            with self._lock:
                self._readers.append(conn)
        row = conn.execute("SELECT mid FROM binaries WHERE sha1 = ?", (sha1,)).fetchone()
        return None if row is None else str(row[0])

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

    def _allowed(self, content_type: str | None) -> bool:
        allow = self._settings.attachment_content_types
        return not allow or (content_type or "").split(";")[0].strip().lower() in {a.lower() for a in allow}

    def _download(self, url: str, declared: Any) -> tuple[bytes, str] | None:
        assert self._source is not None
        limit = self._settings.attachment_max_bytes
        try:
            # Pinned to the URL's origin (the source's): a redirect elsewhere is refused, so foreign
            # bytes never become a Binary in Medplum (pfsync.net.http.RequestGuard).
            with self._source.stream("GET", url, headers={"Accept": "*/*", "Accept-Encoding": ACCEPT_ENCODING},
                                     extensions={PIN_ORIGIN: url, STREAMED: True}) as response:  # fmt: skip
                self._count_request()
                if is_temporary(response):
                    raise AttachmentError(
                        f"attachment download {shown_url(url)} answered {response.status_code}",
                        retryable=True,
                    )
                if response.status_code != 200:
                    raise AttachmentError(
                        f"attachment download {shown_url(url)} answered {response.status_code}"
                    )
                chunks: list[bytes] = []
                size = 0
                for chunk in iter_decoded(response):
                    size += len(chunk)
                    if size > limit:
                        self._count_skip()
                        return None
                    chunks.append(chunk)
                content_type = response.headers.get("content-type") or (
                    declared if isinstance(declared, str) else ""
                )
        except httpx.TransportError as exc:
            raise AttachmentError(
                f"attachment download {shown_url(url)} failed: {exc.__class__.__name__}", retryable=True
            ) from None
        except (httpx.TooManyRedirects, httpx.DecodingError) as exc:
            raise AttachmentError(f"attachment download refused: {protocol_error(exc).message}") from None
        except ProtocolError as exc:  # an unsafe redirect or encoding: quarantined with the reason
            raise AttachmentError(f"attachment download refused: {exc.message}") from None
        data = b"".join(chunks)
        if "fhir+json" in content_type:
            data, content_type = _binary_content(data, declared)
        if not content_type:
            content_type = declared if isinstance(declared, str) and declared else "application/octet-stream"
        if not self._allowed(content_type):
            self._count_skip()
            return None
        return data, content_type.split(";")[0].strip() if "fhir+json" not in content_type else content_type

    def _upload(self, data: bytes, content_type: str) -> str:
        try:
            # The Medplum client's thread-safe path: a 429 (never run) is waited out; anything else
            # is this copy's outcome (a create re-sent after a lost answer could copy twice).
            response = self._medplum.send("POST", "Binary", cost=None, content=data,
                                          headers={"Content-Type": content_type, "Accept": "*/*"},
                                          rules=THROTTLED_ONLY, resend_after_network_error=False)  # fmt: skip
        except httpx.TransportError as exc:
            raise AttachmentError(f"Binary upload failed: {exc.__class__.__name__}", retryable=True) from None
        except HTTPError as exc:  # still throttled past the client's patience
            raise AttachmentError(f"Binary upload failed: {exc.message}", retryable=True) from None
        self._count_request()
        if is_temporary(response):
            raise AttachmentError(f"Binary upload answered {response.status_code}", retryable=True)
        if response.status_code not in (200, 201):
            raise AttachmentError(f"Binary upload answered {response.status_code}")
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            body = None
        mid = body.get("id") if isinstance(body, dict) else None
        if not isinstance(mid, str):
            raise AttachmentError("Binary upload answered without an id", retryable=True)
        return mid

    def load_binary(
        self, p: Prepared, file: str | None, line: int | None, raw: bytes, writer: Writer
    ) -> None:
        """An exported Binary resource: its bytes become a Medplum Binary (no identifier possible)."""
        data_b64 = p.resource.get("data")
        content_type = p.resource.get("contentType") or "application/octet-stream"
        try:
            data = base64.b64decode(data_b64 or "", validate=True)
        except (binascii.Error, ValueError):
            writer.quarantine(p.type, p.sid, file, line, raw, "Binary.data is not valid base64")
            return
        digest = base64.b64encode(hashlib.sha1(data).digest()).decode()
        row = self._idmap.get("Binary", p.sid)
        if row is not None and row.mid is not None and row.hash == digest:
            writer.count("Binary", "unchanged")
            return
        if self._dry_run:
            writer.count("Binary", "created" if row is None or row.mid is None else "updated")
            return
        mid, _ = self._mid_for(digest, data, str(content_type))
        self._idmap.record_binary(digest, mid, len(data))
        self._idmap.record("Binary", p.sid, mid, None, digest)
        writer.count("Binary", "created" if row is None or row.mid is None else "updated")


@dataclass
class Copied:
    """One attachment copied (on a worker): applied to `att` on the loader's thread."""

    att: dict[str, Any]
    digest: str
    mid: str
    size: int
    uploaded: bool


@dataclass
class Copying:
    """A resource whose attachments are being copied, and how that ended."""

    p: Prepared
    file: str | None
    line: int | None
    raw: bytes
    uploaded: int = 0
    error: AttachmentError | None = None
    superseded: bool = False


def _binary_content(data: bytes, declared: Any) -> tuple[bytes, str]:
    """A source that answered with a FHIR Binary resource instead of raw bytes."""
    try:
        doc = orjson.loads(data)
        raw = base64.b64decode(doc.get("data") or "")
        return raw, str(doc.get("contentType") or declared or "application/octet-stream")
    except (orjson.JSONDecodeError, AttributeError, binascii.Error, ValueError):
        return data, "application/fhir+json"


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
