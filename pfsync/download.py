"""Export file downloads: streamed to disk, validated as they stream, retried, resumed, landed atomically.

bulk-data.md "Download": never hold a whole file in memory; accept gzip; retry 408/429/5xx and
connection resets with backoff, resuming with `Range` when the server answers 206 (else the file
restarts); send the token only when `requiresAccessToken` and only to allowed origins. Every line
is checked as it arrives (JSON, resourceType, length) and counted against the manifest `count`.
A pretty-printed JSON resource or Bundle (practice-fusion.md: PF's docs show one served as
application/json) is converted to NDJSON, so the export directory only ever holds NDJSON.
A file whose content looks damaged (bad lines, cut short) is downloaded again a couple of times;
if the damage persists it lands as received, with every problem reported (the loader quarantines
the bad lines).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import orjson

from pfsync.bulk import Issue, JobExpired, ManifestFile, Origins, is_temporary, issues_of, wait
from pfsync.errors import AuthError, ExportError, HTTPError, InterruptedRunError
from pfsync.events import EventSink
from pfsync.exportjob import ExportDir, LandedFile, fsync_dir, without_query
from pfsync.http import Clock, RetryPolicy, outcome_text, parse_retry_after
from pfsync.redact import redact

log = logging.getLogger("pfsync.export")
_GZIP_MAGIC = b"\x1f\x8b"
_PROGRESS_EVERY = 8 * 1024 * 1024
_MAX_PROBLEMS = 50
CONTENT_RETRIES = 2  # re-downloads of a file whose content looks damaged


@dataclass
class Validator:
    """Streaming checker and normaliser of one file: bytes in, NDJSON lines out to `out`."""

    out: IO[bytes]
    expected_type: str
    max_line_bytes: int
    unpack_bundles: bool = True
    lines: int = 0
    written: int = 0
    bad_lines: int = 0
    problems: list[str] = field(default_factory=list)
    types: Counter[str] = field(default_factory=Counter)
    issues: list[Issue] = field(default_factory=list)
    collect_issues: bool = False
    truncated: bool = False
    _digest: Any = field(default_factory=hashlib.sha256)
    _buffer: bytearray = field(default_factory=bytearray)
    _line_no: int = 0
    _skipping: bool = False
    _mode: str = "sniff"  # sniff -> lines | document
    _gunzip: Any = None
    _head: bytes = b""

    @property
    def sha256(self) -> str:
        return str(self._digest.hexdigest())

    def feed(self, data: bytes) -> None:
        if self._gunzip is None and self._head is not None:
            self._head += data
            if len(self._head) < 2:
                return
            data, self._head = self._head, None  # type: ignore[assignment]
            # Gzip sniffed by magic bytes, not by name or header (a server may gzip without saying so).
            self._gunzip = zlib.decompressobj(wbits=31) if data[:2] == _GZIP_MAGIC else False
        if self._gunzip:
            try:
                data = self._gunzip.decompress(data)
            except zlib.error as exc:
                raise ExportError(f"the file is not valid gzip: {exc}") from None
        self._take(data)

    def _take(self, data: bytes) -> None:
        self._buffer += data
        if self._mode == "sniff" and not self._sniff(final=False):
            return
        if self._mode == "document":
            if len(self._buffer) > self.max_line_bytes:
                self._problem(f"document larger than {self.max_line_bytes} bytes")
                self._mode = "lines"
            else:
                return
        if self._skipping:  # the rest of an over-long line, already reported
            end = self._buffer.find(b"\n")
            if end < 0:
                self._buffer.clear()
                return
            self._skipping = False
            del self._buffer[: end + 1]
        if len(self._buffer) > self.max_line_bytes and self._buffer.find(b"\n") < 0:
            self._line_no += 1
            self.bad_lines += 1
            self._problem(f"line {self._line_no} is longer than {self.max_line_bytes} bytes; dropped")
            self._buffer.clear()
            self._skipping = True
            return
        self._lines_from_buffer(final=False)

    def _sniff(self, *, final: bool) -> bool:
        """Decide between NDJSON and one pretty-printed document from the first non-blank line."""
        start = 0
        while start < len(self._buffer) and self._buffer[start] in b" \t\r\n":
            start += 1
        if start == len(self._buffer) and not final:
            return False
        newline = self._buffer.find(b"\n", start)
        if newline < 0 and not final and len(self._buffer) <= self.max_line_bytes:
            return False
        first = bytes(self._buffer[start : newline if newline >= 0 else len(self._buffer)]).strip()
        # practice-fusion.md: a pretty-printed resource's first line is "{" alone, which is not JSON.
        self._mode = "document" if first.startswith(b"{") and not _parses(first) else "lines"
        return True

    def _lines_from_buffer(self, *, final: bool) -> None:
        cut = len(self._buffer) if final else self._buffer.rfind(b"\n") + 1
        if cut <= 0:
            return
        block = bytes(self._buffer[:cut])
        del self._buffer[:cut]
        kept: list[bytes] = []
        raws = block.split(b"\n")
        for index, raw in enumerate(raws):
            line = raw.strip()
            if not line:
                continue
            self._line_no += 1
            if len(line) > self.max_line_bytes:
                self.bad_lines += 1
                self._problem(f"line {self._line_no} is longer than {self.max_line_bytes} bytes; dropped")
                continue
            kept.append(line)
            # The last piece of a final block had no newline: if it does not parse, the file was cut.
            self._check(line, final_fragment=final and index == len(raws) - 1 and not block.endswith(b"\n"))
        self._write(kept)

    def _check(self, line: bytes, *, final_fragment: bool) -> None:
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            self.bad_lines += 1
            if final_fragment:
                self.truncated = True
                self._problem(f"line {self._line_no} is cut short (the file ends mid-line)")
            else:
                self._problem(f"line {self._line_no} is not valid JSON: {exc}")
            return
        rtype = value.get("resourceType") if isinstance(value, dict) else None
        if not isinstance(rtype, str):
            self.bad_lines += 1
            self._problem(f"line {self._line_no} is not a FHIR resource (no resourceType)")
            return
        self.types[rtype] += 1
        if self.collect_issues and len(self.issues) < 1000:
            self.issues += issues_of(value)

    def _write(self, lines: list[bytes]) -> None:
        if not lines:
            return
        data = b"\n".join(lines) + b"\n"
        self.out.write(data)
        self._digest.update(data)
        self.written += len(data)
        self.lines += len(lines)

    def _problem(self, text: str) -> None:
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(text)

    def finish(self) -> None:
        if self._head:  # fewer than two bytes in the whole body
            data, self._head = self._head, None  # type: ignore[assignment]
            self._gunzip = False
            self._take(data)
        if self._gunzip:
            try:
                tail = self._gunzip.flush()
            except zlib.error as exc:
                raise ExportError(f"the file is not valid gzip: {exc}") from None
            if not self._gunzip.eof:
                self.truncated = True
                self._problem("the gzip stream is cut short")
            self._take(tail)
        if self._mode == "sniff":
            self._sniff(final=True)
        if self._mode == "document":
            try:
                value = orjson.loads(bytes(self._buffer))
            except orjson.JSONDecodeError:
                self._mode = "lines"  # not a document after all: report it line by line
            else:
                self._buffer.clear()
                resources = [orjson.dumps(r) for r in self._resources(value)]
                for line in resources:
                    self._line_no += 1
                    self._check(line, final_fragment=False)
                self._write(resources)
                return
        if self._skipping:
            self._buffer.clear()
        if self._buffer:
            self._lines_from_buffer(final=True)

    def _resources(self, value: Any) -> Iterator[Any]:
        if (
            self.unpack_bundles
            and isinstance(value, dict)
            and value.get("resourceType") == "Bundle"
            and isinstance(value.get("entry"), list)
        ):
            for entry in value["entry"]:
                if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                    yield entry["resource"]
            return
        yield value

    def summary_problems(self, count: int | None) -> list[str]:
        """Problems plus the whole-file checks: count against the manifest, unexpected types."""
        found = list(self.problems)
        if count is not None and count != self.lines:
            found.append(f"{self.lines} lines but the manifest announced {count}")
        for rtype, n in sorted(self.types.items()):
            if rtype != self.expected_type:
                found.append(f"{n} resource(s) of type {rtype} in a {self.expected_type} file")
        return found

    def damaged(self, count: int | None) -> bool:
        """Worth downloading again: bad lines, a cut-short end, or fewer lines than announced."""
        return self.bad_lines > 0 or self.truncated or (count is not None and self.lines < count)


def _parses(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


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

    def download(self, entry: ManifestFile, name: str) -> Downloaded:
        """Download `entry` to `name` in the export directory; returns it once landed (renamed)."""
        auth = self.origins.auth_for(entry.url, self.auth) if self.requires_access_token else None
        url = without_query(entry.url)
        self.events.emit("download_request", exportId=self.export_id, fileUrl=url, name=name,
                         type=entry.type, kind=entry.kind, count=entry.count)  # fmt: skip
        started = self.clock.now()
        part = self.export_dir.part_path(name)
        try:
            for content_try in range(CONTENT_RETRIES + 1):
                validator = self._fetch(entry, name, part, auth)
                if not validator.damaged(entry.count) or content_try == CONTENT_RETRIES:
                    break
                self.events.emit("download_error", exportId=self.export_id, fileUrl=url, name=name,
                                 message="; ".join(validator.summary_problems(entry.count)[:3]),
                                 willRetry=True)  # fmt: skip
            final = self.export_dir.path / name
            os.replace(part, final)
            fsync_dir(final.parent)
        finally:
            part.unlink(missing_ok=True)
        problems = tuple(f"{name}: {p}" for p in validator.summary_problems(entry.count))
        for problem in problems:
            log.warning("%s", problem)
        landed = LandedFile(type=entry.type, path=final, sha256=validator.sha256, lines=validator.lines,
                            kind=entry.kind, bytes=validator.written, count=entry.count, url=url)  # fmt: skip
        self.events.emit("download_complete", exportId=self.export_id, fileUrl=url, name=name, type=entry.type,
                         kind=entry.kind, lines=validator.lines, bytes=validator.written,
                         seconds=round(self.clock.now() - started, 3), problems=len(problems))  # fmt: skip
        return Downloaded(landed, problems, tuple(validator.issues))

    def _fetch(self, entry: ManifestFile, name: str, part: Path, auth: httpx.Auth | None) -> Validator:
        """One complete pass over the file into `part` (with Range resumes), validated."""
        attempt = 0
        while True:  # each pass starts from byte 0 with a fresh validator
            with open(part, "wb") as out:
                validator = Validator(out, entry.type, self.max_line_bytes,
                                      unpack_bundles=entry.type != "Bundle",
                                      collect_issues=entry.kind == "error")  # fmt: skip
                offset = 0
                while True:
                    try:
                        offset = self._stream(entry, name, auth, validator, offset)
                    except _Restart as restart:
                        if restart.cause is not None:
                            attempt += 1
                            self._retry_or_raise(entry, name, restart.cause, attempt)
                        break
                    except _Dropped as dropped:
                        offset = dropped.received
                        attempt += 1
                        self._retry_or_raise(entry, name, dropped.cause, attempt)
                        continue
                    except (httpx.TransportError, _Temporary) as exc:
                        attempt += 1
                        self._retry_or_raise(entry, name, exc, attempt)
                        continue
                    validator.finish()
                    out.flush()
                    os.fsync(out.fileno())
                    return validator

    def _retry_or_raise(self, entry: ManifestFile, name: str, exc: Exception, attempt: int) -> None:
        response = exc.response if isinstance(exc, _Temporary) else None
        message = (
            f"HTTP {response.status_code}" + (f": {outcome_text(response)}" if outcome_text(response) else "")
            if response is not None
            else f"{exc.__class__.__name__}: {redact(str(exc))}"
        )
        will_retry = attempt <= self.policy.retries
        self.events.emit("download_error", exportId=self.export_id, fileUrl=without_query(entry.url),
                         name=name, message=message, attempt=attempt, willRetry=will_retry)  # fmt: skip
        if not will_retry:
            raise HTTPError(
                f"download of {redact(without_query(entry.url))} failed after {self.policy.retries} retries: {message}",
                method="GET",
                url=without_query(entry.url),
                status=response.status_code if response is not None else None,
            )
        hinted = (
            parse_retry_after(response.headers.get("Retry-After"), self.clock.now()) if response else None
        )
        delay = min(self.policy.max_wait, hinted) if hinted is not None else self.policy.backoff(attempt)
        wait(self.clock, delay, self.stop)

    def _stream(
        self, entry: ManifestFile, name: str, auth: httpx.Auth | None, validator: Validator, offset: int
    ) -> int:
        """Stream from byte `offset` on; returns the offset when the body ended."""
        headers = {"Accept": "application/fhir+ndjson"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = self.client.build_request("GET", entry.url, headers=headers)
        response = self.client.send(request, auth=auth, stream=True)
        url = redact(without_query(entry.url))
        try:
            status = response.status_code
            if offset and (status in (200, 416) or (
                status == 206 and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
            )):  # fmt: skip
                raise _Restart(None)  # Range not honoured: start the file again from byte 0
            if status not in (200, 206):
                response.read()
                if status in (401, 403):
                    raise AuthError(
                        f"download of {url} refused ({status}): {outcome_text(response) or 'no reason'}"
                    )
                if status in (404, 410):
                    raise JobExpired(f"file {url} is gone ({status}): the export expired or was deleted")
                if is_temporary(response) or status == 500:
                    raise _Temporary(response)
                raise ExportError(
                    f"download of {url} failed ({status}): {outcome_text(response) or 'no reason'}"
                )
            # Range offsets count encoded bytes: with a Content-Encoding we can only restart.
            encoded = response.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
            next_progress = offset + _PROGRESS_EVERY
            try:
                for chunk in response.iter_bytes():
                    if self.stop is not None and self.stop.is_set():
                        raise InterruptedRunError(
                            "export interrupted; complete files are kept and the next run resumes"
                        )
                    validator.feed(chunk)
                    offset += len(chunk)
                    if offset >= next_progress:
                        next_progress = offset + _PROGRESS_EVERY
                        self.events.emit(
                            "download_progress", exportId=self.export_id, name=name, bytes=offset
                        )
            except httpx.TransportError as exc:
                if encoded:
                    raise _Restart(exc) from None
                raise _Dropped(offset, exc) from None
            return offset
        finally:
            response.close()


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
