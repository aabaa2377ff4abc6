"""Attachments and exported Binary resources -> Medplum Binary (medplum.md "Binary and attachments").

An Attachment (any object with `url` and `contentType`: DocumentReference.content.attachment,
DiagnosticReport.presentedForm, ...) whose `url` points at the source origin, or at a source
`Binary/<id>`, is downloaded with the source client (the only client holding the source token),
uploaded with `POST Binary` (raw bytes, real Content-Type) and rewritten to `Binary/<id>` with
`size` and `hash` (base64 SHA-1, per FHIR). Binary has no identifier, so the link to the source is
the SHA-1: the same content is never uploaded twice (id map `binaries`), and an attachment that
already carries a known `hash` is not even downloaded. Over load.attachment_max_bytes or outside
load.attachment_content_types, the attachment is left as it is (reported).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import orjson

from pfsync.http import Clock
from pfsync.idmap import IdMap
from pfsync.settings import LoadSettings
from pfsync.transform import Prepared, TransformContext

if TYPE_CHECKING:
    from pfsync.writes import Writer


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
        self, medplum: httpx.Client, source_client: httpx.Client | None, idmap: IdMap, settings: LoadSettings,
        ctx: TransformContext, *, clock: Clock, dry_run: bool,
    ) -> None:  # fmt: skip
        self._medplum = medplum
        self._source = source_client
        self._idmap = idmap
        self._settings = settings
        self._ctx = ctx
        self._dry_run = dry_run
        self._origin = _origin(ctx.base) if ctx.base else None
        self.requests = 0
        self.skipped = 0

    def close(self) -> None:
        return None

    def process(self, p: Prepared) -> int:
        """Copy the resource's source attachments into Medplum; -> how many were uploaded."""
        uploaded = 0
        for att in _attachments(p.resource):
            uploaded += self._one(att)
        return uploaded

    def _one(self, att: dict[str, Any]) -> int:
        url = att["url"]
        source_binary = self._source_binary_id(url)
        if source_binary is not None:
            row = self._idmap.get("Binary", source_binary)
            if row is not None and row.mid is not None:
                att["url"] = f"Binary/{row.mid}"
                return 0
        if not self._is_source_url(url) and source_binary is None:
            return 0
        known = att.get("hash")
        if isinstance(known, str) and (mid := self._idmap.binary(known)) is not None:
            att["url"] = f"Binary/{mid}"  # same content as before: no download, no upload
            return 0
        if self._source is None or self._dry_run:
            return 0
        absolute = url if "://" in url else f"{self._ctx.base}/{url}"
        fetched = self._download(absolute, att.get("contentType"))
        if fetched is None:
            return 0
        data, content_type = fetched
        digest = base64.b64encode(hashlib.sha1(data).digest()).decode()
        mid = self._idmap.binary(digest)
        uploaded = 0
        if mid is None:
            mid = self._upload(data, content_type)
            self._idmap.record_binary(digest, mid, len(data))
            uploaded = 1
        att["url"] = f"Binary/{mid}"
        att["size"] = len(data)
        att["hash"] = digest
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

    def _allowed(self, content_type: str | None) -> bool:
        allow = self._settings.attachment_content_types
        return not allow or (content_type or "").split(";")[0].strip().lower() in {a.lower() for a in allow}

    def _download(self, url: str, declared: Any) -> tuple[bytes, str] | None:
        assert self._source is not None
        limit = self._settings.attachment_max_bytes
        try:
            with self._source.stream("GET", url, headers={"Accept": "*/*"}) as response:
                self.requests += 1
                if response.status_code in (408, 429) or response.status_code >= 500:
                    raise AttachmentError(
                        f"attachment download {url} answered {response.status_code}", retryable=True
                    )
                if response.status_code != 200:
                    raise AttachmentError(f"attachment download {url} answered {response.status_code}")
                chunks: list[bytes] = []
                size = 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > limit:
                        self.skipped += 1
                        return None
                    chunks.append(chunk)
                content_type = response.headers.get("content-type") or (
                    declared if isinstance(declared, str) else ""
                )
        except httpx.TransportError as exc:
            raise AttachmentError(
                f"attachment download {url} failed: {exc.__class__.__name__}", retryable=True
            ) from None
        data = b"".join(chunks)
        if "fhir+json" in content_type:
            data, content_type = _binary_content(data, declared)
        if not content_type:
            content_type = declared if isinstance(declared, str) and declared else "application/octet-stream"
        if not self._allowed(content_type):
            self.skipped += 1
            return None
        return data, content_type.split(";")[0].strip() if "fhir+json" not in content_type else content_type

    def _upload(self, data: bytes, content_type: str) -> str:
        try:
            response = self._medplum.post("Binary", content=data, headers={"Content-Type": content_type})
        except httpx.TransportError as exc:
            raise AttachmentError(f"Binary upload failed: {exc.__class__.__name__}", retryable=True) from None
        self.requests += 1
        if response.status_code in (408, 429) or response.status_code >= 500:
            raise AttachmentError(f"Binary upload answered {response.status_code}", retryable=True)
        if response.status_code not in (200, 201):
            raise AttachmentError(f"Binary upload answered {response.status_code}")
        mid = orjson.loads(response.content).get("id")
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
        mid = self._idmap.binary(digest) or self._upload(data, str(content_type))
        self._idmap.record_binary(digest, mid, len(data))
        self._idmap.record("Binary", p.sid, mid, None, digest)
        writer.count("Binary", "created" if row is None or row.mid is None else "updated")


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
