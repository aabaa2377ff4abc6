"""Copying bytes into Medplum Binary: downloads from the source, uploads to Medplum, one per content.

docs/medplum.md "Binary and attachments". Binary has no identifier, so the link to the source is
the content's SHA-1 (base64, per FHIR): the same content is never uploaded twice (the id map's
`binaries`). This module owns the mechanics, on any thread: a download with the source client (the
only client holding the source token; pinned to the source's origin, capped at
load.attachment_max_bytes, limited to load.attachment_content_types), an upload with `POST Binary`
(raw bytes, real Content-Type, Content-Length), and the exported Binary resources (`load_binary`).
Which attachments to copy, and when, is pfsync.load.attachments' decision.

Memory: a download streams into a pfsync.load.spool.Spool, which keeps at most
load.attachment_memory_bytes in memory and the rest in a private scratch file in the source's
state directory (0600, nameless: gone with the copy, whatever ends it); the SHA-1, the size and
the cap are taken as the bytes arrive, and the upload streams from the spool. So a copy holds at
most load.attachment_memory_bytes (plus a network chunk) in memory, however large the attachment.
The one exception: a source that answers with a FHIR Binary resource (JSON, base64 `data`)
instead of the raw bytes has it parsed whole, in memory, up to load.attachment_max_bytes.

At most `_DOWNLOADS` downloads run at once (the EHR's politeness rule). The id map belongs to the
loader's thread: workers read earlier runs' Binaries through their own read-only SQLite connection
and share this run's uploads through `_promises` (the same content is uploaded once even when two
workers download it at the same time).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import sqlite3
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from pfsync.core.errors import HTTPError, ProtocolError, StateError
from pfsync.core.netpolicy import shown_url
from pfsync.core.settings import LoadSettings
from pfsync.load.idmap import IdMap
from pfsync.load.spool import Spool, SpoolBody, attachment_hash
from pfsync.load.transform import Prepared
from pfsync.medplum.client import THROTTLED_ONLY, MedplumClient
from pfsync.net.http import ACCEPT_ENCODING, PIN_ORIGIN, STREAMED, is_temporary, iter_decoded, protocol_error

# docs/practice-fusion.md "Defaults, identifiers and politeness": be polite, at most a few parallel downloads
_DOWNLOADS = 4

# One attachment to copy: the Attachment object (rewritten in place), its URL, its declared type.
Job = tuple[dict[str, Any], str, Any]


class AttachmentError(Exception):
    """An attachment could not be copied; `retryable` sends the resource to the retry queue."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class Copied:
    """One attachment copied (on a worker): applied to `att` on the loader's thread."""

    att: dict[str, Any]
    digest: str
    mid: str
    size: int
    uploaded: bool


class Binaries:
    """Downloads and uploads, thread-safe; `copy` runs on the workers, `load_binary` on the loader's thread."""

    def __init__(
        self, medplum: MedplumClient, source_client: httpx.Client | None, idmap: IdMap, settings: LoadSettings,
        *, spool_dir: Path, dry_run: bool,
    ) -> None:  # fmt: skip
        self._medplum = medplum
        self._spool_dir = spool_dir  # where a spool past load.attachment_memory_bytes keeps the rest
        self._source = source_client
        self._idmap = idmap
        self._settings = settings
        self._dry_run = dry_run
        self._requests = 0
        self._owner = threading.current_thread()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._downloads = threading.Semaphore(_DOWNLOADS)
        self._readers: list[sqlite3.Connection] = []
        # content -> its upload while it runs (others wait on it), then just its Medplum id: a Future
        # holds a Condition and its locks, about a kilobyte, and this map lives as long as the run
        self._promises: dict[str, Future[str] | str] = {}

    @property
    def requests(self) -> int:
        return self._requests

    def _count_request(self) -> None:
        with self._lock:
            self._requests += 1

    def close(self) -> None:
        for conn in self._readers:
            conn.close()

    def copy(self, jobs: list[Job]) -> list[Copied | None]:
        """On a worker: download each attachment and upload its content unless Medplum has it; None
        for one over the size cap or outside the allowed types (left as it is)."""
        out: list[Copied | None] = []
        for att, url, declared in jobs:
            with Spool(self._spool_dir, self._settings.attachment_memory_bytes) as spool:
                out.append(self._copy_one(att, url, declared, spool))
        return out

    def _copy_one(self, att: dict[str, Any], url: str, declared: Any, spool: Spool) -> Copied | None:
        with self._downloads:
            content_type = self._download(url, declared, spool)
        if content_type is None:
            return None
        body: bytes | SpoolBody = spool.body()
        size, digest = spool.size, spool.digest
        if "fhir+json" in content_type:
            # A FHIR Binary resource instead of raw bytes: read into memory and parsed whole (JSON is
            # not decoded in pieces here); the download's cap bounds it (load.attachment_max_bytes).
            raw, content_type = _binary_content(spool.read_all(), declared)
            spool.close()
            body, size, digest = raw, len(raw), _sha1(raw)
        if not content_type:
            content_type = declared if isinstance(declared, str) and declared else "application/octet-stream"
        if not self._allowed(content_type):
            return None
        if "fhir+json" not in content_type:
            content_type = content_type.split(";")[0].strip()
        mid, uploaded = self._mid_for(digest, body, size, content_type)
        return Copied(att, digest, mid, size, uploaded)

    def _mid_for(
        self, digest: str, body: bytes | SpoolBody, size: int, content_type: str
    ) -> tuple[str, bool]:
        """The Medplum Binary of this content: known (earlier run, or this one), or uploaded now."""
        with self._lock:
            found = self._promises.get(digest)
            if isinstance(found, str):
                return found, False
            owner = found is None
            promise = self._promises[digest] = Future() if found is None else found
        if not owner:
            return promise.result(), False
        try:
            mid = self._earlier_binary(digest)
            uploaded = mid is None
            if mid is None:
                mid = self._upload(body, size, content_type)
        except BaseException as exc:
            with self._lock:
                del self._promises[digest]  # a later copy of the same content tries again
            promise.set_exception(exc)
            raise
        with self._lock:
            self._promises[digest] = mid
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

    def _allowed(self, content_type: str | None) -> bool:
        allow = self._settings.attachment_content_types
        return not allow or (content_type or "").split(";")[0].strip().lower() in {a.lower() for a in allow}

    def _download(self, url: str, declared: Any, spool: Spool) -> str | None:
        """The attachment's bytes into `spool`; -> the Content-Type it came with (the declared one
        without: may be empty), None when it is over load.attachment_max_bytes."""
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
                for chunk in iter_decoded(response):
                    if spool.size + len(chunk) > limit:
                        return None
                    spool.write(chunk)
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
        except (OSError, StateError) as exc:  # the spool's scratch file (a full disk): try again later
            raise AttachmentError(
                f"attachment download {shown_url(url)}: {_spool_failure(exc)}", retryable=True
            ) from None
        return content_type

    def _upload(self, body: bytes | SpoolBody, size: int, content_type: str) -> str:
        # The raw bytes with their real Content-Type and an explicit Content-Length (docs/medplum.md
        # "Binary and attachments"): a spool is sent in pieces, never with chunked encoding.
        headers = {"Content-Type": content_type, "Content-Length": str(size), "Accept": "*/*"}
        try:
            # The Medplum client's thread-safe path: a 429 (never run) is waited out and the body
            # sent again from its start; anything else is this copy's outcome (a create re-sent
            # after a lost answer could copy twice).
            response = self._medplum.send("POST", "Binary", cost=None, content=body, headers=headers,
                                          rules=THROTTLED_ONLY, resend_after_network_error=False)  # fmt: skip
        except httpx.TransportError as exc:
            raise AttachmentError(f"Binary upload failed: {exc.__class__.__name__}", retryable=True) from None
        except HTTPError as exc:  # still throttled past the client's patience
            raise AttachmentError(f"Binary upload failed: {exc.message}", retryable=True) from None
        except OSError as exc:  # reading the spool back
            raise AttachmentError(f"Binary upload failed: {_spool_failure(exc)}", retryable=True) from None
        self._count_request()
        if is_temporary(response):
            raise AttachmentError(f"Binary upload answered {response.status_code}", retryable=True)
        if response.status_code not in (200, 201):
            raise AttachmentError(f"Binary upload answered {response.status_code}")
        try:
            answer = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            answer = None
        mid = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(mid, str):
            raise AttachmentError("Binary upload answered without an id", retryable=True)
        return mid

    def load_binary(self, p: Prepared) -> str:
        """An exported Binary resource: its bytes become a Medplum Binary (no identifier possible).
        -> its outcome, a count key ("created", "updated", "unchanged"); AttachmentError when its
        data is not valid base64 (the caller quarantines it)."""
        data_b64 = p.resource.get("data")
        content_type = p.resource.get("contentType") or "application/octet-stream"
        try:
            data = base64.b64decode(data_b64 or "", validate=True)
        except (binascii.Error, ValueError):
            raise AttachmentError("Binary.data is not valid base64") from None
        digest = _sha1(data)
        row = self._idmap.get("Binary", p.sid)
        if row is not None and row.mid is not None and row.hash == digest:
            return "unchanged"
        outcome = "created" if row is None or row.mid is None else "updated"
        if self._dry_run:
            return outcome
        mid, _ = self._mid_for(digest, data, len(data), str(content_type))
        self._idmap.record_binary(digest, mid, len(data))
        self._idmap.record("Binary", p.sid, mid, None, digest)
        return outcome


def _sha1(data: bytes) -> str:
    """Attachment.hash of content held whole."""
    return attachment_hash(hashlib.sha1(data).digest())


def _spool_failure(exc: OSError | StateError) -> str:
    what = exc.message if isinstance(exc, StateError) else (exc.strerror or exc.__class__.__name__)
    return f"cannot spool it to disk ({what})"


def _binary_content(data: bytes, declared: Any) -> tuple[bytes, str]:
    """A source that answered with a FHIR Binary resource instead of raw bytes."""
    try:
        doc = orjson.loads(data)
        raw = base64.b64decode(doc.get("data") or "")
        return raw, str(doc.get("contentType") or declared or "application/octet-stream")
    except (orjson.JSONDecodeError, AttributeError, binascii.Error, ValueError):
        return data, "application/fhir+json"
