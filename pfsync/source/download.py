"""Export file downloads: streamed to disk, checked as they stream, retried, resumed, landed durably.

docs/bulk-data.md "Download": never hold a whole file in memory; accept gzip; retry 408/429/5xx and
connection resets with backoff, resuming with `Range` when the server answers 206 (else the file
restarts); send the token only when `requiresAccessToken` and only to allowed origins. Every line
goes through pfsync.source.linecheck.Validator as it arrives. A file whose content looks damaged
(bad lines, cut short, fewer lines than announced) is downloaded again; when a second download is
byte-identical to the first, or the damage persists after CONTENT_RETRIES, it lands as received,
with every problem reported once (the loader quarantines the bad lines).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pfsync.core.errors import AuthError, ExportError, HTTPError, InterruptedRunError, ProtocolError
from pfsync.core.events import EventSink
from pfsync.core.private import create_exclusive
from pfsync.core.redact import redact
from pfsync.core.settings import ExportValidate
from pfsync.net.http import (
    ACCEPT_ENCODING,
    DOWNLOAD_RULES,
    STREAMED,
    Clock,
    Retrier,
    RetryPolicy,
    classify,
    iter_decoded,
    outcome_text,
)
from pfsync.source.bulk import JobExpired, Origins
from pfsync.source.exportjob import ExportDir, LandedFile, without_query
from pfsync.source.linecheck import FEED_BYTES, Validator
from pfsync.source.manifest import Issue, ManifestFile

log = logging.getLogger("pfsync.export")
_PROGRESS_EVERY = 8 * 1024 * 1024
CONTENT_RETRIES = 2  # re-downloads of a file whose content looks damaged


@dataclass(frozen=True)
class Downloaded:
    """A landed file plus what its validation found."""

    landed: LandedFile
    problems: tuple[str, ...] = ()
    issues: tuple[Issue, ...] = ()


@dataclass
class Downloader:
    """Downloads manifest files into an ExportDir. Thread-safe: one instance serves the worker pool."""

    client: httpx.Client
    auth: httpx.Auth | None
    origins: Origins
    export_dir: ExportDir
    policy: RetryPolicy
    clock: Clock
    events: EventSink
    export_id: str
    requires_access_token: bool = True
    max_line_bytes: int = 64 * 1024 * 1024
    stop: threading.Event | None = None
    validate: ExportValidate = "structure"
    max_file_bytes: int | None = None  # export.max_file_bytes
    max_export_bytes: int | None = None  # export.max_export_bytes, over every file of this Downloader
    deadline_at: float | None = None  # clock time the export (downloads included) must end by
    # Network slots (export.parallel_downloads): held while a file streams, released before its
    # fsync, so a pool with more workers than slots keeps that many downloads on the wire.
    streams: threading.Semaphore | None = None
    _received: int = 0
    _received_lock: threading.Lock = field(default_factory=threading.Lock)

    def _account(self, more: int) -> None:
        """Count decoded bytes against the per-export limit (every thread's downloads together)."""
        with self._received_lock:
            self._received += more
            total = self._received
        if self.max_export_bytes is not None and total > self.max_export_bytes:
            raise ProtocolError(
                f"the export's files add up to more than {self.max_export_bytes} bytes "
                "(export.max_export_bytes); the export is refused",
                hint="if an export this large is real, raise PFSYNC_MAX_EXPORT_BYTES",
            )

    def _check_deadline(self, url: str) -> None:
        if self.deadline_at is not None and self.clock.now() > self.deadline_at:
            raise ExportError(
                f"the export did not complete before the deadline (export.deadline) while downloading "
                f"{url}; complete files are kept and the next run resumes",
                hint="raise PFSYNC_EXPORT_DEADLINE if the source is just slow",
            )

    def download(self, entry: ManifestFile, name: str) -> Downloaded:
        """Download `entry` to `name` in the export directory; returns it once landed (renamed)."""
        url = without_query(entry.url)
        self.events.emit("download_request", exportId=self.export_id, fileUrl=url, name=name,
                         type=entry.type, kind=entry.kind, count=entry.count)  # fmt: skip
        started = self.clock.now()
        part = self.export_dir.part_path(name)
        # An error file's `count` is not its line count (the reference server copies the failed
        # output's count onto it): only output and deleted files are checked (docs/export-decisions.md
        # "Downloads that do not match the manifest").
        count = entry.count if entry.kind != "error" else None
        try:
            validator = self._fetch_checked(entry, name, part, count)
            final = self._land(part, name)
        finally:
            part.unlink(missing_ok=True)
        problems = tuple(f"{name}: {p}" for p in validator.summary_problems(count))
        for problem in problems:
            log.warning("%s", problem)
        landed = LandedFile(type=entry.type, path=final, sha256=validator.sha256, lines=validator.lines,
                            kind=entry.kind, bytes=validator.written, count=entry.count, url=url)  # fmt: skip
        self.events.emit("download_complete", exportId=self.export_id, fileUrl=url, name=name, type=entry.type,
                         kind=entry.kind, lines=validator.lines, bytes=validator.written,
                         seconds=round(self.clock.now() - started, 3), problems=len(problems))  # fmt: skip
        return Downloaded(landed, problems, tuple(validator.issues))

    def _fetch_checked(self, entry: ManifestFile, name: str, part: Path, count: int | None) -> Validator:
        """The file in `part`, downloaded again while its content looks damaged (CONTENT_RETRIES),
        holding one of `streams` (the network slots) only while it downloads."""
        auth = self.origins.auth_for(entry.url, self.auth) if self.requires_access_token else None
        previous: str | None = None
        for content_try in range(CONTENT_RETRIES + 1):
            with self.streams or contextlib.nullcontext():
                validator = self._fetch(entry, name, part, auth)
            if not validator.damaged(count) or content_try == CONTENT_RETRIES:
                break
            if validator.sha256 == previous:
                # The same bytes twice: this is what the server has (e.g. a wrong `count` in its
                # manifest); a third download would only cost time. Kept, and reported once.
                break
            if previous is None:
                self.events.emit("download_error", exportId=self.export_id, fileUrl=without_query(entry.url),
                                 name=name, message="; ".join(validator.summary_problems(count)[:3]),
                                 willRetry=True)  # fmt: skip
            previous = validator.sha256
        return validator

    def _land(self, part: Path, name: str) -> Path:
        """Make the downloaded `part` durable under its final name (docs/export-decisions.md "Landing
        files durably"): its data fsynced once, then the rename. The directory is not fsynced per file:
        a rename lost in a crash leaves a journal entry whose file is missing or differs, which the
        next run downloads again (ExportDir.complete checks size and sha256), and the directory is
        fsynced with every job.json write, so before the job is marked downloaded."""
        fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        final = self.export_dir.path / name
        os.replace(part, final)
        return final

    def _fetch(self, entry: ManifestFile, name: str, part: Path, auth: httpx.Auth | None) -> Validator:
        """One complete pass over the file into `part` (with Range resumes), validated. Every
        failed attempt (a restart, a resume, a temporary answer) is decided by one Retrier."""
        retrier = Retrier("GET", without_query(entry.url), self.policy, self.clock, DOWNLOAD_RULES, self.stop)
        while True:  # each pass starts from byte 0 with a fresh validator
            with os.fdopen(create_exclusive(part), "wb") as out:  # O_EXCL, 0600, never a link
                validator = Validator(out, entry.type, self.max_line_bytes,
                                      unpack_bundles=entry.type != "Bundle", mode=self.validate,
                                      collect_issues=entry.kind == "error", max_bytes=self.max_file_bytes,
                                      name=name)  # fmt: skip
                offset = 0
                while True:
                    try:
                        offset = self._stream(entry, name, auth, validator, offset)
                    except _Restart as restart:
                        if restart.cause is not None:
                            self._retry_or_raise(entry, name, restart.cause, retrier)
                        break
                    except _Dropped as dropped:
                        offset = dropped.received
                        self._retry_or_raise(entry, name, dropped.cause, retrier)
                        continue
                    except (httpx.TransportError, _Temporary) as exc:
                        self._retry_or_raise(entry, name, exc, retrier)
                        continue
                    validator.finish()
                    return validator  # flushed on close; fsynced by _land

    def _retry_or_raise(self, entry: ManifestFile, name: str, exc: Exception, retrier: Retrier) -> None:
        response = exc.response if isinstance(exc, _Temporary) else None
        message = (
            f"HTTP {response.status_code}" + (f": {outcome_text(response)}" if outcome_text(response) else "")
            if response is not None
            else f"{exc.__class__.__name__}: {redact(str(exc))}"
        )
        self._check_deadline(without_query(entry.url))
        delay = retrier.next_wait(response)
        self.events.emit("download_error", exportId=self.export_id, fileUrl=without_query(entry.url),
                         name=name, message=message, attempt=retrier.attempt, willRetry=delay is not None)  # fmt: skip
        if delay is None:
            raise HTTPError(
                f"download of {redact(without_query(entry.url))} failed after {self.policy.retries} retries: {message}",
                method="GET",
                url=without_query(entry.url),
                status=response.status_code if response is not None else None,
            )
        retrier.pause(delay, "export")

    def _stream(
        self, entry: ManifestFile, name: str, auth: httpx.Auth | None, validator: Validator, offset: int
    ) -> int:
        """Stream from byte `offset` on; returns the offset when the body ended."""
        headers = {"Accept": "application/fhir+ndjson", "Accept-Encoding": ACCEPT_ENCODING}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = self.client.build_request("GET", entry.url, headers=headers, extensions={STREAMED: True})
        response = self.client.send(request, auth=auth, stream=True)
        try:
            self._check_answer(response, offset)
            return self._pump(response, name, validator, offset)
        finally:
            response.close()

    def _check_answer(self, response: httpx.Response, offset: int) -> None:
        """Raise unless `response` is the body to read from `offset` on (_Restart when a Range was
        not honoured, _Temporary for a retryable answer, the error tree otherwise)."""
        status = response.status_code
        url = redact(without_query(str(response.request.url)))
        if offset and (status in (200, 416) or (
            status == 206 and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
        )):  # fmt: skip
            raise _Restart(None)  # Range not honoured: start the file again from byte 0
        if status in (200, 206):
            return
        response.read()
        if status in (401, 403):
            raise AuthError(f"download of {url} refused ({status}): {outcome_text(response) or 'no reason'}")
        if status in (404, 410):
            raise JobExpired(f"file {url} is gone ({status}): the export expired or was deleted")
        if classify(response, DOWNLOAD_RULES) == "retry":
            raise _Temporary(response)
        raise ExportError(f"download of {url} failed ({status}): {outcome_text(response) or 'no reason'}")

    def _pump(self, response: httpx.Response, name: str, validator: Validator, offset: int) -> int:
        """Feed the body to `validator`; returns the offset reached. The socket yields reads of up to
        64 KiB; they are gathered into one reused buffer and the validator gets FEED_BYTES at once, so
        its per-call work is paid per block. Reused, not joined: a fresh 256 KiB bytes object per
        block is mmap'd by malloc and costs as much in page faults as the structural check."""
        url = redact(without_query(str(response.request.url)))
        # Range offsets count encoded bytes: with a Content-Encoding we can only restart.
        encoded = response.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
        next_progress = offset + _PROGRESS_EVERY
        buf, size = bytearray(FEED_BYTES), 0
        try:
            for chunk in iter_decoded(response):
                self._check_running(url)  # per network read: a trickle cannot outlast either
                view = memoryview(chunk)
                while view:
                    take = min(len(view), FEED_BYTES - size)
                    buf[size : size + take] = view[:take]
                    size += take
                    view = view[take:]
                    if size < FEED_BYTES:
                        break
                    self._feed(validator, buf)  # borrowed: the validator copies what it keeps
                    offset, size = offset + size, 0
                    if offset >= next_progress:
                        next_progress = offset + _PROGRESS_EVERY
                        self.events.emit(
                            "download_progress", exportId=self.export_id, name=name, bytes=offset
                        )
        except httpx.TransportError as exc:
            if size:  # what did arrive is good
                self._feed(validator, bytes(buf[:size]))
                offset += size
            if encoded:
                raise _Restart(exc) from None
            raise _Dropped(offset, exc) from None
        self._check_running(None)
        if size:
            self._feed(validator, bytes(buf[:size]))
        return offset + size

    def _feed(self, validator: Validator, data: bytes | bytearray) -> None:
        fed = validator.fed
        validator.feed(data)
        self._account(validator.fed - fed)

    def _check_running(self, url: str | None) -> None:
        """Raise when the export deadline has passed (`url`: the file being read) or a stop was asked."""
        if url is not None:
            self._check_deadline(url)
        if self.stop is not None and self.stop.is_set():
            raise InterruptedRunError("export interrupted; complete files are kept and the next run resumes")


class _Restart(Exception):
    """Start the file again from byte 0 (`cause`: the failure that counts as an attempt, if any)."""

    def __init__(self, cause: Exception | None) -> None:
        super().__init__("restart")
        self.cause = cause


class _Dropped(Exception):
    """The connection dropped mid-body after `received` bytes: resume from there with Range."""

    def __init__(self, received: int, cause: Exception) -> None:
        super().__init__(f"connection lost after {received} bytes")
        self.received = received
        self.cause = cause


class _Temporary(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response
